"""Run virtopt's gdb commands against a QEMU pid and get their data back (pygdbmi).

    from qemu_ext.gdbmi import query
    threads = query(pid, "threads")          # the dict `virtopt threads --json` prints
    results = run_commands(pid, ["virtopt info --json", "virtopt trace enable qcow2_cache_get"])

The gdb side lives in gdb/virtopt-gdb.py (source it in any gdb); this package also holds
the pure-Python pieces both sides share (ELF symbol reading, KVM exit reasons).
"""

from __future__ import annotations

from qemu_ext.gdbmi.driver import GdbResult, GdbSession, pack_path, query, run_commands

__all__ = ["GdbResult", "GdbSession", "pack_path", "query", "run_commands"]
