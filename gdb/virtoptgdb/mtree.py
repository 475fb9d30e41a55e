"""`virtopt mtree [AS] [--flat]` and `virtopt mtree lookup ADDR`: QEMU's memory map, from memory.

Works on QEMU 7.2, where QEMU's own `qemu mtree` fails ("int too big to convert"):
Int128 sizes are read as 16 bytes instead of through gdb's int(). The flat view is
QEMU's own rendered FlatView (AddressSpace.current_map), so a lookup answers exactly
what HMP `info mtree -f` shows.
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

import gdb

from . import core

MAX_NODES = 20000
U64 = (1 << 64) - 1


def _mr_kind(mr: gdb.Value, depth: int = 0) -> str:
    """memory_region_type() of softmmu/memory.c."""
    alias = core.ptr(mr["alias"])
    if alias and depth < 8:
        return _mr_kind(mr["alias"].dereference(), depth + 1)
    if bool(mr["ram_device"]):
        return "ramd"
    if bool(mr["rom_device"]) and bool(mr["romd_mode"]):
        return "romd"
    if bool(mr["ram"]) and bool(mr["readonly"]):
        return "rom"
    if bool(mr["ram"]):
        return "ram"
    return "i/o"


def _name(mr: gdb.Value) -> str:
    n = core.cstr(mr["name"])
    return n if core.ptr(mr["name"]) else "(null)"


def address_spaces() -> list[gdb.Value]:
    head = core.value_of("address_spaces")
    return core.qtailq(head, "address_spaces_link")


def _find_as(name: Optional[str]) -> list[gdb.Value]:
    spaces = address_spaces()
    if name is None:
        return spaces
    found = [a for a in spaces if core.cstr(a["name"]) == name]
    if not found:
        names = ", ".join(sorted({core.cstr(a["name"]) for a in spaces}))
        raise core.VirtoptGdbError(f"no address space named {name!r} (there are: {names})")
    return found


def _region(mr: gdb.Value, base: int, level: int, count: list[int], aliases: dict[int, gdb.Value]) -> dict[str, Any]:
    count[0] += 1
    if count[0] > MAX_NODES:
        raise core.VirtoptGdbError(f"more than {MAX_NODES} memory regions: the tree looks corrupt")
    start = (base + int(mr["addr"])) & U64
    size = core.int128(mr["size"])
    node: dict[str, Any] = {
        "name": _name(mr),
        "start": start,
        "end": (start + size - 1) & U64 if size else start,
        "size": size,
        "priority": int(mr["priority"]),
        "kind": _mr_kind(mr),
        "nonvolatile": bool(mr["nonvolatile"]),
        "enabled": bool(mr["enabled"]),
        "address": core.ptr(mr.address),
    }
    alias = core.ptr(mr["alias"])
    if alias:
        target = mr["alias"].dereference()
        off = int(mr["alias_offset"])
        node["alias"] = {"name": _name(target), "offset": off, "start": off, "end": (off + size - 1) & U64}
        aliases.setdefault(alias, target)
    subs = [_region(sub.dereference(), start, level + 1, count, aliases)
            for sub in core.qtailq(mr["subregions"], "subregions_link")]
    # the order `info mtree` prints: by address, then higher priority first (stable)
    subs.sort(key=lambda n: (n["start"] - start, -n["priority"]))
    node["subregions"] = subs
    return node


def tree(as_name: Optional[str] = None) -> dict[str, Any]:
    """The region tree of each address space (ASes sharing a root are listed together), plus alias targets."""
    spaces = _find_as(as_name)
    roots: dict[int, dict[str, Any]] = {}
    aliases: dict[int, gdb.Value] = {}
    count = [0]
    out = []
    for a in spaces:
        root = core.ptr(a["root"])
        if root in roots:
            roots[root]["address-spaces"].append(core.cstr(a["name"]))
            continue
        entry = {"address-spaces": [core.cstr(a["name"])],
                 "root": _region(a["root"].dereference(), 0, 0, count, aliases)}
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
        targets.append(_region(mr, 0, 0, count, aliases))
    return {"address-spaces": out, "alias-targets": targets, "regions": count[0]}


def flat(as_name: Optional[str] = None) -> list[dict[str, Any]]:
    """QEMU's rendered FlatView of each address space: what `info mtree -f` prints."""
    views: dict[int, dict[str, Any]] = {}
    out = []
    for a in _find_as(as_name):
        fv = a["current_map"]
        key = core.ptr(fv)
        name = core.cstr(a["name"])
        if key in views:
            views[key]["address-spaces"].append(name)
            continue
        ranges = []
        if key:
            fv = fv.dereference()
            nr = int(fv["nr"])
            if nr > 1000000:
                raise core.VirtoptGdbError(f"FlatView of {name} claims {nr} ranges: corrupt")
            base = fv["ranges"]
            for i in range(nr):
                fr = base[i]
                mr = fr["mr"].dereference()
                start = core.int128(fr["addr"]["start"])
                size = core.int128(fr["addr"]["size"])
                readonly = bool(fr["readonly"])
                ranges.append({
                    "start": start,
                    "end": (start + size - 1) & U64,
                    "size": size,
                    "region": _name(mr),
                    "priority": int(mr["priority"]),
                    "kind": "rom" if readonly else _mr_kind(mr),
                    "nonvolatile": bool(fr["nonvolatile"]),
                    "offset-in-region": int(fr["offset_in_region"]),
                    "region-address": core.ptr(fr["mr"]),
                })
        root = None
        if key and core.ptr(fv["root"]):
            root = _name(fv["root"].dereference())
        entry = {"address-spaces": [name], "as-root": _name(a["root"].dereference()), "root": root,
                 "ranges": ranges}
        views[key] = entry
        out.append(entry)
    return out


def _container_path(mr_addr: int) -> list[str]:
    t = core.CachedType("MemoryRegion").pointer()
    path = []
    mr = gdb.Value(mr_addr).cast(t)
    for _ in range(64):
        if not core.ptr(mr):
            break
        path.append(_name(mr.dereference()))
        mr = mr["container"]
    return list(reversed(path))


def lookup(addr: int, as_name: str = "memory") -> dict[str, Any]:
    """Which region of address space as_name answers at addr (as the flat view dispatches it)."""
    views = flat(as_name)
    for r in views[0]["ranges"]:
        if r["start"] <= addr <= r["end"]:
            return {
                "address-space": as_name,
                "address": addr,
                "found": True,
                "region": r["region"],
                "kind": r["kind"],
                "priority": r["priority"],
                "range-start": r["start"],
                "range-end": r["end"],
                "offset-in-region": r["offset-in-region"] + (addr - r["start"]),
                "path": _container_path(r["region-address"]),
            }
    return {"address-space": as_name, "address": addr, "found": False, "region": None}


def _fmt_line(indent: str, n: dict[str, Any]) -> str:
    kind = ("nv-" if n["nonvolatile"] else "") + n["kind"]
    s = f"{indent}{n['start']:016x}-{n['end']:016x} (prio {n['priority']}, {kind}): "
    if "alias" in n:
        al = n["alias"]
        s += f"alias {n['name']} @{al['name']} {al['start']:016x}-{al['end']:016x}"
    else:
        s += n["name"]
    if not n["enabled"]:
        s += " [disabled]"
    return s


def _render_tree(n: dict[str, Any], level: int, lines: list[str], disabled: bool) -> None:
    if n["enabled"] or disabled:  # like info mtree: hidden when disabled, children still shown
        lines.append(_fmt_line("  " * (level + 1), n))
    for s in n["subregions"]:
        _render_tree(s, level + 1, lines, disabled)


def _parse_addr(text: str) -> int:
    try:
        v = int(gdb.parse_and_eval(text)) if not text.lower().startswith("0x") else int(text, 16)
    except (gdb.error, ValueError) as exc:
        raise core.VirtoptGdbError(f"not an address: {text}") from exc
    if v < 0 or v > U64:
        raise core.VirtoptGdbError(f"address out of range: {text}")
    return v


@core.needs_debug_info
class MtreeCommand(core.VirtoptCommand):
    name = "mtree"
    summary = "QEMU's memory region tree (or its flat view) per address space; works on QEMU 7.2."
    epilog = ("examples:\n  virtopt mtree\n  virtopt mtree memory --flat\n  virtopt mtree I/O --json\n"
              "  virtopt mtree lookup 0xfee00000")
    prefix = True

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("address_space", nargs="?", metavar="ADDRESS-SPACE",
                       help="address space name (memory, I/O, cpu-memory-0, ...); default all")
        p.add_argument("--flat", action="store_true", help="the flat view QEMU dispatches with (info mtree -f)")
        p.add_argument("--disabled", action="store_true", help="also show disabled regions (info mtree -D)")

    def collect(self, args: argparse.Namespace) -> Any:
        if args.flat:
            return {"flat-views": flat(args.address_space)}
        return tree(args.address_space)

    def render(self, data: Any, args: argparse.Namespace) -> None:
        lines: list[str] = []
        if "flat-views" in data:
            for i, v in enumerate(data["flat-views"]):
                lines.append(f"FlatView #{i}")
                for a in v["address-spaces"]:
                    lines.append(f' AS "{a}", root: {v["as-root"]}')
                lines.append(f" Root memory region: {v['root'] or '(none)'}")
                if not v["ranges"]:
                    lines.append("  No rendered FlatView")
                for r in v["ranges"]:
                    kind = ("nv-" if r["nonvolatile"] else "") + r["kind"]
                    line = f"  {r['start']:016x}-{r['end']:016x} (prio {r['priority']}, {kind}): {r['region']}"
                    if r["offset-in-region"]:
                        line += f" @{r['offset-in-region']:016x}"
                    lines.append(line)
                lines.append("")
        else:
            for a in data["address-spaces"]:
                for name in a["address-spaces"]:
                    lines.append(f"address-space: {name}")
                _render_tree(a["root"], 0, lines, args.disabled)
                lines.append("")
            for t in data["alias-targets"]:
                lines.append(f"memory-region: {t['name']}")
                _render_tree(t, 0, lines, args.disabled)
                lines.append("")
        gdb.write("\n".join(lines) + "\n")


@core.needs_debug_info
class MtreeLookupCommand(core.VirtoptCommand):
    name = "mtree lookup"
    summary = "Which memory region answers at an address (from QEMU's flat view)."
    epilog = "examples:\n  virtopt mtree lookup 0xfee00000\n  virtopt mtree lookup 0x3f8 --as I/O --json"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("addr", metavar="ADDR", help="guest physical address (hex or a gdb expression)")
        p.add_argument("--as", dest="address_space", default="memory", help="address space (default memory)")

    def collect(self, args: argparse.Namespace) -> Any:
        return lookup(_parse_addr(args.addr), args.address_space)

    def render(self, d: Any, args: argparse.Namespace) -> None:
        if not d["found"]:
            gdb.write(f"{d['address']:#x}: no region in address space {d['address-space']} (unassigned)\n")
            return
        gdb.write(f"{d['address']:#x} in {d['address-space']}: {d['region']} ({d['kind']}, prio {d['priority']}) "
                  f"offset {d['offset-in-region']:#x}; range {d['range-start']:016x}-{d['range-end']:016x}\n")
        gdb.write(f"  path: {' / '.join(d['path'])}\n")


def register() -> None:
    MtreeCommand()
    MtreeLookupCommand()
