"""Run virtopt's gdb commands against a QEMU pid (or a core) and get their data back.

    from qemu_ext.gdbmi import query, run
    threads = query(pid, "threads")          # the dict `virtopt threads --json` prints
    res = run(["virtopt info --json", "threads --json"], pid=pid)   # res.results, res.paused_seconds

The gdb side lives in gdb/virtopt-gdb.py (source it in any gdb); this package also holds the
pure-Python pieces both sides share (ELF symbols and notes, core files, KVM exit reasons). Its
modules load lazily: the pack imports elfsyms and kvm inside gdb's own Python.
"""

from __future__ import annotations

from typing import Any

__all__ = ["GdbResult", "GdbRun", "GdbSession", "Interrupted", "pack_path", "query", "run", "run_commands"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from qemu_ext.gdbmi import driver

        return getattr(driver, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
