"""What every view shares: is this QEMU, which accelerator, what a view needs, and the registry of
views (the gdb pack's commands and `virtopt inspect` both list them from here).

A requirement is a function ``(target, view name) -> None | reason``; the reasons are the one
wording both front doors print.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Optional

from .target import IntrospectError, MemoryReadError, NotAvailable, Target, TornRead

Requirement = Callable[[Target, str], Optional[str]]


def is_qemu(t: Target) -> bool:
    if "is-qemu" not in t.memo:
        try:
            t.memo["is-qemu"] = t.elf_symbol("main_loop_tlg") is not None or t.elf_symbol("qemu_main_loop") is not None
        except IntrospectError:
            t.memo["is-qemu"] = False
    return t.memo["is-qemu"]


def check_qemu(t: Target, view: str) -> None:
    if "mismatch" not in t.memo:
        t.memo["mismatch"] = t.executable_mismatch()
    if t.memo["mismatch"]:
        raise IntrospectError(f"virtopt {view}: {t.memo['mismatch']}")
    if is_qemu(t):
        return
    exe = "?"
    try:
        exe = os.path.realpath(t.exe())
    except IntrospectError:
        pass
    name = None
    if t.pid is not None and t.kind == "live":
        from .target import proc_comm

        name = proc_comm(t.pid, t.pid)
    # CONTRIBUTING's wording (qemu_ext.errors.not_qemu), exit code 1
    raise IntrospectError(f"virtopt {view}: process {t.pid} is not QEMU ({name or os.path.basename(exe)}, {exe})")


PF_USER_WORKER, PF_KTHREAD = 0x4000, 0x200000  # include/linux/sched.h


def kernel_worker(t: Target, tid: int) -> bool:
    """A thread of QEMU's thread group that never runs QEMU's code: KVM's workers
    (kvm-nx-lpage-recovery, a user worker since Linux 6.4), so it has no TLS and no user registers.
    Live: by the kernel's flags for the task; a core (dead: no flags): False."""
    if t.kind != "live" or t.pid is None:
        return False
    from qemu_ext.host import procfs

    try:
        return bool(int(procfs.task_stat(t.pid, tid)[8]) & (PF_USER_WORKER | PF_KTHREAD))
    except (OSError, ValueError, IndexError):
        return False


def kvm_enabled(t: Target) -> Optional[bool]:
    a = t.symbol_address("kvm_allowed")
    return None if a is None else bool(t.read_u8(a))


def tcg_enabled(t: Target) -> Optional[bool]:
    a = t.symbol_address("tcg_allowed")
    return None if a is None else bool(t.read_u8(a))


def accelerator(t: Target) -> str:
    return "kvm" if kvm_enabled(t) else "tcg" if tcg_enabled(t) else "unknown"


def exe_name(t: Target) -> str:
    try:
        return os.path.basename(os.path.realpath(t.exe()))
    except IntrospectError:
        return "this process"


# ---------------------------------------------------------------- requirements


def needs_debug_info(t: Target, view: str) -> Optional[str]:
    if t.has_debug_info():
        return None
    return (f"virtopt {view} needs QEMU's debug info (DWARF) and {exe_name(t)} has none: "
            "use a QEMU built with --enable-debug-info or install its debug symbols")


def needs_symbols(*names: str) -> Requirement:
    def check(t: Target, view: str) -> Optional[str]:
        missing = [n for n in names if t.symbol_address(n) is None]
        if missing:
            return f"virtopt {view} needs the symbol(s) {', '.join(missing)}, which this QEMU does not have"
        return None

    return check


def needs_write(gdb_command: str) -> Requirement:
    def check(t: Target, view: str) -> Optional[str]:
        if t.can_write:
            return None
        if t.kind == "core":
            return f"virtopt {view} changes a running QEMU and this is a core file: nothing to change"
        return (f"virtopt {view} writes QEMU's memory, which this reader never does (it never stops QEMU): "
                f"use virtopt gdb PID -c '{gdb_command}' (it pauses QEMU while it writes)")

    return check


def needs_live(t: Target, view: str) -> Optional[str]:
    if t.kind == "live":
        return None
    return f"virtopt {view} needs a running QEMU, and this is a core file"


# ---------------------------------------------------------------- the registry


@dataclasses.dataclass
class View:
    name: str  # as typed after `virtopt ` ("mtree lookup", "trace list")
    summary: str
    requires: list[Requirement]
    writes: bool = False


VIEWS: dict[str, View] = {}


def register(name: str, summary: str, requires: list[Requirement], writes: bool = False) -> View:
    v = View(name, summary, requires, writes)
    VIEWS[name] = v
    return v


def availability(t: Target, name: str) -> Optional[str]:
    """None when the view works on this target, else the one-line reason."""
    try:
        check(t, name)
    except (NotAvailable, IntrospectError) as exc:
        return str(exc)
    return None


def check(t: Target, name: str) -> None:
    check_qemu(t, name)
    for req in VIEWS[name].requires:
        msg = req(t, name)
        if msg:
            raise NotAvailable(msg)


# ---------------------------------------------------------------- running a view


RETRIES = 5


def collect(t: Target, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """Run a view's collect function on a fresh snapshot. On a live target that keeps running
    (drgn), a torn read (a list that loops, a pointer freed under us) is retried; on a stopped or
    dead one it is an error at once."""
    attempts = RETRIES if not t.stops_process and t.kind == "live" else 1
    for i in range(attempts):
        t.begin_snapshot()
        try:
            return fn(t, *args, **kw)
        except (TornRead, MemoryReadError):
            if i == attempts - 1:
                raise
            time.sleep(0.001 * (i + 1))
    raise AssertionError("unreachable")


def snapshot_info(t: Target, started: float, ended: float) -> dict[str, Any]:
    """The `snapshot` key of every view's JSON: who read, how, when, how long."""
    return {
        "backend": t.backend,
        "target": t.kind,
        "process-stopped": bool(t.stops_process and t.kind == "live"),
        "time": round(t.snapshot_time, 6),
        "read-seconds": round(ended - started, 6),
    }
