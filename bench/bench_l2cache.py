"""bench_l2cache: the L2-cache curve's speed, memory and accuracy, each against its anchor in the
same run.

1. Exact curve: every cache size for a 10-million-lookup trace (uniform random 4 KiB reads over
   a fully written 1 TiB disk, 64 KiB clusters, QEMU 7.2's default 32 MiB of 4 KiB entries), the
   streamed engine `virtopt l2cache curve` uses, against ONE straightforward single-size LRU
   replay with an OrderedDict. Required: curve CPU time < naive replay CPU time (CPU time, user +
   system: on a shared 2-core machine the wall-clock ratio swings by +-30%), same hits.
2. Sampled curve (SHARDS, fixed-size sample set): three 10-million-lookup traces of a 64 TiB disk
   (uniform, zipf, hot set + scan) from virtopt's own workload generator; the sampled curve with a
   4 MiB budget against the exact one. Required: mean absolute error of the hit ratio over every
   cache size (1 .. distinct slices) <= 0.005 for each.
3. Streaming: `virtopt l2cache curve --virtual-size 256T --count 1000000000 --entry-sizes 4k
   --max-memory 4M`, the real command in a child process: 1 billion lookups. Required: peak RSS
   <= 64 MiB and >= 5 M lookups/s (the naive replay's rate from 1. printed beside it).
4. `virtopt l2cache curve --virtual-size 1T --pattern zipf --count 5000000` (5 entry sizes; took
   300 s before the streamed engine): against the request model it replaced (the per-request
   model, then the curve, for one entry size on 100,000 requests, scaled to 5 M requests and 5
   entry sizes). Required: >= 10x faster.
Exit 1 when any is missed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qemu_ext.l2cache import geometry as G
from qemu_ext.l2cache import options as O
from qemu_ext.l2cache import stream as S
from qemu_ext.l2cache import workloads as W
from qemu_ext.output import tune_bulk_numpy

N = 10_000_000
DISK = 1 << 40
CLUSTER = 65536
REPO = Path(__file__).resolve().parent.parent


def naive_lru(offsets: list, capacity: int) -> int:
    od: OrderedDict = OrderedDict()
    hits = 0
    for o in offsets:
        if o in od:
            od.move_to_end(o)
            hits += 1
        else:
            od[o] = None
            if len(od) > capacity:
                od.popitem(last=False)
    return hits


def lookups(vsize: int, pattern: str, count: int, entry: int = 4096, **kw) -> np.ndarray:
    """The L2 lookups virtopt's generator and fast path give for a synthetic workload."""
    g = G.Geometry(16, vsize)
    syn = W.Synthetic(vsize, pattern=pattern, count=count, seed=2024, **kw)
    return np.concatenate([G.full_disk_l2_lookups(g, entry, ch.offsets, ch.lengths, False)[0] for ch in syn.chunks()])


def exact_vs_naive() -> tuple[bool, float]:
    cfg = O.resolve(CLUSTER, DISK, qemu_version="7.2")
    offs = lookups(DISK, "uniform", N)
    print(f"1. trace: {N:,} L2 lookups (random 4 KiB reads, 1 TiB disk, 64 KiB clusters); "
          f"QEMU 7.2 default cache: {cfg.l2_cache_entries} entries of {cfg.l2_cache_entry_size} bytes")
    t, c0 = time.perf_counter(), time.process_time()
    cs = S.CurveStream()
    cs.feed(offs)
    cv = cs.curve()
    t_curve, c_curve = time.perf_counter() - t, time.process_time() - c0
    print(f"   exact curve over all {cv.distinct:,} cache sizes: {t_curve:.2f} s wall, {c_curve:.2f} s CPU "
          f"(hit ratio at the default size {cv.hit_ratio(cfg.l2_cache_entries):.4f})")
    lst = offs.tolist()
    t, c0 = time.perf_counter(), time.process_time()
    hits = naive_lru(lst, cfg.l2_cache_entries)
    t_naive, c_naive = time.perf_counter() - t, time.process_time() - c0
    print(f"   naive OrderedDict LRU replay, one size: {t_naive:.2f} s wall, {c_naive:.2f} s CPU (hit ratio {hits / N:.4f})")
    same = hits == cv.hits(cfg.l2_cache_entries)
    ratio = c_curve / c_naive
    print(f"   same hits at that size: {same}; ratio curve/naive: {ratio:.2f} CPU, {t_curve / t_naive:.2f} wall "
          "(required: CPU ratio < 1.00)")
    return same and ratio < 1.0, N / t_naive


def mae(offs: np.ndarray, budget: int) -> tuple[float, S.StreamCurve, S.StreamCurve, float, float]:
    t = time.perf_counter()
    ex = S.CurveStream()
    ex.feed(offs)
    e = ex.curve()
    t_exact = time.perf_counter() - t
    t = time.perf_counter()
    sm = S.CurveStream(max_memory=budget)
    sm.feed(offs)
    s = sm.curve()
    t_sampled = time.perf_counter() - t
    sizes = np.arange(1, e.distinct + 1, dtype=np.float64)
    exact = np.full(e.distinct, float(e._cum[-1]) if len(e._cum) else 0.0)
    exact[: min(len(e._cum), e.distinct)] = e._cum[: e.distinct]
    exact /= e.lookups
    cum = np.concatenate([[0.0], s._cum])
    x = sizes / s._bin
    k = np.minimum(x.astype(np.int64), len(s._cum))
    lo, hi = cum[k], cum[np.minimum(k + 1, len(cum) - 1)]
    est = lo + (hi - lo) * (x - k)
    return float(np.abs(est - exact).mean()), e, s, t_exact, t_sampled


def sampled_accuracy() -> bool:
    vsize = 64 << 40
    budget = 4 << 20
    ok = True
    print(f"2. sampled (SHARDS) vs exact curve, 10M lookups each, 64 TiB disk, 4 KiB entries, --max-memory {budget >> 20}M:")
    for name, kw in (("uniform", {"pattern": "uniform"}), ("zipf", {"pattern": "zipf", "zipf_s": 1.1}),
                     ("hot set + scan", {"pattern": "hotset-scan", "hot_fraction": 0.01, "hot_probability": 0.7})):
        offs = lookups(vsize, count=N, **kw)
        err, e, s, te, ts = mae(offs, budget)
        good = err <= 0.005 and not s.exact
        ok &= good
        print(f"   {name:15} {e.distinct:>9,} distinct slices; sampled {s.sampled_slices:,} at rate {s.rate:.4f}: "
              f"mean absolute error {err:.4f} over every size (required <= 0.005) {'ok' if good else 'MISSED'}; "
              f"exact {te:.1f} s, sampled {ts:.1f} s")
    return ok


def streamed(naive_rate: float) -> bool:
    n = 1_000_000_000
    argv = [sys.executable, "-m", "qemu_ext", "l2cache", "curve", "--virtual-size", "256T", "--pattern", "uniform",
            "--count", str(n), "--entry-sizes", "4k", "--max-memory", "4M", "--output=json"]
    print(f"3. {' '.join(['virtopt', *argv[3:]])}")
    # the child's own peak (VmHWM of its address space after exec; a fork of this process would
    # count this process's pages in getrusage's children figure)
    t = time.perf_counter()
    p = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hwm = 0
    out_parts: list[str] = []
    import threading

    reader = threading.Thread(target=lambda: out_parts.append(p.stdout.read() if p.stdout else ""))
    reader.start()
    while p.poll() is None:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                for ln in f:
                    if ln.startswith("VmHWM:"):
                        hwm = max(hwm, int(ln.split()[1]))
        except OSError:
            pass
        time.sleep(0.1)
    reader.join()
    dt = time.perf_counter() - t
    err = p.stderr.read() if p.stderr else ""
    if p.returncode != 0:
        print(f"   failed: {err.strip()}")
        return False
    rss = hwm
    before = 0
    cp = subprocess.CompletedProcess(argv, p.returncode, "".join(out_parts), err)
    res = json.loads(cp.stdout)["curves"][0]
    rss_mib = max(rss, before) / 1024
    rate = n / dt
    ok = rss_mib <= 64 and rate >= 5e6 and res["lookups"] == n
    how = "exact" if res["exact"] else f"sampled at rate {res['sampling-rate']:.5f}"
    print(f"   {res['lookups']:,} lookups in {dt:.1f} s = {rate / 1e6:.1f} M lookups/s (naive replay: "
          f"{naive_rate / 1e6:.2f} M/s, ratio {rate / naive_rate:.1f}); peak RSS {rss_mib:.1f} MiB; {how} "
          f"(required: <= 64 MiB, >= 5 M/s) {'ok' if ok else 'MISSED'}")
    return ok


def curve_command() -> bool:
    from qemu_ext.l2cache import curve as Cv
    from qemu_ext.l2cache import requests as R

    argv = [sys.executable, "-m", "qemu_ext", "l2cache", "curve", "--virtual-size", "1T", "--pattern", "zipf",
            "--count", "5000000", "--output=json"]
    print(f"4. {' '.join(['virtopt', *argv[3:]])}")
    t = time.perf_counter()
    cp = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if cp.returncode != 0:
        print(f"   failed: {cp.stderr.strip()}")
        return False
    k = 100_000
    t = time.perf_counter()
    st = R.ImageState.from_geometry(G.Geometry(16, DISK), 4096, "full")
    lk = R.lookups_for(st, W.synthetic(DISK, pattern="zipf", count=k))
    Cv.lru_curve(lk.l2_offsets().astype(np.int64))
    dm = time.perf_counter() - t
    model = dm * (5_000_000 / k) * 5
    ratio = model / dt
    ok = ratio >= 10
    print(f"   {dt:.1f} s; the request model: {dm:.2f} s for {k:,} requests and one entry size, {model:.0f} s for "
          f"5 M requests and 5 entry sizes: {ratio:.0f}x faster (required >= 10x) {'ok' if ok else 'MISSED'}")
    return ok


def main() -> int:
    tune_bulk_numpy()
    parts = set(sys.argv[1:]) or {"1", "2", "3", "4"}  # bench_l2cache.py [PART...]
    ok1, naive_rate = exact_vs_naive() if parts & {"1", "3"} else (True, 0.0)
    ok2 = sampled_accuracy() if "2" in parts else True
    ok3 = streamed(naive_rate) if "3" in parts else True
    ok4 = curve_command() if "4" in parts else True
    if ok1 and ok2 and ok3 and ok4:
        print("bench_l2cache: ok")
        return 0
    print("bench_l2cache: MISSED")
    return 1


if __name__ == "__main__":
    sys.exit(main())
