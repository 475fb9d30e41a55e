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
CHUNK_BITS = 12
SEGMENT = 1 << 16  # lookups per call of the in-chunk counting (cache-sized buffers)
CHUNK_SHIFT = 1  # chunks of about U/2 lookups: fewer chunks vs fewer levels


I32 = np.int32


def _compact_ids(keys: np.ndarray) -> np.ndarray:
    """Small dense ids (int32) for the looked-up offsets (same id = same slice)."""
    keys = np.asarray(keys).astype(np.int64, copy=False)
    if len(keys) == 0:
        return np.zeros(0, I32)
    lo = int(keys.min())
    span = int(keys.max()) - lo
    g = 1
    # offsets are multiples of the entry size: divide by the largest power of two they share
    low = int(np.bitwise_or.reduce(keys - lo)) if span else 0
    if low:
        g = low & -low
    if span // g < 1 << 26:
        k = (keys - lo) >> (g.bit_length() - 1)
        present = np.zeros(span // g + 1, I32)
        present[k] = 1
        remap = np.cumsum(present, dtype=I32)
        remap -= 1
        return remap[k]
    _u, inv = np.unique(keys, return_inverse=True)
    return inv.reshape(-1).astype(I32)


def _prev_next(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """prev[i] / nxt[i] (int32): the previous / next position with the same id, or -1.

    Segment by segment (cache-sized): inside a segment, a stable sort by id pairs each lookup
    with the next one of the same slice; across segments, last[id] holds the latest position
    seen so far."""
    n = len(ids)
    prev = np.full(n, -1, I32)
    nxt = np.full(n, -1, I32)
    if n < 2:
        return prev, nxt
    u = int(ids.max()) + 1
    small = u <= 65536
    last = np.full(u, -1, I32)
    seg_len = SEGMENT
    for s0 in range(0, n, seg_len):
        s1 = min(n, s0 + seg_len)
        sid = ids[s0:s1]
        order = np.argsort(sid.astype(np.uint16) if small else sid, kind="stable").astype(I32)
        srt = sid[order]
        same = srt[1:] == srt[:-1]
        pos = order + s0
        pv = prev[s0:s1]
        nx = nxt[s0:s1]
        pv[order[1:]] = np.where(same, pos[:-1], I32(-1))
        nx[order[:-1]] = np.where(same, pos[1:], I32(-1))
        # first occurrence of each id in the segment: its previous one is the latest seen before
        firsts = np.flatnonzero(np.concatenate(([True], ~same)))
        fo = order[firsts]
        fid = srt[firsts]
        before = last[fid]
        pv[fo] = before
        had = before >= 0
        nxt[before[had]] = fo[had] + s0
        # last occurrence of each id in the segment
        lasts = np.flatnonzero(np.concatenate((~same, [True])))
        last[srt[lasts]] = order[lasts] + s0
    return prev, nxt


def _prev_occurrence(ids: np.ndarray) -> np.ndarray:
    return _prev_next(ids)[0]


def _prev_order(prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    """Positions sorted by (prev, position) without sorting: first references in position
    order, then for q ascending the reference whose previous one is q."""
    return np.concatenate([np.flatnonzero(prev < 0).astype(I32), nxt[nxt >= 0]])


def dominance_counts_prev(prev: np.ndarray) -> np.ndarray:
    """c[i] = #{j < i : prev[j] <= prev[i]} for a prev-occurrence array (values distinct but -1)."""
    prev = np.asarray(prev)
    n = len(prev)
    nxt = np.full(n, -1, I32)
    has = prev >= 0
    nxt[prev[has]] = np.flatnonzero(has)
    return _dominance_from_arrangement(_prev_order(prev, nxt)).astype(np.int64)


def dominance_counts(v: np.ndarray) -> np.ndarray:
    """c[i] = #{j < i : v[j] <= v[i]} for any integer array v."""
    v = np.asarray(v)
    if len(v) == 0:
        return np.zeros(0, np.int64)
    return _dominance_from_arrangement(np.argsort(v, kind="stable").astype(I32)).astype(np.int64)


def _dominance_from_arrangement(arr: np.ndarray, top_bits: Optional[int] = None) -> np.ndarray:
    """Counts (int32, by original position) for arr = original positions in value order.

    Top-down over the index bits: a node is an aligned block of positions, kept in value order
    and handled as a row of a 2-D view; each level stably partitions every node by the next index
    bit (zeros first) and gives each element of the right half the number of left-half elements
    before it. With top_bits, arr is in value order inside aligned blocks of 2**top_bits positions
    and only pairs inside those blocks are counted. Buffers are allocated once."""
    n = len(arr)
    if n == 0:
        return np.zeros(0, I32)
    if n >= 2**31 - 1:
        raise ValueError("too many lookups for one curve (2**31)")
    arr = arr.astype(I32, copy=True)
    arr2 = np.empty(n, I32)
    cnt = np.zeros(n, I32)
    cnt2 = np.empty(n, I32)
    ob = np.empty(n, I32)
    zb = np.empty(n, I32)
    tmp = np.empty(n, I32)
    npos = np.empty(n, np.intp)
    mask = np.empty(n, bool)
    bits = max(0, (n - 1).bit_length())
    if top_bits is not None:
        bits = min(bits, top_bits)
    for k in range(bits - 1, BASE_BITS - 1, -1):
        size = 1 << (k + 1)
        np.bitwise_and(arr, 1 << k, out=zb)
        np.not_equal(zb, 0, out=mask)
        m, r = divmod(n, size)
        for lo, rows, cols in ((0, m, size), (m * size, 1 if r else 0, r)):
            if rows == 0:
                continue
            hi = lo + rows * cols
            mk = mask[lo:hi].reshape(rows, cols)
            o2 = ob[lo:hi].reshape(rows, cols)
            z2 = zb[lo:hi].reshape(rows, cols)
            np.cumsum(mk, axis=1, dtype=I32, out=o2)
            ones_in = o2[:, -1:].astype(np.intp)
            np.subtract(o2, mk, out=o2)  # ones before, within the node
            np.subtract(np.arange(cols, dtype=I32), o2, out=z2)  # zeros before, within the node
            c2 = cnt[lo:hi].reshape(rows, cols)
            t2 = tmp[lo:hi].reshape(rows, cols)
            np.multiply(z2, mk, out=t2)
            np.add(c2, t2, out=c2)  # right-half elements gain the left-half ones before them
            # new position in the node: zeros keep their order at the front, ones follow them
            np.subtract(o2, z2, out=t2)
            np.add(t2, (cols - ones_in).astype(I32), out=t2)
            np.multiply(t2, mk, out=t2)
            np.add(t2, z2, out=t2)
            base = (lo + np.arange(rows, dtype=np.intp) * cols)[:, None]
            np.add(t2, base, out=npos[lo:hi].reshape(rows, cols))
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
            flat[r0 : r0 + step] += ((x[:, None, :] < x[:, :, None]) & tri).sum(axis=2, dtype=I32)
    if full < n:
        tail = arr[full:]
        mm = len(tail)
        tri = np.tri(mm, mm, -1, dtype=bool)
        cnt[full:] += ((tail[None, :] < tail[:, None]) & tri).sum(axis=1, dtype=I32)
    out = cnt2
    out[arr] = cnt
    return out


def stack_distances(keys: np.ndarray) -> np.ndarray:
    """LRU stack distance (int32) of every lookup (-1 for a first reference).

    The trace is cut into chunks of C = 2**cb lookups. Inside a chunk starting at t0,
    W(i) = #{j in [t0, i) : prev[j] <= prev[i]} comes from the dominance counting restricted to
    the chunk. Then, with p = prev[i]:
      p >= t0 (previous use in the chunk):  d(i) = W(i) - (p - t0 + 1)
      p <  t0:                              d(i) = #{slices last used in (p, t0)} + W(i)
    where the positions of the last use of every slice before t0 are kept as one sorted array
    (at most one per distinct slice), updated once per chunk.
    """
    keys = np.asarray(keys)
    n_all = len(keys)
    if n_all == 0:
        return np.zeros(0, I32)
    ids = _compact_ids(keys)
    # immediate repeats have distance 0 and do not change any other distance: drop them
    keep = np.empty(n_all, bool)
    keep[0] = True
    np.not_equal(ids[1:], ids[:-1], out=keep[1:])
    # (only worth it when there are many: a few cost more to drop than to count)
    kidx = None if int(np.count_nonzero(keep)) > n_all - n_all // 8 else np.flatnonzero(keep)
    rid = ids if kidx is None else ids[kidx]
    del ids
    n = len(rid)
    prev, nxt = _prev_next(rid)
    u = int(rid.max()) + 1
    del rid
    cb = max(CHUNK_BITS, (u - 1).bit_length() - CHUNK_SHIFT)
    arr = _prev_order(prev, nxt)
    if n <= (1 << cb):
        w = _dominance_from_arrangement(arr)
        d = w - (prev + 1)
        d[prev < 0] = -1
    else:
        chunk = arr >> cb
        ck = chunk.astype(np.uint16) if int(chunk.max()) < 65536 else chunk
        del chunk
        arr = arr[np.argsort(ck, kind="stable")]  # (chunk, prev) order: a radix partition
        del ck
        # chunks are independent here: run them in segments that stay in the CPU caches
        w = np.empty(n, I32)
        seg_len = max(1 << cb, SEGMENT)
        for s0 in range(0, n, seg_len):
            s1 = min(n, s0 + seg_len)
            w[s0:s1] = _dominance_from_arrangement(arr[s0:s1] - s0, top_bits=cb)
        d = w  # computed in place, chunk by chunk
        live = np.zeros(0, I32)  # sorted positions of the last use of each slice so far
        rank = np.empty(n, I32)  # rank[q] = index of q in live, for q in live
        c = 1 << cb
        for t0 in range(0, n, c):
            t1 = min(n, t0 + c)
            p = prev[t0:t1]
            dc = d[t0:t1]
            before = p < t0
            wb = dc[before]
            dc -= p - (t0 - 1)  # previous use inside the chunk: W - (p - t0 + 1)
            pb = p[before]
            ref = pb >= 0
            k = rank[pb[ref]]
            wb[ref] += (len(live) - 1) - k  # slices last used after p and before the chunk
            wb[~ref] = -1  # first references
            dc[before] = wb
            if len(k):
                m = np.ones(len(live), bool)
                m[k] = False  # those slices are used again: their old last-use positions go
                live = live[m]
            nx = nxt[t0:t1]
            live = np.concatenate([live, (t0 + np.flatnonzero((nx < 0) | (nx >= t1))).astype(I32)])
            rank[live] = np.arange(len(live), dtype=I32)
        del arr
    if kidx is None:
        return d
    out = np.zeros(n_all, I32)
    out[kidx] = d
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
