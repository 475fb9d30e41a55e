"""``/l2cache [NODE]``: qcow2 cache settings of the running QEMU's nodes and the full-coverage size;
the L2 replay of a ``/trace capture`` of qcow2_cache_get events.

The sizing logic below moves into qemu_ext/l2cache (its owner's library function); this module then
keeps only the rendering and the call.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any, Optional

from qemu_ext.errors import VirtoptError
from qemu_ext.output import count, human_size, percent
from qemu_ext.qmp import address as addr
from qemu_ext.qmp.builtins.registry import BuiltinParser, Context, Result, builtin
from qemu_ext.qmp.client import QmpSession
from qemu_ext.qmp.errors import NoMatchError

_CACHE_KEYS = ("cache-size", "l2-cache-size", "refcount-cache-size", "l2-cache-entry-size", "cache-clean-interval")


@dataclass
class L2CacheInfo:
    node_name: str
    filename: str
    virtual_size: int
    cluster_size: int
    extended_l2: bool
    l2_cache_size: int  # effective bytes of L2 cache (QEMU's read_cache_sizes())
    l2_cache_entry_size: int
    l2_cache_entries: int
    refcount_cache_size: int
    cache_clean_interval: int
    settings_source: str  # "command line" | "blockdev-add options" | "QEMU defaults (...)"
    options: dict[str, Any]  # the cache options as given
    coverage: int  # bytes of guest disk the L2 cache maps when full
    full_coverage_l2_cache_size: int
    full_coverage: bool

    def to_dict(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in self.__dict__.items()}


def _cmdline_cache_options(pid: Optional[int]) -> dict[str, dict[str, str]]:
    """node-name / drive id -> cache options given on QEMU's command line (-drive / -blockdev key=value)."""
    out: dict[str, dict[str, str]] = {}
    if pid is None:
        return out
    argv = addr.proc_cmdline(pid)
    for i, a in enumerate(argv[:-1]):
        if a not in ("-drive", "-blockdev"):
            continue
        val = argv[i + 1]
        if val.startswith("{"):
            try:
                obj = json.loads(val)
            except ValueError:
                continue
            opts = {k: str(v) for k, v in obj.items() if not isinstance(v, dict)}
        else:
            opts = dict(p.split("=", 1) for p in val.split(",") if "=" in p)
        found = {k: v for k, v in opts.items() if k in _CACHE_KEYS}
        for key in ("node-name", "id"):
            if opts.get(key):
                out[opts[key]] = found
    return out


async def l2cache_info(s: QmpSession, node: Optional[str] = None,
                       known_options: Optional[dict[str, dict[str, Any]]] = None) -> list[L2CacheInfo]:
    """Cache settings of every qcow2 node (or of ``node``) and the l2-cache-size for full coverage.

    Cache options are not reported by QMP; they are taken from ``known_options`` (node -> options,
    e.g. what the shell itself sent with blockdev-add), else from QEMU's command line, else QEMU's
    defaults are assumed (and said so in ``settings_source``).
    """
    from qemu_ext.l2cache.options import full_coverage_size, parse_size, resolve

    def _opt_size(opts: dict[str, Any], key: str) -> Optional[int]:
        return parse_size(opts[key]) if key in opts else None

    nodes = await s.execute("query-named-block-nodes", {"flat": True})
    blocks = await s.execute("query-block")
    drive_of = {b.get("inserted", {}).get("node-name"): b.get("device") for b in blocks if b.get("inserted")}
    cmdline = _cmdline_cache_options(s.pid)
    out = []
    for n in nodes:
        if n.get("drv") != "qcow2":
            continue
        name = n.get("node-name", "")
        if node is not None and node not in (name, drive_of.get(name)):
            continue
        img = n.get("image", {})
        vsize = int(img.get("virtual-size", 0))
        csize = int(img.get("cluster-size", 65536))
        ext = bool(img.get("format-specific", {}).get("data", {}).get("extended-l2", False))
        opts: dict[str, Any] = {}
        source = "QEMU defaults (cache options are not visible over QMP)"
        if known_options and name in known_options:
            opts = {k: v for k, v in known_options[name].items() if k in _CACHE_KEYS}
            source = "blockdev-add options"
        elif name in cmdline or drive_of.get(name) in cmdline:
            opts = cmdline.get(name) or cmdline.get(drive_of.get(name) or "", {})
            source = "command line"
        cfg = resolve(
            csize, vsize, ext,
            l2_cache_size=_opt_size(opts, "l2-cache-size"),
            refcount_cache_size=_opt_size(opts, "refcount-cache-size"),
            cache_size=_opt_size(opts, "cache-size"),
            l2_cache_entry_size=_opt_size(opts, "l2-cache-entry-size"),
            cache_clean_interval=int(opts["cache-clean-interval"]) if "cache-clean-interval" in opts else None,
        )
        full = full_coverage_size(csize, vsize, ext)
        coverage = min(vsize, cfg.covered_bytes)
        out.append(L2CacheInfo(name, str(img.get("filename", n.get("file", ""))), vsize, csize, ext,
                               cfg.l2_memory, cfg.l2_cache_entry_size, cfg.l2_cache_entries,
                               cfg.refcount_memory, cfg.cache_clean_interval, source, opts, coverage, full,
                               cfg.l2_cache_size >= full))
    if node is not None and not out:
        raise NoMatchError("qcow2 node", node)
    return out


def recommendation(i: L2CacheInfo) -> str:
    if i.full_coverage:
        return f"the L2 cache ({human_size(i.l2_cache_size)}) already covers the whole disk ({human_size(i.virtual_size)})"
    return (f"l2-cache-size={i.full_coverage_l2_cache_size} ({human_size(i.full_coverage_l2_cache_size)}) covers "
            f"the whole disk ({human_size(i.virtual_size)}); now {human_size(i.l2_cache_size)} covers "
            f"{human_size(i.coverage)}")


def render(items: list[L2CacheInfo]) -> str:
    if not items:
        return "(no qcow2 node)"
    out = []
    for i in items:
        out.append(
            f"{i.node_name}: {i.filename} ({human_size(i.virtual_size)}, cluster {human_size(i.cluster_size)}"
            f"{', extended L2' if i.extended_l2 else ''})\n"
            f"  l2-cache-size {human_size(i.l2_cache_size)} in {count(i.l2_cache_entries)} entries of "
            f"{human_size(i.l2_cache_entry_size)}, refcount-cache-size {human_size(i.refcount_cache_size)}, "
            f"cache-clean-interval {i.cache_clean_interval} s  [{i.settings_source}]\n"
            f"  covers {human_size(i.coverage)} of {human_size(i.virtual_size)}; "
            f"full coverage needs l2-cache-size={i.full_coverage_l2_cache_size}\n"
            f"  {recommendation(i)}"
        )
    return "\n".join(out)


def _args(p: BuiltinParser) -> None:
    p.add_argument("node", nargs="?", metavar="NODE", help="a qcow2 node name or drive id (default: every qcow2 node)"
                   ).completer = lambda d: list(d.qcow2_nodes)  # type: ignore[attr-defined]


@builtin("l2cache", "qcow2 cache settings and the full-coverage l2-cache-size", _args,
         examples=["/l2cache", "/l2cache disk0"])
async def l2cache(ctx: Context, a: argparse.Namespace) -> Result:
    items = await l2cache_info(ctx.session, a.node, ctx.blockdev_options)
    return Result([{**i.to_dict(), "recommendation": recommendation(i)} for i in items], render(items))


# -- the L2 replay of a capture ------------------------------------------------------------------------

_ARG_NAMES = {"c": "is_l2_cache", "i": "index"}  # trace-events argument names -> the names in the format string


def _sim_stats(st: Any) -> dict[str, Any]:
    return {"lookups": st.lookups, "hits": st.hits, "misses": st.misses, "hit-ratio": round(st.hit_ratio, 4)}


def _cache_records(records: list[Any]) -> list[tuple[str, dict[str, str], Optional[int]]]:
    """Decoded qcow2_cache_get* records as (name, {format-string key: text}, timestamp) for the L2 area."""
    out = []
    for r in records:
        name = str(getattr(r, "name", ""))
        if not name.startswith("qcow2_cache_get"):
            continue
        norm = {}
        for k, v in dict(getattr(r, "args", {}) or {}).items():
            key = _ARG_NAMES.get(k, k)
            if isinstance(v, bool):
                v = int(v)
            norm[key] = hex(v) if key in ("offset", "co") and isinstance(v, int) else str(v)
        out.append((name, norm, getattr(r, "timestamp_ns", None)))
    return out


def simulate_capture(records: list[Any], geometry: Optional[L2CacheInfo], notes: list[str]) -> Optional[dict[str, Any]]:
    """The captured qcow2_cache lookups, replayed through the L2-cache area's Qcow2Cache model with the
    node's cache geometry and with full coverage."""
    from qemu_ext.l2cache.model import replay
    from qemu_ext.l2cache.options import resolve
    from qemu_ext.l2cache.workloads import parse_cache_trace

    try:
        lookups = [t for t in parse_cache_trace(_cache_records(records)) if t.is_l2]
    except VirtoptError as exc:
        notes.append(f"the L2-cache simulator could not read the captured events: {exc}")
        return None
    if not lookups:
        return None
    hits = sum(1 for t in lookups if t.hit)
    out: dict[str, Any] = {
        "observed": {"lookups": len(lookups), "hits": hits, "misses": len(lookups) - hits,
                     "hit-ratio": round(hits / len(lookups), 4)},
    }
    if geometry is None:
        notes.append("several qcow2 nodes: give the node (--node NODE) to replay the lookups in the L2-cache simulator")
        return out
    rfd = [t.read_from_disk for t in lookups]
    full = resolve(geometry.cluster_size, geometry.virtual_size, geometry.extended_l2,
                   l2_cache_size=geometry.full_coverage_l2_cache_size)

    def sim(entries: int, entry_size: int) -> dict[str, Any]:
        # a lookup of the slice at offset o uses the cache entry that holds o's table piece of entry_size bytes
        offsets = [t.offset - t.offset % entry_size for t in lookups]
        return {"l2-cache-entries": entries, "l2-cache-entry-size": entry_size,
                **_sim_stats(replay(offsets, entries, entry_size, rfd))}

    try:
        current = sim(geometry.l2_cache_entries, geometry.l2_cache_entry_size)
        full_cov = sim(full.l2_cache_entries, full.l2_cache_entry_size)
    except ValueError as exc:  # lookups that do not fit the node's geometry: events from another node
        notes.append(f"the captured lookups do not fit node {geometry.node_name}'s cache ({exc}): not simulated")
        return out
    out.update({"node": geometry.node_name, "simulated-current": current,
                "simulated-full-coverage": {"l2-cache-size": geometry.full_coverage_l2_cache_size, **full_cov}})
    notes.append("the simulation starts from an empty cache; QEMU's cache may have held tables before the capture")
    return out


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
