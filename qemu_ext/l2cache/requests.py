"""Which cache lookups qcow2 makes for each guest request (QEMU 7.2 block/qcow2.c, qcow2-cluster.c,
qcow2-refcount.c), with the image state kept up to date as writes allocate.

The lookups do not depend on the cache contents (the cache only decides hit or miss), so this
module turns requests into a stream of lookups; model.py / curve.py replay that stream.

Reads (qcow2_co_preadv_part -> qcow2_get_host_offset): one L2 slice lookup per piece; a piece
stops at the end of the L2 slice and where count_contiguous_subclusters() stops (a change of
subcluster type, or allocated clusters that are not contiguous in the file); no lookup where the
L1 entry is empty or beyond the L1 table.

Writes (qcow2_co_pwritev_part -> qcow2_alloc_host_offset, handle_copied, handle_alloc, then
qcow2_alloc_cluster_link_l2 per QCowL2Meta): handle_copied looks the slice up; if the cluster
must be allocated handle_alloc looks it up again; a new L2 table (l2_allocate) takes every slice
of the table with qcow2_cache_get_empty (a miss that reads nothing); link_l2 looks the slice up
once more after the data is written. Allocation goes through the refcount cache: first fit from
free_cluster_index (0 after opening, so the first allocation scans the file from cluster 0),
qcow2_get_refcount per probed cluster, one get per refcount block in update_refcount; a missing
refcount block is allocated (qcow2_cache_get_empty, -EAGAIN, the search retried); clusters that
a write replaces (compressed ones) are freed (update_refcount decreasing, free_cluster_index moved
back). The first block-status call (the COW zero check of the first allocating write with COW
areas) runs qcow2_detect_metadata_preallocation: qcow2_get_refcount for clusters 0, 1, ... of the
file until its end or until the referenced ones outnumber those the file occupies on the host
(st_blocks) by max(2, 11%). st_blocks is read when the image is opened and grown by the 4 KiB
blocks QEMU writes before that call that were holes (SEEK_DATA/SEEK_HOLE) or past the end: data
with its COW areas, new L2 tables, L1 entries, and dirty L2 slices and refcount blocks at each
flush (l2_allocate, alloc_refcount_block, and after every write: qemu-io runs writethrough).

Fidelity (tests/test_l2cache.py, tests/test_l2cache_refcount.py, against qemu-io traces): reads
and in-place overwrites give QEMU's exact sequence of (slice offset, cache entry, hit/miss);
allocating writes make exactly QEMU's L2 lookups, but a write split into several pieces runs the
pieces' L2 updates in concurrent tasks whose order follows I/O completion, so their order (and a
few hits/misses) can differ (within 1% of the misses in the tests). Refcount-cache lookups of
allocating writes equal QEMU's, block for block with hits and misses, on fresh, partly written,
compressed, discarded and sparse-copied images with 64 KiB, 2 MiB and 4 KiB clusters. Not modelled: internal
snapshots (L2 COW of shared tables), compressed writes, zero writes / discard requests, backing
files, external data files, growing the refcount table (qcow2_refcount_area), cache=writeback
(dirty tables written later than after each write), and host file systems that allocate other
than 4 KiB blocks per write (the scan's stop point depends on st_blocks).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from qemu_ext.errors import BadInputError
from qemu_ext.l2cache.geometry import FAST_MAX_REQUEST, Geometry, full_disk_l2_lookups, full_disk_layout  # noqa: F401
from qemu_ext.qcow2.entries import (
    COMPRESSED,
    COPIED,
    OFFSET_MASK,
    SubclusterType,
    compressed_span,
    subcluster_type,
)

INT_MAX = 2**31 - 1
BDRV_REQUEST_MAX_BYTES = (INT_MAX >> 9) << 9  # include/block/block_int-common.h

# QCow2SubclusterType (decoded by qemu_ext.qcow2.entries)
NORMAL = SubclusterType.NORMAL
COMPRESSED_T = SubclusterType.COMPRESSED
ZERO_PLAIN = SubclusterType.ZERO_PLAIN
ZERO_ALLOC = SubclusterType.ZERO_ALLOC
UNALLOC_PLAIN = SubclusterType.UNALLOCATED_PLAIN
UNALLOC_ALLOC = SubclusterType.UNALLOCATED_ALLOC
INVALID = SubclusterType.INVALID

L2_CACHE, REFCOUNT_CACHE = 0, 1
# multi-piece writes: link_l2 of the last piece first (its data write is the smallest and
# typically completes first); measured against qemu-io traces
LINK_LAST_PIECE_FIRST = True


@dataclass
class Meta:
    """QCowL2Meta: what link_l2 does once the data is written."""

    alloc_offset: int
    offset: int  # guest offset of the first cluster
    nb_clusters: int
    keep_old: bool
    cow_start: tuple[int, int]  # (offset in the allocation, bytes)
    cow_end: tuple[int, int]


@dataclass
class Lookups:
    """A stream of cache lookups: which cache, table offset, whether it reads from disk, request no."""

    cache: list[int] = field(default_factory=list)
    offset: list[int] = field(default_factory=list)
    read: list[bool] = field(default_factory=list)
    request: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.offset)

    def l2_offsets(self) -> np.ndarray:
        c = np.asarray(self.cache, dtype=np.int8)
        return np.asarray(self.offset, dtype=np.uint64)[c == L2_CACHE]

    def l2_read_flags(self) -> np.ndarray:
        c = np.asarray(self.cache, dtype=np.int8)
        return np.asarray(self.read, dtype=bool)[c == L2_CACHE]

    def l2_requests(self) -> np.ndarray:
        c = np.asarray(self.cache, dtype=np.int8)
        return np.asarray(self.request, dtype=np.int64)[c == L2_CACHE]


def _ctz32(v: int) -> int:
    v &= 0xFFFFFFFF
    if v == 0:
        return 32
    return (v & -v).bit_length() - 1


def _cto32(v: int) -> int:
    return _ctz32(~v)


def _range_mask(a: int, b: int) -> int:
    """QCOW_OFLAG_SUB_ALLOC_RANGE(a, b): bits a..b-1."""
    return ((1 << b) - 1) & ~((1 << a) - 1)


class ImageState:
    """The parts of BDRVQcow2State that decide lookups: L1, L2 entries, refcounts, free_cluster_index."""

    def __init__(
        self,
        geom: Geometry,
        slice_bytes: int,
        l1: list[int],
        table_loader: Callable[[int], tuple[list[int], Optional[list[int]]]],
        used: bytearray,
        refcount_table: list[int],
        file_length: Optional[int] = None,
        file_allocated: Optional[int] = None,
        path: Optional[str] = None,
        l1_table_offset: Optional[int] = None,
    ) -> None:
        if slice_bytes < 512 or slice_bytes > geom.cluster_size or slice_bytes & (slice_bytes - 1):
            raise BadInputError(f"L2 cache entry size must be a power of two between 512 and {geom.cluster_size}")
        self.g = geom
        self.cb = geom.cluster_bits
        self.cs = geom.cluster_size
        self.ext = geom.extended_l2
        self.l2e = geom.l2_entry_size
        self.slice_bytes = slice_bytes
        self.slice_size = slice_bytes // self.l2e  # s->l2_slice_size (entries)
        self.l2_size = geom.l2_entries
        self.sc_bits = geom.subcluster_bits
        self.sc_per = geom.subclusters
        self.l1 = list(l1)
        self._loader = table_loader
        self._tables: dict[int, tuple[list[int], Optional[list[int]]]] = {}
        self.used = used
        self.reftable = list(refcount_table)
        self.refblock_bits = self.cb + 3 - geom.refcount_order
        self.free_cluster_index = 0
        # the image file as the host sees it: its length and the bytes it occupies (st_blocks);
        # qcow2_detect_metadata_preallocation reads both at the first block-status call
        self.file_length = len(used) * self.cs if file_length is None else file_length
        self._opened_length = self.file_length
        self.file_allocated = self.file_length if file_allocated is None else file_allocated
        self.prealloc_checked = False
        # until that check: what QEMU has written to the file since it was opened (qemu-io runs
        # writethrough, so dirty L2 slices and refcount blocks are written at the end of each write)
        self.path = path
        self.l1_table_offset = 3 * self.cs if l1_table_offset is None else l1_table_offset
        self._written: list[tuple[int, int]] = []
        self._dirty: set[tuple[int, int]] = set()
        self.out = Lookups()
        self.request_no = 0

    # -- constructors -----------------------------------------------------------------------
    @classmethod
    def from_geometry(cls, geom: Geometry, slice_bytes: int, allocation: str = "full") -> ImageState:
        """A synthetic image: 'full' (every cluster allocated, contiguous in the file, like a fully
        written disk) or 'empty' (fresh from qemu-img create)."""
        cs = geom.cluster_size
        l1n = geom.l1_size
        if allocation not in ("full", "empty"):
            raise BadInputError("allocation must be 'full' or 'empty'")
        # qemu-img create layout: header, refcount table, refcount block, L1 table
        l1_clusters = -(-l1n * 8 // cs)
        meta_end = 3 + l1_clusters
        if allocation == "empty":
            l1 = [0] * l1n
            used = bytearray(b"\x01" * meta_end)

            def loader(i: int) -> tuple[list[int], Optional[list[int]]]:
                raise AssertionError("no L2 table in an empty image")

        else:
            # L2 tables right after the metadata, then the data in guest order
            l1 = [((meta_end + i) * cs) | COPIED for i in range(l1n)]
            data0 = meta_end + l1n
            nclusters = -(-geom.virtual_size // cs)
            used = bytearray(b"\x01" * (data0 + nclusters))
            per = geom.l2_entries

            def loader(i: int) -> tuple[list[int], Optional[list[int]]]:
                first = i * per
                n = max(0, min(per, nclusters - first))
                a = np.zeros(per, dtype=np.uint64)
                a[:n] = (np.arange(data0 + first, data0 + first + n, dtype=np.uint64) * np.uint64(cs)) | np.uint64(COPIED)
                ents = a.tolist()
                bms = ([0xFFFFFFFF] * n + [0] * (per - n)) if geom.extended_l2 else None
                return ents, bms

        # qemu-img create writes the header, refcount table and block, and the L1 table (the
        # last one only as far as its entries go); ext4 and tmpfs allocate them in 4 KiB blocks
        if allocation == "empty":
            flen = (meta_end - l1_clusters) * cs + l1n * 8
        else:
            flen = len(used) * cs
        reftable = [2 * cs] + [0] * (cs // 8 - 1)  # one cluster of refcount table
        per_block = 1 << (geom.cluster_bits + 3 - geom.refcount_order)
        if allocation == "full" and len(used) > per_block:
            # more refcount blocks, placed after the data
            nblocks = -(-(len(used) + len(used) // per_block + 1) // per_block)
            first = len(used)
            used.extend(b"\x01" * (nblocks - 1))
            flen = len(used) * cs
            for k in range(1, nblocks):
                if k < len(reftable):
                    reftable[k] = (first + k - 1) * cs
        return cls(geom, slice_bytes, l1, loader, used, reftable, flen, -(-flen // 4096) * 4096)

    @classmethod
    def from_image(cls, img, slice_bytes: int) -> ImageState:
        """Real L1/L2/refcount state from an open qemu_ext.qcow2 image (kept open while simulating)."""
        h = img.header
        geom = Geometry(img.cluster_bits, img.virtual_size, bool(img.extended_l2), int(h.refcount_order))
        l1 = [int(x) for x in img.l1_entries().tolist()]
        cs = img.cluster_size
        fsize = img.file_size

        def loader(i: int) -> tuple[list[int], Optional[list[int]]]:
            off = l1[i] & OFFSET_MASK
            if off + cs > fsize:
                raise BadInputError(f"L2 table at {off:#x} lies beyond the end of the image file")
            t = img.read_l2_table(off)
            if geom.extended_l2:
                return [int(x) for x in t[:, 0].tolist()], [int(x) for x in t[:, 1].tolist()]
            return [int(x) for x in t.tolist()], None

        rc = img.refcounts()
        used = bytearray(np.minimum(rc, 255).astype(np.uint8).tobytes())  # refcounts (capped)
        rt = [int(x) & ~0x1FF & 0x00FFFFFFFFFFFFFF for x in img.refcount_table().tolist()]
        path: Optional[str] = None
        try:
            st = os.stat(img.path)
            if stat.S_ISREG(st.st_mode):
                allocated, path = st.st_blocks * 512, str(img.path)
            else:
                allocated = fsize
        except (OSError, AttributeError):
            allocated = fsize
        return cls(geom, slice_bytes, l1, loader, used, rt, fsize, allocated, path, int(h.l1_table_offset))

    # -- tables ------------------------------------------------------------------------------
    def _table(self, l1i: int) -> tuple[list[int], Optional[list[int]]]:
        t = self._tables.get(l1i)
        if t is None:
            t = self._loader(l1i)
            self._tables[l1i] = t
        return t

    def _emit(self, cache: int, offset: int, read: bool = True) -> None:
        o = self.out
        o.cache.append(cache)
        o.offset.append(offset)
        o.read.append(read)
        o.request.append(self.request_no)

    def _l2_load(self, offset: int, l2_offset: int) -> None:
        l2_index = (offset >> self.cb) & (self.l2_size - 1)
        slice_index = l2_index & (self.slice_size - 1)
        self._emit(L2_CACHE, l2_offset + self.l2e * (l2_index - slice_index))

    def _sc_type(self, entry: int, bitmap: int, sc: int) -> int:
        return subcluster_type(entry, bitmap, sc, self.ext, False)

    def _range_type(self, entry: int, bitmap: int, sc_from: int) -> tuple[int, int]:
        t = self._sc_type(entry, bitmap, sc_from)
        if t == INVALID:
            raise BadInputError("invalid L2 entry (both allocation and zero bits set)")
        if not self.ext or t == COMPRESSED_T:
            return t, self.sc_per - sc_from
        if t == NORMAL:
            return t, _cto32(bitmap | _range_mask(0, sc_from)) - sc_from
        if t in (ZERO_PLAIN, ZERO_ALLOC):
            return t, _cto32((bitmap >> 32) | _range_mask(0, sc_from)) - sc_from
        val = ((bitmap >> 32) | bitmap) & ~_range_mask(0, sc_from) & 0xFFFFFFFF
        return t, _ctz32(val) - sc_from

    def _entry(self, ents: list[int], bms: Optional[list[int]], i: int) -> tuple[int, int]:
        return ents[i], (bms[i] if bms is not None else 0)

    # -- reads -------------------------------------------------------------------------------
    def _get_host_offset(self, offset: int, nbytes: int) -> tuple[int, int]:
        """qcow2_get_host_offset: returns (bytes, subcluster type)."""
        cb, cs = self.cb, self.cs
        oic = offset & (cs - 1)
        needed = nbytes + oic
        l2_index = (offset >> cb) & (self.l2_size - 1)
        sl_index = l2_index & (self.slice_size - 1)
        avail = (self.slice_size - sl_index) << cb
        needed = min(needed, avail)
        l1i = offset >> (cb + cb - (4 if self.ext else 3))
        if l1i >= len(self.l1) or not (self.l1[l1i] & OFFSET_MASK):
            return min(avail, needed) - oic, UNALLOC_PLAIN
        self._l2_load(offset, self.l1[l1i] & OFFSET_MASK)
        ents, bms = self._table(l1i)
        sc_index = oic >> self.sc_bits
        nb = -(-needed // cs)
        count = 0
        expected_type = NORMAL
        check = False
        expected = 0
        first_type = UNALLOC_PLAIN
        for i in range(nb):
            first_sc = sc_index if i == 0 else 0
            e, b = self._entry(ents, bms, l2_index + i)
            t, n = self._range_type(e, b, first_sc)
            if i == 0:
                first_type = t
                if t == COMPRESSED_T:
                    count = n
                    break
                expected_type = t
                expected = e & OFFSET_MASK
                check = t in (NORMAL, ZERO_ALLOC, UNALLOC_ALLOC)
            elif t != expected_type:
                break
            elif check:
                expected += cs
                if expected != (e & OFFSET_MASK):
                    break
            count += n
            if first_sc + n < self.sc_per:
                break
        got = (count + sc_index) << self.sc_bits
        return min(got, needed) - oic, first_type

    def read(self, offset: int, nbytes: int) -> None:
        """qcow2_co_preadv_part."""
        while nbytes > 0:
            cur, _t = self._get_host_offset(offset, min(nbytes, INT_MAX))
            offset += cur
            nbytes -= cur
        self.request_no += 1

    # -- refcounts / allocation -----------------------------------------------------------------
    def _is_used(self, idx: int) -> bool:
        return idx < len(self.used) and self.used[idx] != 0

    def _get_refcount(self, idx: int) -> None:
        rti = idx >> self.refblock_bits
        if rti < len(self.reftable) and self.reftable[rti]:
            self._emit(REFCOUNT_CACHE, self.reftable[rti])

    def _add_ref(self, idx: int, delta: int) -> int:
        """Change a cluster's refcount (kept in self.used, capped at 255); returns the new one."""
        if idx >= len(self.used):
            if idx > len(self.used) + (1 << 26):
                # an L2 entry points far beyond the file: do not grow the map without bound
                raise BadInputError(f"allocation at host offset {idx << self.cb:#x}, far beyond the image file")
            self.used.extend(b"\x00" * (idx + 1 - len(self.used) + 4096))
        v = self.used[idx]
        if v < 255:
            v = max(0, v + delta)
            self.used[idx] = min(v, 255)
        return v

    def _update_refcount(self, start: int, n: int, decrease: bool = False) -> bool:
        """update_refcount for clusters start..start+n-1 (addend 1): one refcount-block lookup
        per block crossed. False where QEMU returns -EAGAIN (a refcount block had to be
        allocated first; the clusters already counted are undone and the caller retries)."""
        last = -1
        for k, idx in enumerate(range(start, start + n)):
            rti = idx >> self.refblock_bits
            if rti != last:
                if not self._alloc_refcount_block(idx):
                    if self.free_cluster_index > start:
                        self.free_cluster_index = start
                    if k:
                        self._update_refcount(start, k, not decrease)
                    return False
                last = rti
                self._mark_dirty(self.reftable[rti], self.cs)
            if self._add_ref(idx, -1 if decrease else 1) == 0 and idx < self.free_cluster_index:
                self.free_cluster_index = idx
        return True

    def _alloc_refcount_block(self, idx: int) -> bool:
        """alloc_refcount_block: a lookup of the existing block, or a new block (found by
        alloc_clusters_noref, taken with qcow2_cache_get_empty, hooked into the refcount table)
        and -EAGAIN (False)."""
        rti = idx >> self.refblock_bits
        if rti < len(self.reftable) and self.reftable[rti]:
            self._emit(REFCOUNT_CACHE, self.reftable[rti])
            return True
        if rti >= len(self.reftable):
            # the refcount table must grow (qcow2_refcount_area): not modelled; the new block is
            # taken inside its own range and looked up once
            self.reftable.extend([0] * (rti + 1 - len(self.reftable)))
            self.reftable[rti] = (rti << self.refblock_bits) * self.cs or self.cs
            self._emit(REFCOUNT_CACHE, self.reftable[rti])
            return True
        self._flush()  # qcow2_cache_flush of the L2 cache (the refcount cache with it)
        new = self._alloc_noref(1)
        if new >> self.refblock_bits == rti:
            self._add_ref(new, 1)  # the block counts itself
        elif not self._update_refcount(new, 1):
            return False
        self._emit(REFCOUNT_CACHE, new << self.cb, False)  # qcow2_cache_get_empty
        self._flush()
        self._file_write(new << self.cb, (new + 1) << self.cb)  # qcow2_cache_flush
        self.reftable[rti] = new << self.cb
        return False

    def _file_write(self, start: int, end: int) -> None:
        """The image file after a write of [start, end)."""
        if not self.prealloc_checked:
            self._written.append((start, end))
        if end > self.file_length:
            self.file_length = end

    def _mark_dirty(self, start: int, size: int) -> None:
        if not self.prealloc_checked:
            self._dirty.add((start, start + size))

    def _flush(self) -> None:
        """qcow2_cache_flush: the dirty tables (whole slices / blocks) reach the file."""
        for a, b in self._dirty:
            self._file_write(a, b)
        self._dirty.clear()

    def _hole_bytes(self, a: int, b: int) -> int:
        """Bytes of [a, b) that the image file did not occupy on the host when it was opened."""
        if self.path is None:
            return max(0, b - max(a, -(-self._opened_length // 4096) * 4096))
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return max(0, b - max(a, self._opened_length))
        try:
            holes = 0
            pos = a
            while pos < b:
                try:
                    data = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:  # ENXIO: no data from pos to the end of the file
                    data = b
                holes += min(data, b) - pos
                if data >= b:
                    break
                pos = os.lseek(fd, data, os.SEEK_HOLE)
            return holes
        finally:
            os.close(fd)

    def _allocated_now(self) -> int:
        """st_blocks * 512 now: at open, plus the 4 KiB blocks written since that were holes or past the end."""
        spans = sorted((a // 4096 * 4096, -(-b // 4096) * 4096) for a, b in self._written)
        total = self.file_allocated
        cur_a, cur_b = -1, -1
        for a, b in spans:
            if a > cur_b:
                if cur_b > cur_a:
                    total += self._hole_bytes(cur_a, cur_b)
                cur_a, cur_b = a, b
            else:
                cur_b = max(cur_b, b)
        if cur_b > cur_a:
            total += self._hole_bytes(cur_a, cur_b)
        return total

    def _detect_metadata_preallocation(self) -> None:
        """qcow2_detect_metadata_preallocation, run once per open by the first qcow2_co_block_status:
        qcow2_get_refcount for clusters 0, 1, ... of the file until the file ends or the count of
        referenced clusters reaches max(real * 10 / 9, real + 2), real being the clusters the file
        occupies on the host (st_blocks) at that moment."""
        real = self._allocated_now() // self.cs
        self.prealloc_checked = True
        self._written.clear()
        self._dirty.clear()
        end_cluster = -(-self.file_length // self.cs)
        threshold = max(real * 10 // 9, real + 2)
        used = np.frombuffer(bytes(self.used[:end_cluster]), dtype=np.uint8) != 0
        hits = np.flatnonzero(used)
        # the loop stops after the cluster that makes count reach threshold
        stop = end_cluster if len(hits) < threshold else int(hits[threshold - 1]) + 1
        per = 1 << self.refblock_bits
        o = self.out
        for rti in range(-(-stop // per)):
            n = min(stop, (rti + 1) * per) - rti * per
            if rti < len(self.reftable) and self.reftable[rti]:  # one qcow2_get_refcount each
                o.cache.extend([REFCOUNT_CACHE] * n)
                o.offset.extend([self.reftable[rti]] * n)
                o.read.extend([True] * n)
                o.request.extend([self.request_no] * n)

    def _alloc_noref(self, n: int) -> int:
        """alloc_clusters_noref: first fit from free_cluster_index, one qcow2_get_refcount per
        cluster probed (none where the refcount block does not exist yet)."""
        i = 0
        while i < n:
            idx = self.free_cluster_index
            self.free_cluster_index += 1
            self._get_refcount(idx)
            if self._is_used(idx):
                i = 0
            else:
                i += 1
        return self.free_cluster_index - n

    def _alloc_clusters(self, n: int) -> int:
        """qcow2_alloc_clusters: alloc_clusters_noref + update_refcount, again after -EAGAIN."""
        while True:
            start = self._alloc_noref(n)
            if self._update_refcount(start, n):
                return start << self.cb

    def _alloc_clusters_at(self, host: int, n: int) -> int:
        """qcow2_alloc_clusters_at: how many clusters from host on are free, then count them."""
        idx = host >> self.cb
        while True:
            i = 0
            while i < n:
                self._get_refcount(idx + i)
                if self._is_used(idx + i):
                    break
                i += 1
            if i == 0 or self._update_refcount(idx, i):
                return i

    # -- writes ------------------------------------------------------------------------------
    def _get_cluster_table(self, offset: int) -> tuple[list[int], Optional[list[int]], int]:
        cb = self.cb
        l1i = offset >> (cb + cb - (4 if self.ext else 3))
        if l1i >= len(self.l1):
            self.l1.extend([0] * (l1i + 1 - len(self.l1)))  # qcow2_grow_l1_table
        if not (self.l1[l1i] & COPIED):
            self._l2_allocate(l1i)
        self._l2_load(offset, self.l1[l1i] & OFFSET_MASK)
        ents, bms = self._table(l1i)
        return ents, bms, (offset >> cb) & (self.l2_size - 1)

    def _l2_allocate(self, l1i: int) -> None:
        old = self.l1[l1i] & OFFSET_MASK
        new = self._alloc_clusters(1)
        self._flush()  # l2_allocate flushes the refcount cache (and the L2 cache before the L1 update)
        n_slices = self.cs // self.slice_bytes
        if old:
            ents, bms = self._table(l1i)
            ents, bms = list(ents), (list(bms) if bms is not None else None)
        else:
            ents = [0] * self.l2_size
            bms = [0] * self.l2_size if self.ext else None
        for k in range(n_slices):
            self._emit(L2_CACHE, new + k * self.slice_bytes, False)  # qcow2_cache_get_empty
            if old:
                self._emit(L2_CACHE, old + k * self.slice_bytes)
        self._file_write(new, new + self.cs)  # qcow2_cache_flush writes the new table
        self._file_write(self.l1_table_offset + 8 * l1i, self.l1_table_offset + 8 * l1i + 8)
        self.l1[l1i] = new | COPIED
        self._tables[l1i] = (ents, bms)

    @staticmethod
    def _needs_new_alloc(entry: int, ext: bool) -> bool:
        if entry & COMPRESSED:
            return True
        off = entry & OFFSET_MASK
        if off and (entry & COPIED):
            return False
        return True

    def _count_single_write(self, ents: list[int], idx: int, nb: int, new_alloc: bool) -> int:
        expected = ents[idx] & OFFSET_MASK
        i = 0
        while i < nb:
            e = ents[idx + i]
            if self._needs_new_alloc(e, self.ext) != new_alloc:
                break
            if not new_alloc:
                if expected != (e & OFFSET_MASK):
                    break
                expected += self.cs
            i += 1
        return i

    def _calculate_l2_meta(
        self, ents: list[int], bms: Optional[list[int]], host: int, guest: int, nbytes: int, keep_old: bool
    ) -> Optional[Meta]:
        cb, cs = self.cb, self.cs
        l2_index = (guest >> cb) & (self.l2_size - 1)
        cow_start_to = guest & (cs - 1)
        cow_end_from = cow_start_to + nbytes
        nb = -(-cow_end_from // cs)
        skip = keep_old
        if skip:
            for i in range(nb):
                e, b = self._entry(ents, bms, l2_index + i)
                wf = max(cow_start_to, i << cb)
                wt = min(cow_end_from, (i + 1) << cb)
                fsc = (wf & (cs - 1)) >> self.sc_bits
                lsc = ((wt - 1) & (cs - 1)) >> self.sc_bits
                t, cnt = self._range_type(e, b, fsc)
                if t != NORMAL or fsc + cnt <= lsc:
                    skip = False
                    break
        if skip:
            return None
        e, b = self._entry(ents, bms, l2_index)
        sc = (guest & (cs - 1)) >> self.sc_bits
        t = self._sc_type(e, b, sc)
        if not keep_old:
            if t == COMPRESSED_T:
                csf = 0
            elif t in (NORMAL, ZERO_ALLOC, UNALLOC_ALLOC):
                csf = (min(sc, _ctz32(b & 0xFFFFFFFF)) << self.sc_bits) if self.ext else 0
            else:
                csf = sc << self.sc_bits
        else:
            csf = cow_start_to if t == NORMAL else sc << self.sc_bits
        e, b = self._entry(ents, bms, l2_index + nb - 1)
        sc = ((guest + nbytes - 1) & (cs - 1)) >> self.sc_bits
        t = self._sc_type(e, b, sc)
        scs = 1 << self.sc_bits
        if not keep_old:
            if t == COMPRESSED_T:
                cet = -(-cow_end_from // cs) * cs
            elif t in (NORMAL, ZERO_ALLOC, UNALLOC_ALLOC):
                cet = -(-cow_end_from // cs) * cs
                if self.ext:
                    alloc = b & 0xFFFFFFFF
                    clz = 32 if alloc == 0 else 32 - alloc.bit_length()
                    cet -= min(self.sc_per - sc - 1, clz) << self.sc_bits
            else:
                cet = -(-cow_end_from // scs) * scs
        else:
            cet = cow_end_from if t == NORMAL else -(-cow_end_from // scs) * scs
        return Meta(host, guest - (guest & (cs - 1)), nb, keep_old, (csf, cow_start_to - csf), (cow_end_from, cet - cow_end_from))

    def _alloc_host_offset(self, offset: int, nbytes: int) -> tuple[int, list[Meta]]:
        """qcow2_alloc_host_offset: returns (bytes handled, metas in creation order)."""
        cb, cs = self.cb, self.cs
        start = offset
        remaining = nbytes
        cluster_offset: Optional[int] = None
        cur = 0
        metas: list[Meta] = []
        while True:
            start += cur
            remaining -= cur
            if cluster_offset is not None:
                cluster_offset += cur
            if remaining == 0:
                break
            cur = remaining
            # handle_copied
            oic = start & (cs - 1)
            l2i = (start >> cb) & (self.l2_size - 1)
            nb = min(-(-(oic + cur) // cs), self.slice_size - (l2i & (self.slice_size - 1)), BDRV_REQUEST_MAX_BYTES >> cb)
            ents, bms, idx = self._get_cluster_table(start)
            e = ents[idx]
            if not self._needs_new_alloc(e, self.ext):
                coff = e & OFFSET_MASK
                if cluster_offset is not None and coff != cluster_offset - (cluster_offset & (cs - 1)):
                    cur = 0
                    break
                keep = self._count_single_write(ents, idx, nb, False)
                cur = min(cur, keep * cs - oic)
                m = self._calculate_l2_meta(ents, bms, coff, start, cur, True)
                if m:
                    metas.append(m)
                if cluster_offset is None:
                    cluster_offset = coff + oic
                continue
            # handle_alloc
            ents, bms, idx = self._get_cluster_table(start)
            nbc = self._count_single_write(ents, idx, nb, True)
            if cluster_offset is None:
                host = self._alloc_clusters(nbc)
            else:
                host = cluster_offset - (cluster_offset & (cs - 1))
                nbc = self._alloc_clusters_at(host, nbc)
                if nbc == 0:
                    cur = 0
                    break
            requested = cur + oic
            nb_bytes = min(requested, nbc << cb)
            cur = min(cur, nb_bytes - oic)
            m = self._calculate_l2_meta(ents, bms, host, start, cur, False)
            if m:
                metas.append(m)
            if cluster_offset is None:
                cluster_offset = host + oic
        return nbytes - remaining, metas

    def _region_is_zero(self, offset: int, nbytes: int) -> bool:
        """bdrv_co_is_zero_fast -> qcow2_co_block_status -> one qcow2_get_host_offset."""
        if not self.prealloc_checked:
            self._detect_metadata_preallocation()
        got, t = self._get_host_offset(offset, nbytes)
        return got >= nbytes and t in (ZERO_PLAIN, ZERO_ALLOC, UNALLOC_PLAIN, UNALLOC_ALLOC)

    def _alloc_space(self, m: Meta) -> bool:
        """handle_alloc_space, at the start of the write task (before the data write): COW areas
        that read as zeroes are written as zeroes instead (bdrv_co_is_zero_fast looks them up).
        Returns whether perform_cow can be skipped."""
        if not (m.cow_start[1] or m.cow_end[1]):
            return False
        if m.cow_start[1] and not self._region_is_zero(m.offset + m.cow_start[0], m.cow_start[1]):
            return False
        if m.cow_end[1] and not self._region_is_zero(m.offset + m.cow_end[0], m.cow_end[1]):
            return False
        return True

    def _link_l2(self, m: Meta, skip_cow: bool) -> None:
        cb = self.cb
        if (m.cow_start[1] or m.cow_end[1]) and not skip_cow:
            # perform_cow reads the old data through qcow2_co_preadv_part
            for off, n in (m.cow_start, m.cow_end):
                if n:
                    o, left = m.offset + off, n
                    while left > 0:
                        got, _t = self._get_host_offset(o, left)
                        o += got
                        left -= got
        ents, bms, idx = self._get_cluster_table(m.offset)
        if not self.prealloc_checked:
            l2_offset = self.l1[m.offset >> (cb + cb - (4 if self.ext else 3))] & OFFSET_MASK
            self._mark_dirty(l2_offset + self.l2e * (idx - idx % self.slice_size), self.slice_bytes)
        old = [e for e in ents[idx : idx + m.nb_clusters] if e]
        for i in range(m.nb_clusters):
            ents[idx + i] = (m.alloc_offset + (i << cb)) | COPIED
            if bms is not None:
                wf = max(m.cow_start[0], i << cb)
                wt = min(m.cow_end[0] + m.cow_end[1], (i + 1) << cb)
                fsc = (wf - (i << cb)) >> self.sc_bits
                lsc = (wt - 1 - (i << cb)) >> self.sc_bits
                r = _range_mask(fsc, lsc + 1)
                bms[idx + i] = (bms[idx + i] | r) & ~(r << 32)
        if not m.keep_old:
            for e in old:  # a COW of clusters the new ones replace: qcow2_free_any_cluster
                self._free_any_cluster(e)

    def _free_any_cluster(self, entry: int) -> None:
        """qcow2_free_any_cluster -> qcow2_free_clusters -> update_refcount(decrease)."""
        cb, cs = self.cb, self.cs
        if entry & COMPRESSED:
            coffset, csize = compressed_span(entry, cb)
            first, last = coffset >> cb, (coffset + csize - 1) >> cb
        elif entry & OFFSET_MASK and not (entry & (cs - 1) & OFFSET_MASK):
            first = last = (entry & OFFSET_MASK) >> cb
        else:
            return  # zero or unallocated: nothing to free
        self._update_refcount(first, last - first + 1, True)

    def write(self, offset: int, nbytes: int) -> None:
        """qcow2_co_pwritev_part. Per piece: the allocation (qcow2_alloc_host_offset), then the
        write task starts at once and checks the COW areas (handle_alloc_space) before its data
        write yields. A single-piece write links its L2 updates right after its data. A
        multi-piece write runs the pieces' data writes concurrently; their link_l2 calls come
        after all pieces are allocated here (in QEMU their order follows I/O completion, so the
        lookup order of such writes is only approximated). Within a piece QEMU links the most
        recent QCowL2Meta first."""
        pending: list[tuple[list[Meta], list[bool]]] = []
        first = True
        while nbytes > 0:
            cur, metas = self._alloc_host_offset(offset, min(nbytes, INT_MAX))
            if cur == 0:
                raise BadInputError("write made no progress (unsupported image state)")
            order = list(reversed(metas))
            skips = [self._alloc_space(m) for m in order]
            for m in order:  # the data write (with its COW or zeroed COW areas) of each piece
                self._file_write(m.alloc_offset + m.cow_start[0], m.alloc_offset + m.cow_end[0] + m.cow_end[1])
            if first and cur == nbytes:
                for m, sk in zip(order, skips):
                    self._link_l2(m, sk)
            else:
                pending.append((order, skips))
            first = False
            offset += cur
            nbytes -= cur
        for order, skips in (reversed(pending) if LINK_LAST_PIECE_FIRST else pending):
            for m, sk in zip(order, skips):
                self._link_l2(m, sk)
        self._flush()  # writethrough (qemu-io's default): the caches are flushed after each write
        self.request_no += 1


def lookups_for(state: ImageState, ops, limit_bytes: Optional[int] = None,
                tick: Optional[Callable[[int], None]] = None) -> Lookups:
    """Run requests (op, offset, length) through the state; op is 'r' or 'w'. tick(n) is called
    every 4096 requests (progress)."""
    vs = state.g.virtual_size if limit_bytes is None else limit_bytes
    for k, (op, off, n) in enumerate(ops):
        if tick is not None and k and not k & 4095:
            tick(4096)
        if off < 0 or n <= 0 or off + n > vs:
            raise BadInputError(f"request {op} {off} {n} lies outside the {vs}-byte disk")
        if op == "r":
            state.read(off, n)
        elif op == "w":
            state.write(off, n)
        else:
            raise BadInputError(f"unknown request type {op!r}")
    return state.out

