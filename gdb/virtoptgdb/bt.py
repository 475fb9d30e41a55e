"""`virtopt bt [THREAD|all]`: thread backtraces with the coroutine stacks stitched in, like QEMU's
`qemu bt` but without calling functions in QEMU or writing registers (qemu_ext.introspect.bt)."""

from __future__ import annotations

import argparse
from typing import Any

from qemu_ext.introspect import render_hang

from . import command


class BtCommand(command.VirtoptCommand):
    name = "bt"
    summary = ("Backtraces of QEMU's threads (all, or one by thread id or gdb thread number) with the stacks of "
               "the coroutines they entered from, unwound from memory (live or core).")
    epilog = ("examples:\n  virtopt bt\n  virtopt bt 12345\n  virtopt bt 1 --json\n\n"
              "A thread running a coroutine shows the coroutine's frames, then the frames of whoever\n"
              "entered it (another coroutine, or the thread's own stack), from their saved contexts.")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("thread", nargs="?", default="all", metavar="THREAD|all",
                       help="a thread id (LWP), a gdb thread number, or all (default)")
        p.add_argument("--limit", type=int, default=64, metavar="N", help="at most N frames per stack (default 64)")

    def view_args(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"thread": args.thread, "limit": args.limit}

    def render(self, d: Any, args: argparse.Namespace) -> str:
        return render_hang.bt(d)


def register() -> None:
    BtCommand()
