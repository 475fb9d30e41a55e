"""QOM objects as QEMU links them (qom/object.c, 7.2 and 10.0): an object's type name, its
children and its canonical path ("/machine/peripheral/vd0/virtio-backend"), read from memory.

An Object keeps its properties in a GLib hash table (``Object.properties``); a child is a property
of type "child<TYPE>" whose ``opaque`` is the child (object_property_try_add_child). QEMU's
object_get_canonical_path_component() finds an object's name by searching its parent's table
for that property; so does this module.

GLib's GHashTable is private to GLib (glib/ghash.c) and GLib ships without debug info here, so
its layout is hand-made: the one of GLib 2.59 and later (2.74 in Debian 12), confirmed on every
table before it is read (size a power of two, mask = size - 1, nnodes <= noccupied <= size).
"""

from __future__ import annotations

import struct
from typing import Any, Optional

from .target import IntrospectError, MemoryReadError, Target, TornRead, Value

OBJECT = "Object"
OBJECT_PROPERTY = "ObjectProperty"

# struct _GHashTable (glib/ghash.c, GLib >= 2.59): gsize size; gint mod; guint mask; guint nnodes;
# guint noccupied; guint have_big_keys:1, have_big_values:1; gpointer keys; guint *hashes;
# gpointer values; ...
GHASH_FMT = "<QiIIII4xQQQ"
GHASH_SIZE = struct.calcsize(GHASH_FMT)
MAX_TABLE = 1 << 16  # QOM property tables hold tens of entries
MAX_DEPTH = 32  # QOM paths are a few levels deep


def hash_table(t: Target, addr: int) -> list[tuple[int, int]]:
    """The (key, value) pointer pairs of the GHashTable at addr (GLib >= 2.59 layout, checked)."""
    if not addr:
        return []
    size, _mod, mask, nnodes, noccupied, flags, keys, hashes, values = struct.unpack(
        GHASH_FMT, t.read(addr, GHASH_SIZE))
    if not (8 <= size <= MAX_TABLE and size & (size - 1) == 0 and mask == size - 1
            and nnodes <= noccupied <= size and keys and hashes):
        raise TornRead(f"the GHashTable at {addr:#x} does not look like GLib's (size {size}, mask {mask:#x}, "
                       f"{nnodes} nodes)")
    kw = 8 if flags & 1 else 4
    vw = 8 if flags & 2 else 4
    hs = struct.unpack(f"<{size}I", t.read(hashes, 4 * size))
    kraw = t.read(keys, kw * size)
    vraw = kraw if values == keys else t.read(values, vw * size)
    kfmt, vfmt = ("<Q" if kw == 8 else "<I"), ("<Q" if vw == 8 else "<I")
    out = []
    for i, h in enumerate(hs):
        if h >= 2:  # HASH_IS_REAL: 0 unused, 1 tombstone
            out.append((struct.unpack_from(kfmt, kraw, i * kw)[0], struct.unpack_from(vfmt, vraw, i * vw)[0]))
    if len(out) != nnodes:
        raise TornRead(f"the GHashTable at {addr:#x} has {len(out)} entries, not {nnodes}")
    return out


SNAPSHOT_MEMO = ("qom-children", "aio-contexts")


def forget(t: Target) -> None:
    """Drop what this module and blockgraph cached about QEMU's objects: call at the start of a
    collect (the process may have run since the last one)."""
    for k in SNAPSHOT_MEMO:
        t.memo.pop(k, None)


def obj(t: Target, addr: int) -> Value:
    return t.value(addr, OBJECT)


def type_name(t: Target, addr: int) -> Optional[str]:
    """The QOM type of the object at addr (object_get_typename)."""
    if not addr:
        return None
    try:
        cls = obj(t, addr)["class"]
        if cls.is_null():
            return None
        ty = cls.deref()["type"]
        return None if ty.is_null() else ty.deref()["name"].cstring()
    except IntrospectError:
        return None


def children(t: Target, addr: int) -> list[tuple[str, int, str]]:
    """(name, child address, child type) of every child<> property of the object at addr, by name."""
    memo = t.memo.setdefault("qom-children", {})
    if addr in memo:
        return memo[addr]
    out = []
    for _key, prop in hash_table(t, obj(t, addr)["properties"].ptr()):
        p = t.value(prop, OBJECT_PROPERTY)
        ptype = p["type"].cstring()
        if ptype.startswith("child<") and ptype.endswith(">"):
            out.append((p["name"].cstring(), p["opaque"].ptr(), ptype[6:-1]))
    out.sort()
    memo[addr] = out
    return out


def parent(t: Target, addr: int) -> int:
    return obj(t, addr)["parent"].ptr()


def root(t: Target) -> Optional[int]:
    """The QOM root ("/"): the parent of the machine (current_machine is /machine)."""
    m = t.find_var("current_machine")
    if m is None or m.is_null():
        return None
    a = m.ptr()
    for _ in range(MAX_DEPTH):
        p = parent(t, a)
        if not p:
            return a
        a = p
    raise TornRead("the QOM parent chain of the machine does not end")


def canonical_path(t: Target, addr: int) -> Optional[str]:
    """object_get_canonical_path(): "/" joined names from the root; None for an object outside the
    tree (its chain of parents does not reach the root)."""
    parts: list[str] = []
    a = addr
    for _ in range(MAX_DEPTH):
        p = parent(t, a)
        if not p:
            return "/" + "/".join(reversed(parts)) if a == root(t) else None
        name = next((n for n, c, _ty in children(t, p) if c == a), None)
        if name is None:
            return None
        parts.append(name)
        a = p
    return None


def resolve(t: Target, path: str) -> Optional[int]:
    """The object at an absolute QOM path (children only, no links)."""
    a = root(t)
    for part in [p for p in path.split("/") if p]:
        if a is None:
            return None
        a = next((c for n, c, _ty in children(t, a) if n == part), None)
    return a


def iothreads(t: Target) -> list[dict[str, Any]]:
    """Every IOThread object (-object iothread,id=ID: a child of /objects), with its AioContext
    and thread (struct IOThread, include/sysemu/iothread.h 7.2, include/system/iothread.h 10.0)."""
    out = []
    objs = resolve(t, "/objects")
    if objs is not None:
        for name, child, ty in children(t, objs):
            if ty != "iothread":
                continue
            io = t.value(child, "IOThread")
            out.append({"id": name, "address": child, "aio-context": io["ctx"].ptr() or None,
                        "thread-id": int(io["thread_id"])})
    mon = t.find_var("mon_iothread")  # monitor/monitor.c: the QMP out-of-band thread (not in /objects)
    if mon is not None and not mon.is_null():
        io = mon.deref()
        out.append({"id": "mon_iothread", "address": mon.ptr(), "aio-context": io["ctx"].ptr() or None,
                    "thread-id": int(io["thread_id"])})
    return out


def device_id(t: Target, dev: int) -> dict[str, Any]:
    """A DeviceState as query-block names it: ``qdev`` is its id when it has one, else its canonical
    path (blk_get_attached_dev_id, block/block-backend.c 7.2 and 10.0)."""
    d = t.value(dev, "DeviceState")
    ident = d["id"].cstring() if d.has("id") and d["id"].ptr() else None
    try:
        path = canonical_path(t, dev)
    except (MemoryReadError, TornRead):
        path = None
    return {"id": ident, "qdev": ident or path, "path": path, "type": type_name(t, dev)}
