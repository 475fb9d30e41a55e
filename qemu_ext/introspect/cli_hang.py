"""The hang-analysis views (block, waiters, locks, cpustate, bt) for `virtopt inspect`: their
arguments, the view arguments they give, and their text — so the inspect front door hooks them
with three calls (add_parsers, view_args, render) and stays one place.

Front-door code (it formats through render_hang; the views only collect).
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

from . import render_hang

NAMES = ("block", "waiters", "locks", "cpustate", "bt")


def add_parsers(view: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """Add the views' sub-parsers with inspect's own ``view(name, help)`` (which adds --json)."""
    b = view("block", "the block graph, backends, throttle groups and queued requests")
    b.add_argument("node", nargs="?", metavar="NODE", help="only this node (node name or -drive id)")
    view("waiters", "coroutines parked in CoQueues, CoMutexes, throttle queues and blkdebug breaks")
    view("locks", "BQL holder and waiters, AioContext locks, what each thread is blocked on")
    c = view("cpustate", "guest vCPU state from CPUArchState")
    c.add_argument("cpu", nargs="?", type=int, metavar="CPU", help="only this vCPU (cpu index)")
    t = view("bt", "thread backtraces with coroutine stacks (needs registers: gdb, or a core)")
    t.add_argument("thread", nargs="?", default="all", metavar="TID|all", help="a thread id, or all (default)")


def view_args(name: str, va: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of views.run for the parsed view arguments."""
    if name == "block":
        return {"node": va.node}
    if name == "cpustate":
        return {"cpu": va.cpu}
    if name == "bt":
        return {"thread": va.thread}
    return {}


def render(name: str, data: dict[str, Any]) -> str:
    return {"block": render_hang.block, "waiters": render_hang.waiters, "locks": render_hang.locks,
            "cpustate": render_hang.cpustate, "bt": render_hang.bt}[name](data)
