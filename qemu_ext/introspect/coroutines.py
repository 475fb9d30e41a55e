"""`coroutines`: the coroutines that can be found in QEMU, without calling into it.

Found through what QEMU keeps pointers to: each thread's current coroutine (the __thread
co_tls_current of util/coroutine-ucontext.c) and its callers, the block layer's tracked
requests, the AioContexts' scheduled coroutines, the coroutines parked in CoQueues, CoMutexes,
throttle queues and blkdebug breaks (waiters.parked: a throttled write waits in its group's
CoQueue before the block layer tracks it), and the free pools: 7.2's per-thread alloc_pool
and global release_pool (util/qemu-coroutine.c), 10.0's per-thread local_pool and global_pool of
CoroutinePoolBatches. Thread-local variables need each thread's $fs_base: a reader that cannot
see registers (drgn on a live QEMU) says so in the snapshot's limits.

Each coroutine has a ``source`` (where it was found first) and ``waits-on`` (what it is parked
on, in waiters.source_label's words, or None).
"""

from __future__ import annotations

from typing import Any, Optional

from . import block, common, waiters
from .target import CachedType, IntrospectError, NotAvailable, Target, Value, qlist

COROUTINE = CachedType("Coroutine")
COROUTINE_POOL = CachedType("CoroutinePool")  # 10.0: a QSLIST of CoroutinePoolBatch
COROUTINE_QSLIST = CachedType("CoroutineQSList")  # 7.2: a QSLIST of Coroutine

MAX_POOL = 10000

common.register("coroutines", "Coroutines in flight (running, tracked block requests, scheduled, parked and what "
                "each waits on) and the pools",
                [common.needs_debug_info])


def describe(t: Target, co: int, source: str, thread: Optional[int] = None) -> dict[str, Any]:
    c = t.value(co, COROUTINE.get(t))
    entry = c["entry"].ptr()
    sched = c["scheduled"]
    return {
        "address": co,
        "source": source,
        "thread": thread,
        "entry": t.symbolize(entry) or (f"{entry:#x}" if entry else None),
        "entry-arg": c["entry_arg"].ptr(),
        "caller": c["caller"].ptr() or None,
        "locks-held": int(c["locks_held"]),
        "ctx": c["ctx"].ptr() or None,
        "scheduled-by": sched.cstring() if sched.ptr() else None,
        "waits-on": None,
    }


def _pool_members(t: Target, head: Value, batched: bool) -> list[int]:
    """Coroutines of a pool head: a QSLIST of Coroutine (7.2) or of CoroutinePoolBatch (10.0)."""
    out: list[int] = []
    if batched:
        for b in qlist(head, "next", limit=MAX_POOL):
            out += [c.ptr() for c in qlist(b.deref()["list"], "pool_next", limit=MAX_POOL)]
    else:
        out = [c.ptr() for c in qlist(head, "pool_next", limit=MAX_POOL)]
    return out[:MAX_POOL]


def find(t: Target) -> dict[str, Any]:
    found: dict[int, dict[str, Any]] = {}
    notes: list[str] = []

    def add(co: int, source: str, thread: Optional[int] = None) -> None:
        if co and co not in found:
            found[co] = describe(t, co, source, thread)

    batched = t.find_type("CoroutinePoolBatch") is not None  # 10.0 (qemu-coroutine.c, since 8.0)
    pool_var = "co_tls_local_pool" if batched else "co_tls_alloc_pool"
    leaders: set[int] = set()
    tls_ok = True
    for th in t.threads():
        leader = t.tls_address(th.tid, "co_tls_leader")
        if leader is None:
            if common.kernel_worker(t, th.tid):
                continue  # KVM's worker runs no QEMU code: no TLS, no coroutine
            tls_ok = False
            break
        leaders.add(leader)  # CoroutineUContext starts with its Coroutine
    if tls_ok:
        for th in t.threads():
            tid = th.tid
            cur = t.tls_address(tid, "co_tls_current")
            if cur is not None:
                c = t.read_u64(cur)
                chain = 0
                while c and chain < 64:
                    if c not in leaders:
                        add(c, "running" if chain == 0 else "caller-of-running", tid)
                    c = t.value(c, COROUTINE.get(t))["caller"].ptr()
                    chain += 1
            pool = t.tls_address(tid, pool_var)
            if pool is not None:
                head = t.value(pool, (COROUTINE_POOL if batched else COROUTINE_QSLIST).get(t))
                for co in _pool_members(t, head, batched):
                    add(co, "alloc-pool", tid)
    else:
        t.memo.setdefault("limits", []).append(
            "running coroutines and the per-thread pools need each thread's registers ($fs_base), which this "
            "reader does not see: virtopt gdb PID -c coroutines lists them (it pauses QEMU)")
    for co in list(found):
        if co in leaders:
            del found[co]
    try:
        for bsp in block.bdrv_states(t):
            bs = bsp.deref()
            for req in qlist(bs["tracked_requests"], "list"):
                add(req.deref()["co"].ptr(), f"tracked-request:{bs['node_name'].cstring()}")
    except (IntrospectError, NotAvailable) as exc:
        notes.append(f"block layer not readable: {exc}")
    for ctx_name in ("qemu_aio_context", "iohandler_ctx"):
        try:
            ctx = t.var(ctx_name)
            if not ctx.is_null():
                for co in qlist(ctx.deref()["scheduled_coroutines"], "co_scheduled_next"):
                    add(co.ptr(), f"scheduled:{ctx_name}")
        except (IntrospectError, NotAvailable) as exc:
            notes.append(f"{ctx_name} not readable: {exc}")
    try:
        for co, label in waiters.parked_coroutines(t):
            add(co, label)
            if found.get(co) is not None and found[co]["waits-on"] is None:
                found[co]["waits-on"] = label
    except (IntrospectError, NotAvailable) as exc:
        notes.append(f"parked coroutines not readable: {exc}")
    pool_name = "global_pool" if batched else "release_pool"
    try:
        for co in _pool_members(t, t.var(pool_name), batched):
            add(co, "release-pool")
    except (IntrospectError, NotAvailable) as exc:
        notes.append(f"{pool_name} not readable: {exc}")
    order = {"running": 0, "caller-of-running": 1}
    cos = sorted(found.values(), key=lambda c: (order.get(c["source"], 2 if not c["source"].endswith("pool") else 3),
                                                c["address"]))
    return {"coroutines": cos, "notes": notes}


def collect(t: Target, pools: bool = False) -> dict[str, Any]:
    data = find(t)
    cos = data["coroutines"]
    data["pooled"] = sum(1 for c in cos if c["source"].endswith("pool"))
    if not pools:
        data["coroutines"] = [c for c in cos if not c["source"].endswith("pool")]
    return data
