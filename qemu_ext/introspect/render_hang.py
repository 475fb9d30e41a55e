"""Human output of the hang-analysis views (block, waiters, locks, bt, cpustate), shared by the gdb
pack's commands and `virtopt inspect`: each function takes what a view returned and gives the text.

This is front-door code (it formats; the view modules only collect), like render.py.
"""

from __future__ import annotations

from typing import Any, Optional

from qemu_ext.output import human_size

from .render import table


def _ctx(c: Optional[dict[str, Any]]) -> str:
    if not c:
        return "-"
    return c["name"] if c["name"] != "unknown" else f"AioContext {c['address']:#x}"


def request(r: Optional[dict[str, Any]]) -> str:
    if not r:
        return ""
    return f"{r['type']} {human_size(r['bytes'])} at offset {r['offset']}"


def parked_line(p: dict[str, Any]) -> str:
    """One parked coroutine: what it runs, what it waits on, whose that is, who holds it."""
    what = request(p.get("request"))
    head = f"coroutine {p['coroutine']:#x} ({p['entry'] or '?'}{': ' + what if what else ''})"
    owner = p.get("owner") or {}
    if owner.get("kind") == "backend":
        of = f" of BlockBackend {owner.get('name') or owner.get('node-name')}"
    elif owner.get("kind") == "node":
        of = f" of node {owner.get('name')}"
    else:
        of = f" of {owner['name']}" if owner.get("name") and p["structure"] != "graph-lock" else ""
    if p["waits-on"] == "blkdebug-break":
        return (f"{head} is held by a blkdebug break, tag {p.get('tag')!r}{of} "
                f"(qemu-io \"resume {p.get('tag')}\" lets it go)")
    place = p.get("meaning") or f"{p['structure']}.{p['field']}"
    if p.get("throttle-group"):
        of = f" of throttle group {p['throttle-group']}" + of.replace(" of ", " (", 1) + (")" if of else "")
    verb = "waits in" if p["waits-on"] == "co-queue" else "waits for"
    held = f", held by coroutine {p['holder']:#x}" if p.get("holder") else ""
    return f"{head} {verb} {place}{of}{held} [{p['waits-on']} {p['structure']}.{p['field']}]"


def block(d: dict[str, Any]) -> str:
    out: list[str] = []
    nodes = {n["node-name"]: n for n in d["nodes"]}
    has_parent = {c["node-name"] for n in d["nodes"] for c in n["children"]}
    backend_by_node = {b["node-name"]: b for b in d["backends"]}
    shown: set[str] = set()

    def show(name: str, depth: int, label: str) -> None:
        n = nodes.get(name)
        pad = "  " * depth
        if n is None:
            out.append(f"{pad}{label}{name} (not in this listing)")
            return
        if name in shown:
            out.append(f"{pad}{label}{name} (shown above)")
            return
        shown.add(name)
        extra = f"  throttle group {n['throttle-group']}" if n.get("throttle-group") else ""
        out.append(f"{pad}{label}{name} ({n['driver'] or 'no driver'}) {n['filename']}  [{_ctx(n['aio-context'])}]  "
                   f"in-flight {n['in-flight']}  quiesce {n['quiesce-counter']}{extra}")
        for r in n["tracked-requests"]:
            co = f"coroutine {r['coroutine']:#x}" if r["coroutine"] else "no coroutine"
            out.append(f"{pad}    request {request(r)} ({co}{', serialising' if r['serialising'] else ''}"
                       f"{', waiting for another request' if r['waiting-for'] else ''})")
        for p in n.get("parked", []):
            out.append(f"{pad}    waiting: {parked_line(p)}")
        for c in n["children"]:
            show(c["node-name"], depth + 1, f"{c['name']}: ")

    for b in d["backends"]:
        dev = b["device"]
        devtxt = f"device {dev['qdev']} ({dev['type']})" if dev else "no device"
        tg = f"  throttle group {b['throttle-group']}" if b.get("throttle-group") else ""
        out.append(f"BlockBackend {b['name'] or '(anonymous)'}: {devtxt}  [{_ctx(b['aio-context'])}]  "
                   f"in-flight {b['in-flight']}  quiesce {b['quiesce-counter']}{tg}")
        for p in b.get("parked", []):
            out.append(f"    waiting: {parked_line(p)}")
        if b["node-name"]:
            show(b["node-name"], 1, "root: ")
    for n in d["nodes"]:
        if n["node-name"] not in shown and n["node-name"] not in has_parent and n["node-name"] not in backend_by_node:
            show(n["node-name"], 0, "")
    for n in d["nodes"]:
        if n["node-name"] not in shown:
            show(n["node-name"], 0, "")
    for g in d["throttle-groups"]:
        members = ", ".join(m.get("backend") or m.get("node-name") or f"{m['address']:#x}" for m in g["members"])
        out.append(f"throttle group {g['name']}: members {members or 'none'}; {len(g['queued'])} request(s) queued")
        for q in g["queued"]:
            out.append(f"    {q['direction']} coroutine {q['coroutine']:#x} of {q['owner']}"
                       f"{': ' + request(q['request']) if q['request'] else ''}")
    ctxs = ", ".join(f"{c['name']} (thread {c['thread-id']})" for c in d["aio-contexts"])
    out.append(f"AioContexts: {ctxs}")
    return "\n".join(out) + "\n"


def waiters(d: dict[str, Any]) -> str:
    out = []
    if not d["parked"]:
        out.append("no coroutine waits in a CoQueue, CoMutex, throttle queue or blkdebug break")
    for p in d["parked"]:
        out.append(parked_line(p))
    for m in d["co-mutexes"]:
        owner = m["owner"].get("name") or ""
        holder = f"held by coroutine {m['holder']:#x}" if m["holder"] else "held (holder not recorded)"
        out.append(f"CoMutex {m['structure']}.{m['field']} of {owner}: {holder}, {len(m['waiters'])} waiting")
    return "\n".join(out) + "\n"


def _tid(tid: Optional[int], labels: dict[int, str]) -> str:
    if not tid:
        return "nobody"
    lab = labels.get(tid)
    return f"thread {tid} ({lab})" if lab else f"thread {tid}"


def locks(d: dict[str, Any]) -> str:
    labels = {r["tid"]: r["label"] or r["name"] or "" for r in d["threads"]}
    out = []
    b = d["bql"]
    if not b["known"]:
        out.append("BQL: unknown (neither bql nor qemu_global_mutex is visible without debug info)")
    else:
        waiting = ", ".join(_tid(w, labels) for w in b["waiters"]) or "nobody"
        out.append(f"BQL ({b['name']}): held by {_tid(b['holder'], labels)}; waiting: {waiting}")
    al = d["aio-context-locks"]
    if not al["version-has-them"]:
        out.append("AioContext locks: none in this QEMU (aio_context_acquire was removed in 9.0)")
    for lk in al["locks"]:
        if lk["holder"] or lk["waiters"]:
            waiting = ", ".join(_tid(w, labels) for w in lk["waiters"]) or "nobody"
            out.append(f"AioContext lock of {lk['aio-context']['name']}: held by {_tid(lk['holder'], labels)}"
                       f" (depth {lk['count']}); waiting: {waiting}")
        else:
            out.append(f"AioContext lock of {lk['aio-context']['name']}: free")
    rows = []
    for r in d["threads"]:
        w = r["waits-on"]
        holder = f"held by {_tid(w['holder'], labels)}" if w and w.get("holder") else ""
        rows.append([r["tid"], r["label"] or r["name"] or "", r["state"], holder])
    out.append("")
    out.append(table(rows, ["TID", "THREAD", "STATE", ""]).rstrip("\n"))
    for m in d["co-mutexes"]:
        holder = f"coroutine {m['holder']:#x}" if m["holder"] else "?"
        out.append(f"CoMutex {m['structure']}.{m['field']} of {m['owner'].get('name')}: held by {holder}, "
                   f"{len(m['waiters'])} coroutine(s) waiting")
    if d["parked-coroutines"]:
        out.append(f"{d['parked-coroutines']} coroutine(s) parked in CoQueues/CoMutexes/throttle queues: virtopt waiters")
    return "\n".join(out) + "\n"


def _frame(i: int, f: dict[str, Any]) -> str:
    loc = f" at {f['file']}:{f['line']}" if f.get("file") else ""
    return f"#{i:<3} {f['pc']:#018x} in {f['function'] or '??'}{loc}"


def bt(d: dict[str, Any]) -> str:
    out = []
    for th in d["threads"]:
        out.append(f"Thread {th['tid']} ({th['label'] or th['name'] or '?'}):")
        i = 0
        for n, seg in enumerate(th["segments"]):
            if n:
                what = (f"coroutine {seg['coroutine']:#x} ({seg['entry']})" if seg["kind"] == "coroutine"
                        else "the thread's own stack")
                out.append(f"  -- entered from {what}:")
            elif seg["kind"] == "coroutine":
                out.append(f"  -- running coroutine {seg['coroutine']:#x} ({seg['entry']}):")
            for f in seg["frames"]:
                out.append("  " + _frame(i, f))
                i += 1
        out += [f"  note: {n}" for n in th["notes"]]
        out.append("")
    return "\n".join(out)


def cpustate(d: dict[str, Any]) -> str:
    out = []
    for c in d["vcpus"]:
        cs = c["cs"]
        wide = c["mode"] == "64-bit" or c["efer"] & (1 << 10)
        ip = f"RIP={c['rip']:016x}" if wide else f"EIP={c['rip'] & 0xffffffff:08x}"
        out.append(f"vCPU {c['cpu-index']} (thread {c['thread-id']}): {c['mode']} mode, CPL {c['cpl']}"
                   f"{', SMM' if c['smm'] else ''}{', halted' if c['halted'] else ''}"
                   f"{', exception ' + str(c['exception']) if c['exception'] else ''}")
        out.append(f"  {ip} CS={cs['selector']:04x} base {cs['base']:x} limit {cs['limit']:x} flags {cs['flags']:08x}")
        out.append(f"  CR0={c['cr0']:08x} CR2={c['cr2']:x} CR3={c['cr3']:x} CR4={c['cr4']:08x} EFER={c['efer']:x}")
        if not c["registers-current"]:
            out.append(f"  note: not current: {c['registers-source']}")
    return "\n".join(out) + "\n"


__all__ = ["block", "bt", "cpustate", "locks", "parked_line", "request", "table", "waiters"]
