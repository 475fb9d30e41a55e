"""The L2-cache simulator's library API: simulate, curve, recommend. Each returns a dict ready
for --output=json (kebab-case keys; "_"-prefixed keys hold objects for rendering and are dropped
by strip_private); the front doors only render it.

Where the lookups come from: a captured slice-level trace (QEMU's own lookups; only entry sizes
at least as large as the slices it was captured with can be derived from it), a bare disk that is
fully written (vectorized: geometry.full_disk_l2_lookups, generated and consumed in chunks, so
memory follows the slices touched, not the disk size or the request count), or the request model
(requests.ImageState: real images, fresh bare disks, allocating writes).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import numpy as np

from qemu_ext import errors
from qemu_ext.errors import BadInputError, UsageError
from qemu_ext.l2cache import geometry as G
from qemu_ext.l2cache import model as M
from qemu_ext.l2cache import options as O
from qemu_ext.l2cache import stream as S
from qemu_ext.l2cache import workloads as W

MODEL_MAX_REQUESTS = 20_000_000  # the request model keeps every lookup in memory (about 100 B each)
LOOKUP_CHUNK = 1 << 17

# progress(total, description) -> an object with update(n) and close() (tqdm's interface); the
# front door passes qemu_ext.output.progress, the library never draws anything itself
Progress = Callable[[Optional[int], str], Any]


@dataclass
class Disk:
    """What is simulated: a real image (read-only) or bare geometry."""

    image: Optional[str] = None
    virtual_size: Optional[int] = None
    cluster_size: int = 65536
    extended_l2: bool = False
    allocation: str = "full"  # bare geometry: 'full' or 'empty'

    def describe(self, geom: G.Geometry) -> dict:
        d: dict[str, Any] = {
            "virtual-size": geom.virtual_size,
            "cluster-size": geom.cluster_size,
            "extended-l2": geom.extended_l2,
        }
        if self.image:
            d["filename"] = self.image
        else:
            d["allocation"] = self.allocation
        return d


@dataclass
class Settings:
    """-drive / -blockdev cache options (None = not given) and the QEMU version resolving them."""

    l2_cache_size: Optional[int] = None
    l2_cache_entry_size: Optional[int] = None
    refcount_cache_size: Optional[int] = None
    cache_size: Optional[int] = None
    cache_clean_interval: Optional[int] = None
    qemu_version: str = O.DEFAULT_VERSION

    def given(self) -> bool:
        return any(v is not None for v in (self.l2_cache_size, self.l2_cache_entry_size, self.refcount_cache_size,
                                          self.cache_size))

    def resolve(self, geom: G.Geometry, entry_size: Optional[int] = None) -> O.CacheConfig:
        return O.resolve(
            geom.cluster_size,
            geom.virtual_size,
            geom.extended_l2,
            l2_cache_size=self.l2_cache_size,
            refcount_cache_size=self.refcount_cache_size,
            cache_size=self.cache_size,
            l2_cache_entry_size=entry_size if entry_size is not None else self.l2_cache_entry_size,
            cache_clean_interval=self.cache_clean_interval,
            qemu_version=self.qemu_version,
        )


@dataclass
class WorkloadSpec:
    """Where the lookups come from: requests (in memory), a synthetic stream (generated in
    chunks), or QEMU's own slice-level lookups."""

    requests: Optional[W.Workload] = None
    synthetic: Optional[W.Synthetic] = None
    slice_trace: Optional[W.SliceTrace] = None
    description: dict = field(default_factory=dict)


def workload_from_records(records: Any, source: str) -> WorkloadSpec:
    """A workload from normalised trace records (workloads.normalise): QEMU's L2 lookups when
    the qcow2_cache_get events are there, else the requests of qcow2_writev_start_req /
    qcow2_add_task."""
    recs = list(records)
    sl = W.SliceTrace.from_lookups(W.parse_cache_trace(recs))
    if len(sl):
        d = {"source": f"slice-level trace {source}", "lookups": len(sl), "captured-slice-size": sl.slice_size,
             "measured": sl.measured()}
        return WorkloadSpec(slice_trace=sl, description=d)
    w = W.parse_request_trace(recs)
    if not len(w):
        raise BadInputError(
            f"{source}: no qcow2_cache_get (is_l2_cache 1), qcow2_writev_start_req or qcow2_add_task events"
        )
    w.source = f"request-level trace {source}"
    return WorkloadSpec(requests=w, description=w.describe())


def load_workload(
    qemu_io: Optional[str] = None,
    trace: Optional[str] = None,
    synthetic: Optional[dict] = None,
    virtual_size: Optional[int] = None,
) -> WorkloadSpec:
    if qemu_io:
        w = W.read_qemu_io_file(qemu_io)
        return WorkloadSpec(requests=w, description=w.describe())
    if trace:
        return workload_from_records(W.trace_records(trace), trace)
    if virtual_size is None:
        raise UsageError("a synthetic workload needs the disk size")
    syn = W.Synthetic(virtual_size, **(synthetic or {}))
    return WorkloadSpec(synthetic=syn, description=syn.describe())


@contextlib.contextmanager
def _opened(disk: Disk, wl: Optional[WorkloadSpec] = None) -> Iterator[tuple[G.Geometry, Any]]:
    with _opened_disk(disk) as (geom, img):
        if wl is not None and wl.slice_trace is not None:
            wl.slice_trace.cap(geom.cluster_size)
        yield geom, img


@contextlib.contextmanager
def _opened_disk(disk: Disk) -> Iterator[tuple[G.Geometry, Any]]:
    if disk.image:
        from qemu_ext.qcow2 import open_image

        try:
            os.stat(disk.image)
        except OSError as exc:
            raise errors.open_error(disk.image, exc) from None
        with open_image(disk.image) as img:
            if img.has_data_file:
                raise BadInputError(f"{disk.image}: images with an external data file are not modelled")
            geom = G.Geometry(img.cluster_bits, img.virtual_size, bool(img.extended_l2), int(img.header.refcount_order))
            yield geom, img
    else:
        if not disk.virtual_size:
            raise UsageError("give an image or --virtual-size")
        cs = disk.cluster_size
        if cs < 512 or cs > 2 * 1024 * 1024 or cs & (cs - 1):
            raise UsageError(f"--cluster-size must be a power of two from 512 to 2M, not {cs}")
        if disk.extended_l2 and cs < 16384:
            raise UsageError("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes")
        O.check_virtual_size(disk.virtual_size, cs, disk.extended_l2)
        if disk.allocation not in ("full", "empty"):
            raise UsageError("--allocation must be full or empty")
        yield G.Geometry(cs.bit_length() - 1, disk.virtual_size, disk.extended_l2), None


def _model() -> Any:
    """The request model (imported when needed: a streamed bare disk does without it)."""
    from qemu_ext.l2cache import requests

    return requests


def _state(geom: G.Geometry, img: Any, disk: Disk, entry: int) -> Any:
    R = _model()
    if img is not None:
        return R.ImageState.from_image(img, entry)
    return R.ImageState.from_geometry(geom, entry, disk.allocation)


# ------------------------------------------------------------------------------------- lookups
def not_evaluable(wl: WorkloadSpec, entry: int) -> Optional[str]:
    """Why the lookups of `entry`-byte L2 entries cannot be derived from this workload, or None.

    A captured trace shows the slices QEMU's cache used: a lookup of a bigger entry is the
    lookup of the entry holding that slice, but a smaller entry would need to know which part
    of the slice each request used, which the trace does not record."""
    if wl.slice_trace is not None:
        captured = wl.slice_trace.slice_size
        if captured and entry < captured:
            return (f"the trace was captured with {captured}-byte L2 slices: the lookups of smaller entries "
                    f"cannot be derived from it (a capture with a smaller l2-cache-entry-size shows them)")
    return None


def _fast(disk: Disk, img: Any, wl: WorkloadSpec) -> bool:
    """The vectorized path: a bare, fully written disk and requests it serves."""
    if img is not None or disk.allocation != "full" or wl.slice_trace is not None:
        return False
    if wl.synthetic is not None:
        return wl.synthetic.request_size <= G.FAST_MAX_REQUEST
    return wl.requests is not None and (not len(wl.requests) or int(wl.requests.lengths.max()) <= G.FAST_MAX_REQUEST)


def _check_bounds(w: W.Workload, vsize: int) -> None:
    bad = np.flatnonzero((w.offsets < 0) | (w.lengths <= 0) | (w.offsets + w.lengths > vsize))
    if len(bad):
        i = int(bad[0])
        op = "w" if w.writes[i] else "r"
        raise BadInputError(f"request {op} {int(w.offsets[i])} {int(w.lengths[i])} lies outside the {vsize}-byte disk")


def _request_chunks(wl: WorkloadSpec) -> Iterator[W.Workload]:
    if wl.synthetic is not None:
        wl.synthetic._scan_pos = 0
        yield from wl.synthetic.chunks()
    else:
        assert wl.requests is not None
        w = wl.requests
        for s0 in range(0, len(w), LOOKUP_CHUNK):
            yield W.Workload(w.writes[s0 : s0 + LOOKUP_CHUNK], w.offsets[s0 : s0 + LOOKUP_CHUNK],
                             w.lengths[s0 : s0 + LOOKUP_CHUNK])


def _model_requests(wl: WorkloadSpec) -> W.Workload:
    if wl.requests is not None:
        return wl.requests
    assert wl.synthetic is not None
    if wl.synthetic.count > MODEL_MAX_REQUESTS:
        raise UsageError(f"--count {wl.synthetic.count} is too large for the request model (at most "
                         f"{MODEL_MAX_REQUESTS:,} requests on an image or a fresh disk; a fully written bare "
                         "disk, --virtual-size with --allocation full, takes any count)")
    return wl.synthetic.workload()


def lookup_chunks(disk: Disk, geom: G.Geometry, img: Any, wl: WorkloadSpec, entries: list[int],
                  tick: Optional[Callable[[int], None]] = None) -> Iterator[dict[int, np.ndarray]]:
    """The L2 lookups (slice offsets, int64) for each entry size, in chunks: {entry: offsets}.
    tick(n) is called as requests (trace lookups) are done, once per entry size for the model."""
    if wl.slice_trace is not None:
        offs = wl.slice_trace.offsets
        for s0 in range(0, len(offs), LOOKUP_CHUNK):
            part = offs[s0 : s0 + LOOKUP_CHUNK]
            yield {e: part & ~np.int64(e - 1) for e in entries}
            if tick:
                tick(len(part))
        return
    if _fast(disk, img, wl):
        for ch in _request_chunks(wl):
            _check_bounds(ch, geom.virtual_size)
            yield {e: G.full_disk_l2_lookups(geom, e, ch.offsets, ch.lengths, False)[0] for e in entries}
            if tick:
                tick(len(ch))
        return
    reqs = _model_requests(wl)
    for e in entries:
        st = _state(geom, img, disk, e)
        lk = _model().lookups_for(st, reqs, tick=tick)
        offs = lk.l2_offsets().astype(np.int64)
        for s0 in range(0, max(1, len(offs)), LOOKUP_CHUNK):
            yield {e: offs[s0 : s0 + LOOKUP_CHUNK]}


def _bar(progress: Optional[Progress], disk: Disk, img: Any, wl: WorkloadSpec, entries: int, desc: str) -> Any:
    """A progress bar over the requests, or the trace's lookups; the request model goes over the
    requests once per entry size."""
    if progress is None:
        return None
    if wl.slice_trace is not None:
        return progress(len(wl.slice_trace), desc)
    n = wl.synthetic.count if wl.synthetic is not None else len(wl.requests) if wl.requests is not None else 0
    return progress(n if _fast(disk, img, wl) else n * entries, desc)


def _replay(
    offs: np.ndarray,
    rfd: np.ndarray,
    cfg: O.CacheConfig,
    ts: Optional[np.ndarray],
    detailed: bool,
    opened_ns: Optional[int] = None,
) -> M.Qcow2Cache:
    """Run the lookups through QEMU's cache; with timestamps, the cache-clean-interval timer
    (armed when the image is opened, re-armed each time it fires) runs qcow2_cache_clean_unused."""
    c = M.Qcow2Cache(cfg.l2_cache_entries, cfg.l2_cache_entry_size, detailed=detailed)
    interval_ns = cfg.cache_clean_interval * 10**9
    if ts is not None and interval_ns:
        next_clean = (int(ts[0]) if opened_ns is None else opened_ns) + interval_ns
        for o, r, t in zip(offs.tolist(), rfd.tolist(), ts.tolist()):
            while t >= next_clean:
                c.clean_unused()
                next_clean += interval_ns
            c.put(c.get(o, r))
    else:
        for o, r in zip(offs.tolist(), rfd.tolist()):
            c.put(c.get(o, r))
    return c


def _model_lookups(disk: Disk, geom: G.Geometry, img: Any, wl: WorkloadSpec,
                   entry: int) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray], Any]:
    """(L2 slice offsets, read_from_disk flags, timestamps or None, full lookup stream) for one entry size."""
    if wl.slice_trace is not None:
        t = wl.slice_trace
        return t.offsets & ~np.int64(entry - 1), t.read_from_disk, t.timestamps, None
    reqs = _model_requests(wl)
    st = _state(geom, img, disk, entry)
    lk = _model().lookups_for(st, reqs)
    ts = None
    if reqs.timestamps is not None:
        req = lk.l2_requests()
        t = reqs.timestamps
        ts = t[np.minimum(req, len(t) - 1)] if len(t) else None
    return lk.l2_offsets().astype(np.int64), lk.l2_read_flags(), ts, lk


# ------------------------------------------------------------------------------- current setting
def current_setting(geom: G.Geometry, settings: Settings, wl: WorkloadSpec) -> tuple[O.CacheConfig, dict]:
    """The cache the workload ran with (or will run with): the options given; else, for a
    captured trace, what QEMU's own cache showed (entry size from the slice offsets, entries from
    the highest cache index it used); else QEMU's defaults for this disk and version."""
    if settings.given() or wl.slice_trace is None or not len(wl.slice_trace):
        cfg = settings.resolve(geom)
        src = "options" if settings.given() else f"QEMU {settings.qemu_version} defaults (no cache option given)"
        return cfg, {"source": src}
    ev = wl.slice_trace.cache_evidence()
    entry = wl.slice_trace.slice_size
    if not entry or entry < 512 or entry > geom.cluster_size or ev["entries-used"] is None:
        cfg = settings.resolve(geom)
        return cfg, {"source": f"QEMU {settings.qemu_version} defaults (the trace does not show QEMU's cache)"}
    n = max(ev["entries-used"], O.MIN_L2_CACHE_SIZE)
    cfg = O.resolve(geom.cluster_size, geom.virtual_size, geom.extended_l2, l2_cache_size=n * entry,
                    l2_cache_entry_size=entry, cache_clean_interval=settings.cache_clean_interval,
                    qemu_version=settings.qemu_version)
    how = ("the cache was full (entries were reused for other slices)" if ev["evicted"]
           else "no entry was reused: the cache may be larger")
    return cfg, {"source": "trace", "evidence": (f"QEMU used {n} entries of {entry} bytes; {how}"),
                 "at-least": not ev["evicted"]}


# ------------------------------------------------------------------------------------- simulate
def simulate(disk: Disk, settings: Settings, wl: WorkloadSpec, detailed: bool = False,
             progress: Optional[Progress] = None) -> dict:
    """Lookups, hits, misses, hit ratio, metadata bytes read and evictions for these settings."""
    with _opened(disk, wl) as (geom, img):
        cfg, cur = current_setting(geom, settings, wl)
        e = cfg.l2_cache_entry_size
        why = not_evaluable(wl, e)
        if why:
            raise BadInputError(f"l2-cache-entry-size {e}: {why}")
        rc_stats = None
        exact_policy = detailed or wl.slice_trace is not None or not _fast(disk, img, wl)
        if exact_policy:
            offs, rfd, ts, lk = _model_lookups(disk, geom, img, wl, e)
            opened = wl.requests.opened_ns if wl.requests is not None else None
            c = _replay(offs, rfd, cfg, ts, detailed, opened)
            st = c.stats
            lookups, hits, misses, ev, reads = st.lookups, st.hits, st.misses, st.evictions, st.disk_reads
            if lk is not None:
                rcache = M.Qcow2Cache(cfg.refcount_cache_entries, cfg.cluster_size)
                for cache, o, r in zip(lk.cache, lk.offset, lk.read):
                    if cache == _model().REFCOUNT_CACHE:
                        rcache.put(rcache.get(o, r))
                rc_stats = rcache.stats
        else:
            # a fully written bare disk: every miss reads its table, nothing allocates, and QEMU's
            # cache is LRU (curve.py): the stream's stack distances give hits at this size
            cs = S.CurveStream()
            bar = _bar(progress, disk, img, wl, 1, "simulating")
            try:
                for ch in lookup_chunks(disk, geom, img, wl, [e], bar.update if bar is not None else None):
                    cs.feed(ch[e])
            finally:
                if bar is not None:
                    bar.close()
            cv = cs.curve()
            lookups, hits = cv.lookups, cv.hits(cfg.l2_cache_entries)
            misses = lookups - hits
            ev = misses - min(cfg.l2_cache_entries, cv.distinct)
            reads = misses
            st = None
    out: dict[str, Any] = {
        "disk": disk.describe(geom),
        "workload": wl.description,
        "cache": cfg.as_dict(),
        "current-setting": cur,
        "lookups": lookups,
        "hits": hits,
        "misses": misses,
        "hit-ratio": round(hits / lookups, 6) if lookups else None,
        "misses-reading-disk": reads,
        "metadata-bytes-read": reads * e,
        "evictions": ev,
    }
    if rc_stats is not None:
        out["refcount-cache"] = {"lookups": rc_stats.lookups, "hits": rc_stats.hits, "misses": rc_stats.misses}
    if detailed and st is not None and st.events is not None:
        out["events"] = [{"offset": x.offset, "index": x.index, "hit": x.hit, "read-from-disk": x.read_from_disk}
                         for x in st.events]
    return out


# ---------------------------------------------------------------------------------------- curve
def default_entry_sizes(cluster_size: int) -> list[int]:
    lo = min(4096, cluster_size)
    out = []
    e = lo
    while e <= cluster_size:
        out.append(e)
        e *= 2
    return out


def _point(cv: S.StreamCurve, entries: int, entry: int) -> dict:
    return {
        "entries": int(entries),
        "l2-cache-size": int(entries) * entry,
        "hit-ratio": round(cv.hit_ratio(int(entries)), 6),
        "warm-hit-ratio": round(cv.warm_hit_ratio(int(entries)), 6),
        "misses": cv.lookups - cv.hits(int(entries)),
    }


def knees(cv: S.StreamCurve, lo: int, hi: int, limit: int = 3) -> list[int]:
    """Entry counts where the curve bends (Kneedle on a log2 size axis): the local maxima of the
    normalised hit ratio's lead over the diagonal, each a clear bend (lead at least 0.05 above
    the lowest lead between it and the previous knee)."""
    if hi <= lo + 2:
        return []
    xs = np.unique(np.round(np.geomspace(lo, hi, num=256)).astype(np.int64))
    ys = np.array([cv.hit_ratio(int(x)) for x in xs])
    if ys[-1] - ys[0] < 0.02:
        return []
    lx = np.log2(xs.astype(np.float64))
    xn = (lx - lx[0]) / (lx[-1] - lx[0])
    yn = (ys - ys[0]) / (ys[-1] - ys[0])
    lead = yn - xn
    out: list[int] = []
    low = float("inf")
    for i in range(1, len(xs) - 1):
        low = min(low, lead[i])
        if lead[i] >= lead[i - 1] and lead[i] > lead[i + 1] and lead[i] - low >= 0.05 and lead[i] > 0.02:
            out.append(int(xs[i]))
            low = float("inf")
    best = sorted(out, key=lambda x: -lead[int(np.searchsorted(xs, x))])[:limit]
    return sorted(best)


def curve_series(geom: G.Geometry, cfg: O.CacheConfig, curves: dict[int, S.StreamCurve],
                 target: Optional[float] = None, max_points: int = 512) -> list[dict]:
    """One series per entry size: points over the cache sizes (a geometric grid plus every power
    of two), and the marked sizes: knees, maximum, current (for the current entry size) and, with
    a target, the recommended size."""
    full_bytes = O.full_coverage_size(geom.cluster_size, geom.virtual_size, geom.extended_l2)
    series = []
    for e, cv in sorted(curves.items()):
        full_entries = -(-full_bytes // e)
        top = max(O.MIN_L2_CACHE_SIZE, min(max(cv.distinct, 1), full_entries))
        n = top
        ladder = 1 << np.arange(1, n.bit_length(), dtype=np.int64)  # every power of two up to n
        idx = np.unique(np.concatenate([
            np.round(np.geomspace(O.MIN_L2_CACHE_SIZE, n, num=max_points)).astype(np.int64), ladder[ladder <= n]]))
        marks: dict[str, Any] = {
            "knees": [_point(cv, k, e) for k in knees(cv, O.MIN_L2_CACHE_SIZE, n)],
            "maximum": _point(cv, top, e),
            "current": None,
            "recommended": None,
        }
        if e == cfg.l2_cache_entry_size:
            marks["current"] = _point(cv, cfg.l2_cache_entries, e)
        if target is not None:
            need = cv.smallest_size_for(target)
            if need is not None:
                marks["recommended"] = _point(cv, max(need, O.MIN_L2_CACHE_SIZE), e)
        series.append({
            "l2-cache-entry-size": e,
            "lookups": cv.lookups,
            "distinct-slices": cv.distinct,
            "exact": cv.exact,
            "sampling-rate": round(cv.rate, 6),
            "sampled-slices": cv.sampled_slices,
            "points": [_point(cv, int(k), e) for k in idx.tolist()],
            "marks": marks,
            "_curve": cv,
        })
    return series


def curve(
    disk: Disk,
    settings: Settings,
    wl: WorkloadSpec,
    entry_sizes: Optional[list[int]] = None,
    max_points: int = 512,
    max_memory: Optional[int] = None,
    target: Optional[float] = None,
    progress: Optional[Progress] = None,
) -> dict:
    """Hit ratio over every cache size (LRU stack distances), for each entry size the workload
    can answer, with the sizes worth seeing marked: the knees, the maximum (the smallest size
    that holds every slice), the current setting and, with `target`, the recommended size."""
    with _opened(disk, wl) as (geom, img):
        cfg, cur = current_setting(geom, settings, wl)
        sizes = sorted(set(entry_sizes)) if entry_sizes else sorted({cfg.l2_cache_entry_size,
                                                                      *default_entry_sizes(geom.cluster_size)})
        for e in sizes:
            if e < 512 or e > geom.cluster_size or e & (e - 1):
                raise UsageError(f"entry size {e} must be a power of two between 512 and the cluster size "
                                 f"({geom.cluster_size})")
        skipped = [{"l2-cache-entry-size": e, "reason": why} for e in sizes if (why := not_evaluable(wl, e))]
        todo = [e for e in sizes if not not_evaluable(wl, e)]
        if not todo:
            raise BadInputError(f"no entry size can be evaluated: {skipped[0]['reason']}")
        budget = None if max_memory is None else max(1 << 20, max_memory // len(todo))
        streams = {e: S.CurveStream(max_memory=budget) for e in todo}
        bar = _bar(progress, disk, img, wl, len(todo), "curve")
        try:
            for ch in lookup_chunks(disk, geom, img, wl, todo, bar.update if bar is not None else None):
                for e, offs in ch.items():
                    streams[e].feed(offs)
        finally:
            if bar is not None:
                bar.close()
        series = curve_series(geom, cfg, {e: streams[e].curve() for e in todo}, target, max_points)
    return {"disk": disk.describe(geom), "workload": wl.description, "cache": cfg.as_dict(),
            "current-setting": cur, "curves": series, "not-evaluated": skipped}


def recommend(disk: Disk, settings: Settings, wl: WorkloadSpec, target: float = 0.99,
              max_memory: Optional[int] = None, progress: Optional[Progress] = None,
              node: str = "disk0", image: Optional[str] = None) -> dict:
    """Smallest l2-cache-size reaching `target` (warm hit ratio) over the entry sizes the
    workload can answer, the full-coverage size, their memory cost and option text.

    The target applies to the warm hit ratio (lookups after the first of each slice): the first
    lookup of a slice misses at any cache size, so a short workload would otherwise never reach
    a high target although a running VM does."""
    if not 0.0 < target <= 1.0 or target != target:
        raise UsageError(f"--target must be above 0 and at most 1, not {target}")
    res = curve(disk, settings, wl, target=target, max_memory=max_memory, progress=progress)
    return recommendation(res, settings.qemu_version, target, image or disk.image or "disk.qcow2", node)


def recommendation(res: dict, qemu_version: str, target: float, image: str = "disk.qcow2",
                   node: str = "disk0") -> dict:
    """recommend()'s answer from a curve() result (also the one --watch keeps up to date)."""
    cache = res["cache"]
    cs = res["disk"]["cluster-size"]
    vsize = res["disk"]["virtual-size"]
    ext = res["disk"]["extended-l2"]
    full = O.full_coverage_size(cs, vsize, ext)

    def texts(size: int, e: Optional[int]) -> dict:
        return O.option_text(size, e, image, node, cs, vsize, ext, qemu_version)

    options = []
    for s in res["curves"]:
        cv: S.StreamCurve = s["_curve"]
        e = s["l2-cache-entry-size"]
        rec = s["marks"]["recommended"]
        if rec is None:
            continue
        size = rec["l2-cache-size"]
        r = O.resolve(cs, vsize, ext, l2_cache_size=size, l2_cache_entry_size=e, qemu_version=qemu_version)
        options.append({
            "l2-cache-entry-size": e,
            "l2-cache-size": size,
            "entries": r.l2_cache_entries,
            "hit-ratio": round(cv.hit_ratio(r.l2_cache_entries), 6),
            "warm-hit-ratio": round(cv.warm_hit_ratio(r.l2_cache_entries), 6),
            "memory": r.l2_memory,
            "exact": cv.exact,
            "options": texts(size, e if _needs_entry_option(cs, vsize, ext, size, e, qemu_version) else None),
        })
    best = min(options, key=lambda o: (o["memory"], -o["l2-cache-entry-size"])) if options else None
    by_entry = {s["l2-cache-entry-size"]: s["_curve"] for s in res["curves"]}
    for o in options:
        # libvirt's cache-size leaves the entry size to QEMU: what that cache gives, when evaluated
        t = o["options"]
        le, ls = t.get("libvirt-entry-size"), t.get("libvirt-l2-cache-size")
        if le in by_entry and ls:
            t["libvirt-warm-hit-ratio"] = round(by_entry[le].warm_hit_ratio(max(ls // le, O.MIN_L2_CACHE_SIZE)), 6)
    fr = O.resolve(cs, vsize, ext, l2_cache_size=full, qemu_version=qemu_version)
    cur_series = next((s for s in res["curves"] if s["marks"]["current"] is not None), None)
    cur_mark = cur_series["marks"]["current"] if cur_series else None
    return {
        "disk": res["disk"],
        "workload": res["workload"],
        "qemu-version": qemu_version,
        "target-hit-ratio": target,
        "current": {
            "l2-cache-size": cache["l2-memory"],
            "l2-cache-entry-size": cache["l2-cache-entry-size"],
            "entries": cache["l2-cache-entries"],
            **res["current-setting"],
            "hit-ratio": cur_mark["hit-ratio"] if cur_mark else None,
            "warm-hit-ratio": cur_mark["warm-hit-ratio"] if cur_mark else None,
            "misses": cur_mark["misses"] if cur_mark else None,
            "lookups": cur_series["lookups"] if cur_series else None,
        },
        "recommended": best,
        "candidates": options,
        "full-coverage": {
            "l2-cache-size": full,
            "memory": fr.l2_memory,
            "entries": fr.l2_cache_entries,
            "l2-cache-entry-size": fr.l2_cache_entry_size,
            "options": texts(full, None),
        },
        "not-evaluated": res["not-evaluated"],
        "exact": all(s["exact"] for s in res["curves"]),
        "_curves": res,
    }


def _needs_entry_option(cs: int, vsize: int, ext: bool, size: int, e: int, qemu_version: str) -> bool:
    """Whether QEMU would pick another entry size than e for l2-cache-size=size on its own."""
    try:
        r = O.resolve(cs, vsize, ext, l2_cache_size=size, qemu_version=qemu_version)
    except BadInputError:
        return True
    return r.l2_cache_entry_size != e


def strip_private(d: Any) -> Any:
    """Drop keys starting with '_' (numpy objects kept for rendering) before JSON output."""
    if isinstance(d, dict):
        return {k: strip_private(v) for k, v in d.items() if not k.startswith("_")}
    if isinstance(d, list):
        return [strip_private(x) for x in d]
    return d
