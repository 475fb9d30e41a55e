"""Coroutines parked where QEMU parks them, and what each waits on (7.2 and 10.0).

A yielded coroutine is referenced only by what it waits on, so it is found by walking those:
- CoQueue (include/qemu/coroutine.h): a QSIMPLEQ of Coroutine linked by co_queue_next
  (qemu_co_queue_wait_impl, util/qemu-coroutine-lock.c);
- CoMutex: the CoWaitRecord lists from_push and to_pop, and the holder coroutine
  (qemu_co_mutex_lock_slowpath);
- CoRwlock: its CoMutex and the CoRwTicket queue (qemu_co_rwlock_rdlock/wrlock);
- throttling: ThrottleGroupMember.throttled_reqs[THROTTLE_READ/WRITE] CoQueues
  (throttle_group_co_io_limits_intercept, block/throttle-groups.c);
- blkdebug's suspended requests (suspend_request, block/blkdebug.c: `break EVENT TAG`).

The structures walked: every BlockDriverState (its own CoQueues/CoMutexes, its tracked requests'
wait_queue, and the driver state of the drivers listed in DRIVER_STATE), every BlockBackend
(queued_requests while drained, its throttle group member), every throttle group's members, and
in 10.0 the block graph lock's reader_queue (block/graph-lock.c). The sync fields of a structure
are found by their types in the debug info, so a field QEMU adds is found without a change here.

``parked(t)`` is the one function: the coroutines view and `virtopt block` / `virtopt locks`
call it.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

from . import block, common
from .target import CachedType, IntrospectError, Target, TypeInfo, Value, qlist

COROUTINE = CachedType("Coroutine")

SYNC_TYPES = {"CoQueue": "co-queue", "CoMutex": "co-mutex", "CoRwlock": "co-rwlock"}
MAX_WAITERS = 10000

#: bs->opaque type of the drivers whose state holds coroutine locks or queues (per drv->format_name)
DRIVER_STATE = {
    "qcow2": "BDRVQcow2State",  # CoMutex lock, CoQueue thread_task_queue
    "qed": "BDRVQEDState",  # CoMutex table_lock, CoQueue allocating_write_reqs
    "vmdk": "BDRVVmdkState",
    "vpc": "BDRVVPCState",
    "vdi": "BDRVVdiState",  # CoRwlock bmap_lock
    "vhdx": "BDRVVHDXState",
    "parallels": "BDRVParallelsState",
    "copy-before-write": "BDRVCopyBeforeWriteState",
    "nbd": "BDRVNBDState",
    "nvme": "BDRVNVMeState",
    "throttle": "ThrottleGroupMember",  # block/throttle.c: bs->opaque is the member itself
    "blkdebug": "BDRVBlkdebugState",  # and its suspended_reqs
}

#: what a sync field means, by (structure, field); anything else is named by its C path
MEANING = {
    ("ThrottleGroupMember", "throttled_reqs[0]"): "the throttled-read queue",
    ("ThrottleGroupMember", "throttled_reqs[1]"): "the throttled-write queue",
    ("ThrottleGroupMember", "throttled_reqs_lock"): "the throttle queues' lock",
    ("BlockBackend", "queued_requests"): "the queue of requests held while the backend is drained",
    ("BlockDriverState", "flush_queue"): "the queue of flushes behind the flush in progress",
    ("BlockDriverState", "bsc_modify_lock"): "the block-status cache lock",
    ("BDRVQcow2State", "lock"): "the qcow2 metadata lock (s->lock)",
    ("BdrvTrackedRequest", "wait_queue"): "the queue of an overlapping serialising request",
    ("graph-lock", "reader_queue"): "the block graph lock (a writer holds it)",
}

common.register("waiters", "Coroutines parked in CoQueues, CoMutexes, throttle queues and blkdebug breaks, "
                "and what each waits on", [common.needs_debug_info])


# ---------------------------------------------------------------- the sync fields of a structure


def sync_fields(t: Target, ty: TypeInfo, depth: int = 3) -> list[tuple[str, int, str, TypeInfo]]:
    """(C path, byte offset, kind, type) of every CoQueue/CoMutex/CoRwlock embedded in ty (also in
    arrays and nested structures, not behind pointers); cached per type."""
    memo = t.memo.setdefault("sync-fields", {})
    key = (ty.name, depth)
    if key in memo:
        return memo[key]
    out: list[tuple[str, int, str, TypeInfo]] = []
    for name, f in ty.fields.items():
        ft = f.type
        base = f.bitpos // 8
        kind = SYNC_TYPES.get(_bare(ft.name))
        if kind:
            out.append((name, base, kind, ft))
        elif ft.kind == "array" and ft.length:
            kind = SYNC_TYPES.get(_bare(ft.target.name))
            if kind:
                out += [(f"{name}[{i}]", base + i * ft.target.size, kind, ft.target) for i in range(ft.length)]
        elif ft.kind in ("struct", "union") and depth > 1 and _bare(ft.name) not in ("Coroutine",):
            out += [(f"{name}.{p}", base + o, k, st) for p, o, k, st in sync_fields(t, ft, depth - 1)]
    memo[key] = out
    return out


def _bare(name: str) -> str:
    for pre in ("struct ", "union ", "const ", "volatile "):
        if name.startswith(pre):
            name = name[len(pre):]
    return name


# ---------------------------------------------------------------- one lock or queue


def queue_members(q: Value) -> list[int]:
    """The coroutines waiting in a CoQueue, oldest first."""
    return [c.ptr() for c in qlist(q["entries"], "co_queue_next", limit=MAX_WAITERS)]


def mutex_state(m: Value) -> dict[str, Any]:
    """A CoMutex: how many lockers (0 free, 1 held, more: waiters), the holder, the waiters."""
    waiting = []
    for head in ("from_push", "to_pop"):
        waiting += [r.deref()["co"].ptr() for r in qlist(m[head], "next", limit=MAX_WAITERS)]
    return {"locked": int(m["locked"]), "holder": m["holder"].ptr() or None, "waiters": waiting}


def rwlock_state(t: Target, lk: Value) -> dict[str, Any]:
    st = mutex_state(lk["mutex"])
    tickets = []
    if t.find_type("CoRwTicket") is not None:  # util/qemu-coroutine-lock.c (since 6.1)
        for tk in qlist(lk["tickets"], "next", limit=MAX_WAITERS):
            tkv = tk.deref()
            tickets.append((tkv["co"].ptr(), "read" if tkv["read"].bool() else "write"))
    return {"owners": int(lk["owners"]), "mutex": st, "tickets": tickets}


# ---------------------------------------------------------------- where QEMU keeps them


def _owners(t: Target) -> Iterator[tuple[Value, dict[str, Any]]]:
    """(structure, who it belongs to) for every structure whose sync fields are scanned."""
    backends_of = {}
    try:
        blks = qlist(t.var("block_backends"), "link")
    except IntrospectError:
        blks = []
    for blkp in blks:
        blk = blkp.deref()
        name = blk["name"].cstring()
        root = blk["root"]
        node = None
        if root.ptr():
            bs = root.deref()["bs"].ptr()
            node = t.value(bs, "BlockDriverState")["node_name"].cstring() if bs else None
            backends_of[bs] = name
        yield blk, {"kind": "backend", "name": name, "node-name": node, "address": blkp.ptr()}
    for bsp in block.bdrv_states(t):
        bs = bsp.deref()
        node = bs["node_name"].cstring()
        owner = {"kind": "node", "name": node, "driver": block.format_name(bs), "address": bsp.ptr()}
        yield bs, owner
        for req in qlist(bs["tracked_requests"], "list"):
            yield req.deref(), {**owner, "request": tracked_request(req.deref())}
        drv = owner["driver"]
        opaque = bs["opaque"].ptr()
        tyname = DRIVER_STATE.get(drv or "")
        if opaque and tyname and t.find_type(tyname) is not None:
            yield t.value(opaque, tyname), owner


REQUEST_TYPES = ("read", "write", "discard", "truncate")  # enum BdrvTrackedRequestType (7.2, 10.0)


def tracked_request(r: Value) -> dict[str, Any]:
    """One BdrvTrackedRequest (block/io.c tracked_request_begin) as the views show it."""
    ty = int(r["type"])
    waiting_for = r["waiting_for"].ptr() if r.has("waiting_for") else 0
    return {"offset": int(r["offset"]), "bytes": int(r["bytes"]),
            "type": REQUEST_TYPES[ty] if 0 <= ty < len(REQUEST_TYPES) else str(ty),
            "serialising": r["serialising"].bool(), "coroutine": r["co"].ptr() or None,
            "waiting-for": waiting_for or None, "address": r.addr}


def throttle_groups(t: Target) -> list[dict[str, Any]]:
    """Every throttle group (throttle_groups, block/throttle-groups.c) with its members' addresses."""
    out = []
    tg_list = t.find_var("throttle_groups")
    if tg_list is None:
        return out
    for tgp in qlist(tg_list, "list"):
        tg = tgp.deref()
        members = [m.ptr() for m in qlist(tg["head"], "round_robin")]
        out.append({"name": tg["name"].cstring(), "address": tgp.ptr(), "members": members,
                    "ts": tg["ts"].addr})
    return out


def request_of(t: Target, co: int) -> Optional[dict[str, Any]]:
    """The I/O a coroutine runs, when its entry says: blk_aio_read_entry/blk_aio_write_entry take a
    BlkAioEmAIOCB (block/block-backend.c 7.2, 10.0) with the offset and byte count."""
    c = t.value(co, COROUTINE.get(t))
    entry = t.symbolize(c["entry"].ptr())
    if entry in ("blk_aio_read_entry", "blk_aio_write_entry"):
        ty = t.find_type("BlkAioEmAIOCB")
        arg = c["entry_arg"].ptr()
        if ty is not None and arg:
            acb = t.value(arg, ty)
            return {"type": "read" if entry == "blk_aio_read_entry" else "write",
                    "offset": int(acb["rwco"]["offset"]), "bytes": int(acb["bytes"])}
    return None


def parked(t: Target) -> list[dict[str, Any]]:
    """Every coroutine found waiting in a CoQueue, CoMutex, CoRwlock, throttle queue or blkdebug
    break, with what it waits on (one entry per coroutine and place)."""
    out: list[dict[str, Any]] = []
    seen: set[tuple[int, int]] = set()
    tg = throttle_groups(t)
    group_of = {m: g["name"] for g in tg for m in g["members"]}

    def add(co: int, kind: str, obj: int, struct: str, field: str, owner: dict[str, Any],
            holder: Optional[int] = None, extra: Optional[dict[str, Any]] = None) -> None:
        if not co or (co, obj) in seen:
            return
        seen.add((co, obj))
        c = t.value(co, COROUTINE.get(t))
        entry = c["entry"].ptr()
        meaning = MEANING.get((struct, field.split(".")[-1])) or MEANING.get((struct, field))
        rec = {"coroutine": co, "entry": t.symbolize(entry) or (f"{entry:#x}" if entry else None),
               "waits-on": kind, "object": obj, "structure": struct, "field": field,
               "meaning": meaning, "owner": owner, "holder": holder, "request": request_of(t, co)}
        rec.update(extra or {})
        out.append(rec)

    def scan(v: Value, owner: dict[str, Any]) -> None:
        struct = _bare(v.type.name)
        member = v.addr if struct == "ThrottleGroupMember" else None
        for path, off, kind, ty in sync_fields(t, v.type):
            obj = v.addr + off
            sv = t.value(obj, ty)
            sub_struct, sub_field = struct, path
            extra: dict[str, Any] = {}
            if path.startswith("public.throttle_group_member."):  # BlockBackendPublic (block-backend.h)
                sub_struct, sub_field = "ThrottleGroupMember", path.split("throttle_group_member.", 1)[1]
                member = v["public"]["throttle_group_member"].addr
            if sub_struct == "ThrottleGroupMember":
                extra["throttle-group"] = group_of.get(member or 0)
            if kind == "co-queue":
                for co in queue_members(sv):
                    add(co, kind, obj, sub_struct, sub_field, owner, extra=extra)
            elif kind == "co-mutex":
                st = mutex_state(sv)
                for co in st["waiters"]:
                    add(co, kind, obj, sub_struct, sub_field, owner, holder=st["holder"], extra=extra)
            else:
                st = rwlock_state(t, sv)
                for co in st["mutex"]["waiters"]:
                    add(co, "co-mutex", obj, sub_struct, sub_field + ".mutex", owner, holder=st["mutex"]["holder"])
                for co, mode in st["tickets"]:
                    add(co, kind, obj, sub_struct, sub_field, owner, extra={"mode": mode, "owners": st["owners"]})

    for v, owner in _owners(t):
        scan(v, owner)
        if _bare(v.type.name) == "BDRVBlkdebugState" and v.has("suspended_reqs"):
            for r in qlist(v["suspended_reqs"], "next"):
                rv = r.deref()
                add(rv["co"].ptr(), "blkdebug-break", r.ptr(), "BlkdebugSuspendedReq", "suspended_reqs", owner,
                    extra={"tag": rv["tag"].cstring()})
    for g in tg:  # members that are neither a backend nor a throttle node (none today): still walked
        for m in g["members"]:
            scan(t.value(m, "ThrottleGroupMember"), {"kind": "throttle-group", "name": g["name"], "address": m})
    rq = t.find_var("reader_queue")  # 10.0 block/graph-lock.c: readers waiting for the graph writer
    if rq is not None and _bare(rq.type.name) == "CoQueue":
        for co in queue_members(rq):
            add(co, "co-queue", rq.addr, "graph-lock", "reader_queue", {"kind": "global", "name": "block graph lock"})
    return out


def source_label(p: dict[str, Any]) -> str:
    """A parked coroutine's place in one token, for lists that label coroutines by where they were
    found (the coroutines view's "source"): "throttled-writes:tg0:d0", "co-mutex:BDRVQcow2State.lock:
    #block405", "blkdebug-break:A:#block266"."""
    owner = p["owner"].get("name") or p["owner"].get("node-name") or ""
    if p["waits-on"] == "blkdebug-break":
        return f"blkdebug-break:{p.get('tag')}:{owner}"
    if p.get("throttle-group") and p["field"].startswith("throttled_reqs["):
        way = "reads" if p["field"].endswith("[0]") else "writes"
        return f"throttled-{way}:{p['throttle-group']}:{owner}"
    return f"{p['waits-on']}:{p['structure']}.{p['field']}:{owner}"


def parked_coroutines(t: Target) -> list[tuple[int, str]]:
    """(coroutine address, source label) of every parked coroutine: for the coroutines view, whose
    other sources (running, tracked requests, scheduled, pools) miss a request queued before the
    block layer tracks it (a throttled write waits in its group's CoQueue with blk->in_flight 1)."""
    return [(p["coroutine"], source_label(p)) for p in parked(t)]


def held_mutexes(t: Target) -> list[dict[str, Any]]:
    """Every CoMutex found held (locked > 0), with holder and waiters: for `virtopt locks`."""
    out = []
    for v, owner in _owners(t):
        struct = _bare(v.type.name)
        for path, off, kind, ty in sync_fields(t, v.type):
            if kind != "co-mutex":
                continue
            st = mutex_state(t.value(v.addr + off, ty))
            if st["locked"] or st["holder"]:
                out.append({"object": v.addr + off, "structure": struct, "field": path,
                            "meaning": MEANING.get((struct, path)), "owner": owner, **st})
    return out


def collect(t: Target) -> dict[str, Any]:
    return {"parked": parked(t), "co-mutexes": held_mutexes(t)}
