"""`virtopt coroutines [--bt N|ADDR]`: coroutines found in QEMU (the view in qemu_ext.introspect)
and the backtrace of a yielded one — unwound from memory, with no register written and no call
into QEMU, so it works on a live QEMU and on a core file alike.

QEMU's own `qemu bt` / `qemu coroutine` call arch_prctl() in the inferior and write the thread's
registers. Here the coroutine's saved context (its sigsetjmp buffer, demangled with glibc's pointer
guard: qemu_ext.introspect.bt.saved_registers) goes to the backend's unwinder (GdbTarget.frames:
a gdb.unwinder presents it as the caller of the newest frame, gdb unwinds by its own CFI).
"""

from __future__ import annotations

import argparse
from typing import Any

import gdb  # type: ignore[import-not-found]
from qemu_ext.introspect import bt, coroutines, render
from qemu_ext.introspect.target import IntrospectError, Target

from . import command, utils


def backtrace(t: Target, co: int, limit: int = 32) -> list[dict[str, Any]]:
    """Unwind a yielded coroutine from memory (nothing in QEMU is written): its saved context
    (bt.saved_registers) handed to the backend's unwinder (Target.frames)."""
    regs = bt.saved_registers(t, co)
    if not regs["rsp"] or not regs["rip"]:
        raise IntrospectError(f"coroutine {co:#x} has no saved context")
    tid = gdb.selected_thread().ptid[1]
    frames = t.frames(tid, regs, limit)
    if frames is None:
        raise IntrospectError("this reader cannot unwind a stack")
    return [{"level": i, **f} for i, f in enumerate(frames)]


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
    summary = ("Coroutines that can be found (running, tracked block requests, scheduled, parked in a queue "
               "or lock and what each waits on, pools) and a backtrace of one, without calling functions in "
               "QEMU (live or core).")
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

