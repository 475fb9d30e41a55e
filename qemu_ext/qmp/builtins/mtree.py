"""``/mtree``: the memory tree, and which region and device own an address (library: :mod:`qemu_ext.qmp.mtree`)."""

from __future__ import annotations

import argparse

from qemu_ext.qmp import mtree as mt
from qemu_ext.qmp.builtins.registry import BuiltinParser, Context, Result, builtin


def _args(p: BuiltinParser) -> None:
    sub = p.add_subparsers(dest="op", metavar="lookup|tree")
    lk = sub.add_parser("lookup", help="the region and device owning an I/O port or a guest-physical address")
    lk.add_argument("address", help="0x70, 112, 0xfed00000")
    lk.add_argument("space", nargs="?", choices=list(mt.SPACES), default="io", metavar="io|memory",
                    help="io (default) or memory")
    tr = sub.add_parser("tree", help="the regions of address spaces, with their owners (the default)")
    tr.add_argument("spaces", nargs="*", metavar="SPACE",
                    help="io, memory or a name 'info mtree' prints (default: io and memory)"
                    ).completer = lambda d: list(mt.SPACES)  # type: ignore[attr-defined]


def render_match(m: mt.MtreeMatch) -> str:
    width = 4 if m.space == "io" else 16
    what = "port" if m.space == "io" else "address"
    if not m.claimed:
        return (f"{what} {m.address:#x}: no device claims it (only the root container '{m.region}' of "
                f"address space {m.address_space} covers it; accesses are unassigned)")
    dev = m.device_type or "?"
    if m.device_id:
        dev += f" id={m.device_id}"
    lines = [
        f"{what} {m.address:#x} -> {m.region} ({m.start:0{width}x}-{m.end:0{width}x}), device {dev}"
        + (f" at {m.owner}" if m.owner else ""),
        f"  chain: {' > '.join(m.chain)}",
    ]
    if m.flat_region and m.flat_region != m.leaf:
        lines.append(f"  flat view dispatches to: {m.flat_region}")
    return "\n".join(lines)


def render_tree(tree: dict[str, list[mt.Region]]) -> str:
    out = []
    for name, regions in tree.items():
        out.append(f"address-space: {name}")
        width = 4 if name == "I/O" else 16
        for r in regions:
            extra = [r.kind] + ([f"prio {r.priority}"] if r.priority else []) + ([] if r.enabled else ["disabled"])
            line = f"{'  ' * (r.depth + 1)}{r.start:0{width}x}-{r.end:0{width}x} {r.name} ({', '.join(extra)})"
            if r.alias_of:
                line += f" -> {r.alias_of}"
            if r.owner:
                line += f"  [{r.owner}]"
            out.append(line)
    return "\n".join(out)


@builtin("mtree", "the memory tree, or which region and device own an address", _args,
         examples=["/mtree", "/mtree tree io", "/mtree lookup 0x70 io", "/mtree lookup 0xfed00000 memory"])
async def mtree(ctx: Context, a: argparse.Namespace) -> Result:
    if a.op == "lookup":
        m = await mt.mtree_lookup(ctx.session, a.address, a.space)
        return Result(m.to_dict(), render_match(m))
    tree = await mt.mtree(ctx.session, getattr(a, "spaces", None) or ["memory", "io"])
    return Result({name: [r.to_dict() for r in regions] for name, regions in tree.items()}, render_tree(tree))
