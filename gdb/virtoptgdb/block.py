"""`virtopt block [NODE]` and `virtopt waiters`: the block graph and the coroutines parked in it
(the views in qemu_ext.introspect.blockgraph and qemu_ext.introspect.waiters)."""

from __future__ import annotations

import argparse
from typing import Any

from qemu_ext.introspect import render_hang

from . import command


class BlockCommand(command.VirtoptCommand):
    name = "block"
    summary = ("Block graph: every node (driver, file, children, AioContext, in-flight, quiesce counter, tracked "
               "requests), each BlockBackend and its device, throttle groups and the requests queued in them.")
    epilog = ("examples:\n  virtopt block\n  virtopt block drive0\n  virtopt block --json\n\n"
              "Compare with QMP query-named-block-nodes, query-block and x-debug-query-block-graph;\n"
              "this reads memory only, so it also works on a hung QEMU and on a core file.")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("node", nargs="?", metavar="NODE", help="only this node (node name or -drive id)")

    def view_args(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"node": args.node}

    def render(self, d: Any, args: argparse.Namespace) -> str:
        return render_hang.block(d)


class WaitersCommand(command.VirtoptCommand):
    name = "waiters"
    summary = ("Coroutines parked in CoQueues, CoMutexes, throttle queues and blkdebug breaks, what each waits on, "
               "and the CoMutexes held.")
    epilog = ("examples:\n  virtopt waiters\n  virtopt waiters --json\n\n"
              "A throttled request waits in its throttle group's queue before the block layer tracks it:\n"
              "`virtopt coroutines` cannot see it, this can.")

    def render(self, d: Any, args: argparse.Namespace) -> str:
        return render_hang.waiters(d)


def register() -> None:
    BlockCommand()
    WaitersCommand()
