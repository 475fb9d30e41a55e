"""Refcounts for `check`, in memory that follows the file, not the disk size.

``Computed`` is qcow2_inc_refcounts_imrt()'s in-memory refcount table: one byte per cluster of the
file (QEMU keeps refcount_bits per cluster; 16 for most images), exact counts of 255 and more in a
side table (only clusters shared by hundreds of snapshots get there). ``OnDisk`` is
qcow2_get_refcount(): the stored refcounts, decoded refcount block by refcount block as they are
asked for (a small cache), never all at once.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Optional

import numpy as np

from qemu_ext.qcow2 import format as F

if TYPE_CHECKING:
    from qemu_ext.qcow2.image import Qcow2Image

U = np.uint64
SAT = 255  # a stored 255 means "look the exact count up in the side table"


class Computed:
    """Reference counts per host cluster (one byte each, exact beyond 254 in ``big``)."""

    def __init__(self, clusters: int) -> None:
        self.counts = np.zeros(clusters, dtype=np.uint8)
        self.big: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.counts)

    def _grow(self, top: int) -> None:
        if top > len(self.counts):
            grown = np.zeros(top, dtype=np.uint8)
            grown[: len(self.counts)] = self.counts
            self.counts = grown

    def add(self, idx: np.ndarray, weights: Optional[np.ndarray] = None) -> None:
        """Count one reference (or weights[i]) to each cluster idx[i]."""
        if not len(idx):
            return
        idx = idx.astype(np.int64, copy=False)
        self._grow(int(idx.max()) + 1)
        c = self.counts
        if weights is None and (len(idx) == 1 or (np.diff(idx) > 0).all()):
            cur = c[idx]
            if not (cur >= SAT - 1).any():  # the common case: each cluster once, far from saturation
                c[idx] = cur + 1
                return
            u, cnt = idx, np.ones(len(idx), dtype=np.int64)
        elif weights is None:
            u, cnt = np.unique(idx, return_counts=True)
        else:
            u, inv = np.unique(idx, return_inverse=True)
            cnt = np.bincount(inv, weights=weights.astype(np.float64)).astype(np.int64)
        new = self.get(u) + cnt
        c[u] = np.minimum(new, SAT).astype(np.uint8)
        for k in np.flatnonzero(new >= SAT).tolist():
            self.big[int(u[k])] = int(new[k])

    def get(self, idx: np.ndarray) -> np.ndarray:
        """Exact counts (int64) of clusters idx (0 beyond the array)."""
        idx = idx.astype(np.int64, copy=False)
        out = np.zeros(len(idx), dtype=np.int64)
        inside = idx < len(self.counts)
        out[inside] = self.counts[idx[inside]]
        for k in np.flatnonzero(out == SAT).tolist():
            out[k] = self.big[int(idx[k])]
        return out

    def window(self, lo: int, hi: int) -> np.ndarray:
        """Exact counts of clusters [lo, hi) as int64."""
        out = np.zeros(hi - lo, dtype=np.int64)
        k = min(hi, len(self.counts))
        if k > lo:
            out[: k - lo] = self.counts[lo:k]
        for i in np.flatnonzero(out == SAT).tolist():
            out[i] = self.big[lo + i]
        return out


class OnDisk:
    """qcow2_get_refcount() for any cluster: 0 past the refcount table or for a missing block, an
    error for a block that is not cluster aligned (QEMU signals corruption: -EIO)."""

    CACHE_BYTES = 64 << 20  # decoded blocks kept (a handful of 2 MiB blocks, dozens of 64 KiB ones)

    def __init__(self, img: Qcow2Image) -> None:
        self.img = img
        self.rt = img.refcount_table()  # up to the end of the file; entries past it are 0
        self.blocks = self.rt & U(F.RT_OFFSET_MASK)
        self.per = img.refcount_block_entries
        self.rb_bits = self.per.bit_length() - 1
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cached_bytes = 0

    def block_error(self, i: int) -> bool:
        return i < len(self.blocks) and int(self.blocks[i]) % self.img.cluster_size != 0

    def block(self, i: int) -> np.ndarray:
        """Decoded refcounts of refcount block i (narrow unsigned type; zeros when absent or past the file)."""
        b = self._cache.get(i)
        if b is not None:
            self._cache.move_to_end(i)
            return b
        off = int(self.blocks[i]) if i < len(self.blocks) else 0
        cs = self.img.cluster_size
        if not off or off % cs:
            b = np.zeros(self.per, dtype=np.uint8)
        else:
            raw = self.img.pread_zero_padded(off, cs) if off < self.img.file_size else bytes(cs)
            b = self.img.decode_refcount_block(raw, narrow=True)
            if b.dtype == np.uint64:  # compared as int64: absurd 64-bit refcounts are clamped
                b = np.minimum(b, U(1 << 62)).astype(np.int64)
        self._cache[i] = b
        self._cached_bytes += b.nbytes
        while self._cached_bytes > self.CACHE_BYTES and len(self._cache) > 1:
            _k, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.nbytes
        return b

    def get(self, clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(refcounts as int64, error mask) of cluster indexes."""
        c = clusters.astype(np.int64, copy=False)
        out = np.zeros(len(c), dtype=np.int64)
        err = np.zeros(len(c), dtype=bool)
        if not len(c):
            return out, err
        bi = c >> self.rb_bits
        order = np.argsort(bi, kind="stable")
        bs = bi[order]
        starts = np.flatnonzero(np.r_[True, bs[1:] != bs[:-1]])
        for s, e in zip(starts.tolist(), [*starts[1:].tolist(), len(bs)]):
            i = int(bs[s])
            sel = order[s:e]
            if i < 0 or i >= len(self.blocks):
                continue
            if self.block_error(i):
                err[sel] = True
                continue
            out[sel] = self.block(i)[c[sel] & (self.per - 1)]
        return out, err

    def window(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Refcounts and error mask of clusters [lo, hi), block by block (lo a multiple of per)."""
        out = np.zeros(hi - lo, dtype=np.int64)
        err = np.zeros(hi - lo, dtype=bool)
        for i in range(lo >> self.rb_bits, ((hi - 1) >> self.rb_bits) + 1):
            if i >= len(self.blocks):
                break
            a, b = max(lo, i * self.per), min(hi, (i + 1) * self.per)
            if self.block_error(i):
                err[a - lo : b - lo] = True
            elif int(self.blocks[i]):
                blk = self.block(i)
                out[a - lo : b - lo] = blk[a - i * self.per : b - i * self.per]
        return out, err
