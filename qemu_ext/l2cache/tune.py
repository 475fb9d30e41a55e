"""The closed loop on a running QEMU: measure the L2 cache of a qcow2 node, recommend, apply,
verify (``virtopt l2cache tune``, the shell's ``/l2cache tune``), and the watch mode that keeps a
VM's whole day in bounded memory.

tune(): capture the node's qcow2_cache_get* events for ``seconds`` (qemu_ext.qmp.capture, which
turns the events it enabled off again on every exit path), report what QEMU did (lookups, misses,
hit ratio, per second), the simulator's prediction at the current setting (node.size_node: equal
to QEMU's misses after the cold start, or it says so), the curve and the smallest l2-cache-size
(and entry size) reaching the target warm hit ratio with its memory cost. With ``apply``, set it
live with blockdev-reopen (the node's other options passed again, since reopen resets the ones
not given), capture again and report measured before -> after beside the predicted after. A node
that cannot be reopened changes nothing: the report says why and gives the -blockdev/-drive text
and libvirt's <metadata_cache><max_size> (QEMU's cache-size) to use instead. What tracing costs
the guest is measured: the I/O rate of the node's device (query-blockstats) with the events off,
then on.

Watcher: captures in windows, deletes each window's file once decoded (the trace file rotates:
nothing grows), feeds the lookups to one CurveStream per entry size (exact while the slices fit
``max_memory``, sampled beyond), and gives the curve and recommendation over the whole time
covered at any moment.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional

from qemu_ext.errors import BadInputError, UsageError
from qemu_ext.l2cache import domain as D
from qemu_ext.l2cache import geometry as G
from qemu_ext.l2cache import node as N
from qemu_ext.l2cache import options as O
from qemu_ext.l2cache import sim
from qemu_ext.l2cache import stream as S
from qemu_ext.l2cache import workloads as W

EVENTS = "qcow2_cache_get*"  # qcow2_cache_get, _replace_entry, _read, _done: one L2 lookup each
During = Callable[[Any], Awaitable[Any]]
Notify = Callable[[str], None]


def check_args(seconds: float, target: float) -> None:
    if not 0.1 <= seconds <= 3600 or seconds != seconds:
        raise UsageError(f"--seconds must be from 0.1 to 3600, not {seconds}")
    if not 0.0 < target <= 1.0 or target != target:
        raise UsageError(f"--target must be above 0 and at most 1, not {target}")


async def io_counters(s: Any, info: N.NodeCache) -> Optional[dict[str, int]]:
    """The node's device I/O counters (query-blockstats counts per BlockBackend: a node without a
    device has none)."""
    for st in await s.execute("query-blockstats"):
        if st.get("node-name") == info.node_name or (info.device and st.get("device") == info.device):
            c = st.get("stats", {})
            return {k: int(c.get(k, 0)) for k in ("rd_operations", "wr_operations", "rd_bytes", "wr_bytes")}
    return None


def _rate(a: Optional[dict[str, int]], b: Optional[dict[str, int]], seconds: float) -> Optional[dict[str, float]]:
    if a is None or b is None or seconds <= 0:
        return None
    ops = (b["rd_operations"] - a["rd_operations"]) + (b["wr_operations"] - a["wr_operations"])
    nbytes = (b["rd_bytes"] - a["rd_bytes"]) + (b["wr_bytes"] - a["wr_bytes"])
    return {"operations-per-second": round(ops / seconds, 3), "bytes-per-second": round(nbytes / seconds, 3),
            "operations": ops, "seconds": round(seconds, 6)}


async def _window(s: Any, info: N.NodeCache, seconds: float, during: Optional[During]) -> Optional[dict[str, float]]:
    """The device's I/O rate over a window with the events off."""
    from qemu_ext.qmp.capture import run_for

    a = await io_counters(s, info)
    t0 = time.monotonic()
    await run_for(s, seconds, during)
    b = await io_counters(s, info)
    return _rate(a, b, time.monotonic() - t0)


@dataclass
class Window:
    """One capture: QEMU's L2 lookups, how long the events were on, the device's I/O rate."""

    trace: W.SliceTrace
    seconds: float
    started: float
    io: Optional[dict[str, float]]
    backend: str
    notes: list[str]


async def capture_window(s: Any, info: N.NodeCache, seconds: float, during: Optional[During] = None,
                         keep: Optional[str] = None) -> Window:
    """Capture the L2 lookups for ``seconds``; the capture file is deleted once decoded (unless
    ``keep`` names where to write it)."""
    from qemu_ext.qmp.capture import capture

    a = await io_counters(s, info)
    cap = await capture(s, EVENTS, seconds, during=during, file=keep)
    b = await io_counters(s, info)
    if keep is None:
        try:
            os.unlink(cap.file)
        except OSError:
            pass
    trace = W.SliceTrace.from_lookups(W.parse_cache_trace(W.normalise(cap.records)))
    return Window(trace, cap.seconds, cap.started, _rate(a, b, cap.seconds), cap.backend, list(cap.notes))


def measured_warm(trace: W.SliceTrace) -> Optional[float]:
    """QEMU's hit ratio over the lookups after the first of each slice."""
    if not len(trace):
        return None
    warm, misses = N.warm_counts(trace, trace.slice_size or 512)
    return round(1 - misses / warm, 6) if warm else None


def _measured(w: Window) -> dict[str, Any]:
    t = w.trace
    n = len(t)
    hits = int(t.hits.sum())
    return {"seconds": round(w.seconds, 6), "lookups": n, "hits": hits, "misses": n - hits,
            "hit-ratio": round(hits / n, 6) if n else None, "warm-hit-ratio": measured_warm(t),
            "lookups-per-second": round(n / w.seconds, 3) if w.seconds else None,
            "misses-per-second": round((n - hits) / w.seconds, 3) if w.seconds else None,
            "io": w.io}


PROBE_BATCHES = 4  # off, on, off, on, ...: drift and other I/O hit both sides alike
PROBE_READS = 50


async def _probe(s: Any, node: str, names: list[str], enable: bool) -> float:
    """Seconds per HMP qemu-io read of the node's first sector, with the L2 events on or off."""
    from qemu_ext.qmp.capture import window

    cmd = f'qemu-io {node} "read 0 512"'
    async with window(s, names if enable else []):
        t0 = time.perf_counter()
        for _ in range(PROBE_READS):
            await s.hmp(cmd)
        return (time.perf_counter() - t0) / PROBE_READS


async def tracing_cost(s: Any, info: N.NodeCache, io_off: Optional[dict[str, float]], w: Window,
                       probe: bool) -> dict[str, Any]:
    """What the events cost the guest. With accounted guest I/O (query-blockstats counts what the
    node's device does): its I/O rate with the events off, then on. Without (no device, or I/O
    that devices do not account, like HMP qemu-io): a probe of qemu-io reads of one sector (one
    L2 lookup each, always the same slice, which QEMU's cache then keeps), in batches with the
    events off and on alternately; the difference of the median times per read is the cost of
    one lookup's events, and times the lookups per second captured, the share of a CPU tracing
    takes. The probe only reads."""
    from qemu_ext.qmp.capture import trace_list

    cost: dict[str, Any] = {"events-off": io_off, "events-on": w.io}
    if io_off and w.io and io_off["operations"] > 0:
        cost["method"] = "guest I/O rate (query-blockstats)"
        cost["change"] = round(w.io["operations-per-second"] / io_off["operations-per-second"] - 1, 6)
        return cost
    if not probe:
        cost["method"] = None
        cost["note"] = "not measured"
        return cost
    names = [e.name for e in await trace_list(s, EVENTS) if e.state == "disabled"]
    await s.hmp(f'qemu-io {info.node_name} "read 0 512"')  # the slice is in the cache from now on
    offs, ons = [], []
    for _ in range(PROBE_BATCHES):
        offs.append(await _probe(s, info.node_name, names, False))
        ons.append(await _probe(s, info.node_name, names, True))
    off, on = sorted(offs)[len(offs) // 2], sorted(ons)[len(ons) // 2]
    per = max(0.0, on - off)
    rate = len(w.trace) / w.seconds if w.seconds else 0.0
    cost.update({"method": f"qemu-io reads of one sector, {PROBE_BATCHES} batches of {PROBE_READS} with the events off "
                           "and on (medians)",
                 "probe-seconds-per-read-off": round(off, 9), "probe-seconds-per-read-on": round(on, 9),
                 "seconds-per-lookup": round(per, 9), "cpu-share": round(per * rate, 6),
                 "resolved": on > off,
                 "note": ("no guest I/O was accounted on the node's device (query-blockstats): "
                          "measured with qemu-io reads instead")})
    return cost


async def _events_state(s: Any) -> list[str]:
    from qemu_ext.qmp.capture import trace_list

    return [e.name for e in await trace_list(s, EVENTS) if e.state == "enabled"]


async def tune(s: Any, node: str, seconds: float = 10.0, target: float = 0.99, apply: bool = False,
               known_options: Optional[dict[str, dict[str, Any]]] = None, during: Optional[During] = None,
               baseline: Optional[float] = None, max_memory: Optional[int] = None,
               notify: Optional[Notify] = None, probe: bool = True) -> dict[str, Any]:
    """The closed loop (see the module docstring). ``during(session)`` drives I/O in each window
    (tests); ``baseline`` seconds of events-off measurement (default: ``seconds``, 0: none);
    ``notify(text)`` gets a line as each step starts."""
    check_args(seconds, target)
    say = notify or (lambda _t: None)
    infos = await N.node_caches(s, node, known_options)
    if len(infos) != 1:
        raise BadInputError(f"{node!r} names {len(infos)} qcow2 nodes: give a node-name")
    info = infos[0]
    disk = await D.disk_for(s, info)  # the libvirt domain's disk, None for a socket
    on_before = set(await _events_state(s))
    notes: list[str] = []
    base = seconds if baseline is None else baseline
    io_off = None
    if base > 0:
        say(f"measuring the I/O rate of node {info.node_name} with the events off for {base:g} s")
        io_off = await _window(s, info, base, during)
    say(f"capturing {EVENTS} of node {info.node_name} for {seconds:g} s")
    w1 = await capture_window(s, info, seconds, during)
    notes += w1.notes
    sizing = N.size_node(info, w1.trace, target, w1.seconds, max_memory)
    notes += sizing.notes
    before = _measured(w1)
    cost = await tracing_cost(s, info, io_off, w1, probe and base > 0)
    rec = sizing.recommendation
    if disk is not None:
        if sizing.curves is not None:
            rec, more = D.recommendation(sizing.curves, info, target, disk, rec)
            notes += more
    report: dict[str, Any] = {
        "node": info.to_dict(),
        "qemu-version": info.qemu_version,
        "target-warm-hit-ratio": target,
        "trace-backend": w1.backend,  # simple (a trace file of its own) or log (QEMU's -D file or stderr)
        "tracing-cost": cost,
        "before": before,
        "current": sizing.current,
        "predicted": sizing.predicted,
        "prediction-exact": sizing.prediction_exact,
        "recommended-l2-cache-size": rec["l2-cache-size"] if rec else None,
        "recommended-l2-cache-entry-size": rec["l2-cache-entry-size"] if rec else None,
        "recommended": rec,
        "full-coverage": sizing.full_coverage,
        "not-evaluated": sizing.not_evaluated,
        "applied": None,
        "after": None,
        "notes": notes,
        "_sizing": sizing,
    }
    if rec is None:
        if len(w1.trace):
            notes.append(f"no cache size reaches a warm hit ratio of {target} on the lookups captured")
    elif rec["memory"] == sizing.current["l2-cache-size"] and rec["l2-cache-entry-size"] == \
            sizing.current["l2-cache-entry-size"]:
        notes.append("the current setting is already the recommended one")
    if apply and rec is not None:
        report["applied"], info2 = await _apply(s, info, rec, say, rec.get("cache-size") if disk else None)
        if info2 is not None:
            say(f"capturing again for {seconds:g} s with l2-cache-size={info2.config.l2_cache_size}")
            w2 = await capture_window(s, info2, seconds, during)
            after = _measured(w2)
            after["predicted-warm-hit-ratio"] = rec["warm-hit-ratio"]
            s2 = N.size_node(info2, w2.trace, target, w2.seconds, max_memory)
            after["prediction-exact"] = s2.prediction_exact
            after["predicted"] = s2.predicted
            report["after"] = after
            notes += [n for n in w2.notes + s2.notes if n not in notes]
            if known_options is not None:
                known_options[info.node_name] = dict(report["applied"]["options"])
    elif apply:
        report["applied"] = {"done": False, "reason": "nothing to apply: no recommendation"}
    left = sorted(set(await _events_state(s)) - on_before) if s.connected else []
    report["events-left-enabled"] = left
    if disk is not None:
        report["libvirt"] = libvirt_section(s, disk, info, w1.backend, report["applied"])
    return report


def libvirt_section(s: Any, disk: D.DomainDisk, info: N.NodeCache, backend: Optional[str],
                    applied: Optional[dict[str, Any]]) -> dict[str, Any]:
    """What a report on a libvirt domain adds: the domain and disk, where the trace lines were read,
    whether our monitor commands made libvirt taint the domain, and whether a change is live only."""
    return {**disk.to_dict(), "node-name": info.node_name,
            "trace-read-from": disk.log if backend == "log" else None,
            "tainted-by-virtopt": [n for n in s.transport.notices if "tainted" in n],
            "live-only": bool(applied and applied.get("done"))}


async def _apply(s: Any, info: N.NodeCache, rec: dict[str, Any], say: Notify,
                 cache_size: Optional[int] = None) -> tuple[dict[str, Any], Optional[N.NodeCache]]:
    """blockdev-reopen with the recommended size, or why not (then nothing changed). ``cache_size``
    (a libvirt domain): reopen with that cache-size alone, as libvirt passes <metadata_cache>."""
    from qemu_ext.qmp.errors import QmpCommandError

    size, e = rec["l2-cache-size"], rec["l2-cache-entry-size"]
    entry = e if e != info.config.l2_cache_entry_size or "l2-cache-entry-size" in info.options else None
    if entry is None:
        try:
            r = O.resolve(info.cluster_size, info.virtual_size, info.extended_l2, l2_cache_size=size,
                          qemu_version=info.qemu_version)
            entry = None if r.l2_cache_entry_size == e else e
        except BadInputError:
            entry = e
    why = info.reopen_refusal()
    alternatives = rec["options"]
    if why:
        return {"done": False, "reason": f"{why}; nothing was changed", "instead": alternatives}, None
    if cache_size is not None:
        opts = info.reopen_options_cache_size(cache_size)
        say(f"blockdev-reopen {info.node_name} with cache-size={cache_size}")
    else:
        opts = info.reopen_options(size, entry)
        say(f"blockdev-reopen {info.node_name} with l2-cache-size={size}"
            + (f", l2-cache-entry-size={entry}" if entry else ""))
    try:
        await s.execute("blockdev-reopen", {"options": [opts]})
    except QmpCommandError as exc:
        return {"done": False, "reason": f"QEMU refused blockdev-reopen: {exc.desc}; nothing was changed",
                "instead": alternatives, "options": opts}, None
    info2 = N.node_cache({"node-name": info.node_name, "image": {"virtual-size": info.virtual_size,
                                                                  "cluster-size": info.cluster_size,
                                                                  "format-specific": {"data": {"extended-l2": info.extended_l2}}},
                          "file": info.filename},
                         None, opts, info.file_child, info.device, info.qemu_version)
    c = info2.config
    return {"done": True, "command": "blockdev-reopen", "options": opts, "instead": alternatives,
            "l2-cache-size": c.l2_memory, "l2-cache-entry-size": c.l2_cache_entry_size,
            "refcount-cache-size": c.refcount_memory}, info2


# ------------------------------------------------------------------------------------------- watch
@dataclass
class Watcher:
    """The curve over every window captured so far, in bounded memory."""

    info: N.NodeCache
    target: float = 0.99
    max_memory: Optional[int] = None
    streams: dict[int, S.CurveStream] = field(default_factory=dict)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    first: Optional[float] = None  # time.time() of the first window's start
    last: Optional[float] = None  # and the last one's end
    windows: int = 0
    lookups: int = 0
    hits: int = 0
    seconds: float = 0.0
    last_window: Optional[dict[str, Any]] = None
    slice_size: int = 0
    backend: Optional[str] = None
    domain: Optional[D.DomainDisk] = None  # a libvirt domain's disk: the recommendation its XML can keep

    def add(self, w: Window) -> None:
        t = w.trace
        self.windows += 1
        self.first = w.started if self.first is None else self.first
        self.last = w.started + w.seconds
        self.seconds += w.seconds
        self.last_window = _measured(w)
        self.backend = w.backend
        if not len(t):
            return
        self.lookups += len(t)
        self.hits += int(t.hits.sum())
        t.cap(self.info.cluster_size)
        if not self.streams:
            self.slice_size = t.slice_size or self.info.config.l2_cache_entry_size
            sizes = [e for e in sim.default_entry_sizes(self.info.cluster_size) if e >= self.slice_size]
            sizes = sizes or [self.info.cluster_size]
            budget = None if self.max_memory is None else self.max_memory // len(sizes)
            self.streams = {e: S.CurveStream(max_memory=budget) for e in sizes}
            wl = sim.WorkloadSpec(slice_trace=t)
            self.skipped = [{"l2-cache-entry-size": e, "reason": why}
                            for e in sim.default_entry_sizes(self.info.cluster_size) if (why := sim.not_evaluable(wl, e))]
        for e, cs in self.streams.items():
            cs.feed(t.offsets & ~(e - 1))

    def state_bytes(self) -> int:
        return sum(cs.state_bytes() for cs in self.streams.values())

    def report(self) -> dict[str, Any]:
        info = self.info
        geom = G.Geometry(info.cluster_size.bit_length() - 1, info.virtual_size, info.extended_l2)
        cfg = info.config
        window = {"from": self.first, "to": self.last, "windows": self.windows,
                  "captured-seconds": round(self.seconds, 3),
                  "covered-seconds": round((self.last or 0) - (self.first or 0), 3)}
        out: dict[str, Any] = {"node": info.node_name, "window": window,
                               "measured": {"lookups": self.lookups, "hits": self.hits,
                                            "hit-ratio": round(self.hits / self.lookups, 6) if self.lookups else None},
                               "last-window": self.last_window, "curves": [], "recommended": None,
                               "not-evaluated": self.skipped, "state-bytes": self.state_bytes(),
                               "backend": self.backend}
        if not self.streams:
            return out
        series = sim.curve_series(geom, cfg, {e: cs.curve() for e, cs in self.streams.items()}, self.target)
        res = {"disk": {"virtual-size": info.virtual_size, "cluster-size": info.cluster_size,
                        "extended-l2": info.extended_l2}, "workload": {"source": f"watch of node {info.node_name}"},
               "cache": cfg.as_dict(), "current-setting": {"source": info.source}, "curves": series,
               "not-evaluated": self.skipped}
        rec = sim.recommendation(res, info.qemu_version, self.target, info.filename, info.node_name)
        out["curves"] = series
        out["recommended"] = rec["recommended"]
        if self.domain is not None:
            out["recommended"], out["notes"] = D.recommendation(res, info, self.target, self.domain,
                                                                rec["recommended"])
            out["libvirt"] = {**self.domain.to_dict(), "node-name": info.node_name,
                              "trace-read-from": self.domain.log if self.backend == "log" else None}
        out["current"] = rec["current"]
        out["exact"] = rec["exact"]
        out["_curves"] = res
        return out


async def watch(s: Any, node: str, seconds: float = 10.0, target: float = 0.99, max_memory: Optional[int] = None,
                known_options: Optional[dict[str, dict[str, Any]]] = None, during: Optional[During] = None,
                on_update: Optional[Callable[[dict[str, Any]], None]] = None, windows: Optional[int] = None,
                watcher: Optional[Watcher] = None) -> Watcher:
    """Capture window after window (each ``seconds`` long) until cancelled (Ctrl-C) or ``windows``
    are done; ``on_update(report)`` after each. The Watcher (pass one to keep it on Ctrl-C)
    holds the answer so far."""
    check_args(seconds, target)
    infos = await N.node_caches(s, node, known_options)
    if len(infos) != 1:
        raise BadInputError(f"{node!r} names {len(infos)} qcow2 nodes: give a node-name")
    wt = watcher if watcher is not None else Watcher(infos[0], target, max_memory)
    wt.info = infos[0]
    wt.domain = await D.disk_for(s, wt.info)
    k = 0
    while windows is None or k < windows:
        w = await capture_window(s, wt.info, seconds, during)
        wt.add(w)
        k += 1
        if on_update is not None:
            on_update(wt.report())
    return wt
