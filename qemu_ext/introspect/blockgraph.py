"""`block`: the block graph as QEMU holds it, for "why is this I/O stuck" (7.2 and 10.0).

Every BlockDriverState (all_bdrv_states, block.c) with its node name, driver, file name, children
(bs->children: BdrvChild name -> node, the edges of x-debug-query-block-graph), AioContext (the main
loop's qemu_aio_context or which IOThread's), in_flight, quiesce_counter and tracked requests
(bs->tracked_requests, block/io.c tracked_request_begin); every BlockBackend (block_backends,
block/block-backend.c) with its device (query-block's qdev: blk_get_attached_dev_id), in_flight,
quiesce_counter and throttle group; every throttle group with the requests queued in it; and the
coroutines parked on the way (waiters.parked). Memory reads only: live or core.
"""

from __future__ import annotations

from typing import Any, Optional

from . import block, common, qom, waiters
from .target import IntrospectError, Target, Value, qlist

common.register("block", "Block graph: nodes, children, AioContext, in-flight and tracked requests, BlockBackends "
                "and their devices, throttle groups and queued requests", [common.needs_debug_info])


def aio_contexts(t: Target) -> dict[int, dict[str, Any]]:
    """AioContext address -> {name, iothread, thread-id}: the main loop's two (util/main-loop.c
    qemu_aio_context and iohandler_ctx) and each IOThread's (iothread->ctx)."""
    memo = t.memo.get("aio-contexts")
    if memo is not None:
        return memo
    out: dict[int, dict[str, Any]] = {}
    for var, name in (("qemu_aio_context", "main-loop"), ("iohandler_ctx", "main-loop-iohandler")):
        v = t.find_var(var)
        if v is not None and not v.is_null():
            out[v.ptr()] = {"address": v.ptr(), "name": name, "iothread": None, "thread-id": t.pid}
    try:
        ios = qom.iothreads(t)
    except IntrospectError as exc:
        t.memo.setdefault("limits", []).append(f"IOThreads not readable: {exc}")
        ios = []
    for io in ios:
        if io["aio-context"]:
            out[io["aio-context"]] = {"address": io["aio-context"], "name": f"iothread {io['id']}",
                                      "iothread": io["id"], "thread-id": io["thread-id"]}
    t.memo["aio-contexts"] = out
    return out


def context_ref(t: Target, addr: int) -> Optional[dict[str, Any]]:
    if not addr:
        return None
    known = aio_contexts(t).get(addr)
    return dict(known) if known else {"address": addr, "name": "unknown", "iothread": None, "thread-id": None}


def _node(t: Target, bsp: Value, backend_of: dict[int, str]) -> dict[str, Any]:
    bs = bsp.deref()
    children = []
    for ch in qlist(bs["children"], "next"):
        c = ch.deref()
        child_bs = c["bs"].ptr()
        children.append({"name": c["name"].cstring(),
                          "node-name": t.value(child_bs, "BlockDriverState")["node_name"].cstring() if child_bs
                          else None,
                          "perm": int(c["perm"]), "shared-perm": int(c["shared_perm"])})
    reqs = [waiters.tracked_request(r.deref()) for r in qlist(bs["tracked_requests"], "list")]
    return {
        "node-name": bs["node_name"].cstring(),
        "driver": block.format_name(bs),
        "filename": bs["filename"].cstring(4096),
        "address": bsp.ptr(),
        "aio-context": context_ref(t, bs["aio_context"].ptr()),
        "in-flight": int(bs["in_flight"]),
        "quiesce-counter": int(bs["quiesce_counter"]),
        "refcnt": int(bs["refcnt"]),
        "children": children,
        "backend": backend_of.get(bsp.ptr()),
        "tracked-requests": reqs,
    }


def _backend(t: Target, blkp: Value) -> dict[str, Any]:
    blk = blkp.deref()
    root = blk["root"]
    node = None
    if root.ptr():
        bs = root.deref()["bs"].ptr()
        node = t.value(bs, "BlockDriverState")["node_name"].cstring() if bs else None
    dev = blk["dev"].ptr()
    tgm = blk["public"]["throttle_group_member"]
    return {
        "name": blk["name"].cstring(),
        "address": blkp.ptr(),
        "node-name": node,
        "device": qom.device_id(t, dev) if dev else None,
        "aio-context": context_ref(t, blk["ctx"].ptr()) if blk.has("ctx") else None,
        "in-flight": int(blk["in_flight"]),
        "quiesce-counter": int(blk["quiesce_counter"]),
        "throttle-member": tgm.addr if tgm["throttle_state"].ptr() else None,
    }


def collect(t: Target, node: Optional[str] = None) -> dict[str, Any]:
    qom.forget(t)
    blks = qlist(t.var("block_backends"), "link")
    backends = [_backend(t, b) for b in blks]
    backend_of: dict[int, str] = {}
    for b, raw in zip(backends, blks):
        r = raw.deref()["root"]
        if r.ptr():
            backend_of[r.deref()["bs"].ptr()] = b["name"] or (b["device"] or {}).get("qdev") or ""
    nodes = [_node(t, bsp, backend_of) for bsp in block.bdrv_states(t)]
    by_addr = {n["address"]: n for n in nodes}
    parked = waiters.parked(t)
    groups = []
    for g in waiters.throttle_groups(t):
        members = []
        for m in g["members"]:
            who: dict[str, Any] = {"address": m}
            b = next((b for b in backends if b["throttle-member"] == m), None)
            if b is not None:
                who.update({"backend": b["name"], "node-name": b["node-name"]})
            else:  # a throttle node: bs->opaque is the member (block/throttle.c)
                bs = next((n for n in nodes if n["driver"] == "throttle"
                           and t.value(n["address"], "BlockDriverState")["opaque"].ptr() == m), None)
                if bs is not None:
                    who.update({"node-name": bs["node-name"]})
                    bs["throttle-group"] = g["name"]
            tgm = t.value(m, "ThrottleGroupMember")
            who["pending"] = {"read": int(tgm["pending_reqs"].index(0)), "write": int(tgm["pending_reqs"].index(1))}
            members.append(who)
        queued = [p for p in parked if p["structure"] == "ThrottleGroupMember" and p["field"].startswith(
            "throttled_reqs[") and p.get("throttle-group") == g["name"]]
        groups.append({"name": g["name"], "members": members,
                       "queued": [{"coroutine": p["coroutine"], "direction": "read" if p["field"].endswith("[0]")
                                   else "write", "owner": p["owner"].get("name"), "request": p["request"]}
                                  for p in queued]})
    for b in backends:
        g = next((g for g in groups if any(m["address"] == b["throttle-member"] for m in g["members"])), None)
        b["throttle-group"] = g["name"] if g else None
    for n in nodes:
        n.setdefault("throttle-group", None)
        n["parked"] = [p for p in parked if p["owner"].get("kind") == "node" and p["owner"].get("address")
                       == n["address"]]
    for b in backends:
        b["parked"] = [p for p in parked if p["owner"].get("kind") == "backend" and p["owner"].get("address")
                       == b["address"]]
    if node is not None:
        keep = {n["address"] for n in nodes if n["node-name"] == node or n["backend"] == node}
        if not keep:
            names = ", ".join(sorted(n["node-name"] for n in nodes)) or "none"
            raise IntrospectError(f"no block node named {node} (nodes: {names})")
        nodes = [n for n in nodes if n["address"] in keep]
        backends = [b for b in backends if b["name"] == node or b["node-name"] in {n["node-name"] for n in nodes}]
    del by_addr
    return {"nodes": nodes, "backends": backends, "throttle-groups": groups,
            "aio-contexts": list(aio_contexts(t).values())}
