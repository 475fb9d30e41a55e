"""The L2-cache simulator's library API: simulate, curve, recommend. Each returns a dict ready
for --output=json; the CLI only renders it."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from qemu_ext.errors import BadInputError
from qemu_ext.l2cache import curve as C
from qemu_ext.l2cache import model as M
from qemu_ext.l2cache import options as O
from qemu_ext.l2cache import requests as R
from qemu_ext.l2cache import workloads as W


@dataclass
class Disk:
    """What is simulated: a real image (read-only) or bare geometry."""

    image: Optional[str] = None
    virtual_size: Optional[int] = None
    cluster_size: int = 65536
    extended_l2: bool = False
    allocation: str = "full"  # bare geometry: 'full' or 'empty'

    def describe(self, geom: R.Geometry) -> dict:
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

    def resolve(self, geom: R.Geometry, entry_size: Optional[int] = None) -> O.CacheConfig:
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
    """Where the lookups come from: a request Workload, or a slice-level trace."""

    requests: Optional[W.Workload] = None
    slice_trace: Optional[list[W.TraceLookup]] = None
    description: dict = field(default_factory=dict)


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
        recs = list(W.trace_records(trace))
        sl = [t for t in W.parse_cache_trace(recs) if t.is_l2]
        if sl:
            return WorkloadSpec(
                slice_trace=sl,
                description={"source": f"slice-level trace {trace}", "lookups": len(sl)},
            )
        w = W.parse_request_trace(recs)
        if not len(w):
            raise BadInputError(
                f"{trace}: no qcow2_cache_get (is_l2_cache 1), qcow2_writev_start_req or qcow2_add_task events"
            )
        w.source = f"request-level trace {trace}"
        return WorkloadSpec(requests=w, description=w.describe())
    if virtual_size is None:
        raise BadInputError("a synthetic workload needs the disk size")
    w = W.synthetic(virtual_size, **(synthetic or {}))
    d = w.describe()
    d.update({k: v for k, v in (synthetic or {}).items()})
    return WorkloadSpec(requests=w, description=d)


@contextlib.contextmanager
def _opened(disk: Disk) -> Iterator[tuple[R.Geometry, Any]]:
    if disk.image:
        from qemu_ext.qcow2 import open_image

        if not Path(disk.image).exists():
            raise BadInputError(f"{disk.image}: no such file")
        with open_image(disk.image) as img:
            if img.has_data_file:
                raise BadInputError(f"{disk.image}: images with an external data file are not modelled")
            geom = R.Geometry(img.cluster_bits, img.virtual_size, bool(img.extended_l2), int(img.header.refcount_order))
            yield geom, img
    else:
        if not disk.virtual_size or disk.virtual_size <= 0:
            raise BadInputError("give an image or --virtual-size")
        cs = disk.cluster_size
        if cs < 512 or cs > 2 * 1024 * 1024 or cs & (cs - 1):
            raise BadInputError("cluster size must be a power of two between 512 and 2M")
        if disk.extended_l2 and cs < 16384:
            raise BadInputError("extended L2 entries need clusters of at least 16k")
        yield R.Geometry(cs.bit_length() - 1, disk.virtual_size, disk.extended_l2), None


def _state(geom: R.Geometry, img: Any, disk: Disk, entry: int) -> R.ImageState:
    if img is not None:
        return R.ImageState.from_image(img, entry)
    return R.ImageState.from_geometry(geom, entry, disk.allocation)


def lookups_for(
    disk: Disk, geom: R.Geometry, img: Any, wl: WorkloadSpec, entry: int
) -> tuple[np.ndarray, np.ndarray, Optional[list], Optional[R.Lookups]]:
    """(L2 slice offsets, read_from_disk flags, timestamps or None, full lookup stream) for one entry size."""
    if wl.slice_trace is not None:
        offs = np.array([t.offset for t in wl.slice_trace], dtype=np.int64)
        rfd = np.array([t.read_from_disk for t in wl.slice_trace], dtype=bool)
        ts = [t.timestamp_ns for t in wl.slice_trace]
        gran = int(np.bitwise_or.reduce(offs)) if len(offs) else entry
        captured = gran & -gran if gran else entry
        if entry < captured:
            raise BadInputError(
                f"the trace was captured with {captured}-byte (or larger) L2 slices; it cannot be replayed with {entry}-byte entries"
            )
        offs = offs & ~np.int64(entry - 1)
        return offs, rfd, (ts if all(t is not None for t in ts) else None), None
    st = _state(geom, img, disk, entry)
    assert wl.requests is not None
    lk = R.lookups_for(st, wl.requests)
    ts = None
    if wl.requests.timestamps:
        req = lk.l2_requests()
        t = wl.requests.timestamps
        ts = [t[r] if r < len(t) else t[-1] for r in req.tolist()]
    return lk.l2_offsets().astype(np.int64), lk.l2_read_flags(), ts, lk


def _replay(
    offs: np.ndarray,
    rfd: np.ndarray,
    cfg: O.CacheConfig,
    ts: Optional[list],
    detailed: bool,
    opened_ns: Optional[int] = None,
) -> M.Qcow2Cache:
    """Run the lookups through QEMU's cache; with timestamps, the cache-clean-interval timer
    (armed when the image is opened, re-armed each time it fires) runs qcow2_cache_clean_unused."""
    c = M.Qcow2Cache(cfg.l2_cache_entries, cfg.l2_cache_entry_size, detailed=detailed)
    interval_ns = cfg.cache_clean_interval * 10**9
    if ts and interval_ns:
        next_clean = (ts[0] if opened_ns is None else opened_ns) + interval_ns
        for o, r, t in zip(offs.tolist(), rfd.tolist(), ts):
            while t >= next_clean:
                c.clean_unused()
                next_clean += interval_ns
            c.put(c.get(o, r))
    else:
        for o, r in zip(offs.tolist(), rfd.tolist()):
            c.put(c.get(o, r))
    return c


def simulate(disk: Disk, settings: Settings, wl: WorkloadSpec, detailed: bool = False) -> dict:
    """Lookups, hits, misses, hit ratio, metadata bytes read and evictions for these settings."""
    with _opened(disk) as (geom, img):
        cfg = settings.resolve(geom)
        offs, rfd, ts, lk = lookups_for(disk, geom, img, wl, cfg.l2_cache_entry_size)
        opened = wl.requests.opened_ns if wl.requests is not None else None
        c = _replay(offs, rfd, cfg, ts, detailed, opened)
        rc_stats = None
        if lk is not None:
            rcache = M.Qcow2Cache(cfg.refcount_cache_entries, cfg.cluster_size)
            for cache, o, r in zip(lk.cache, lk.offset, lk.read):
                if cache == R.REFCOUNT_CACHE:
                    rcache.put(rcache.get(o, r))
            rc_stats = rcache.stats
    st = c.stats
    out: dict[str, Any] = {
        "disk": disk.describe(geom),
        "workload": wl.description,
        "cache": cfg.as_dict(),
        "lookups": st.lookups,
        "hits": st.hits,
        "misses": st.misses,
        "hit-ratio": round(st.hit_ratio, 6),
        "misses-reading-disk": st.disk_reads,
        "metadata-bytes-read": st.disk_reads * cfg.l2_cache_entry_size,
        "evictions": st.evictions,
    }
    if rc_stats is not None:
        out["refcount-cache"] = {"lookups": rc_stats.lookups, "hits": rc_stats.hits, "misses": rc_stats.misses}
    if detailed and st.events is not None:
        out["events"] = [e.as_dict() for e in st.events]
    return out


def default_entry_sizes(cluster_size: int) -> list[int]:
    lo = min(4096, cluster_size)
    out = []
    e = lo
    while e <= cluster_size:
        out.append(e)
        e *= 2
    return out


def curve(
    disk: Disk,
    settings: Settings,
    wl: WorkloadSpec,
    entry_sizes: Optional[list[int]] = None,
    max_points: int = 4096,
) -> dict:
    """Hit ratio over every cache size (LRU stack distances), for each entry size."""
    with _opened(disk) as (geom, img):
        cfg = settings.resolve(geom)
        sizes = entry_sizes or sorted({cfg.l2_cache_entry_size, *default_entry_sizes(geom.cluster_size)})
        series = []
        for e in sizes:
            if e < 512 or e > geom.cluster_size or e & (e - 1):
                raise BadInputError(f"entry size {e} must be a power of two between 512 and {geom.cluster_size}")
            offs, _rfd, _ts, _lk = lookups_for(disk, geom, img, wl, e)
            cv = C.lru_curve(offs)
            full_entries = -(-O.full_coverage_size(geom.cluster_size, geom.virtual_size, geom.extended_l2) // e)
            n = max(1, min(len(cv.hits_by_size), full_entries))
            idx = np.unique(np.round(np.geomspace(1, n, num=min(n, max_points))).astype(np.int64))
            pts = [
                {
                    "entries": int(k),
                    "l2-cache-size": int(k) * e,
                    "hit-ratio": round(cv.hit_ratio(int(k)), 6),
                    "misses": cv.lookups - cv.hits(int(k)),
                }
                for k in idx.tolist()
            ]
            current = None
            if e == cfg.l2_cache_entry_size:
                current = {
                    "entries": cfg.l2_cache_entries,
                    "l2-cache-size": cfg.l2_memory,
                    "hit-ratio": round(cv.hit_ratio(cfg.l2_cache_entries), 6),
                    "misses": cv.lookups - cv.hits(cfg.l2_cache_entries),
                }
            series.append(
                {
                    "l2-cache-entry-size": e,
                    "lookups": cv.lookups,
                    "distinct-slices": cv.distinct,
                    "cold-misses": cv.distinct,
                    "points": pts,
                    "current": current,
                    "_curve": cv,
                }
            )
    return {"disk": disk.describe(geom), "workload": wl.description, "cache": cfg.as_dict(), "curves": series}


def recommend(disk: Disk, settings: Settings, wl: WorkloadSpec, target: float = 0.99) -> dict:
    """Smallest l2-cache-size reaching `target` and the full-coverage size, with their memory cost.

    The target applies to the warm hit ratio (lookups after the first of each slice): the first
    lookup of a slice misses at any cache size, so a short workload would otherwise never reach
    a high target although a running VM does."""
    if not 0.0 < target <= 1.0:
        raise BadInputError("the target hit ratio must be in (0, 1]")
    res = curve(disk, settings, wl, entry_sizes=None)
    cfg = res["cache"]
    geom_cs = res["disk"]["cluster-size"]
    vsize = res["disk"]["virtual-size"]
    ext = res["disk"]["extended-l2"]
    image = disk.image or "disk.qcow2"
    full = O.full_coverage_size(geom_cs, vsize, ext)
    options = []
    for s in res["curves"]:
        cv: C.Curve = s["_curve"]
        e = s["l2-cache-entry-size"]
        need = cv.smallest_size_for(target)
        if need is None:
            continue
        entries = max(need, O.MIN_L2_CACHE_SIZE)
        size = entries * e
        r = O.resolve(geom_cs, vsize, ext, l2_cache_size=size, l2_cache_entry_size=e, qemu_version=settings.qemu_version)
        options.append(
            {
                "l2-cache-entry-size": e,
                "l2-cache-size": size,
                "entries": r.l2_cache_entries,
                "hit-ratio": round(cv.hit_ratio(r.l2_cache_entries), 6),
                "warm-hit-ratio": round(cv.warm_hit_ratio(r.l2_cache_entries), 6),
                "memory": r.l2_memory,
                "options": O.option_text(size, e if _needs_entry_option(geom_cs, vsize, ext, size, e, settings) else None, image),
            }
        )
    best = min(options, key=lambda o: (o["memory"], -o["l2-cache-entry-size"])) if options else None
    fr = O.resolve(geom_cs, vsize, ext, l2_cache_size=full, qemu_version=settings.qemu_version)
    cur_curve = next((s for s in res["curves"] if s["current"] is not None), None)
    out = {
        "disk": res["disk"],
        "workload": res["workload"],
        "qemu-version": settings.qemu_version,
        "target-hit-ratio": target,
        "current": {
            "l2-cache-size": cfg["l2_memory"],
            "l2-cache-entry-size": cfg["l2_cache_entry_size"],
            "hit-ratio": cur_curve["current"]["hit-ratio"] if cur_curve else None,
            "warm-hit-ratio": (
                round(cur_curve["_curve"].warm_hit_ratio(cur_curve["current"]["entries"]), 6) if cur_curve else None
            ),
            "misses": cur_curve["current"]["misses"] if cur_curve else None,
            "lookups": cur_curve["lookups"] if cur_curve else None,
        },
        "recommended": best,
        "candidates": options,
        "full-coverage": {
            "l2-cache-size": full,
            "memory": fr.l2_memory,
            "entries": fr.l2_cache_entries,
            "l2-cache-entry-size": fr.l2_cache_entry_size,
            "options": O.option_text(full, None, image),
        },
    }
    return out


def _needs_entry_option(cs: int, vsize: int, ext: bool, size: int, e: int, settings: Settings) -> bool:
    """Whether QEMU would pick another entry size than e for l2-cache-size=size on its own."""
    try:
        r = O.resolve(cs, vsize, ext, l2_cache_size=size, qemu_version=settings.qemu_version)
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
