"""The curve's claim: LRU stack distances give exactly QEMU's hits for every cache size, because
Qcow2Cache (empty entries first, then lowest lru_counter, scan from (offset/size*4) % size) acts as
LRU when each get is followed by its put. Checked against the model that scans like QEMU (which
tests/test_l2cache.py holds to real qemu-io traces), over all sizes, on lookup streams produced by
the qcow2 request model and on arbitrary sequences."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qemu_ext.l2cache import curve as C
from qemu_ext.l2cache import model as M
from qemu_ext.l2cache import requests as R
from qemu_ext.l2cache import workloads as W


def _brute_dominance(v: np.ndarray) -> np.ndarray:
    return np.array([(v[:i] <= v[i]).sum() for i in range(len(v))], dtype=np.int64)


@given(st.lists(st.integers(-3, 40), min_size=0, max_size=300))
@settings(max_examples=60, deadline=None)
def test_dominance_counts_equal_brute_force(vals):
    v = np.array(vals, dtype=np.int64)
    assert C.dominance_counts(v).tolist() == _brute_dominance(v).tolist()


@given(st.lists(st.integers(1, 24), min_size=1, max_size=250), st.sampled_from([512, 4096, 65536]))
@settings(max_examples=60, deadline=None)
def test_curve_equals_qemu_scan_model_at_every_size(slots, table):
    offs = np.array(slots, dtype=np.int64) * table
    cv = C.lru_curve(offs)
    for size in range(1, 27):
        stats = M.replay(offs, size, table)
        assert stats.hits == cv.hits(size), size


def test_curve_exact_on_qcow2_lookup_streams_with_allocations():
    # lookups of a mixed workload on a fresh 8 GiB image: new L2 tables (get_empty), COW-less
    # allocating writes, overwrites, reads; every size from 1 to the number of distinct slices
    g = R.Geometry(16, 8 << 30)
    stt = R.ImageState.from_geometry(g, 4096, "empty")
    wl = W.synthetic(8 << 30, pattern="zipf", count=3000, request_size=65536, read_ratio=0.5, seed=3)
    lk = R.lookups_for(stt, wl)
    offs = lk.l2_offsets().astype(np.int64)
    cv = C.lru_curve(offs)
    assert cv.distinct > 50
    for size in [*range(1, 40), cv.distinct - 1, cv.distinct, cv.distinct + 5]:
        assert M.replay(offs, size, 4096).hits == cv.hits(size), size


def test_stack_distances_large_random_matches_model_at_sampled_sizes():
    rng = np.random.default_rng(7)
    offs = (rng.zipf(1.2, 60000) % 3000 + 1).astype(np.int64) * 4096
    cv = C.lru_curve(offs)
    for size in (1, 2, 17, 256, 1000, 2999, 3001):
        assert M.replay(offs, size, 4096).hits == cv.hits(size)


def test_qemu_entry_choice_empty_first_then_lru():
    # QEMU scans from (offset / table_size * 4) % size; empty entries (lru 0) win, then the
    # lowest counter; with size 3 and table 4096 the first misses land on entries 0, 1, 2
    c = M.Qcow2Cache(3, 4096, detailed=True)
    for o in (4096, 8192, 12288, 4096, 16384, 8192):
        c.put(c.get(o))
    ev = [(e.offset, e.index, e.hit) for e in c.stats.events]
    assert [e[2] for e in ev] == [False, False, False, True, False, False]
    # 16384 evicts the least recently put (8192, put 2nd); 8192 then evicts 12288
    assert ev[4][1] == ev[1][1] and ev[5][1] == ev[2][1]


def test_chunked_and_segmented_path_matches_model():
    # long enough for several chunks and segments of the vectorized algorithm, with runs of
    # immediate repeats (dropped before counting) mixed in
    rng = np.random.default_rng(11)
    base = rng.integers(0, 5000, 150_000)
    offs = (np.repeat(base, rng.integers(1, 3, len(base))) + 1).astype(np.int64) * 4096
    assert len(offs) > 2 * C.SEGMENT
    cv = C.lru_curve(offs)
    for size in (3, 700, 4999):
        assert M.replay(offs, size, 4096).hits == cv.hits(size), size
    offs2 = (rng.integers(0, 5000, 200_000) + 1).astype(np.int64) * 512  # few repeats: kept
    cv2 = C.lru_curve(offs2)
    for size in (2, 1234, 4999):
        assert M.replay(offs2, size, 512).hits == cv2.hits(size), size
