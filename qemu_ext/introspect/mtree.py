"""`mtree [AS] [--flat]` and `mtree lookup ADDR`: QEMU's memory map, read from memory.

The tree is memory_region tree of every AddressSpace (softmmu/memory.c mtree_info, 7.2;
system/memory.c, 10.0); the flat view is QEMU's own rendered FlatView (AddressSpace.current_map),
so a lookup answers exactly what HMP `info mtree -f` shows. Int128 sizes are read as 16 bytes
(QEMU's own `qemu mtree` fails on 7.2 with "int too big to convert").
"""

from __future__ import annotations

from typing import Any, Optional

from . import common
from .target import CachedType, IntrospectError, Target, Value, int128, qlist

MEMORY_REGION = CachedType("MemoryRegion")

MAX_NODES = 20000
U64 = (1 << 64) - 1

common.register("mtree", "QEMU's memory region tree (or its flat view) per address space",
                [common.needs_debug_info])
common.register("mtree lookup", "Which memory region answers at an address (from QEMU's flat view)",
                [common.needs_debug_info])


def _mr_kind(mr: Value, depth: int = 0) -> str:
    """memory_region_type() of softmmu/memory.c (7.2) / system/memory.c (10.0)."""
    alias = mr["alias"].ptr()
    if alias and depth < 8:
        return _mr_kind(mr["alias"].deref(), depth + 1)
    if mr["ram_device"].bool():
        return "ramd"
    if mr["rom_device"].bool() and mr["romd_mode"].bool():
        return "romd"
    if mr["ram"].bool() and mr["readonly"].bool():
        return "rom"
    if mr["ram"].bool():
        return "ram"
    return "i/o"


def _name(mr: Value) -> str:
    n = mr["name"]
    return n.cstring() if n.ptr() else "(null)"


def address_spaces(t: Target) -> list[Value]:
    return qlist(t.var("address_spaces"), "address_spaces_link")


# the short names the shell's `/mtree lookup ADDR io|memory` takes, for the same address spaces
AS_ALIASES = {"io": "I/O"}


def _find_as(t: Target, name: Optional[str]) -> list[Value]:
    spaces = address_spaces(t)
    if name is None:
        return spaces
    name = AS_ALIASES.get(name, name)
    found = [a for a in spaces if a.deref()["name"].cstring() == name]
    if not found:
        names = ", ".join(sorted({a.deref()["name"].cstring() for a in spaces}))
        raise IntrospectError(f"no address space named {name!r} (there are: {names})")
    return found


def _region(mr: Value, base: int, count: list[int], aliases: dict[int, Value]) -> dict[str, Any]:
    count[0] += 1
    if count[0] > MAX_NODES:
        raise IntrospectError(f"more than {MAX_NODES} memory regions: the tree looks corrupt")
    start = (base + int(mr["addr"])) & U64
    size = int128(mr["size"])
    node: dict[str, Any] = {
        "name": _name(mr),
        "start": start,
        "end": (start + size - 1) & U64 if size else start,
        "size": size,
        "priority": int(mr["priority"]),
        "kind": _mr_kind(mr),
        "nonvolatile": mr["nonvolatile"].bool(),
        "enabled": mr["enabled"].bool(),
        "address": mr.addr,
    }
    alias = mr["alias"].ptr()
    if alias:
        target = mr["alias"].deref()
        off = int(mr["alias_offset"])
        node["alias"] = {"name": _name(target), "offset": off, "start": off, "end": (off + size - 1) & U64}
        aliases.setdefault(alias, target)
    subs = [_region(sub.deref(), start, count, aliases) for sub in qlist(mr["subregions"], "subregions_link")]
    # the order `info mtree` prints: by address, then higher priority first (stable)
    subs.sort(key=lambda n: (n["start"] - start, -n["priority"]))
    node["subregions"] = subs
    return node


def tree(t: Target, as_name: Optional[str] = None) -> dict[str, Any]:
    """The region tree of each address space (ASes sharing a root are listed together), plus alias targets."""
    roots: dict[int, dict[str, Any]] = {}
    aliases: dict[int, Value] = {}
    count = [0]
    out = []
    for ap in _find_as(t, as_name):
        a = ap.deref()
        root = a["root"].ptr()
        if root in roots:
            roots[root]["address-spaces"].append(a["name"].cstring())
            continue
        entry = {"address-spaces": [a["name"].cstring()], "root": _region(a["root"].deref(), 0, count, aliases)}
        roots[root] = entry
        out.append(entry)
    # like info mtree: every alias target once, in the order met (also roots, also nested aliases)
    targets = []
    done: set[int] = set()
    while aliases:
        addr = next(iter(aliases))
        mr = aliases.pop(addr)
        if addr in done:
            continue
        done.add(addr)
        targets.append(_region(mr, 0, count, aliases))
    return {"address-spaces": out, "alias-targets": targets, "regions": count[0]}


def _accel_marks(t: Target) -> Optional[tuple[str, dict[int, set[tuple[int, int]]], int]]:
    """What `info mtree -f` needs to print the accelerator after a range: the accelerator's name
    and, per address space KVM listens to, its memory slots (KVMState.as[].ml->slots).
    mtree_print_flatview() asks AccelClass.has_memory (kvm_accel_has_memory, accel/kvm/kvm-all.c,
    7.2 and 10.0): a slot with exactly that start and MIN(kvm_max_slot_size, size). TCG has no
    has_memory: no marks."""
    if not common.kvm_enabled(t):
        return None
    ks = t.find_var("kvm_state")
    if ks is None or ks.is_null():
        return None
    k = ks.as_pointer_to(t.type("KVMState", near="kvm_accel_has_memory"))  # struct in kvm_int.h
    slots: dict[int, set[tuple[int, int]]] = {}
    for i in range(max(0, min(int(k["nr_as"]), 64))):
        kas = k["as"].index(i)
        if kas["ml"].is_null():
            continue
        ml = kas["ml"].deref()
        n = int(ml["nr_slots_allocated"])
        if not 0 <= n <= 1 << 16:
            raise IntrospectError(f"a KVM memory listener claims {n} slots: corrupt")
        got = set()
        for j in range(n):
            sl = ml["slots"].index(j)
            got.add((int(sl["start_addr"]), int(sl["memory_size"])))
        slots.setdefault(kas["as"].ptr(), set()).update(got)
    mss = t.find_var("kvm_max_slot_size")
    max_slot = int(mss) if mss is not None else U64
    return "KVM", slots, max_slot


def _glib_direct_hash_order(keys: list[int]) -> Optional[list[int]]:
    """The order g_hash_table_foreach() visits pointer keys inserted in this order into a
    g_hash_table_new(g_direct_hash, ...) (GLib 2.74 ghash.c: 8 buckets, index (hash * 11) % 7,
    quadratic probing); None past 7 keys, where the table would have been resized."""
    if len(keys) > 7:
        return None
    table: list[Optional[int]] = [None] * 8
    for key in keys:
        h = key & 0xFFFFFFFF
        if h < 2:
            h = 2
        idx, step = ((h * 11) & 0xFFFFFFFF) % 7, 0  # guint arithmetic
        while table[idx] is not None:
            step += 1
            idx = (idx + step) & 7
        table[idx] = key
    return [k for k in table if k is not None]


def flat(t: Target, as_name: Optional[str] = None) -> list[dict[str, Any]]:
    """QEMU's rendered FlatView of each address space, in the order and with the details
    `info mtree -f` prints them (mtree_info_flatview/mtree_print_flatview, softmmu/memory.c 7.2,
    system/memory.c 10.0)."""
    views: dict[int, dict[str, Any]] = {}
    marks = _accel_marks(t)
    as_ptrs: dict[int, list[int]] = {}
    for ap in _find_as(t, as_name):
        a = ap.deref()
        fvp = a["current_map"]
        key = fvp.ptr()
        root_mr = a["root"].deref()
        entry_as = {"name": a["name"].cstring(), "root": _name(root_mr),
                    "root-alias": _name(root_mr["alias"].deref()) if root_mr["alias"].ptr() else None}
        if key in views:
            views[key]["address-spaces"].append(entry_as)
            as_ptrs[key].append(ap.ptr())
            continue
        as_ptrs[key] = [ap.ptr()]
        ranges = []
        root = None
        if key:
            fv = fvp.deref()
            nr = int(fv["nr"])
            if nr > 1000000:
                raise IntrospectError(f"FlatView of {entry_as['name']} claims {nr} ranges: corrupt")
            base = fv["ranges"]
            for i in range(nr):
                fr = base.index(i)
                mr = fr["mr"].deref()
                start = int128(fr["addr"]["start"])
                size = int128(fr["addr"]["size"])
                ranges.append({
                    "start": start,
                    "end": (start + size - 1) & U64,
                    "size": size,
                    "region": _name(mr),
                    "priority": int(mr["priority"]),
                    "kind": "rom" if fr["readonly"].bool() else _mr_kind(mr),
                    "nonvolatile": fr["nonvolatile"].bool(),
                    "offset-in-region": int(fr["offset_in_region"]),
                    "region-address": mr.addr,
                    "accelerator": [],
                })
            if fv["root"].ptr():
                root = _name(fv["root"].deref())
        views[key] = {"address-spaces": [entry_as], "root": root, "ranges": ranges}
    if marks is not None:
        name, slots, max_slot = marks
        for key, v in views.items():
            for r in v["ranges"]:
                for asp in as_ptrs[key]:
                    if asp in slots and (r["start"], min(max_slot, r["size"] & U64)) in slots[asp]:
                        r["accelerator"].append(name)
    order = _glib_direct_hash_order(list(views)) if as_name is None else None
    return [views[k] for k in (order if order is not None else views)]


def _container_path(t: Target, mr_addr: int) -> list[str]:
    path: list[str] = []
    mr = t.value(mr_addr, MEMORY_REGION.get(t))
    for _ in range(64):
        path.append(_name(mr))
        c = mr["container"]
        if c.is_null():
            break
        mr = c.deref()
    return list(reversed(path))


def lookup(t: Target, addr: int, as_name: str = "memory") -> dict[str, Any]:
    """Which region of address space as_name answers at addr (as the flat view dispatches it)."""
    as_name = AS_ALIASES.get(as_name, as_name)  # reported by QEMU's own name
    views = flat(t, as_name)
    for r in views[0]["ranges"]:
        if r["start"] <= addr <= r["end"]:
            return {
                "address-space": as_name, "address": addr, "found": True, "region": r["region"],
                "kind": r["kind"], "priority": r["priority"], "range-start": r["start"], "range-end": r["end"],
                "offset-in-region": r["offset-in-region"] + (addr - r["start"]),
                "path": _container_path(t, r["region-address"]),
            }
    return {"address-space": as_name, "address": addr, "found": False, "region": None}


def parse_addr(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        try:
            v = int(text, 16)
        except ValueError as exc:
            raise IntrospectError(f"not an address: {text}") from exc
    if v < 0 or v > U64:
        raise IntrospectError(f"address out of range: {text}")
    return v


def collect(t: Target, address_space: Optional[str] = None, flat_view: bool = False) -> dict[str, Any]:
    if flat_view:
        return {"flat-views": flat(t, address_space)}
    return tree(t, address_space)
