"""The streamed curve (stream.py): exact mode gives QEMU's hits at every cache size, whatever the
chunking, as the scan model (model.Qcow2Cache) does; sampled mode (SHARDS) stays close to the exact
curve with a bounded sample set, and says it sampled."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qemu_ext.l2cache import curve as C
from qemu_ext.l2cache import model as M
from qemu_ext.l2cache import stream as S


@given(st.lists(st.integers(1, 30), min_size=1, max_size=300), st.integers(1, 64), st.sampled_from([512, 4096, 65536]))
@settings(max_examples=60, deadline=None)
def test_streamed_exact_curve_equals_qemu_scan_model(slots, chunk, table):
    offs = np.array(slots, dtype=np.int64) * table
    cs = S.CurveStream(chunk=chunk)
    # fed in pieces of any length, as a capture delivers them
    cut = len(offs) // 3
    cs.feed(offs[:cut])
    cs.feed(offs[cut:])
    cv = cs.curve()
    assert cv.exact and cv.rate == 1.0 and cv.lookups == len(offs) and cv.distinct == len(set(slots))
    for size in range(1, 33):
        assert M.replay(offs, size, table).hits == cv.hits(size), size


def test_streamed_exact_equals_in_memory_curve_on_a_long_trace():
    rng = np.random.default_rng(3)
    offs = (rng.zipf(1.3, 400_000) % 20_000 + 1).astype(np.int64) * 4096
    ref = C.lru_curve(offs)
    cs = S.CurveStream()
    for part in np.array_split(offs, 7):
        cs.feed(part)
    cv = cs.curve()
    assert cv.exact and cv.distinct == ref.distinct
    sizes = np.unique(np.geomspace(1, ref.distinct + 10, 200).astype(int))
    assert [cv.hits(int(k)) for k in sizes] == [ref.hits(int(k)) for k in sizes]
    assert cv.smallest_size_for(0.9) == ref.smallest_size_for(0.9)


def test_sampled_curve_is_close_and_bounded():
    """200k distinct slices, a sample set of 4096: the rate drops to about 2%, the state stays at
    the sample set, and the curve is within 0.01 of the exact one on average."""
    rng = np.random.default_rng(9)
    n, u = 2_000_000, 200_000
    offs = (rng.integers(0, u, n) + 1).astype(np.int64) * 4096
    ref = C.lru_curve(offs)
    cs = S.CurveStream(sample_slices=4096)
    peak = 0
    for part in np.array_split(offs, 20):
        cs.feed(part)
        peak = max(peak, cs.slices)
    cv = cs.curve()
    assert not cv.exact and 0.01 < cv.rate < 0.05
    assert peak <= 4096
    assert abs(cv.distinct - ref.distinct) < 0.05 * ref.distinct
    sizes = np.unique(np.geomspace(1, ref.distinct, 300).astype(int))
    err = np.mean([abs(cv.hit_ratio(int(k)) - ref.hit_ratio(int(k))) for k in sizes])
    assert err < 0.01, err


def test_budget_decides_exact_or_sampled():
    offs = (np.arange(50_000) % 5000 + 1).astype(np.int64) * 4096
    big = S.CurveStream(max_memory=64 << 20)
    big.feed(offs)
    assert big.curve().exact
    small = S.CurveStream(max_memory=S.MIN_SAMPLE_SLICES * S.STATE_BYTES // 2)
    many = (np.arange(200_000) % 50_000 + 1).astype(np.int64) * 4096
    small.feed(many)
    cv = small.curve()
    assert not cv.exact and cv.rate < 1.0 and small.slices <= small.limit


def test_watch_an_hour_of_trace_in_bounded_memory():
    """360 windows of 10 s (an hour) of QEMU-shaped L2 lookups (32 KiB slices of a 64 TiB disk:
    a hot terabyte, reads anywhere, and a scan that keeps reaching new slices) through the watch
    mode's Watcher with a
    4 MiB budget: it turns to sampling, its state stays within the budget, the process's traced
    memory does not grow from the 10th minute to the end, and the report covers the hour."""
    import tracemalloc

    from qemu_ext.l2cache import node as N
    from qemu_ext.l2cache import options as O
    from qemu_ext.l2cache import requests as R
    from qemu_ext.l2cache import tune as T
    from qemu_ext.l2cache import workloads as W

    vsize, cs, entry = 64 << 40, 65536, 32768
    g = R.Geometry(16, vsize)
    cfg = O.resolve(cs, vsize, l2_cache_size=8 << 20, l2_cache_entry_size=entry)
    info = N.NodeCache("disk0", "vm.qcow2", vsize, cs, False, "command line", {"l2-cache-size": 8 << 20}, cfg, "7.2",
                       "-blockdev", False, "f0", None, None, O.full_coverage_size(cs, vsize))
    budget = 4 << 20
    wt = T.Watcher(info, 0.95, budget)
    rng = np.random.default_rng(1)
    t0 = 1_700_000_000.0
    scan = 0
    tracemalloc.start()
    try:
        mark = None
        for k in range(360):
            n = 5_000
            hot = rng.integers(0, 1 << 28, n // 2) * 4096  # the first TiB: 4096 slices
            anywhere = rng.integers(0, 1 << 34, n // 4) * 4096
            lin = (scan + np.arange(n - n // 2 - n // 4, dtype=np.int64)) * (1 << 24) % vsize  # ever new slices
            scan += len(lin)
            guest = np.concatenate([hot, anywhere, lin])[rng.permutation(n)]
            offs, _ = R.full_disk_l2_lookups(g, entry, guest, np.full(n, 4096))
            tr = W.SliceTrace(offs, np.ones(n, bool), rng.random(n) < 0.5, np.full(n, -1, np.int32))
            wt.add(T.Window(tr, 10.0, t0 + 10 * k, None, "simulated", []))
            if k == 60:
                mark = tracemalloc.get_traced_memory()[0]
            if k % 60 == 59:
                assert wt.state_bytes() <= budget
        end = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    rep = wt.report()
    assert rep["window"]["covered-seconds"] == 3600 and rep["window"]["windows"] == 360
    assert rep["measured"]["lookups"] == 1_800_000
    assert all(not s["exact"] and s["sampling-rate"] < 1 for s in rep["curves"])
    assert rep["recommended"] is not None
    assert mark is not None and end - mark < 2 << 20, (mark, end)
