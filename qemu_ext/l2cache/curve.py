"""Hit ratio over every cache size in one pass: LRU stack distances, vectorized in numpy.

Why LRU stack distances are exact for QEMU's Qcow2Cache: every lookup qcow2 makes is a
qcow2_cache_get immediately followed by its qcow2_cache_put (no entry is referenced by two
lookups at once in the synchronous paths modelled here). Empty entries have lru_counter 0 and
are used first; once full, the victim is the unreferenced entry with the smallest counter, i.e.
the least recently put one. So a cache of C entries always holds the C most recently used
distinct slices, and a lookup hits iff fewer than C distinct other slices were looked up since
the previous lookup of the same slice: the LRU stack distance. (tests/test_l2cache_curve.py
checks this against model.Qcow2Cache, which scans like QEMU, for every size.)

Stack distance of a re-reference i whose previous reference is p = prev[i]:
    d(i) = #{ j < i : prev[j] <= prev[i] } - (prev[i] + 1)
(all j <= p count, plus one j per distinct slice first seen after p). The dominance count
#{j < i : v[j] <= v[i]} is computed offline by splitting the index bits top-down: at each level
every node (an aligned block of indices, kept in value order) is stably partitioned by the next
index bit with cumulative sums; each element of the right half gains the number of left-half
elements before it (those have a smaller or equal value). The last 5 levels are done by brute
force on 32-element blocks. No per-lookup Python loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

BASE_BITS = 5  # brute force inside aligned blocks of 32 indices


def _compact_ids(keys: np.ndarray) -> np.ndarray:
    """Small dense ids for the looked-up offsets (same id = same slice)."""
    keys = np.asarray(keys).astype(np.int64, copy=False)
    if len(keys) == 0:
        return np.zeros(0, np.int64)
    lo = int(keys.min())
    span = int(keys.max()) - lo
    g = 1
    # offsets are multiples of the entry size: divide by the largest power of two they share
    low = np.bitwise_or.reduce(keys - lo) if span else 0
    if low:
        g = int(low & -low)
    if span // g < 1 << 26:
        k = (keys - lo) // g
        present = np.zeros(span // g + 1, np.int64)
        present[k] = 1
        remap = np.cumsum(present) - 1
        return remap[k]
    _u, inv = np.unique(keys, return_inverse=True)
    return inv.reshape(-1).astype(np.int64)


def _prev_occurrence(ids: np.ndarray) -> np.ndarray:
    """prev[i] = largest j < i with ids[j] == ids[i], or -1."""
    n = len(ids)
    prev = np.full(n, -1, np.int64)
    if n < 2:
        return prev
    if int(ids.max()) < 65536:
        order = np.argsort(ids.astype(np.uint16), kind="stable")  # radix sort
    else:
        order = np.argsort(ids, kind="stable")
    sid = ids[order]
    same = sid[1:] == sid[:-1]
    prev[order[1:][same]] = order[:-1][same]
    return prev


def dominance_counts_prev(prev: np.ndarray) -> np.ndarray:
    """c[i] = #{j < i : prev[j] <= prev[i]} for a prev-occurrence array (values distinct but -1)."""
    n = len(prev)
    # arrangement sorted by (value, index) without sorting: first references in index order,
    # then, for q ascending, the reference whose previous one is q
    first = np.flatnonzero(prev < 0)
    nxt = np.full(n, -1, np.int64)
    has = prev >= 0
    nxt[prev[has]] = np.flatnonzero(has)
    arr = np.concatenate([first, nxt[nxt >= 0]])
    return _dominance_from_arrangement(arr)


def dominance_counts(v: np.ndarray) -> np.ndarray:
    """c[i] = #{j < i : v[j] <= v[i]} for any integer array v."""
    v = np.asarray(v)
    if len(v) == 0:
        return np.zeros(0, np.int64)
    return _dominance_from_arrangement(np.argsort(v, kind="stable").astype(np.int64))


def _dominance_from_arrangement(arr: np.ndarray) -> np.ndarray:
    """arr: original indices in (value, index) order. Work buffers are allocated once (fresh
    large allocations cost page faults) and every step writes into them; a node is an aligned
    block of positions, handled as rows of a 2-D view so that node starts need no gathers."""
    n = len(arr)
    if n == 0:
        return np.zeros(0, np.int64)
    w = np.int32 if n < 2**31 - 1 else np.int64
    arr = arr.astype(w, copy=True)
    arr2 = np.empty(n, w)
    cnt = np.zeros(n, w)
    cnt2 = np.empty(n, w)
    bit = np.empty(n, w)
    ob = np.empty(n, w)
    zb = np.empty(n, w)
    tw = np.empty(n, w)
    npos = np.empty(n, np.int64)
    t64 = np.empty(n, np.int64)
    mask = np.empty(n, bool)
    bits = max(0, (n - 1).bit_length())
    for k in range(bits - 1, BASE_BITS - 1, -1):
        size = 1 << (k + 1)
        np.right_shift(arr, k, out=bit)
        np.bitwise_and(bit, 1, out=bit)
        m, r = divmod(n, size)
        for lo, rows, cols in ((0, m, size), (m * size, 1 if r else 0, r)):
            if rows == 0:
                continue
            hi = lo + rows * cols
            b2 = bit[lo:hi].reshape(rows, cols)
            o2 = ob[lo:hi].reshape(rows, cols)
            z2 = zb[lo:hi].reshape(rows, cols)
            np.cumsum(b2, axis=1, out=o2)
            ones_in = o2[:, -1:].astype(np.int64)
            np.subtract(o2, b2, out=o2)  # ones before, within the node
            np.subtract(np.arange(cols, dtype=w), o2, out=z2)  # zeros before, within the node
            t2 = tw[lo:hi].reshape(rows, cols)
            np.multiply(b2, z2, out=t2)
            c2 = cnt[lo:hi].reshape(rows, cols)
            np.add(c2, t2, out=c2)  # right-half elements gain the left-half elements before them
            p2 = npos[lo:hi].reshape(rows, cols)
            base = (lo + np.arange(rows, dtype=np.int64) * cols)[:, None]
            np.add(z2, base, out=p2)  # zeros keep their order at the front
            mk = mask[lo:hi].reshape(rows, cols)
            np.not_equal(b2, 0, out=mk)
            q2 = t64[lo:hi].reshape(rows, cols)
            np.add(o2, base + (cols - ones_in), out=q2)
            np.copyto(p2, q2, where=mk)  # ones after the zeros
        arr2[npos] = arr
        cnt2[npos] = cnt
        arr, arr2 = arr2, arr
        cnt, cnt2 = cnt2, cnt
    b = 1 << BASE_BITS
    full = n // b * b
    if full:
        blk = arr[:full].reshape(-1, b)
        tri = np.tri(b, b, -1, dtype=bool)  # [i, j]: j before i in value order
        step = max(1, (1 << 20) // b)  # rows per batch: bounded temporary memory
        flat = cnt[:full].reshape(-1, b)
        for r0 in range(0, len(blk), step):
            x = blk[r0 : r0 + step]
            flat[r0 : r0 + step] += ((x[:, None, :] < x[:, :, None]) & tri).sum(axis=2, dtype=w)
    if full < n:
        tail = arr[full:]
        mm = len(tail)
        tri = np.tri(mm, mm, -1, dtype=bool)
        cnt[full:] += ((tail[None, :] < tail[:, None]) & tri).sum(axis=1, dtype=w)
    out = np.empty(n, np.int64)
    out[arr] = cnt
    return out


def stack_distances(keys: np.ndarray) -> np.ndarray:
    """LRU stack distance of every lookup (-1 for a first reference)."""
    keys = np.asarray(keys)
    n = len(keys)
    if n == 0:
        return np.zeros(0, np.int64)
    ids = _compact_ids(keys)
    # immediate repeats have distance 0 and do not change any other distance: drop them
    keep = np.ones(n, bool)
    keep[1:] = ids[1:] != ids[:-1]
    if keep.all():
        rid = ids
        kidx = None
    else:
        kidx = np.flatnonzero(keep)
        rid = ids[kidx]
    prev = _prev_occurrence(rid)
    c = dominance_counts_prev(prev)
    np.subtract(c, prev + 1, out=c)
    c[prev < 0] = -1
    if kidx is None:
        return c
    out = np.zeros(n, np.int64)
    out[kidx] = c
    return out


@dataclass
class Curve:
    """Hits for every cache size 1..max_entries (index 0 = 1 entry)."""

    lookups: int
    distinct: int
    hits_by_size: np.ndarray  # hits_by_size[c-1] = hits with c entries

    def hits(self, entries: int) -> int:
        if entries <= 0:
            return 0
        if entries > len(self.hits_by_size):
            return int(self.hits_by_size[-1]) if len(self.hits_by_size) else 0
        return int(self.hits_by_size[entries - 1])

    def hit_ratio(self, entries: int) -> float:
        return self.hits(entries) / self.lookups if self.lookups else 1.0

    def warm_hit_ratio(self, entries: int) -> float:
        """Hit ratio among re-references: the first lookup of each slice misses at any size."""
        re = self.lookups - self.distinct
        return self.hits(entries) / re if re else 1.0

    def smallest_size_for(self, target: float, warm: bool = True) -> Optional[int]:
        """Smallest number of entries whose (warm) hit ratio reaches target (None: never)."""
        total = self.lookups - self.distinct if warm else self.lookups
        if total <= 0:
            return 1
        need = target * total
        ok = np.flatnonzero(self.hits_by_size >= need - 1e-9)
        return int(ok[0]) + 1 if len(ok) else None


def curve_from_distances(d: np.ndarray) -> Curve:
    n = len(d)
    re = d[d >= 0]
    distinct = int(n - len(re))
    hist = np.bincount(re, minlength=max(1, distinct)) if len(re) else np.zeros(max(1, distinct), np.int64)
    hits = np.cumsum(hist)[: max(1, distinct)]
    return Curve(lookups=n, distinct=distinct, hits_by_size=hits.astype(np.int64))


def lru_curve(keys: np.ndarray) -> Curve:
    """Hit counts for every cache size from a sequence of looked-up slice offsets."""
    return curve_from_distances(stack_distances(keys))
