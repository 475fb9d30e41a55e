"""`bt [THREAD|all]`: each thread's backtrace with its coroutine stacks stitched in, as QEMU's
`qemu bt` (scripts/qemugdb/coroutine.py, 7.2 and 10.0) shows them, without calling functions in
QEMU or writing registers.

A thread that runs a coroutine runs it on the coroutine's own stack: its backtrace ends at
coroutine_trampoline. The rest of the story is in the chain of callers (Coroutine.caller): each
caller is suspended in qemu_coroutine_switch with its registers in its sigjmp_buf
(CoroutineUContext.env, util/coroutine-ucontext.c), the last one being the thread's "leader"
(co_tls_leader), whose saved context is the thread's original stack. The registers are demangled
with glibc's pointer guard (PTR_MANGLE: rotate left 0x11 after xor with the guard at fs:0x30) and
unwound by the reader's unwinder (Target.frames).

Needs the threads' registers: gdb (live, it pauses QEMU) and cores. A reader that never stops QEMU
cannot see a running thread's registers, and says so.
"""

from __future__ import annotations

from typing import Any, Optional

from . import common
from .target import CachedType, IntrospectError, NotAvailable, Target

COROUTINE = CachedType("Coroutine")
COROUTINE_UCONTEXT = CachedType("CoroutineUContext")
POINTER_GUARD_OFFSET = 0x30  # glibc x86-64 tcbhead_t.pointer_guard
JB_RBX, JB_RBP, JB_R12, JB_R13, JB_R14, JB_R15, JB_RSP, JB_PC = range(8)  # glibc x86-64 __jmp_buf
U64 = (1 << 64) - 1
MAX_CHAIN = 64


def _needs_unwinding(t: Target, view: str) -> Optional[str]:
    if t.can_read_registers:
        return None
    return (f"virtopt {view} needs the threads' registers, which a reader that never stops QEMU cannot see: "
            "use virtopt gdb PID -c 'bt all' (it pauses QEMU while it unwinds), or a core file")


common.register("bt", "Backtraces of QEMU's threads with their coroutine stacks stitched in (qemu bt, without "
                "calling into QEMU)", [_needs_unwinding])


def demangle(v: int, guard: int) -> int:
    """glibc's PTR_DEMANGLE on x86-64: rotate right by 0x11, then xor the guard."""
    v &= U64
    return (((v >> 0x11) | (v << (64 - 0x11))) & U64) ^ guard


def pointer_guard(t: Target) -> int:
    if "pointer-guard" not in t.memo:
        guard = None
        for th in t.threads():
            fs = t.register(th.tid, "fs_base")
            if fs:
                guard = t.read_u64(fs + POINTER_GUARD_OFFSET)
                break
        if guard is None:
            raise NotAvailable("cannot read any thread's $fs_base (needed for glibc's pointer guard)")
        t.memo["pointer-guard"] = guard
    return t.memo["pointer-guard"]


def saved_registers(t: Target, co: int) -> dict[str, int]:
    """The registers a yielded coroutine (or a thread's leader) resumes with, from its sigjmp_buf."""
    uc = t.value(co, COROUTINE_UCONTEXT.get(t))  # CoroutineUContext starts with its Coroutine
    jb = uc["env"].index(0)["__jmpbuf"]
    v = [int(jb.index(i)) & U64 for i in range(8)]
    g = pointer_guard(t)
    return {"rbx": v[JB_RBX], "rbp": demangle(v[JB_RBP], g), "r12": v[JB_R12], "r13": v[JB_R13],
            "r14": v[JB_R14], "r15": v[JB_R15], "rsp": demangle(v[JB_RSP], g), "rip": demangle(v[JB_PC], g)}


def _entry(t: Target, co: int) -> Optional[str]:
    e = t.value(co, COROUTINE.get(t))["entry"].ptr()
    return t.symbolize(e) or (f"{e:#x}" if e else None)


def thread_stack(t: Target, tid: int, limit: int = 64) -> dict[str, Any]:
    """One thread: its own frames, then (when it runs a coroutine) each caller's saved stack."""
    frames = t.frames(tid, limit=limit)
    if frames is None:
        raise NotAvailable("this reader cannot unwind stacks: use gdb (virtopt gdb PID -c 'bt all', or gdb QEMU CORE)")
    segments: list[dict[str, Any]] = []
    cur_addr = t.tls_address(tid, "co_tls_current") if t.has_debug_info() else None
    leader = t.tls_address(tid, "co_tls_leader") if t.has_debug_info() else None
    current = t.read_u64(cur_addr) if cur_addr else 0
    in_coroutine = bool(current) and current != leader
    segments.append({"kind": "coroutine" if in_coroutine else "thread", "coroutine": current if in_coroutine else None,
                     "entry": _entry(t, current) if in_coroutine else None, "frames": frames})
    notes: list[str] = []
    co = current if in_coroutine else 0
    for _ in range(MAX_CHAIN):
        if not co:
            break
        caller = t.value(co, COROUTINE.get(t))["caller"].ptr()
        if not caller:
            break
        is_leader = caller == leader
        try:
            regs = saved_registers(t, caller)
            fr = t.frames(tid, regs, limit=limit) or []
        except (IntrospectError, NotAvailable) as exc:
            notes.append(f"caller {caller:#x} not unwound: {exc}")
            fr = []
        segments.append({"kind": "thread" if is_leader else "coroutine", "coroutine": None if is_leader else caller,
                         "entry": None if is_leader else _entry(t, caller), "frames": fr})
        co = caller
    return {"segments": segments, "notes": notes}


def _select(t: Target, which: Optional[str]) -> list[Any]:
    ths = t.threads()
    if which in (None, "", "all"):
        return ths
    try:
        n = int(which, 0)
    except ValueError:
        raise IntrospectError(f"bt takes a thread id, a thread number or 'all', not {which!r}") from None
    for th in ths:
        if th.tid == n:
            return [th]
    for th in ths:
        if th.num == n:
            return [th]
    raise IntrospectError(f"no thread {which} in this QEMU (threads: {', '.join(str(th.tid) for th in ths)})")


def collect(t: Target, thread: Optional[str] = None, limit: int = 64) -> dict[str, Any]:
    from . import threads as threads_view

    labels: dict[int, Any] = {}
    try:
        labels = {r["tid"]: r for r in threads_view.collect(t)["threads"]}
    except IntrospectError:
        pass
    out = []
    for th in _select(t, thread):
        st = thread_stack(t, th.tid, limit)
        row = labels.get(th.tid, {})
        out.append({"tid": th.tid, "num": th.num, "name": th.name if th.name is not None else row.get("name"),
                    "label": row.get("label"), **st})
    return {"threads": out}
