"""One entry point per view for every front door (the gdb commands, `virtopt inspect`).

``run(target, name, **args)`` checks the view's requirements, collects on a fresh snapshot
(retried on a live QEMU that keeps running), and adds the ``snapshot`` key: who read, whether
QEMU was stopped, when, how long, and what this reader could not see.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from . import (  # blockgraph, bt, cpustate, locks, waiters: the hang-analysis views
    blockgraph,
    bt,
    common,
    coroutines,
    cpustate,
    info,
    locks,
    mtree,
    qcow2,
    threads,
    timers,
    trace,
    vcpus,
    waiters,
)
from .target import Target

COLLECT: dict[str, Callable[..., Any]] = {
    "info": info.collect,
    "threads": threads.collect,
    "vcpus": vcpus.collect,
    "mtree": mtree.collect,
    "mtree lookup": lambda t, addr, address_space="memory": mtree.lookup(t, mtree.parse_addr(addr), address_space),
    "timers": timers.collect,
    "trace list": trace.collect_list,
    "trace enable": lambda t, patterns: trace.set_state(t, patterns, True),
    "trace disable": lambda t, patterns: trace.set_state(t, patterns, False),
    "qcow2": qcow2.collect,
    "coroutines": coroutines.collect,
    "block": blockgraph.collect,
    "waiters": waiters.collect,
    "locks": locks.collect,
    "bt": bt.collect,
    "cpustate": cpustate.collect,
}

NAMES = list(COLLECT)


def run(t: Target, name: str, **kw: Any) -> dict[str, Any]:
    common.check(t, name)
    t.memo.pop("limits", None)
    started = time.monotonic()
    data = common.collect(t, COLLECT[name], **kw)
    snap = common.snapshot_info(t, started, time.monotonic())
    snap["limits"] = t.memo.pop("limits", [])
    data["snapshot"] = snap
    return data
