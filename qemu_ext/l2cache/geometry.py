"""Bare qcow2 geometry and the vectorized L2 lookups of a fully written bare disk: what the
simulator needs without the request model (requests.py), so that a streamed curve of a bare disk
imports nothing else (memory: the streamed run is measured in bench/bench_l2cache.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass
class Geometry:
    """Bare image geometry (what the cache model needs from an image)."""

    cluster_bits: int
    virtual_size: int
    extended_l2: bool = False
    refcount_order: int = 4

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_size

    @property
    def l1_size(self) -> int:
        per = self.l2_entries * self.cluster_size
        return max(1, -(-self.virtual_size // per))

    @property
    def subclusters(self) -> int:
        return 32 if self.extended_l2 else 1

    @property
    def subcluster_bits(self) -> int:
        return self.cluster_bits - (5 if self.extended_l2 else 0)


FAST_MAX_REQUEST = 1 << 30  # longer requests go through the model (read/write loops split at INT_MAX)


def full_disk_layout(geom: Geometry) -> int:
    """First cluster of the L2 tables of ImageState.from_geometry(geom, ..., "full"): qemu-img
    create's header, refcount table and block, then the L1 table."""
    return 3 + -(-geom.l1_size * 8 // geom.cluster_size)


def full_disk_l2_lookups(geom: Geometry, slice_bytes: int, offsets: np.ndarray, lengths: np.ndarray,
                         with_requests: bool = True) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """The L2 lookups of reads or writes on a fully written bare disk, without the per-request
    model: (slice offsets, request number of each lookup), vectorized.

    On ImageState.from_geometry(geom, slice_bytes, "full") every cluster is allocated (COPIED)
    and contiguous in the file in guest order, so qcow2_get_host_offset (reads) and handle_copied
    (writes: in place, no allocation, no link_l2) stop only at the end of an L2 slice: one lookup
    per slice a request touches, in order. tests/test_l2cache_fast.py holds this to the model.
    Requests must lie inside the disk and be at most FAST_MAX_REQUEST bytes."""
    cb, cs = geom.cluster_bits, geom.cluster_size
    span = (slice_bytes // geom.l2_entry_size) << cb  # guest bytes per slice (a power of two)
    shift = span.bit_length() - 1
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    s0 = offsets >> shift
    last = offsets + lengths
    last -= 1
    last >>= shift
    if not len(s0) or np.array_equal(s0, last):  # every request inside one slice (in place: little memory)
        s = s0
        del last
        req = np.arange(len(offsets), dtype=np.int64) if with_requests else None
    else:
        counts = last - s0 + 1
        del last
        req = np.repeat(np.arange(len(offsets), dtype=np.int64), counts)
        starts = np.cumsum(counts) - counts
        s = np.repeat(s0, counts) + (np.arange(len(req), dtype=np.int64) - np.repeat(starts, counts))
        if not with_requests:
            req = None
    # slice s: table s // per_table (at cluster layout + that), slice s % per_table inside it
    per_shift = (cs // slice_bytes).bit_length() - 1
    within = s & ((1 << per_shift) - 1)
    s >>= per_shift
    s += full_disk_layout(geom)
    s <<= cb
    within <<= slice_bytes.bit_length() - 1
    s += within
    return s, req
