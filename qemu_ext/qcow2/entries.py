"""L2 entries: the one decoder of qcow2's cluster descriptors (docs/interop/qcow2.txt, "Cluster mapping").

Every reader of L2 tables (info, check, map, read/convert, dump, the L2-cache simulator) classifies
entries here, the way QEMU does in block/qcow2.h (identical in 7.2 and 10.0):

- ``cluster_type`` / ``cluster_types``: qcow2_get_cluster_type() for one entry / a numpy array;
- ``subcluster_type`` / ``subcluster_types``: qcow2_get_subcluster_type() (extended L2 entries
  carry a 64-bit bitmap: bit x = subcluster x allocated, bit 32+x = subcluster x reads as zeros);
- ``compressed_span``: qcow2_parse_compressed_l2_entry(), the host bytes a compressed cluster
  occupies (works on ints and on numpy arrays).
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

import numpy as np

from qemu_ext.qcow2.format import (
    L2_BITMAP_ALLOC_MASK,
    L2E_COMPRESSED,
    L2E_COPIED,
    L2E_OFFSET_MASK,
    L2E_ZERO,
    SUBCLUSTERS_PER_CLUSTER,
)

# the names QEMU's sources use (block/qcow2.h), for callers that mirror QEMU line by line
COPIED = L2E_COPIED  # QCOW_OFLAG_COPIED
COMPRESSED = L2E_COMPRESSED  # QCOW_OFLAG_COMPRESSED
ZERO = L2E_ZERO  # QCOW_OFLAG_ZERO
OFFSET_MASK = L2E_OFFSET_MASK  # L2E_OFFSET_MASK
COMPRESSED_SECTOR_SIZE = 512  # QCOW2_COMPRESSED_SECTOR_SIZE

U = np.uint64


class ClusterType(IntEnum):
    """QCow2ClusterType (block/qcow2.h, 7.2 and 10.0)."""

    UNALLOCATED = 0
    ZERO_PLAIN = 1
    ZERO_ALLOC = 2
    NORMAL = 3
    COMPRESSED = 4


class SubclusterType(IntEnum):
    """QCow2SubclusterType (block/qcow2.h, 7.2 and 10.0)."""

    UNALLOCATED_PLAIN = 0
    UNALLOCATED_ALLOC = 1
    ZERO_PLAIN = 2
    ZERO_ALLOC = 3
    NORMAL = 4
    COMPRESSED = 5
    INVALID = 6


def cluster_type(entry: int, extended: bool, data_file: bool) -> ClusterType:
    """qcow2_get_cluster_type() of one standard L2 entry (the first 64 bits of an extended one)."""
    if entry & COMPRESSED:
        return ClusterType.COMPRESSED
    if entry & ZERO and not extended:
        return ClusterType.ZERO_ALLOC if entry & OFFSET_MASK else ClusterType.ZERO_PLAIN
    if not entry & OFFSET_MASK:
        # offset 0 is a valid offset in an external data file, where every cluster has
        # refcount 1: QCOW_OFLAG_COPIED tells an allocated cluster at 0 from an unallocated one
        if data_file and entry & COPIED:
            return ClusterType.NORMAL
        return ClusterType.UNALLOCATED
    return ClusterType.NORMAL


def cluster_types(ent: np.ndarray, extended: bool, data_file: bool) -> np.ndarray:
    """qcow2_get_cluster_type() of every entry of a uint64 array (int8 ClusterType values)."""
    off = (ent & U(OFFSET_MASK)) != 0
    alloc = off | ((ent & U(COPIED)) != 0) if data_file else off
    t = np.where(alloc, np.int8(ClusterType.NORMAL), np.int8(ClusterType.UNALLOCATED))
    if not extended:
        z = (ent & U(ZERO)) != 0
        t[z] = np.where(off[z], np.int8(ClusterType.ZERO_ALLOC), np.int8(ClusterType.ZERO_PLAIN))
    t[(ent & U(COMPRESSED)) != 0] = ClusterType.COMPRESSED
    return t


_SC_OF_CLUSTER = {
    ClusterType.COMPRESSED: SubclusterType.COMPRESSED,
    ClusterType.ZERO_PLAIN: SubclusterType.ZERO_PLAIN,
    ClusterType.ZERO_ALLOC: SubclusterType.ZERO_ALLOC,
    ClusterType.NORMAL: SubclusterType.NORMAL,
    ClusterType.UNALLOCATED: SubclusterType.UNALLOCATED_PLAIN,
}


# qcow2_get_subcluster_type() without extended L2: a numpy lookup indexed by ClusterType
SC_OF_CLUSTER = np.array([_SC_OF_CLUSTER[ClusterType(i)] for i in range(len(ClusterType))], dtype=np.int8)


def subcluster_type(entry: int, bitmap: int, sc: int, extended: bool, data_file: bool) -> SubclusterType:
    """qcow2_get_subcluster_type(): the type of subcluster ``sc`` (0 without extended L2)."""
    t = cluster_type(entry, extended, data_file)
    if not extended or t == ClusterType.COMPRESSED:
        return _SC_OF_CLUSTER[t]
    if t == ClusterType.NORMAL:
        if (bitmap >> 32) & bitmap & L2_BITMAP_ALLOC_MASK:
            return SubclusterType.INVALID
        if bitmap >> (32 + sc) & 1:
            return SubclusterType.ZERO_ALLOC
        if bitmap >> sc & 1:
            return SubclusterType.NORMAL
        return SubclusterType.UNALLOCATED_ALLOC
    # QCOW2_CLUSTER_UNALLOCATED (zero clusters do not exist with extended L2)
    if bitmap & L2_BITMAP_ALLOC_MASK:
        return SubclusterType.INVALID
    return SubclusterType.ZERO_PLAIN if bitmap >> (32 + sc) & 1 else SubclusterType.UNALLOCATED_PLAIN


def subcluster_types(ent: np.ndarray, bmp: np.ndarray, data_file: bool) -> np.ndarray:
    """qcow2_get_subcluster_type() of all 32 subclusters of every extended entry: int8, shape (*ent.shape, 32)."""
    ct = cluster_types(ent, True, data_file)
    sc = np.arange(SUBCLUSTERS_PER_CLUSTER, dtype=np.uint64)
    alloc_bits = ((bmp[..., None] >> sc) & U(1)) != 0
    zero_bits = ((bmp[..., None] >> (sc + U(32))) & U(1)) != 0
    normal = (ct == ClusterType.NORMAL)[..., None]
    unalloc = (ct == ClusterType.UNALLOCATED)[..., None]
    out = np.full(alloc_bits.shape, np.int8(SubclusterType.UNALLOCATED_PLAIN))
    out[np.broadcast_to((ct == ClusterType.COMPRESSED)[..., None], out.shape)] = SubclusterType.COMPRESSED
    out[normal & ~zero_bits & ~alloc_bits] = SubclusterType.UNALLOCATED_ALLOC
    out[normal & alloc_bits] = SubclusterType.NORMAL
    out[normal & zero_bits] = SubclusterType.ZERO_ALLOC
    out[unalloc & zero_bits] = SubclusterType.ZERO_PLAIN
    invalid = ((ct == ClusterType.NORMAL) & (((bmp >> U(32)) & bmp & U(L2_BITMAP_ALLOC_MASK)) != 0)) | (
        (ct == ClusterType.UNALLOCATED) & ((bmp & U(L2_BITMAP_ALLOC_MASK)) != 0)
    )
    out[np.broadcast_to(invalid[..., None], out.shape)] = SubclusterType.INVALID
    return out


def compressed_field_widths(cluster_bits: int) -> tuple[int, int]:
    """(x, sector bits) of a compressed cluster descriptor: x = 62 - (cluster_bits - 8) offset bits
    (s->csize_shift), then cluster_bits - 8 bits of additional 512-byte sectors (s->csize_mask)."""
    x = 62 - (cluster_bits - 8)
    return x, cluster_bits - 8


def compressed_span(entry: Any, cluster_bits: int) -> tuple[Any, Any]:
    """qcow2_parse_compressed_l2_entry(): (host offset, bytes from it to the end of its last sector)
    of compressed L2 entries; ``entry`` is an int or a numpy uint64 array (then int64 arrays)."""
    x, nbits = compressed_field_widths(cluster_bits)
    if isinstance(entry, np.ndarray):
        e = entry.astype(np.uint64, copy=False)
        off = (e & U((1 << x) - 1)).astype(np.int64)
        nsec = ((e >> U(x)) & U((1 << nbits) - 1)).astype(np.int64) + 1
        return off, nsec * COMPRESSED_SECTOR_SIZE - (off & (COMPRESSED_SECTOR_SIZE - 1))
    off = entry & ((1 << x) - 1)
    nsec = ((entry >> x) & ((1 << nbits) - 1)) + 1
    return off, nsec * COMPRESSED_SECTOR_SIZE - (off & (COMPRESSED_SECTOR_SIZE - 1))


__all__ = [
    "COMPRESSED",
    "COPIED",
    "OFFSET_MASK",
    "SC_OF_CLUSTER",
    "ZERO",
    "ClusterType",
    "SubclusterType",
    "cluster_type",
    "cluster_types",
    "compressed_field_widths",
    "compressed_span",
    "subcluster_type",
    "subcluster_types",
]
