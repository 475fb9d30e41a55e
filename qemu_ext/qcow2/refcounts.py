"""Refcounts for `check`, in memory that follows the file, not the disk size.

``Computed`` is qcow2_inc_refcounts_imrt()'s in-memory refcount table: two bits per cluster of the
file (QEMU keeps refcount_bits per cluster; 16 for most images), exact counts of 3 and more in a
side table (clusters shared by snapshots). ``OnDisk`` is
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
SAT = 3  # a stored 3 means "look the exact count up in the side table"


class Computed:
    """Reference counts per host cluster in 2 bits each (0, 1, 2; 3 = exact count in ``big``):
    a quarter of a byte per cluster of the file, where QEMU keeps two bytes (refcount_bits 16).
    Clusters referenced three times and more (shared by snapshots) are counted in a dict."""

    def __init__(self, clusters: int) -> None:
        self.n = clusters
        self.bits = np.zeros((clusters + 3) // 4, dtype=np.uint8)
        self.big: dict[int, int] = {}

    def __len__(self) -> int:
        return self.n

    def _grow(self, top: int) -> None:
        if top > self.n:
            need = (top + 3) // 4
            if need > len(self.bits):
                grown = np.zeros(need, dtype=np.uint8)
                grown[: len(self.bits)] = self.bits
                self.bits = grown
            self.n = top

    def _raw(self, idx: np.ndarray) -> np.ndarray:
        return (self.bits[idx >> 2] >> ((idx & 3) << 1).astype(np.uint8)) & np.uint8(3)

    def _store(self, idx: np.ndarray, v: np.ndarray) -> None:
        """Set the 2-bit fields of distinct clusters idx to v (0..3): four passes, one per position
        in the byte, so no two writes of a pass touch the same byte."""
        for pos in range(4):
            sel = (idx & 3) == pos
            if not sel.any():
                continue
            byte = idx[sel] >> 2
            shift = np.uint8(pos * 2)
            self.bits[byte] = (self.bits[byte] & np.uint8(~(3 << (pos * 2)) & 0xFF)) | (v[sel].astype(np.uint8) << shift)

    def add(self, idx: np.ndarray, weights: Optional[np.ndarray] = None) -> None:
        """Count one reference (or weights[i]) to each cluster idx[i]."""
        if not len(idx):
            return
        idx = idx.astype(np.int64, copy=False)
        self._grow(int(idx.max()) + 1)
        if weights is None and (len(idx) == 1 or (idx[1:] > idx[:-1]).all()):
            u, cnt = idx, None  # each cluster once (the common case)
        elif weights is None:
            u, cnt = np.unique(idx, return_counts=True)
        else:
            u, inv = np.unique(idx, return_inverse=True)
            cnt = np.bincount(inv, weights=weights.astype(np.float64)).astype(np.int64)
        raw = self._raw(u)
        if cnt is None and not (raw >= 2).any():
            self._store(u, raw + 1)
            return
        new = self.get(u, raw) + (1 if cnt is None else cnt)
        self._store(u, np.minimum(new, SAT))
        for k in np.flatnonzero(new >= SAT).tolist():
            self.big[int(u[k])] = int(new[k])

    def get(self, idx: np.ndarray, raw: Optional[np.ndarray] = None) -> np.ndarray:
        """Exact counts (int64) of clusters idx (0 beyond the table)."""
        idx = idx.astype(np.int64, copy=False)
        out = np.zeros(len(idx), dtype=np.int64)
        if raw is None:
            inside = idx < self.n
            out[inside] = self._raw(idx[inside])
        else:
            out[:] = raw
        for k in np.flatnonzero(out == SAT).tolist():
            out[k] = self.big[int(idx[k])]
        return out

    def window(self, lo: int, hi: int) -> np.ndarray:
        """Exact counts of clusters [lo, hi) as int64."""
        out = np.zeros(hi - lo, dtype=np.int64)
        k = min(hi, self.n)
        if k > lo:
            out[: k - lo] = self._raw(np.arange(lo, k, dtype=np.int64))
        for i in np.flatnonzero(out == SAT).tolist():
            out[i] = self.big[lo + i]
        return out


class OnDisk:
    """qcow2_get_refcount() for any cluster: 0 past the refcount table or for a missing block, an
    error for a block that is not cluster aligned (QEMU signals corruption: -EIO)."""

    CACHE_BYTES = 1 << 20  # decoded blocks kept (16 of 64 KiB, or the current 2 MiB one: scans are sequential)

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
        if len(bi) < 2 or (bi[1:] >= bi[:-1]).all():  # already in block order (the usual scan)
            order = np.arange(len(bi))
            bs = bi
        else:
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
