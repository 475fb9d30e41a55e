"""`virtopt qcow2 map`: the guest-to-host mapping, entry for entry as `qemu-img map --output=json`.

qemu-img map asks bdrv_block_status() layer by layer and merges neighbours whose
(depth, present, zero, data, has-offset) agree and whose host offsets continue;
the result is therefore the set of maximal runs of one per-byte status.  Here each
layer's status is computed in bulk from its L2 tables (numpy run detection per
chunk of tables), unallocated ranges descend to the backing file, and the same
merge rule is applied.  Like QEMU 7.2, when qcow2 detects metadata preallocation
(more refcounted clusters than the file really allocates) data clusters that lie
in holes of the host file are reported as zero (BDRV_BLOCK_RECURSE).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from qemu_ext.errors import BadInputError
from qemu_ext.qcow2 import format as F
from qemu_ext.qcow2.chain import Chain, Layer, open_chain
from qemu_ext.qcow2.entries import OFFSET_MASK, SC_OF_CLUSTER, SubclusterType, cluster_types, subcluster_types
from qemu_ext.qcow2.image import PathLike, ProgressFactory, Qcow2Image, start_bar

U = np.uint64
# block status codes of a run: BDRV_BLOCK_DATA, BDRV_BLOCK_ZERO, BDRV_BLOCK_COMPRESSED (10.0)
UNALLOC, DATA, ZERO, COMPRESSED_FLAG = 0, 1, 2, 4
SCAN_BYTES = 512 << 10


@dataclass
class Runs:
    """Runs of one status in bytes: start, length, code (UNALLOC or DATA/ZERO/COMPRESSED_FLAG bits), has_off, off."""

    start: np.ndarray
    length: np.ndarray
    code: np.ndarray
    has_off: np.ndarray
    off: np.ndarray

    @staticmethod
    def empty() -> Runs:
        z = np.zeros(0, dtype=np.int64)
        return Runs(z, z.copy(), np.zeros(0, dtype=np.int8), np.zeros(0, dtype=bool), z.copy())

    def __len__(self) -> int:
        return len(self.start)


def _concat(parts: list[Runs]) -> Runs:
    if not parts:
        return Runs.empty()
    return Runs(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("start", "length", "code", "has_off", "off")))


def merge(r: Runs) -> Runs:
    """Merge neighbours with equal status and continuing host offsets (sorted, gap-free input)."""
    n = len(r)
    if n <= 1:
        return r
    brk = np.ones(n, dtype=bool)
    brk[1:] = (
        (r.code[1:] != r.code[:-1])
        | (r.has_off[1:] != r.has_off[:-1])
        | (r.has_off[1:] & (r.off[1:] != r.off[:-1] + r.length[:-1]))
        | (r.start[1:] != r.start[:-1] + r.length[:-1])
    )
    idx = np.nonzero(brk)[0]
    length = np.add.reduceat(r.length, idx)
    return Runs(r.start[idx], length, r.code[idx], r.has_off[idx], r.off[idx])


def _fill_gaps(r: Runs, size: int) -> Runs:
    """Insert UNALLOC runs wherever [0, size) is not covered, then clamp to size."""
    if len(r):
        keep = r.start < size
        r = Runs(r.start[keep], r.length[keep], r.code[keep], r.has_off[keep], r.off[keep])
        if len(r):
            end = r.start + r.length
            r.length[-1] = min(int(end[-1]), size) - int(r.start[-1])
    ends = np.concatenate([[0], r.start + r.length])
    starts = np.concatenate([r.start, [size]])
    gap = starts - ends
    gi = np.nonzero(gap > 0)[0]
    if not len(gi):
        return r
    g = Runs(ends[gi], gap[gi], np.zeros(len(gi), dtype=np.int8), np.zeros(len(gi), dtype=bool),
             np.zeros(len(gi), dtype=np.int64))
    allr = _concat([r, g])
    order = np.argsort(allr.start, kind="stable")
    return Runs(*(getattr(allr, f)[order] for f in ("start", "length", "code", "has_off", "off")))


def c_hex(v: int) -> str:
    """printf's %#x: 0x1f, but 0 for zero."""
    return f"{v:#x}" if v else "0"


def corrupt(img: Qcow2Image, message: str) -> BadInputError:
    """qcow2_signal_corruption() on a read-only image: the request fails with EIO (qemu-img map:
    "Could not read file metadata: Input/output error")."""
    return BadInputError(f"{img.path}: Image is corrupt: {message}")


def _entry_error(img: Qcow2Image, st: np.ndarray, cl_off: np.ndarray, guest_cluster: np.ndarray,
                 l2_offs: np.ndarray, per: int) -> Optional[tuple[int, str]]:
    """The first L2 entry (in guest order) that qcow2_get_host_offset() refuses, as
    (guest cluster, QEMU's message); st holds the subcluster types per cluster (rows of 1 or 32)."""
    T = SubclusterType
    cs = img.cluster_size
    bad = np.zeros(len(st), dtype=np.int8)  # 0 ok, else the reason below
    if img.version < 3:
        bad[((st == T.ZERO_PLAIN) | (st == T.ZERO_ALLOC)).any(axis=1)] = 1
    hostish = ((st == T.NORMAL) | (st == T.ZERO_ALLOC) | (st == T.UNALLOCATED_ALLOC)).any(axis=1)
    if img.has_data_file:
        bad[(st == T.COMPRESSED).any(axis=1) & (bad == 0)] = 2
        bad[hostish & (cl_off != guest_cluster * cs) & ((cl_off & (cs - 1)) == 0) & (bad == 0)] = 4
    bad[hostish & ((cl_off & (cs - 1)) != 0) & (bad == 0)] = 3
    bad[(st == T.INVALID).any(axis=1) & (bad == 0)] = 5
    nz = np.flatnonzero(bad)
    if not len(nz):
        return None
    k = int(nz[0])
    g = int(guest_cluster[k])
    l2o, idx = int(l2_offs[k]), g % per
    why = int(bad[k])
    if why == 1:
        msg = f"Zero cluster entry found in pre-v3 image (L2 offset: {c_hex(l2o)}, L2 index: {c_hex(idx)})"
    elif why == 2:
        msg = (f"Compressed cluster entry found in image with external data file (L2 offset: {c_hex(l2o)}, "
               f"L2 index: {c_hex(idx)})")
    elif why == 3:
        msg = f"Cluster allocation offset {c_hex(int(cl_off[k]))} unaligned (L2 offset: {c_hex(l2o)}, L2 index: {c_hex(idx)})"
    elif why == 4:
        msg = (f"External data file host cluster offset {c_hex(int(cl_off[k]))} does not match guest cluster offset: "
               f"{c_hex(g * cs)}, L2 index: {c_hex(idx)})")
    else:
        msg = f"Invalid cluster entry found  (L2 offset: {c_hex(l2o)}, L2 index: {c_hex(idx)})"
    return g, msg


def _chunk_runs(img: Qcow2Image, sel: np.ndarray, offs: np.ndarray, tabs: np.ndarray, split: bool = False) -> Runs:
    """Status runs (qcow2_co_block_status, 7.2 and 10.0) of the guest units of a chunk of L2 tables
    (with split, no run continues from one table into the next)."""
    cs = img.cluster_size
    per = img.l2_entries_per_table
    crypto = img.header.crypt_method != 0
    data_file = img.has_data_file
    T = SubclusterType
    if img.extended_l2:
        ent, bmp = tabs[:, :, 0], tabs[:, :, 1]
        st = subcluster_types(ent, bmp, data_file)  # (rows, per, 32)
        unit = cs // 32
    else:
        ent = tabs
        if not crypto and not data_file and img.version >= 3:
            fast = _fast_chunk_runs(img, sel, ent, split)
            if fast is not None:
                return fast
        st = SC_OF_CLUSTER[cluster_types(ent, False, data_file)][:, :, None]
        unit = cs
    nsc = st.shape[2]
    cl_off = (ent & U(OFFSET_MASK)).astype(np.int64)
    gcl = sel.astype(np.int64)[:, None] * per + np.arange(per, dtype=np.int64)[None, :]
    err = _entry_error(img, st.reshape(-1, nsc), cl_off.ravel(), gcl.ravel(),
                       np.repeat(offs.astype(np.int64), per), per)
    if err is not None:
        raise corrupt(img, err[1])
    code = np.zeros(st.shape, dtype=np.int8)
    code[(st == T.ZERO_PLAIN) | (st == T.ZERO_ALLOC)] = ZERO
    code[st == T.NORMAL] = DATA
    code[st == T.COMPRESSED] = DATA | COMPRESSED_FLAG
    has_off = ((st == T.NORMAL) | (st == T.ZERO_ALLOC) | (st == T.UNALLOCATED_ALLOC)) & (not crypto)
    off = cl_off[:, :, None] + (np.arange(nsc, dtype=np.int64) * unit)[None, None, :]
    g = gcl[:, :, None] * nsc + np.arange(nsc, dtype=np.int64)[None, None, :]
    code, has_off, off, g = code.ravel(), has_off.ravel(), off.ravel(), g.ravel()
    n = len(code)
    brk = np.ones(n, dtype=bool)
    brk[1:] = (
        (code[1:] != code[:-1])
        | (has_off[1:] != has_off[:-1])
        | (has_off[1:] & (off[1:] != off[:-1] + unit))
        | (g[1:] != g[:-1] + 1)
    )
    if split:
        brk[:: per * nsc] = True
    idx = np.nonzero(brk)[0]
    lengths = np.diff(np.append(idx, n)) * unit
    return Runs(g[idx] * unit, lengths.astype(np.int64), code[idx], has_off[idx].copy(),
                np.where(has_off[idx], off[idx], 0).astype(np.int64))


def _fast_chunk_runs(img: Qcow2Image, sel: np.ndarray, ent: np.ndarray, split: bool = False) -> Optional[Runs]:
    """Standard L2 entries that are only normal (aligned) or unallocated: runs in a few passes."""
    cs = img.cluster_size
    special = U(F.L2E_COMPRESSED | F.L2E_ZERO | ((cs - 1) & ~0x1FF))
    if (ent & special).any():
        return None
    rows, per = ent.shape
    o = (ent & U(F.L2E_OFFSET_MASK)).ravel().view(np.int64)
    n = o.size
    brk = np.empty(n, dtype=bool)
    brk[0] = True
    alloc = o != 0
    if alloc.all():
        np.not_equal(o[1:], o[:-1] + cs, out=brk[1:])
    else:
        brk[1:] = (alloc[1:] != alloc[:-1]) | (alloc[1:] & (o[1:] != o[:-1] + cs))
    # a table whose L1 index does not follow the previous one starts a new run
    gap = np.ones(rows, dtype=bool)
    if not split:
        gap[1:] = np.diff(sel) != 1
    brk[np.flatnonzero(gap) * per] = True
    idx = np.flatnonzero(brk)
    r, j = np.divmod(idx, per)
    start = (sel.astype(np.int64)[r] * per + j) * cs
    lengths = np.diff(np.append(idx, n)) * cs
    a = alloc[idx]
    return Runs(start, lengths.astype(np.int64), np.where(a, DATA, UNALLOC).astype(np.int8), a, np.where(a, o[idx], 0))


def metadata_preallocation(img: Qcow2Image) -> bool:
    """qcow2_detect_metadata_preallocation(): more refcounted clusters than the file allocates."""
    st = os.fstat(img._fd)
    real_clusters = st.st_blocks * 512 // img.cluster_size
    threshold = max(real_clusters * 10 // 9, real_clusters + 2)
    end_cluster = (img.file_size + img.cluster_size - 1) // img.cluster_size
    # like QEMU, count refcounted clusters block by block and stop once the threshold is reached
    rt = img.refcount_table()
    per = img.refcount_block_entries
    cs = img.cluster_size
    count = 0
    for i in np.nonzero(rt & U(F.RT_OFFSET_MASK))[0].tolist():
        if i * per >= end_cluster:
            break
        off = int(rt[i]) & F.RT_OFFSET_MASK
        if off % cs:
            continue
        blk = img.decode_refcount_block(img.pread_zero_padded(off, cs), narrow=True)
        count += int(np.count_nonzero(blk[: max(0, end_cluster - i * per)]))
        if count >= threshold:
            return True
    return False


def file_extents(fd: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Data extents (starts, ends) of a host file, from SEEK_DATA/SEEK_HOLE (the whole file if unsupported)."""
    starts: list[int] = []
    ends: list[int] = []
    pos = 0
    try:
        while pos < length:
            try:
                d = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            h = os.lseek(fd, d, os.SEEK_HOLE)
            starts.append(d)
            ends.append(h)
            pos = h
    except (OSError, AttributeError):
        starts, ends = [0], [length]
    return np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64)


def _split_by_holes(r: Runs, extents: tuple[np.ndarray, np.ndarray]) -> Runs:
    """BDRV_BLOCK_RECURSE: the parts of DATA runs with a host offset that lie in holes of the host
    file read as zeros (DATA|ZERO), in bulk: each run is cut at the extent boundaries inside it."""
    starts, ends = extents
    split = (r.code == DATA) & r.has_off
    if not split.any():
        return r
    cuts = np.unique(np.concatenate([starts, ends]))
    o, ln = r.off, r.length
    lo = np.where(split, np.searchsorted(cuts, o, side="right"), 0)
    hi = np.where(split, np.searchsorted(cuts, o + ln, side="left"), 0)
    n = hi - lo + 1  # pieces of each run (1 when not split)
    run = np.repeat(np.arange(len(r)), n)
    k = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)  # piece number within its run
    cut_i = np.repeat(lo, n) + k - 1
    piece_start = np.where(k == 0, o[run], cuts[np.clip(cut_i, 0, max(len(cuts) - 1, 0))])
    last = k == n[run] - 1
    nxt = cuts[np.clip(cut_i + 1, 0, max(len(cuts) - 1, 0))] if len(cuts) else piece_start
    piece_end = np.where(last, o[run] + ln[run], nxt)
    # a piece is data when the last extent starting at or before it reaches past its start
    e = np.searchsorted(starts, piece_start, side="right") - 1
    in_data = (e >= 0) & (ends[np.clip(e, 0, max(len(ends) - 1, 0))] > piece_start) if len(starts) else \
        np.zeros(len(piece_start), dtype=bool)
    code = r.code[run].copy()
    code[split[run] & ~in_data] = DATA | ZERO
    return Runs(r.start[run] + (piece_start - o[run]) * split[run], np.where(split[run], piece_end - piece_start,
                ln[run]), code, r.has_off[run], np.where(split[run], piece_start, r.off[run]))


def layer_runs(layer: Layer, progress_bar: Any = None) -> Runs:
    """The block status of one layer over [0, size) as merged runs."""
    size = layer.size
    if layer.img is None:  # raw: data and holes of the file, all allocated, offset = guest offset
        st, en = file_extents(layer.fd, layer.file_size)
        r = Runs(st, en - st, np.full(len(st), DATA, dtype=np.int8), np.ones(len(st), dtype=bool), st.copy())
        r = _fill_gaps(r, size)
        z = r.code == UNALLOC
        r.code[z] = ZERO
        r.has_off[z] = True
        r.off[z] = r.start[z]
        return merge(r)
    img = layer.img
    # only the L1 entries that cover the disk: guest I/O never looks past it (QEMU's l1_vm_state_index)
    l1 = layer.l1_entries()[: img.l1_entries_needed(size)]
    l2_offs = l1 & U(F.L1E_OFFSET_MASK)
    used = np.nonzero(l2_offs)[0]
    offs_used = l2_offs[used]
    # each distinct L2 table once (several L1 entries may point at one: only in corrupt images),
    # in guest order of its first use; an unaligned table offset fails there (qcow2_get_host_offset)
    uniq, first, inv = np.unique(offs_used, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    unaligned = np.flatnonzero(offs_used % U(img.cluster_size))
    stop = int(unaligned[0]) if len(unaligned) else len(used)  # position in `used` of the first unaligned one
    todo = order[first[order] < stop]
    chunk = max(1, SCAN_BYTES // img.cluster_size)  # L2 tables per step: a few MiB of temporaries
    if img.extended_l2:
        chunk = max(1, chunk // 8)
    parts: list[Runs] = []
    for s in range(0, len(todo), chunk):
        t = todo[s : s + chunk]
        sel = used[first[t]]
        parts.append(_chunk_runs(img, sel, uniq[t], img.read_l2_tables(uniq[t], reuse=True), len(uniq) < len(used)))
        if progress_bar is not None:
            progress_bar.update(len(t))
    if stop < len(used):
        raise corrupt(img, f"L2 table offset {c_hex(int(offs_used[stop]))} unaligned "
                           f"(L1 index: {c_hex(int(used[stop]))})")
    if len(uniq) < len(used):
        parts = [_repeat_tables(img, _concat(parts), used, first[todo], inv, rank)]
    r = merge(_fill_gaps(_concat(parts), size))
    if img.header.crypt_method == 0 and (r.code == DATA).any() and metadata_preallocation(img):
        if img.has_data_file:
            from qemu_ext.qcow2.data import data_file_path

            fd = os.open(data_file_path(img), os.O_RDONLY)
            try:
                r = merge(_split_by_holes(r, file_extents(fd, os.fstat(fd).st_size)))
            finally:
                os.close(fd)
        else:
            r = merge(_split_by_holes(r, file_extents(img._fd, img.file_size)))
    return r


def _repeat_tables(img: Qcow2Image, r: Runs, used: np.ndarray, first_pos: np.ndarray, inv: np.ndarray,
                   rank: np.ndarray) -> Runs:
    """The runs of every L1 entry from those of the distinct tables (computed at each table's first
    L1 entry): the same runs, shifted to each entry's guest range."""
    span = img.l2_entries_per_table * img.cluster_size
    first_l1 = used[first_pos]  # in rank order
    table = np.searchsorted(first_l1 * span, r.start, side="right") - 1  # rank of the table of each run
    rel = r.start - first_l1[table] * span
    counts = np.bincount(table, minlength=len(first_l1))
    ptr = np.concatenate([[0], np.cumsum(counts)])
    k_rank = rank[inv]  # table rank of each used L1 entry
    n = counts[k_rank]
    idx = np.repeat(ptr[k_rank], n) + (np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n))
    base = np.repeat(used.astype(np.int64) * span, n)
    return Runs(base + rel[idx], r.length[idx], r.code[idx], r.has_off[idx], r.off[idx])


class MapEntry:
    """One entry of qemu-img map (its MapEntry, qemu-img.c): a run of one block status.
    compressed is BDRV_BLOCK_COMPRESSED (printed by qemu-img map since 8.2). Slots: maps of big
    images have tens of thousands of entries."""

    __slots__ = ("compressed", "data", "depth", "filename", "length", "offset", "present", "start", "zero")

    def __init__(self, start: int, length: int, depth: int, present: bool, zero: bool, data: bool,
                 offset: Optional[int], filename: Optional[str] = None, compressed: bool = False) -> None:
        self.start, self.length, self.depth, self.present = start, length, depth, present
        self.zero, self.data, self.offset, self.filename, self.compressed = zero, data, offset, filename, compressed

    def __repr__(self) -> str:
        return f"MapEntry({self.as_dict()})"

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"start": self.start, "length": self.length, "depth": self.depth,
                             "present": self.present, "zero": self.zero, "data": self.data,
                             "compressed": self.compressed}
        if self.offset is not None:
            d["offset"] = self.offset
        return d


def _descend(runs: list[Runs], layers: list[Layer], depth: int, a: int, b: int, out: list[tuple]) -> None:
    """Status of [a, b) starting at layer `depth`
    (appends (start, len, depth, present, zero, data, off|None, compressed))."""
    r = runs[depth]
    i = int(np.searchsorted(r.start, a, side="right")) - 1
    while a < b:
        s, ln = int(r.start[i]), int(r.length[i])
        e = min(b, s + ln)
        c = int(r.code[i])
        h = bool(r.has_off[i])
        o = int(r.off[i]) + (a - s) if h else None
        if c != UNALLOC:
            out.append((a, e - a, depth, True, bool(c & ZERO), bool(c & DATA), o, bool(c & COMPRESSED_FLAG)))
        elif depth + 1 < len(layers):
            bsize = layers[depth + 1].size
            if a < bsize:
                m = min(e, bsize)
                _descend(runs, layers, depth + 1, a, m, out)
                if m < e:
                    out.append((m, e - m, depth, False, True, False, None if o is None else o + (m - a), False))
            else:
                out.append((a, e - a, depth, False, True, False, o, False))
        else:
            out.append((a, e - a, depth, False, True, False, o, False))
        a = e
        i += 1


def chain_map(chain: Chain, progress: Optional[ProgressFactory] = None) -> list[MapEntry]:
    """qemu-img map's entries for a whole chain (top layer first)."""
    layers = chain.layers
    runs: list[Runs] = []
    total = sum(int(np.count_nonzero(L.l1_entries() & U(F.L1E_OFFSET_MASK))) for L in layers if L.img is not None)
    bar = start_bar(progress, total, "qcow2 map", unit="L2")
    try:
        for L in layers:
            runs.append(layer_runs(L, bar))
    finally:
        bar.close()
    top = runs[0]
    if len(layers) == 1:
        # fast path: no backing, unallocated means zero at depth 0
        out = []
        code = top.code
        zero = (code == UNALLOC) | ((code & ZERO) != 0)
        data = (code & DATA) != 0
        present = code != UNALLOC
        comp = (code & COMPRESSED_FLAG) != 0
        st, ln, ho, of = top.start.tolist(), top.length.tolist(), top.has_off.tolist(), top.off.tolist()
        for k, (z, d, p, c) in enumerate(zip(zero.tolist(), data.tolist(), present.tolist(), comp.tolist())):
            out.append(MapEntry(st[k], ln[k], 0, p, z, d, of[k] if ho[k] else None, compressed=c))
        return _merge_entries(out)
    rows: list[tuple] = []
    _descend(runs, layers, 0, 0, layers[0].size, rows)
    return _merge_entries([MapEntry(*t[:7], compressed=t[7]) for t in rows])


def _merge_entries(entries: list[MapEntry]) -> list[MapEntry]:
    out: list[MapEntry] = []
    for e in entries:
        if e.length <= 0:
            continue
        if out:
            c = out[-1]
            if (
                c.zero == e.zero and c.data == e.data and c.depth == e.depth and c.present == e.present
                and c.compressed == e.compressed
                and (c.offset is None) == (e.offset is None)
                and (c.offset is None or c.offset + c.length == e.offset)
            ):
                c.length += e.length
                continue
        out.append(e)  # merged into in place: the entries were made for this list
    return out


def clip(entries: list[MapEntry], start: int, max_length: Optional[int]) -> list[MapEntry]:
    """qemu-img map --start-offset/--max-length: the entries inside [start, start + max_length)."""
    end = entries[-1].start + entries[-1].length if entries else 0
    if max_length is not None:
        end = min(end, start + max_length)
    out = []
    for e in entries:
        a, b = max(e.start, start), min(e.start + e.length, end)
        if a >= b:
            continue
        off = None if e.offset is None else e.offset + (a - e.start)
        out.append(MapEntry(a, b - a, e.depth, e.present, e.zero, e.data, off, e.filename, e.compressed))
    return out


def image_map(path: PathLike, progress: Optional[ProgressFactory] = None, start: int = 0,
              max_length: Optional[int] = None) -> list[MapEntry]:
    """The `qemu-img map` entries of an image through its backing chain."""
    with open_chain(path) as chain:
        entries = chain_map(chain, progress)
        names = [L.img.data_file if L.img is not None and L.img.has_data_file and L.img.data_file else L.filename
                 for L in chain.layers]  # qemu-img names the node holding the data: the data file, if any
        for e in entries:
            e.filename = names[e.depth] if e.offset is not None else None
        if start or max_length is not None:
            entries = clip(entries, start, max_length)
        if not entries:  # qemu-img prints its empty initial entry
            entries = [MapEntry(start, 0, 0, False, False, False, None)]
        return entries
