"""``/l2cache [NODE]`` and ``/l2cache tune NODE``: the shell's front door to qemu_ext.l2cache (the
node's cache settings, the closed loop); ``/trace capture``'s L2 replay. The sizing lives in the
library (qemu_ext.l2cache.node, .tune); this module calls it and renders."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, Optional

from qemu_ext.errors import UsageError
from qemu_ext.output import count, human_size, number, percent
from qemu_ext.qmp.builtins.registry import BuiltinParser, Context, Result, builtin
from qemu_ext.qmp.client import QmpSession

if TYPE_CHECKING:  # the library (numpy) loads on first use: the shell's prompt does not wait for it
    from qemu_ext.l2cache import node as N


async def l2cache_info(s: QmpSession, node: Optional[str] = None,
                       known_options: Optional[dict[str, dict[str, Any]]] = None) -> list[N.NodeCache]:
    """Cache settings of every qcow2 node (or of ``node``): qemu_ext.l2cache.node.node_caches."""
    from qemu_ext.l2cache import node as N

    return await N.node_caches(s, node, known_options)


def recommendation(i: N.NodeCache) -> str:
    if i.full_coverage:
        return (f"the L2 cache ({human_size(i.config.l2_memory)}) already covers the whole disk "
                f"({human_size(i.virtual_size)})")
    return (f"l2-cache-size={i.full_coverage_size} ({human_size(i.full_coverage_size)}) covers "
            f"the whole disk ({human_size(i.virtual_size)}); now {human_size(i.config.l2_memory)} covers "
            f"{human_size(i.coverage)}")


def render(items: list[N.NodeCache]) -> str:
    if not items:
        return "(no qcow2 node)"
    out = []
    for i in items:
        c = i.config
        out.append(
            f"{i.node_name}: {i.filename} ({human_size(i.virtual_size)}, cluster {human_size(i.cluster_size)}"
            f"{', extended L2' if i.extended_l2 else ''})\n"
            f"  l2-cache-size {human_size(c.l2_memory)} in {count(c.l2_cache_entries)} entries of "
            f"{human_size(c.l2_cache_entry_size)}, refcount-cache-size {human_size(c.refcount_memory)}, "
            f"cache-clean-interval {c.cache_clean_interval} s  [{i.source}]\n"
            f"  covers {human_size(i.coverage)} of {human_size(i.virtual_size)}; "
            f"full coverage needs l2-cache-size={i.full_coverage_size}\n"
            f"  {recommendation(i)}"
        )
    return "\n".join(out)


def _args(p: BuiltinParser) -> None:
    p.add_argument("what", nargs="?", metavar="NODE|tune",
                   help="a qcow2 node name or drive id (default: every qcow2 node), or 'tune'"
                   ).completer = lambda d: ["tune", *d.qcow2_nodes]  # type: ignore[attr-defined]
    p.add_argument("node", nargs="?", metavar="NODE", help="tune: the node to measure"
                   ).completer = lambda d: list(d.qcow2_nodes)  # type: ignore[attr-defined]
    p.add_argument("--seconds", type=number(float, 0.1, 3600), default=10.0,
                   help="tune: length of each capture, 0.1 to 3600 (default 10)")
    p.add_argument("--target", type=number(float, 0, 1, lo_open=True), default=0.99,
                   help="tune: target warm hit ratio, above 0 and at most 1 (default 0.99)")
    p.add_argument("--apply", action="store_true", help="tune: set the recommendation live (blockdev-reopen)")
    p.add_argument("--baseline", type=number(float, 0, 3600), default=None,
                   help="tune: seconds of I/O rate with the events off, 0 to 3600 (default --seconds; 0: none)")


@builtin("l2cache", "qcow2 cache settings; 'tune NODE' measures, recommends and applies l2-cache-size", _args,
         examples=["/l2cache", "/l2cache disk0", "/l2cache tune disk0 --seconds 5",
                   "/l2cache tune disk0 --target 0.98 --apply"])
async def l2cache(ctx: Context, a: argparse.Namespace) -> Result:
    if a.what == "tune":
        if not a.node:
            raise UsageError("usage: /l2cache tune NODE [--seconds S] [--target R] [--apply]")
        return await _tune(ctx, a)
    if a.node is not None or a.apply:
        raise UsageError("usage: /l2cache [NODE]  or  /l2cache tune NODE [--seconds S] [--target R] [--apply]")
    items = await l2cache_info(ctx.session, a.what, ctx.blockdev_options)
    return Result([{**i.to_dict(), "recommendation": recommendation(i)} for i in items], render(items))


async def _tune(ctx: Context, a: argparse.Namespace) -> Result:
    from qemu_ext.l2cache import tune as T
    from qemu_ext.l2cache.sim import strip_private
    from qemu_ext.l2cache.tune_cli import render_tune

    T.check_args(a.seconds, a.target)
    notify = ctx.err if ctx.interactive else None
    r = await T.tune(ctx.session, a.node, seconds=a.seconds, target=a.target, apply=a.apply,
                     known_options=ctx.blockdev_options, baseline=a.baseline, notify=notify)
    return Result(strip_private(r), render_tune(r))


# -- the L2 replay of a /trace capture ----------------------------------------------------------------


def simulate_capture(records: list[Any], geometry: Optional[N.NodeCache], notes: list[str]) -> Optional[dict[str, Any]]:
    """The captured lookups, replayed with the node's cache and with full coverage
    (qemu_ext.l2cache.node.replay_capture)."""
    from qemu_ext.l2cache import node as N

    return N.replay_capture(records, geometry, notes)


def render_simulation(sim: dict[str, Any]) -> str:
    o = sim["observed"]
    lines = [f"L2 lookups seen: {count(o['lookups'])} ({count(o['hits'])} hits, {count(o['misses'])} misses, "
             f"hit ratio {percent(o['hit-ratio'])})"]
    cur, full = sim.get("simulated-current"), sim.get("simulated-full-coverage")
    if cur and full:
        lines.append(f"simulated for {sim['node']}: current cache ({count(cur['l2-cache-entries'])} x "
                     f"{human_size(cur['l2-cache-entry-size'])}) {count(cur['misses'])} misses, hit ratio "
                     f"{percent(cur['hit-ratio'])}; full coverage (l2-cache-size={full['l2-cache-size']}) "
                     f"{count(full['misses'])} misses, hit ratio {percent(full['hit-ratio'])}")
    return "\n".join(lines)
