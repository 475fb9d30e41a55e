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

import bisect
import errno
import os
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from qemu_ext.errors import BadInputError
from qemu_ext.qcow2 import format as F
from qemu_ext.qcow2.chain import Chain, Layer, open_chain
from qemu_ext.qcow2.image import PathLike, Qcow2Image

U = np.uint64
UNALLOC, DATA, ZERO = 0, 1, 2


@dataclass
class Runs:
    """Runs of one status in bytes: start, length, code (UNALLOC/DATA/ZERO), has_off, off."""

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


def _chunk_runs(img: Qcow2Image, sel: np.ndarray, tabs: np.ndarray) -> Runs:
    """Status runs of the guest units described by a chunk of L2 tables."""
    cs = img.cluster_size
    per = img.l2_entries_per_table
    crypto = img.header.crypt_method != 0
    data_file = img.has_data_file
    if img.extended_l2:
        ent = tabs[:, :, 0]
        bmp = tabs[:, :, 1]
    else:
        ent = tabs
        bmp = None
        if not crypto and not data_file:
            fast = _fast_chunk_runs(img, sel, ent)
            if fast is not None:
                return fast
    compressed = (ent & U(F.L2E_COMPRESSED)) != 0
    off = (ent & U(F.L2E_OFFSET_MASK)).astype(np.int64)
    copied = (ent & U(F.L2E_COPIED)) != 0
    allocated = (off != 0) | (copied & data_file)
    if bmp is None:
        zero = ~compressed & ((ent & U(F.L2E_ZERO)) != 0)
        normal = ~compressed & ~zero & allocated
        code = np.where(compressed | normal, DATA, np.where(zero, ZERO, UNALLOC)).astype(np.int8)
        has_off = (normal | (zero & allocated)) & (not crypto)
        unit = cs
        bad = has_off & ((off & (cs - 1)) != 0)
        g = (sel.astype(np.int64)[:, None] * per + np.arange(per, dtype=np.int64)[None, :])
        code, has_off, off, g = code.ravel(), has_off.ravel(), off.ravel(), g.ravel()
    else:
        sc = np.arange(32, dtype=np.uint64)
        alloc_bits = ((bmp[:, :, None] >> sc) & U(1)) != 0
        zero_bits = ((bmp[:, :, None] >> (sc + U(32))) & U(1)) != 0
        std = ~compressed
        normal_c = std & allocated
        unalloc_c = std & ~allocated
        invalid = (normal_c & (((bmp >> U(32)) & bmp) != 0)) | (unalloc_c & ((bmp & U(F.L2_BITMAP_ALLOC_MASK)) != 0))
        if invalid.any():
            r, j = (int(x[0]) for x in np.nonzero(invalid))
            raise BadInputError(
                f"{img.path}: invalid subcluster bitmap in the L2 entry for guest offset "
                f"{(int(sel[r]) * per + j) * cs:#x} (qemu-img map fails with an I/O error here)"
            )
        nc = normal_c[:, :, None]
        code = np.full(alloc_bits.shape, UNALLOC, dtype=np.int8)
        code[np.broadcast_to(compressed[:, :, None], code.shape)] = DATA
        code[nc & zero_bits] = ZERO
        code[nc & ~zero_bits & alloc_bits] = DATA
        code[unalloc_c[:, :, None] & zero_bits] = ZERO
        has_off = np.broadcast_to(nc, code.shape) & (not crypto)
        unit = cs // 32
        bad = normal_c & ((off & (cs - 1)) != 0) & (not crypto)
        off = (off[:, :, None] + (np.arange(32, dtype=np.int64) * unit)[None, None, :])
        g = (sel.astype(np.int64)[:, None, None] * per + np.arange(per, dtype=np.int64)[None, :, None]) * 32 + \
            np.arange(32, dtype=np.int64)[None, None, :]
        code, has_off, off, g = code.ravel(), has_off.ravel(), off.ravel(), g.ravel()
    if bad.any():
        r, j = (int(x[0]) for x in np.nonzero(bad))
        raise BadInputError(
            f"{img.path}: L2 entry for guest offset {(int(sel[r]) * per + j) * cs:#x} has an unaligned host offset "
            f"(qemu-img map fails with an I/O error here)"
        )
    n = len(code)
    brk = np.ones(n, dtype=bool)
    brk[1:] = (
        (code[1:] != code[:-1])
        | (has_off[1:] != has_off[:-1])
        | (has_off[1:] & (off[1:] != off[:-1] + unit))
        | (g[1:] != g[:-1] + 1)
    )
    idx = np.nonzero(brk)[0]
    lengths = np.diff(np.append(idx, n)) * unit
    return Runs(g[idx] * unit, lengths.astype(np.int64), code[idx], has_off[idx].copy(),
                np.where(has_off[idx], off[idx], 0).astype(np.int64))


def _fast_chunk_runs(img: Qcow2Image, sel: np.ndarray, ent: np.ndarray) -> Optional[Runs]:
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
        blk = img.decode_refcount_block(img.pread_zero_padded(off, cs))
        count += int(np.count_nonzero(blk[: max(0, end_cluster - i * per)]))
        if count >= threshold:
            return True
    return False


def file_extents(fd: int, length: int) -> list[tuple[int, int]]:
    """Data extents [(start, end)] of a host file, from SEEK_DATA/SEEK_HOLE (whole file if unsupported)."""
    out: list[tuple[int, int]] = []
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
            out.append((d, h))
            pos = h
    except (OSError, AttributeError):
        return [(0, length)]
    return out


def _split_by_holes(r: Runs, extents: list[tuple[int, int]], file_len: int) -> Runs:
    """Set ZERO on the parts of DATA runs with a host offset that lie in holes of the host file."""
    starts = [e[0] for e in extents]
    out_s: list[int] = []
    out_l: list[int] = []
    out_c: list[int] = []
    out_h: list[bool] = []
    out_o: list[int] = []
    zero_data = 3  # DATA|ZERO
    for s, ln, c, h, o in zip(r.start.tolist(), r.length.tolist(), r.code.tolist(), r.has_off.tolist(), r.off.tolist()):
        if c != DATA or not h:
            out_s.append(s), out_l.append(ln), out_c.append(c), out_h.append(h), out_o.append(o)
            continue
        pos = o
        end = o + ln
        while pos < end:
            i = bisect.bisect_right(starts, pos) - 1
            if i >= 0 and extents[i][0] <= pos < extents[i][1]:
                nxt = min(end, extents[i][1])
                code = DATA
            else:
                nxt = min(end, starts[i + 1]) if i + 1 < len(starts) else end
                code = zero_data
            out_s.append(s + pos - o), out_l.append(nxt - pos), out_c.append(code), out_h.append(True), out_o.append(pos)
            pos = nxt
    return Runs(np.array(out_s, dtype=np.int64), np.array(out_l, dtype=np.int64), np.array(out_c, dtype=np.int8),
                np.array(out_h, dtype=bool), np.array(out_o, dtype=np.int64))


def layer_runs(layer: Layer, progress_bar: Any = None) -> Runs:
    """The block status of one layer over [0, size) as merged runs."""
    size = layer.size
    if layer.img is None:  # raw: data and holes of the file, all allocated, offset = guest offset
        ext = file_extents(layer.fd, layer.file_size)
        r = Runs(np.array([a for a, _ in ext], dtype=np.int64), np.array([b - a for a, b in ext], dtype=np.int64),
                 np.full(len(ext), DATA, dtype=np.int8), np.ones(len(ext), dtype=bool),
                 np.array([a for a, _ in ext], dtype=np.int64))
        r = _fill_gaps(r, size)
        z = r.code == UNALLOC
        r.code[z] = ZERO
        r.has_off[z] = True
        r.off[z] = r.start[z]
        return merge(r)
    img = layer.img
    img.require_known_features()
    l1 = layer.l1_entries()
    l2_offs = l1 & U(F.L1E_OFFSET_MASK)
    used = np.nonzero(l2_offs)[0]
    bad = used[(l2_offs[used] % U(img.cluster_size)) != 0]
    if len(bad):
        raise BadInputError(f"{img.path}: L1 entry {int(bad[0])} points to an unaligned L2 table "
                            f"(qemu-img map fails with an I/O error here)")
    chunk = max(1, (2 << 20) // img.cluster_size)
    if img.extended_l2:
        chunk = max(1, chunk // 8)
    parts: list[Runs] = []
    for s in range(0, len(used), chunk):
        sel = used[s : s + chunk]
        parts.append(_chunk_runs(img, sel, img.read_l2_tables(l2_offs[sel], reuse=True)))
        if progress_bar is not None:
            progress_bar.update(len(sel))
    r = merge(_fill_gaps(_concat(parts), size))
    if img.header.crypt_method == 0 and (r.code == DATA).any() and metadata_preallocation(img):
        if img.has_data_file:
            from qemu_ext.qcow2.data import data_file_path

            fd = os.open(data_file_path(img), os.O_RDONLY)
            try:
                flen = os.fstat(fd).st_size
                r = merge(_split_by_holes(r, file_extents(fd, flen), flen))
            finally:
                os.close(fd)
        else:
            r = merge(_split_by_holes(r, file_extents(img._fd, img.file_size), img.file_size))
    return r


@dataclass
class MapEntry:
    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: Optional[int]
    filename: Optional[str] = None

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"start": self.start, "length": self.length, "depth": self.depth,
                             "present": self.present, "zero": self.zero, "data": self.data}
        if self.offset is not None:
            d["offset"] = self.offset
        return d


def _descend(runs: list[Runs], layers: list[Layer], depth: int, a: int, b: int, out: list[tuple]) -> None:
    """Status of [a, b) starting at layer `depth` (appends (start, len, depth, present, zero, data, off|None))."""
    r = runs[depth]
    i = int(np.searchsorted(r.start, a, side="right")) - 1
    while a < b:
        s, ln = int(r.start[i]), int(r.length[i])
        e = min(b, s + ln)
        c = int(r.code[i])
        h = bool(r.has_off[i])
        o = int(r.off[i]) + (a - s) if h else None
        if c != UNALLOC:
            out.append((a, e - a, depth, True, bool(c & ZERO), bool(c & DATA), o))
        elif depth + 1 < len(layers):
            bsize = layers[depth + 1].size
            if a < bsize:
                m = min(e, bsize)
                _descend(runs, layers, depth + 1, a, m, out)
                if m < e:
                    out.append((m, e - m, depth, False, True, False, None if o is None else o + (m - a)))
            else:
                out.append((a, e - a, depth, False, True, False, o))
        else:
            out.append((a, e - a, depth, False, True, False, o))
        a = e
        i += 1


def chain_map(chain: Chain, progress: bool = False) -> list[MapEntry]:
    """qemu-img map's entries for a whole chain (top layer first)."""
    from qemu_ext.output import progress as make_bar

    layers = chain.layers
    runs: list[Runs] = []
    total = sum(int(np.count_nonzero(L.l1_entries() & U(F.L1E_OFFSET_MASK))) for L in layers if L.img is not None)
    bar = make_bar(total, "qcow2 map", unit="L2") if progress else None
    try:
        for L in layers:
            runs.append(layer_runs(L, bar))
    finally:
        if bar is not None:
            bar.close()
    top = runs[0]
    if len(layers) == 1:
        # fast path: no backing, unallocated means zero at depth 0
        out = []
        code = top.code
        zero = (code == UNALLOC) | ((code & ZERO) != 0)
        data = (code & DATA) != 0
        present = code != UNALLOC
        st, ln, ho, of = top.start.tolist(), top.length.tolist(), top.has_off.tolist(), top.off.tolist()
        for k, (z, d, p) in enumerate(zip(zero.tolist(), data.tolist(), present.tolist())):
            out.append(MapEntry(st[k], ln[k], 0, p, z, d, of[k] if ho[k] else None))
        return _merge_entries(out)
    rows: list[tuple] = []
    _descend(runs, layers, 0, 0, layers[0].size, rows)
    return _merge_entries([MapEntry(*t) for t in rows])


def _merge_entries(entries: list[MapEntry]) -> list[MapEntry]:
    out: list[MapEntry] = []
    for e in entries:
        if e.length <= 0:
            continue
        if out:
            c = out[-1]
            if (
                c.zero == e.zero and c.data == e.data and c.depth == e.depth and c.present == e.present
                and (c.offset is None) == (e.offset is None)
                and (c.offset is None or c.offset + c.length == e.offset)
            ):
                c.length += e.length
                continue
        out.append(MapEntry(e.start, e.length, e.depth, e.present, e.zero, e.data, e.offset))
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
        out.append(MapEntry(a, b - a, e.depth, e.present, e.zero, e.data, off, e.filename))
    return out


def image_map(path: PathLike, progress: bool = False, start: int = 0,
              max_length: Optional[int] = None) -> list[MapEntry]:
    """The `qemu-img map` entries of an image through its backing chain."""
    with open_chain(path) as chain:
        entries = chain_map(chain, progress)
        names = [L.filename for L in chain.layers]
        for e in entries:
            e.filename = names[e.depth] if e.offset is not None else None
        if start or max_length is not None:
            entries = clip(entries, start, max_length)
        if not entries:  # qemu-img prints its empty initial entry
            entries = [MapEntry(start, 0, 0, False, False, False, None)]
        return entries


def render_json(entries: list[MapEntry]) -> str:
    """Byte for byte what `qemu-img map --output=json` prints."""
    parts = []
    for e in entries:
        s = (f'{{ "start": {e.start}, "length": {e.length}, "depth": {e.depth}, '
             f'"present": {"true" if e.present else "false"}, "zero": {"true" if e.zero else "false"}, '
             f'"data": {"true" if e.data else "false"}')
        if e.offset is not None:
            s += f', "offset": {e.offset}'
        parts.append(s + "}")
    return "[" + ",\n".join(parts) + "]\n"


def _hex(v: int) -> str:
    return f"{v:#x}" if v else "0"


def render_human(entries: list[MapEntry]) -> tuple[str, Optional[str]]:
    """`qemu-img map` human output (data extents only) and the error qemu-img stops with, if any.

    Like qemu-img, the lines before a compressed (or encrypted) extent are printed, then it fails."""
    lines = [f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File"]
    for e in entries:
        if e.data and e.offset is None:
            return "\n".join(lines) + "\n", "File contains external, encrypted or compressed clusters."
        if e.data and not e.zero:
            lines.append(f"{_hex(e.start):<16}{_hex(e.length):<16}{_hex(e.offset or 0):<16}{e.filename or ''}")
    return "\n".join(lines) + "\n", None
