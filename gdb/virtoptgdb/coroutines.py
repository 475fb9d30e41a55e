"""`virtopt coroutines [--bt N|ADDR]`: coroutines found in QEMU (the view in qemu_ext.introspect)
and the backtrace of a yielded one — unwound from memory, with no register written and no call
into QEMU, so it works on a live QEMU and on a core file alike.

QEMU's own `qemu bt` / `qemu coroutine` call arch_prctl() in the inferior and write the thread's
registers. Here an unwinder (gdb.unwinder) presents the coroutine's saved context (its sigsetjmp
buffer, CoroutineUContext.env, demangled with glibc's pointer guard read from fs:0x30) as the
caller of the selected thread's newest frame; gdb then unwinds the coroutine's stack by its own
DWARF CFI.
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

from gdb.unwinder import Unwinder, register_unwinder  # type: ignore[import-not-found]

import gdb  # type: ignore[import-not-found]
from qemu_ext.introspect import coroutines, render
from qemu_ext.introspect.target import CachedType, IntrospectError, Target

from . import command, utils

COROUTINE_UCONTEXT = CachedType("CoroutineUContext")
POINTER_GUARD_OFFSET = 0x30  # glibc x86-64 tcbhead_t.pointer_guard
JB_RBX, JB_RBP, JB_R12, JB_R13, JB_R14, JB_R15, JB_RSP, JB_PC = range(8)  # glibc x86-64 __jmp_buf
OUTERMOST = ("__start_context", "start_thread", "clone3", "__clone3")
U64 = (1 << 64) - 1


def _demangle(v: int, guard: int) -> int:
    """glibc's PTR_DEMANGLE on x86-64: rotate right by 0x11, xor the guard."""
    v &= U64
    return (((v >> 0x11) | (v << (64 - 0x11))) & U64) ^ guard


def jmpbuf_regs(t: Target, co: int) -> dict[str, int]:
    """The registers a yielded coroutine resumes with (CoroutineUContext.env), demangled."""
    uc = t.value(co, COROUTINE_UCONTEXT.get(t))
    jb = uc["env"].index(0)["__jmpbuf"]
    vals = [int(jb.index(i)) & U64 for i in range(8)]
    tid = gdb.selected_thread().ptid[1]
    fs_base = t.register(tid, "fs_base")
    if not fs_base:
        raise IntrospectError("cannot read $fs_base of the selected thread (needed for glibc's pointer guard)")
    guard = t.read_u64(fs_base + POINTER_GUARD_OFFSET)
    return {
        "rbx": vals[JB_RBX], "rbp": _demangle(vals[JB_RBP], guard), "r12": vals[JB_R12], "r13": vals[JB_R13],
        "r14": vals[JB_R14], "r15": vals[JB_R15], "rsp": _demangle(vals[JB_RSP], guard),
        "rip": _demangle(vals[JB_PC], guard),
    }


class _FrameId:
    def __init__(self, sp: Any, pc: Any) -> None:
        self.sp, self.pc = sp, pc


class CoroutineUnwinder(Unwinder):
    """While ``regs`` is set: the selected thread's newest frame has the coroutine as its caller."""

    def __init__(self) -> None:
        super().__init__("virtopt-coroutine")
        self.regs: Optional[dict[str, int]] = None

    def __call__(self, pending: Any) -> Any:
        if self.regs is None or pending.level() != 0:
            return None
        ulong = gdb.lookup_type("unsigned long")
        # frame 0's id sits just below the coroutine's stack: gdb stops a backtrace whose caller is
        # "inner" to its callee, and the coroutine stack is elsewhere than the thread's
        info = pending.create_unwind_info(_FrameId(gdb.Value(self.regs["rsp"] - 16).cast(ulong),
                                                   pending.read_register("rip")))
        for reg, val in self.regs.items():
            info.add_saved_register(reg, gdb.Value(val).cast(ulong))
        return info


UNWINDER: list[CoroutineUnwinder] = []


def _unwinder() -> CoroutineUnwinder:
    if not UNWINDER:
        u = CoroutineUnwinder()
        register_unwinder(None, u, replace=True)
        UNWINDER.append(u)
    return UNWINDER[0]


def backtrace(t: Target, co: int, limit: int = 32) -> list[dict[str, Any]]:
    """Unwind a yielded coroutine from memory (nothing in QEMU is written)."""
    regs = jmpbuf_regs(t, co)
    if not regs["rsp"] or not regs["rip"]:
        raise IntrospectError(f"coroutine {co:#x} has no saved context")
    u = _unwinder()
    frames: list[dict[str, Any]] = []
    u.regs = regs
    gdb.invalidate_cached_frames()
    try:
        f: Optional[gdb.Frame] = gdb.newest_frame().older()  # frame 1: the coroutine's context
        while f is not None and len(frames) < limit and f.pc():
            fr = utils.frame_info(f)
            fr = {"level": len(frames), **fr}
            frames.append(fr)
            if fr["function"] in OUTERMOST:
                break
            try:
                f = f.older()
            except gdb.error:
                break
    finally:
        u.regs = None
        gdb.invalidate_cached_frames()
    return frames


def _is_coroutine(t: Target, addr: int) -> bool:
    """Does addr hold a Coroutine (its entry is a function of this QEMU)?"""
    try:
        c = t.value(addr, coroutines.COROUTINE.get(t))
        entry = c["entry"].ptr()
    except IntrospectError:
        return False
    return bool(entry) and t.symbolize(entry) is not None


class CoroutinesCommand(command.VirtoptCommand):
    name = "coroutines"
    summary = ("Coroutines that can be found (running, tracked block requests, scheduled, pools) and a "
               "backtrace of one, without calling functions in QEMU (live or core).")
    epilog = ("examples:\n  virtopt coroutines\n  virtopt coroutines --bt 0   (backtrace of the first listed)\n"
              "  virtopt coroutines --bt 0x55d0c0a3f1f0 --json")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--bt", metavar="N|ADDR", help="backtrace of coroutine number N in the list, or at ADDR")
        p.add_argument("--pools", action="store_true", help="also list free coroutines in the pools")

    def view_args(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"pools": args.pools or args.bt is not None}

    def collect(self, args: argparse.Namespace) -> Any:
        data = super().collect(args)
        if args.bt is None:
            return data
        t = utils.target()
        cos = data["coroutines"]
        text = args.bt.strip()
        try:
            n = int(text, 0)
        except ValueError as exc:
            raise IntrospectError(f"--bt takes a list index or an address, not {text!r}") from exc
        if 0 <= n < len(cos) and not text.lower().startswith("0x"):
            co = cos[n]
        else:
            co = next((c for c in cos if c["address"] == n), None)
            if co is None:
                if not _is_coroutine(t, n):
                    raise IntrospectError(f"{text} is not a coroutine: neither a list index (0-{len(cos) - 1}) "
                                          "nor the address of a Coroutine" if cos else
                                          f"{text} is not the address of a Coroutine")
                co = coroutines.describe(t, n, "given")
        if co["source"] == "running":
            raise IntrospectError(
                f"coroutine {co['address']:#x} is running: its stack is its thread's (thread {co['thread']}: bt)")
        data["backtrace"] = {"coroutine": co["address"], "frames": backtrace(t, co["address"])}
        return data

    def render(self, d: Any, args: argparse.Namespace) -> str:
        return render.coroutines(d, args.pools)


def register() -> None:
    CoroutinesCommand()

