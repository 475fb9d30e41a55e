"""The hit-ratio curve of a lookup stream fed in chunks, in bounded memory: exact while the
distinct slices fit a memory budget, sampled beyond it (SHARDS).

Exact mode. The LRU stack distance of a re-reference is the number of distinct other slices
looked up since the previous lookup of the same slice (curve.py explains why that is exactly
QEMU's Qcow2Cache). Fed chunk by chunk, with p the previous use of lookup i and t0 the chunk's
first position:
    p >= t0:  d(i) = W(i) - (p - t0 + 1)
    p <  t0:  d(i) = #{slices last used in (p, t0)} + W(i)
where W(i) = #{j in [t0, i) : prev[j] <= prev[i]} is the chunk's dominance count (curve.py's
bit-split counting). Across chunks only one thing per distinct slice is kept: its key, the time of
its last use, and the sorted array of those times. Memory: about STATE_BYTES per distinct slice
plus the chunk buffers, whatever the length of the stream.

Sampled mode (Waldspurger et al., "Efficient MRC Construction with SHARDS", FAST '15, fixed-size
variant). A slice is sampled when hash(key) < T (a spatial filter: every lookup of a sampled slice
is kept, none of the others); the rate is R = T / 2**24. The sampled stream goes through the exact
engine above; a sampled distance d stands for d / R distinct slices. At most `sample_slices`
slices are kept: when more appear, T is lowered to the hash of the largest one kept, the slices at
or above it are evicted, and the histogram is rescaled by R_new / R_old so that what was counted at
the old rate weighs as if counted at the new one. The histogram of scaled distances is kept in at
most HIST_BINS bins (coarsened by two when the distances outgrow them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from qemu_ext.l2cache import curve as C

HASH_BITS = 24
HASH_SPACE = 1 << HASH_BITS
# per distinct slice: key (8), id (4), hash (8), live time (8), histogram (8), and by id the last
# use and the lookup count (16, with up to 1.5x spare ids between compactions and 1.25x growth)
STATE_BYTES = 72
HIST_BINS = 1 << 14  # the scaled histogram of sampled mode (and its folded copy): 2 x 128 KiB
HEAVY_FACTOR = 16
HEAVY_SHARE = 0.05
DEFAULT_CHUNK = 1 << 17
MIN_CHUNK = 1 << 12
# bytes per lookup of one chunk's buffers (keys, ids, prev/next, the dominance buffers)
CHUNK_BYTES_PER_LOOKUP = 72
MIN_SAMPLE_SLICES = 4096

I32 = np.int32
I64 = np.int64
U64 = np.uint64


def slice_hash(keys: np.ndarray) -> np.ndarray:
    """A 24-bit hash of each key (splitmix64's finaliser): uniform, so `hash < T` samples each
    distinct slice with probability T / 2**24, independently of where it lies."""
    z = keys.astype(U64, copy=True)
    t = np.empty_like(z)
    with np.errstate(over="ignore"):
        z += U64(0x9E3779B97F4A7C15)
        for shift, mul in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
            np.right_shift(z, U64(shift), out=t)
            z ^= t
            z *= U64(mul)
        np.right_shift(z, U64(31), out=t)
        z ^= t
    z >>= U64(64 - HASH_BITS)
    return z.view(I64)


def chunk_for_budget(max_memory: Optional[int]) -> int:
    """Lookups per chunk: the default, or less when the memory budget is small."""
    if max_memory is None:
        return DEFAULT_CHUNK
    c = max(1 << 12, min(DEFAULT_CHUNK, max_memory // (4 * CHUNK_BYTES_PER_LOOKUP)))
    return 1 << (c.bit_length() - 1)


@dataclass
class StreamCurve:
    """The curve a stream gave: hits for every cache size, exact or estimated.

    ``hits(entries)``, ``hit_ratio``, ``warm_hit_ratio`` and ``smallest_size_for`` behave as
    curve.Curve's. ``exact`` is False when sampled; ``rate`` is then the final sampling rate.
    """

    lookups: int
    distinct: int  # exact, or estimated (sampled distinct slices / rate)
    exact: bool
    rate: float
    sampled_slices: int  # slices in the sample set at the end (all of them when exact)
    _cum: np.ndarray  # cumulative hits (exact: per distance; sampled: per bin, as a fraction)
    _bin: int = 1  # sampled: scaled-distance width of one bin

    def hits(self, entries: int) -> int:
        if entries <= 0 or self.lookups == 0:
            return 0
        if self.exact:
            if len(self._cum) == 0:
                return 0
            return int(self._cum[min(entries, len(self._cum)) - 1])
        return round(self._frac(entries) * self.lookups)

    def _frac(self, entries: int) -> float:
        # hits with `entries` entries = references with scaled distance < entries; inside a bin
        # the references are taken as spread evenly
        cum = self._cum
        if len(cum) == 0:
            return 0.0
        x = entries / self._bin
        k = int(x)
        if k >= len(cum):
            return float(cum[-1])
        lo = float(cum[k - 1]) if k > 0 else 0.0
        return lo + (float(cum[k]) - lo) * (x - k)

    def hit_ratio(self, entries: int) -> float:
        if not self.lookups:
            return 1.0
        if self.exact:
            return self.hits(entries) / self.lookups
        return self._frac(entries)

    def warm_hit_ratio(self, entries: int) -> float:
        re = self.lookups - self.distinct
        if re <= 0:
            return 1.0
        if self.exact:
            return self.hits(entries) / re
        return min(1.0, self._frac(entries) * self.lookups / re)

    @property
    def max_hit_ratio(self) -> float:
        return self.hit_ratio(max(1, self.distinct))

    def smallest_size_for(self, target: float, warm: bool = True) -> Optional[int]:
        """Smallest number of entries whose (warm) hit ratio reaches target (None: never)."""
        if self.exact:
            cv = C.Curve(self.lookups, self.distinct, self._cum.astype(I64) if len(self._cum) else np.zeros(1, I64))
            return cv.smallest_size_for(target, warm)
        f = (lambda e: self.warm_hit_ratio(e)) if warm else (lambda e: self.hit_ratio(e))
        top = max(2, int(len(self._cum) * self._bin) + self._bin)
        if f(top) < target - 1e-9:
            return None
        lo, hi = 1, top
        while lo < hi:
            mid = (lo + hi) // 2
            if f(mid) >= target - 1e-9:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def as_curve(self) -> C.Curve:
        """A curve.Curve (exact mode only): hits for every size 1..distinct."""
        if not self.exact:
            raise ValueError("a sampled curve has no per-size hit counts")
        h = self._cum.astype(I64) if len(self._cum) else np.zeros(max(1, self.distinct), I64)
        return C.Curve(self.lookups, self.distinct, h)


class CurveStream:
    """Feed slice offsets (np.int64 arrays) in any number of chunks; ``curve()`` at any time.

    ``max_memory``: bytes for the per-slice state and the chunk buffers; exact while
    STATE_BYTES per distinct slice fits, then sampled with a fixed-size sample set that fits.
    None: always exact (memory grows with the distinct slices).
    """

    def __init__(self, max_memory: Optional[int] = None, chunk: Optional[int] = None,
                 sample_slices: Optional[int] = None) -> None:
        self.chunk = chunk or chunk_for_budget(max_memory)
        self.max_memory = max_memory
        if sample_slices is None and max_memory is not None:
            state = max_memory - self.chunk * CHUNK_BYTES_PER_LOOKUP - 2 * 8 * HIST_BINS
            sample_slices = max(MIN_SAMPLE_SLICES, state // STATE_BYTES)
        self.limit = sample_slices  # None: unlimited (exact)
        self.t = 0  # positions fed to the exact engine (sampled lookups only, when sampling)
        self.lookups = 0  # every lookup seen
        self.threshold = HASH_SPACE  # T: sampled iff hash < T
        self.exact = True
        self._keys = np.empty(0, I64)  # sorted keys of the slices in the state
        self._kid = np.empty(0, I32)  # their ids
        self._khash = np.empty(0, I64)  # their hashes (sampled mode)
        self._last = np.empty(0, I64)  # by id: last use (engine time), -1 none
        self._cnt = np.empty(0, I64)  # by id: lookups fed to the engine
        self._live = np.empty(0, I64)  # sorted last-use times of the slices in the state
        self._nid = 0
        self._hist = np.zeros(0, I64)  # references by (sampled) stack distance at the current rate
        self._cold = 0.0
        self._bhist = np.zeros(0, np.float64)  # sampled: weight by scaled-distance bin, earlier rates
        self._bin = 1  # scaled distances per bin
        self._weight = 0.0  # sampled: total (rescaled) weight of the sampled references
        self._pending: list[np.ndarray] = []  # lookups waiting for a full chunk
        self._npending = 0

    # -- public ---------------------------------------------------------------------------------
    @property
    def rate(self) -> float:
        return self.threshold / HASH_SPACE

    @property
    def slices(self) -> int:
        return len(self._keys)

    def state_bytes(self) -> int:
        """Bytes held between chunks (the arrays kept per slice and the histogram)."""
        return int(sum(a.nbytes for a in (self._keys, self._kid, self._khash, self._last, self._cnt, self._live,
                                          self._hist, self._bhist)))

    def feed(self, keys: np.ndarray) -> None:
        """Add lookups. They are processed in chunks (small feeds wait in a buffer of at most one
        chunk; curve() processes what waits); when sampling, only the sampled ones are kept."""
        keys = np.asarray(keys, dtype=I64)
        self.lookups += len(keys)
        if not self.exact:
            keys = keys[slice_hash(keys) < self.threshold]
        if len(keys):
            self._pending.append(keys)
            self._npending += len(keys)
        while self._npending >= self._chunk_len():
            self._run(self._chunk_len())

    def flush(self) -> None:
        while self._npending:
            self._run(self._chunk_len())

    def _chunk_len(self) -> int:
        # two to four times the slices held (up to the budget's chunk): the per-chunk cost grows
        # with the slices held, the per-lookup cost with the log of the chunk length (measured:
        # U/2 takes a third more CPU than 2U..4U on 10M uniform lookups of 32768 slices)
        return min(self.chunk, max(MIN_CHUNK, 1 << (self.slices.bit_length() + 1)))

    def _run(self, c: int) -> None:
        allk = self._pending[0] if len(self._pending) == 1 else np.concatenate(self._pending)
        part, rest = allk[:c], allk[c:]
        self._pending = [rest] if len(rest) else []
        self._npending = len(rest)
        self._feed_chunk(part)

    def curve(self, adjust: bool = True) -> StreamCurve:
        self.flush()
        if self.exact:
            n = max(1, int(self._cold))
            h = self._hist[:n]
            cum = np.cumsum(h) if len(h) else np.zeros(0, I64)
            return StreamCurve(self.lookups, int(self._cold), True, 1.0, self.slices, cum)
        bh, bw = self._folded(self._hist, self.rate)
        rate = self.rate
        total = self.lookups * rate
        if adjust and len(bh) and self._heavy_share() > HEAVY_SHARE:
            # SHARDS_adj, when a few very hot slices carry much of the sampled lookups: the
            # sampled references should weigh lookups x rate, and the difference comes from hot
            # slices that were, or were not, sampled: their lookups have the shortest distances.
            # (Without hot slices the difference is noise spread over all distances: applying it
            # to the first bin would make the curve worse, as measured on uniform traffic.)
            extra = total - self._weight
            if extra >= 0:
                bh[0] += extra
            else:  # too many: take them from the shortest distances, where those lookups went
                cum = np.cumsum(bh)
                k = int(np.searchsorted(cum, -extra))
                if k < len(bh):
                    bh[k] = cum[k] + extra
                bh[:k] = 0.0
        else:
            total = self._weight
        cum = np.clip(np.cumsum(bh) / total, 0.0, 1.0) if total > 0 else np.zeros(0)
        distinct = round(self._cold / rate) if rate > 0 else 0
        return StreamCurve(self.lookups, min(distinct, self.lookups), False, rate, self.slices, cum, bw)

    # -- internals --------------------------------------------------------------------------------
    def _feed_chunk(self, keys: np.ndarray) -> None:
        if self.exact and self.limit is not None and self.slices + len(keys) > self.limit:
            # might outgrow the budget with this chunk: count what is new first
            new = self._new_keys(keys)
            if self.slices + len(new) > self.limit:
                self._start_sampling()
        if not self.exact:
            h = slice_hash(keys)
            m = h < self.threshold
            keys, h = keys[m], h[m]
            new, nh = self._new_keys(keys, h)
            if self.slices + len(new) > self.limit:  # type: ignore[operator]
                self._lower_threshold(nh)
                m = h < self.threshold
                keys = keys[m]
        if len(keys):
            self._distances(keys)

    def _new_keys(self, keys: np.ndarray, h: Optional[np.ndarray] = None):
        u, first = np.unique(keys, return_index=True)
        if len(self._keys):
            pos = np.searchsorted(self._keys, u)
            pos[pos == len(self._keys)] = 0
            fresh = self._keys[pos] != u
            u, first = u[fresh], first[fresh]
        if h is None:
            return u
        return u, h[first]

    def _heavy_share(self) -> float:
        """Share of the sampled lookups that went to slices looked up over HEAVY_FACTOR times as
        often as the mean sampled slice."""
        c = self._cnt[self._kid] if len(self._kid) else np.zeros(0)
        tot = float(c.sum())
        if tot <= 0:
            return 0.0
        return float(c[c > HEAVY_FACTOR * tot / len(c)].sum()) / tot

    def _start_sampling(self) -> None:
        """Switch to sampled mode: hash the slices held, keep those under the new threshold."""
        assert self.limit is not None
        self.exact = False
        self._khash = slice_hash(self._keys)
        self._weight = float(self.t)
        self._cold = float(self._cold)
        if self.slices > self.limit:
            self._lower_threshold(np.empty(0, I64))

    def _lower_threshold(self, new_hashes: np.ndarray) -> None:
        """Lower T so that the slices held plus the new ones fit the sample set; evict the rest."""
        assert self.limit is not None
        allh = np.concatenate([self._khash, new_hashes])
        if len(allh) <= self.limit:
            return
        t_new = int(np.partition(allh, self.limit)[self.limit])
        # keys with hash == t_new go too (strict test): at most `limit` stay
        t_new = max(1, min(t_new, self.threshold))
        # the distances counted at the old rate join the scaled histogram, which then weighs
        # as if it had been sampled at the new rate
        self._bhist, self._bin = self._folded(self._hist, self.rate)
        self._hist = np.zeros(0, I64)
        scale = t_new / self.threshold
        self.threshold = t_new
        self._bhist *= scale
        self._cold *= scale
        self._weight *= scale
        keep = self._khash < t_new
        gone_ids = self._kid[~keep]
        if len(gone_ids):
            m = np.ones(len(self._live), bool)
            m[np.searchsorted(self._live, self._last[gone_ids])] = False
            self._live = self._live[m]
            self._last[gone_ids] = -1
            self._cnt[gone_ids] = 0
        self._keys, self._kid, self._khash = self._keys[keep], self._kid[keep], self._khash[keep]
        if self._nid > 3 * max(1024, len(self._keys)) // 2:
            self._compact_ids()

    def _compact_ids(self) -> None:
        n = len(self._keys)
        new_last = np.full(max(n, 1), -1, I64)
        new_last[:n] = self._last[self._kid]
        new_cnt = np.zeros(max(n, 1), I64)
        new_cnt[:n] = self._cnt[self._kid]
        self._kid = np.arange(n, dtype=I32)
        self._last, self._cnt = new_last, new_cnt
        self._nid = n

    def _group_ids(self, u: np.ndarray) -> np.ndarray:
        """Ids for the distinct keys u (sorted); new keys get new ids and enter the key array."""
        nk = len(self._keys)
        pos = np.searchsorted(self._keys, u)
        if nk:
            found = (pos < nk) & (self._keys[np.minimum(pos, nk - 1)] == u)
        else:
            found = np.zeros(len(u), bool)
        if found.all():
            return self._kid[pos]
        nu = u[~found]
        ids_new = np.arange(self._nid, self._nid + len(nu), dtype=I32)
        self._nid += len(nu)
        if self._nid > len(self._last):
            extra = max(self._nid, len(self._last) * 5 // 4) - len(self._last)
            self._last = np.concatenate([self._last, np.full(extra, -1, I64)])
            self._cnt = np.concatenate([self._cnt, np.zeros(extra, I64)])
        ins = pos[~found]
        self._keys = np.insert(self._keys, ins, nu)
        self._kid = np.insert(self._kid, ins, ids_new)
        if not self.exact:
            self._khash = np.insert(self._khash, ins, slice_hash(nu))
        out = np.empty(len(u), I32)
        out[found] = self._kid[np.searchsorted(self._keys, u[found])]
        out[~found] = ids_new
        return out

    def _distances(self, keys: np.ndarray) -> None:
        n = len(keys)
        t0 = self.t
        # previous / next use inside the chunk (local positions), -1 when none
        order = _stable_order(keys)
        srt = keys[order]
        same = srt[1:] == srt[:-1]
        prev = np.full(n, -1, I64)
        nxt = np.full(n, -1, I32)
        o0, o1 = order[:-1][same], order[1:][same]
        prev[o1] = o0 + t0
        nxt[o0] = o1
        starts = np.concatenate(([True], ~same))
        firsts = order[starts]
        lasts = order[np.concatenate((~same, [True]))]
        gid = self._group_ids(srt[starts])  # one id per distinct slice of the chunk
        before = self._last[gid]  # its last use before the chunk (engine time) or -1
        prev[firsts] = before
        # arrangement: positions by (prev, position): first uses by their earlier last use (the
        # never-seen ones, prev -1, first, in position order), then the in-chunk re-uses in the
        # order of their previous use
        bo = np.argsort(before, kind="stable")
        fo = firsts[bo]
        arr = np.concatenate([fo.astype(I32), nxt[nxt >= 0]])
        w = C._dominance_from_arrangement(arr).astype(I64)
        d = w
        inner = prev >= t0
        d[inner] -= prev[inner] - t0 + 1
        fb = before[bo]  # ascending: the searches below walk the live array once
        seen = fb >= 0
        fs = fo[seen]
        if len(self._live):
            k = np.searchsorted(self._live, fb[seen])  # live[k] == fb (the slice's own last use)
            d[fs] += len(self._live) - 1 - k
        else:
            k = np.empty(0, np.intp)
        cold = fo[~seen]
        d[cold] = -1
        # state: the chunk's slices now last used inside it
        if seen.any():
            m = np.ones(len(self._live), bool)
            m[k] = False  # those slices are used again: their old last-use times go
            self._live = self._live[m]
        self._last[gid] = lasts + t0
        self._cnt[gid] += np.diff(np.concatenate([np.flatnonzero(starts), [n]]))
        mark = np.zeros(n, bool)
        mark[lasts] = True
        self._live = np.concatenate([self._live, np.flatnonzero(mark) + t0])  # still sorted
        self.t += n
        re = d[d >= 0]
        self._cold += len(cold)
        if not self.exact:
            self._weight += n
        if len(re):
            bc = np.bincount(re)
            if len(bc) > len(self._hist):
                self._hist = np.concatenate([self._hist, np.zeros(len(bc) - len(self._hist), I64)])
            self._hist[: len(bc)] += bc

    def _folded(self, hist: np.ndarray, rate: float) -> tuple[np.ndarray, int]:
        """The scaled histogram (bins of self._bin, coarsened as needed) plus `hist`, sampled
        distances at `rate`. A sampled distance d stands for d / rate distinct slices, and for
        anything up to (d + 1) / rate: its weight is spread evenly over that interval (for
        rate 1, over [d, d + 1), which keeps integer sizes exact)."""
        b, w = self._bhist, self._bin
        top = len(hist) / rate
        while top / w > HIST_BINS:
            if len(b) % 2:
                b = np.concatenate([b, [0.0]])
            b = b.reshape(-1, 2).sum(axis=1)
            w *= 2
        nb = max(len(b), int(np.ceil(top / w)) + 1)
        out = np.zeros(nb)
        out[: len(b)] = b
        if len(hist):
            # cumulative weight at the knots d / rate, linear in between; read at the bin edges
            knots = np.arange(len(hist) + 1) / rate
            cum = np.concatenate([[0.0], np.cumsum(hist, dtype=np.float64)])
            edges = np.arange(nb + 1, dtype=np.float64) * w
            out += np.diff(np.interp(edges, knots, cum))
        return out, w


def _stable_order(keys: np.ndarray) -> np.ndarray:
    """Positions in key order, equal keys in position order (int32). Keys that fit 16 bits once
    divided by their common power of two are radix-sorted."""
    if len(keys) > 1:
        lo = int(keys.min())
        rel = keys - lo
        span = int(rel.max())
        if span:
            low = int(np.bitwise_or.reduce(rel))
            shift = (low & -low).bit_length() - 1
            if span >> shift < 1 << 16:
                return np.argsort((rel >> shift).astype(np.uint16), kind="stable").astype(I32)
    return np.argsort(keys, kind="stable").astype(I32)


def stream_curve(chunks, max_memory: Optional[int] = None,
                 progress: Optional[Callable[[int], None]] = None) -> StreamCurve:
    """One CurveStream over an iterable of key arrays."""
    cs = CurveStream(max_memory)
    for ch in chunks:
        cs.feed(ch)
        if progress is not None:
            progress(len(ch))
    return cs.curve()
