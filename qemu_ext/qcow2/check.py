"""`virtopt qcow2 check`: read-only refcount recomputation with qemu-img check's semantics.

Follows block/qcow2-refcount.c qcow2_check_refcounts() and friends (QEMU 7.2 and 10.0 agree)
without ever writing: every cluster referenced by the header, the active and snapshot L1/L2
tables, the snapshot table, the refcount table and blocks, the encryption header and the bitmaps
is counted in an in-memory refcount array (refcounts.Computed, a byte per cluster of the file),
then compared window by window with the on-disk refcounts (refcounts.OnDisk, decoded block by
block). The counts, JSON fields and exit codes are those of `qemu-img check`; in addition every
problem is listed with the cluster, what is wrong and which table points there.

Work follows the file, not the header: an L2 table that lies past the end of the file reads as
zeros (nothing to count), and an L2 table that many L1 entries point at is decoded once and its
references counted once per L1 entry (QEMU walks it again for each; the counts are the same).
"""

from __future__ import annotations

import errno
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np

from qemu_ext.errors import BadInputError
from qemu_ext.qcow2 import format as F
from qemu_ext.qcow2.chain import open_chain
from qemu_ext.qcow2.entries import ClusterType, cluster_types, compressed_span
from qemu_ext.qcow2.image import (
    BDRV_MAX_LENGTH,
    INT_MAX,
    OpenError,
    OpenMode,
    PathLike,
    ProgressFactory,
    Qcow2Image,
    start_bar,
)
from qemu_ext.qcow2.refcounts import Computed, OnDisk

MAX_PROBLEMS = 10000
CHUNK_BYTES = 512 << 10  # L2 tables decoded per step: temporaries stay small
WINDOW = 1 << 16  # clusters compared per step (temporaries of a few hundred KiB)
U = np.uint64


@dataclass
class Problem:
    """One finding: kind is corruption, leak or check-error."""

    kind: str
    what: str
    offset: Optional[int] = None  # host offset concerned
    cluster: Optional[int] = None  # host cluster index concerned
    table: Optional[str] = None  # which table (and entry) points there
    guest_offset: Optional[int] = None
    referrers: Optional[list[str]] = None  # for refcount mismatches: every reference found to the cluster


class CheckFailed(BadInputError):
    """qemu-img check gave up (qcow2_co_check returned an error): no counts, exit 1. The message is
    what QEMU printed about it, then qemu-img's own "Check failed: STRERROR"."""

    def __init__(self, img: Qcow2Image, detail: str, err: int) -> None:
        super().__init__(f"{img.path}: {detail} (Check failed: {os.strerror(err)})")


@dataclass
class CheckResult:
    filename: str
    format: str = "qcow2"
    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    problems: list[Problem] = field(default_factory=list)
    problems_not_listed: int = 0

    @property
    def exit_code(self) -> int:
        """qemu-img check's: 1 check failed, 2 corruptions, 3 leaks only, 0 clean."""
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def qemu_json(self) -> dict[str, Any]:
        """The fields `qemu-img check --output=json` prints (optional ones only when non-zero)."""
        d: dict[str, Any] = {}
        if self.image_end_offset:
            d["image-end-offset"] = self.image_end_offset
        for key, val in (
            ("total-clusters", self.total_clusters),
            ("compressed-clusters", self.compressed_clusters),
        ):
            if val:
                d[key] = val
        d["check-errors"] = self.check_errors
        for key, val in (
            ("allocated-clusters", self.allocated_clusters),
            ("corruptions", self.corruptions),
            ("leaks", self.leaks),
            ("corruptions-fixed", self.corruptions_fixed),
            ("leaks-fixed", self.leaks_fixed),
        ):
            if val:
                d[key] = val
        d["filename"] = self.filename
        d["format"] = self.format
        if self.fragmented_clusters:
            d["fragmented-clusters"] = self.fragmented_clusters
        return d

    def as_dict(self) -> dict[str, Any]:
        d = self.qemu_json()
        d["problems"] = [{k.replace("_", "-"): v for k, v in asdict(p).items() if v is not None}
                         for p in self.problems]
        if self.problems_not_listed:
            d["problems-not-listed"] = self.problems_not_listed
        return d


@dataclass
class L2Chunk:
    """A chunk of L2 tables being checked: which L1 entries point at them, their entries."""

    sel: np.ndarray  # L1 indexes
    offs: np.ndarray  # L2 table offsets
    ent: np.ndarray  # (tables, entries) standard descriptors
    bmp: Optional[np.ndarray]  # the subcluster bitmaps of extended L2 entries
    label: str  # "active" or the snapshot
    active: bool
    n_entries: int  # entries per L2 table
    cluster_size: int
    weight: np.ndarray  # how many L1 entries point at each table (1 but for corrupt images)

    def where(self, r: int, j: int) -> dict[str, Any]:
        more = int(self.weight[r]) - 1
        return {
            "table": f"{self.label} L2 table at {int(self.offs[r]):#x} (L1 entry {int(self.sel[r])}"
                     + (f" and {more} more" if more else "") + f") entry {j}",
            "guest_offset": (int(self.sel[r]) * self.n_entries + j) * self.cluster_size,
        }


class _Checker:
    def __init__(self, img: Qcow2Image, filename: str, progress: Optional[ProgressFactory],
                 watch: Optional[np.ndarray] = None) -> None:
        self.img = img
        # watch mode: only record which tables reference the clusters in `watch` (sorted)
        self.watch = watch
        self.referrers: dict[int, list[str]] = {}
        self.res = CheckResult(filename=filename)
        self.cs = img.cluster_size
        self.cb = img.cluster_bits
        self.file_len = img.file_size
        self.file_clusters = (self.file_len + self.cs - 1) >> self.cb
        self.progress = progress
        self.bar: Any = None
        # s->refcount_max: the largest refcount an entry holds
        self.refmax = min((1 << img.refcount_bits) - 1, 1 << 62)

    # -------------------------------------------------------------- findings
    def problem(self, kind: str, what: str, n: int = 1, **kw: Any) -> None:
        """A finding counted n times (the same entry of an L2 table n L1 entries point at), listed once."""
        if self.watch is not None:
            return
        if kind == "corruption":
            self.res.corruptions += n
        elif kind == "leak":
            self.res.leaks += n
        else:
            self.res.check_errors += n
        self.note(kind, what, **kw)

    def note(self, kind: str, what: str, **kw: Any) -> None:
        if self.watch is not None:
            return
        if len(self.res.problems) < MAX_PROBLEMS:
            if kw.get("offset") is not None and kw.get("cluster") is None:
                kw["cluster"] = int(kw["offset"]) >> self.cb
            self.res.problems.append(Problem(kind, what, **kw))
        else:
            self.res.problems_not_listed += 1

    # -------------------------------------------------------------- refcount increments
    def inc(self, offs: np.ndarray, sizes: Any, tables: Any, weights: Optional[np.ndarray] = None) -> None:
        """qcow2_inc_refcounts_imrt() for many regions at once (region i counted weights[i] times);
        tables(i) names region i's referrer."""
        offs = offs.astype(np.int64, copy=False)
        if isinstance(sizes, int) and sizes == self.cs and len(offs) and self.watch is None and weights is None:
            # fast path: cluster-sized, aligned regions inside the file (L2 tables, data clusters)
            if not (offs >= self.file_len).any() and not (offs & (self.cs - 1)).any():
                self.imrt.add(offs >> self.cb)
                return
        sizes = np.broadcast_to(np.asarray(sizes, dtype=np.int64), offs.shape)
        w = np.ones(len(offs), dtype=np.int64) if weights is None else weights.astype(np.int64, copy=False)
        keep = sizes > 0
        bad = keep & (offs + sizes - self.file_len >= self.cs)
        for i in np.nonzero(bad)[0][:MAX_PROBLEMS].tolist():
            self.problem("corruption", f"reference to a region exceeding the end of the file by one cluster or more "
                         f"(offset {int(offs[i]):#x} size {int(sizes[i]):#x})", n=int(w[i]), offset=int(offs[i]),
                         table=tables(i))
        extra = np.nonzero(bad)[0][MAX_PROBLEMS:]
        if len(extra):
            self.res.corruptions += int(w[extra].sum())
            self.res.problems_not_listed += len(extra)
        good = keep & ~bad
        if not good.any():
            return
        o, sz, wg = offs[good], sizes[good], w[good]
        start = o >> self.cb
        last = (o + sz - 1) >> self.cb
        spans = last - start + 1
        if self.watch is not None:
            self._record(start, last, np.flatnonzero(good), tables)
        if not (spans - 1).any():
            idx, wi = start, wg
        else:
            idx = np.repeat(start, spans)
            first = np.repeat(np.cumsum(spans) - spans, spans)
            idx = idx + (np.arange(len(idx), dtype=np.int64) - first)
            wi = np.repeat(wg, spans)
        self.imrt.add(idx, None if (wi == 1).all() else wi)

    def _record(self, start: np.ndarray, last: np.ndarray, region: np.ndarray, tables: Any) -> None:
        """Watch mode: note the referrer of every watched cluster inside [start, last] of each region."""
        w = self.watch
        assert w is not None
        lo = np.searchsorted(w, start, side="left")
        hi = np.searchsorted(w, last, side="right")
        for k in np.flatnonzero(hi > lo).tolist():
            name = tables(int(region[k]))
            for c in w[lo[k] : hi[k]].tolist():
                lst = self.referrers.setdefault(int(c), [])
                if len(lst) < 64:
                    lst.append(name)

    def inc1(self, offset: int, size: int, table: str) -> None:
        if size > 0 and offset >= 1 << 63:  # negative as QEMU's int64: the in-memory table cannot grow there
            raise CheckFailed(self.img, f"{table}: reference to offset {offset:#x}", errno.ENOMEM)
        if size > 0 and (offset >= 1 << 62 or size >= 1 << 62):
            self.problem("corruption", f"reference to a region exceeding the end of the file by one cluster or more "
                         f"(offset {offset:#x} size {size:#x})", table=table)
            return
        self.inc(np.array([offset], dtype=np.int64), np.array([size], dtype=np.int64), lambda i: table)

    # -------------------------------------------------------------- L1 / L2
    def check_l1(self, l1_offset: int, l1_size: int, label: str, active: bool) -> None:
        """check_refcounts_l1(): the table, each L2 table once per L1 entry pointing at it."""
        img = self.img
        cs = self.cs
        if not l1_size:
            return
        self.inc1(l1_offset, l1_size * 8, f"header ({label} L1 table)")
        if l1_offset > BDRV_MAX_LENGTH or l1_size * 8 > BDRV_MAX_LENGTH - l1_offset:  # bdrv_pread() fails
            raise CheckFailed(img, "ERROR: I/O error in check_refcounts_l1", errno.EIO)
        l1 = img.read_be64_prefix(l1_offset, l1_size)  # past the end of the file: zeros, nothing to check
        used = np.nonzero(l1)[0]
        if not len(used):
            return
        resv = used[(l1[used] & U(F.L1E_RESERVED_MASK)) != 0]
        for i in resv[:MAX_PROBLEMS].tolist():
            self.problem("corruption", f"L1 entry with reserved bits set: {int(l1[i]):#x}", table=f"{label} L1 entry {i}")
        self.bulk("corruption", len(resv) - MAX_PROBLEMS)
        l2_offs = (l1[used] & U(F.L1E_OFFSET_MASK)).astype(np.int64)
        self.inc(l2_offs, cs, lambda i: f"{label} L1 entry {int(used[i])}")
        for i in np.nonzero(l2_offs % cs)[0][:MAX_PROBLEMS].tolist():
            self.problem("corruption", f"L2 table at {int(l2_offs[i]):#x} is not cluster aligned; L1 entry corrupted",
                         offset=int(l2_offs[i]), table=f"{label} L1 entry {int(used[i])}")
        if active:
            self.check_l1_copied(used, l2_offs, (l1[used] & U(F.L1E_COPIED)) != 0, l1[used])
        # each distinct table inside the file once, with the number of L1 entries pointing at it
        uniq, first, weight = np.unique(l2_offs, return_index=True, return_counts=True)
        inside = uniq < self.file_len  # a table past the end of the file reads as zeros: nothing in it
        order = np.argsort(first[inside], kind="stable")  # in L1 order
        uniq, sel, weight = uniq[inside][order], used[first[inside][order]], weight[inside][order]
        chunk = max(1, CHUNK_BYTES // cs)
        ext = img.extended_l2
        for s in range(0, len(uniq), chunk):
            offs = uniq[s : s + chunk]
            tabs = img.read_l2_tables(offs.astype(np.uint64), reuse=True)
            self.check_l2_chunk(L2Chunk(sel[s : s + chunk], offs, tabs[:, :, 0] if ext else tabs,
                                        tabs[:, :, 1] if ext else None, label, active, img.l2_entries_per_table,
                                        cs, weight[s : s + chunk]))
            self.bar.update(int(weight[s : s + chunk].sum()))

    def check_l2_chunk(self, ch: L2Chunk) -> None:
        """check_refcounts_l2() for a chunk of L2 tables (and check_oflag_copied() for active ones)."""
        if ch.bmp is None and not self.img.has_data_file and self.watch is None and self._fast_chunk(ch):
            return
        ct = cluster_types(ch.ent, self.img.extended_l2, self.img.has_data_file)
        comp = ct == ClusterType.COMPRESSED
        resv = ~comp & ((ch.ent & U(F.L2E_STD_RESERVED_MASK)) != 0)
        if resv.any():
            self.report(ch, resv, lambda r, j: f"L2 entry with reserved bits set: {int(ch.ent[r, j]):#x}")
        if comp.any():
            self._compressed_clusters(ch, comp)
        alloc = (ct == ClusterType.NORMAL) | (ct == ClusterType.ZERO_ALLOC)
        if alloc.any():
            self._allocated_clusters(ch, alloc)
        if ch.bmp is not None:
            ua = (ct == ClusterType.UNALLOCATED) & ((ch.bmp & U(F.L2_BITMAP_ALLOC_MASK)) != 0)
            if ua.any():
                self.report(ch, ua, "unallocated cluster has a non-zero subcluster allocation bitmap")

    def report(self, ch: L2Chunk, mask: np.ndarray, what: Any) -> None:
        """One corruption per entry of mask (times its table's weight); what is a text or a function of
        (row, entry). Past MAX_PROBLEMS listed, the rest is counted without building each line."""
        rr, jj = np.nonzero(mask)
        room = max(0, MAX_PROBLEMS - len(self.res.problems))
        for r, j in zip(rr[:room].tolist(), jj[:room].tolist()):
            self.problem("corruption", what(r, j) if callable(what) else what, n=int(ch.weight[r]), offset=None,
                         **ch.where(r, j))
        if len(rr) > room:
            self.bulk("corruption", len(rr) - room, int(ch.weight[rr[room:]].sum()))

    def bulk(self, kind: str, listed: int, n: Optional[int] = None) -> None:
        """Findings not listed one by one: `listed` of them, counted n times (default: once each)."""
        if listed <= 0 or self.watch is not None:
            return
        n = listed if n is None else n
        if kind == "corruption":
            self.res.corruptions += n
        else:
            self.res.check_errors += n
        self.res.problems_not_listed += listed

    def _compressed_clusters(self, ch: L2Chunk, comp: np.ndarray) -> None:
        """QCOW2_CLUSTER_COMPRESSED in check_refcounts_l2(): flags, then the compressed bytes are counted."""
        cc = comp & ((ch.ent & U(F.L2E_COPIED)) != 0)
        if cc.any():
            self.report(ch, cc, "copied flag set on a compressed cluster")
        usable = comp.copy()
        if self.img.has_data_file:
            self.report(ch, comp, "compressed cluster in an image with an external data file")
            return
        if ch.bmp is not None:
            bad_bmp = usable & (ch.bmp != 0)
            if bad_bmp.any():
                self.report(ch, bad_bmp, "compressed cluster with a non-zero subcluster allocation bitmap")
                usable &= ~bad_bmp
        rr, jj = np.nonzero(usable)
        coff, csize = compressed_span(ch.ent[rr, jj], self.cb)
        w = ch.weight[rr]
        self.inc(coff, csize, lambda i: ch.where(int(rr[i]), int(jj[i]))["table"], None if (w == 1).all() else w)
        if ch.active:
            k = int(w.sum())
            self.res.allocated_clusters += k
            self.res.compressed_clusters += k
            self.res.fragmented_clusters += k

    def _allocated_clusters(self, ch: L2Chunk, alloc: np.ndarray) -> None:
        """QCOW2_CLUSTER_NORMAL and ZERO_ALLOC in check_refcounts_l2(): bitmap, alignment, fragmentation,
        the reference; then OFLAG_COPIED against the on-disk refcount (check_oflag_copied)."""
        cs = self.cs
        ent = ch.ent
        off = ent & U(F.L2E_OFFSET_MASK)
        if ch.bmp is not None:
            badbm = alloc & (((ch.bmp >> U(32)) & ch.bmp) != 0)
            if badbm.any():
                self.report(ch, badbm, "allocated cluster has a corrupted subcluster allocation bitmap")
        unal = alloc & ((off & U(cs - 1)) != 0)
        if unal.any():
            self.report(ch, unal, lambda r, j: f"data cluster offset {int(off[r, j]):#x} is not cluster aligned; "
                        "L2 entry corrupted")
        if alloc.all():
            fi = None
            o = off.ravel().astype(np.int64)
            rr = np.repeat(np.arange(alloc.shape[0]), alloc.shape[1])
            jj = np.tile(np.arange(alloc.shape[1]), alloc.shape[0])
        else:
            fi = np.flatnonzero(alloc)
            rr, jj = np.divmod(fi, alloc.shape[1])
            o = off.ravel()[fi].astype(np.int64)
        w = ch.weight[rr]
        weighted = not (w == 1).all()
        if ch.active:
            self.res.allocated_clusters += int(w.sum())
            # fragmentation: per L2 table, an allocated cluster not following the previous one
            same_row = np.zeros(len(rr), dtype=bool)
            same_row[1:] = rr[1:] == rr[:-1]
            contiguous = np.zeros(len(rr), dtype=bool)
            contiguous[1:] = o[1:] == o[:-1] + cs
            self.res.fragmented_clusters += int(w[same_row & ~contiguous].sum())
        if not self.img.has_data_file:
            self.inc(o, cs, lambda i: ch.where(int(rr[i]), int(jj[i]))["table"], w if weighted else None)
        if not ch.active:
            return
        if self.img.has_data_file:  # every cluster of an external data file has refcount 1
            rc = np.ones(len(o), dtype=np.int64)
            err = np.zeros(len(o), dtype=bool)
        else:
            rc, err = self.disk.get(o >> self.cb)
        copied = (ent & U(F.L2E_COPIED)) != 0
        cp = copied.ravel() if fi is None else copied.ravel()[fi]
        mism = np.nonzero(~err & ((rc == 1) != cp))[0]
        room = max(0, MAX_PROBLEMS - len(self.res.problems))
        for i in mism[:room].tolist():
            r, j = int(rr[i]), int(jj[i])
            self.problem("corruption", f"OFLAG_COPIED data cluster: l2_entry={int(ent[r, j]):x} refcount={int(rc[i])}",
                         n=int(w[i]), offset=int(o[i]), **ch.where(r, j))
        self.bulk("corruption", len(mism) - room, int(w[mism[room:]].sum()))

    def _fast_chunk(self, ch: L2Chunk) -> bool:
        """The common case in one tight pass: every entry a normal, aligned cluster inside the file.

        Returns False (nothing counted) when the chunk needs the general path."""
        cs = self.cs
        ent = ch.ent
        special = U(F.L2E_COMPRESSED | F.L2E_ZERO | F.L2E_STD_RESERVED_MASK | ((cs - 1) & ~0x1FF))
        if (ch.weight != 1).any() or (ent & special).any():
            return False
        off = ent & U(F.L2E_OFFSET_MASK)
        o = off.ravel().view(np.int64)
        if not o.all() or int(o.max()) >= self.file_len:
            return False
        idx = o >> self.cb
        self.imrt.add(idx)
        if not ch.active:
            return True
        per = ent.shape[1]
        self.res.allocated_clusters += o.size
        brk = np.diff(o) != cs
        brk[per - 1 :: per] = False  # a new L2 table starts: not counted as fragmentation
        self.res.fragmented_clusters += int(np.count_nonzero(brk))
        rc, err = self.disk.get(idx)
        mism = np.flatnonzero(~err & ((rc == 1) ^ (ent.ravel() >= U(F.L2E_COPIED))))
        room = max(0, MAX_PROBLEMS - len(self.res.problems))
        for k in mism[:room].tolist():
            r, j = divmod(k, per)
            self.problem("corruption", f"OFLAG_COPIED data cluster: l2_entry={int(ent[r, j]):x} "
                         f"refcount={int(rc[k])}", offset=int(o[k]), **ch.where(r, j))
        self.bulk("corruption", len(mism) - room)
        return True

    def check_l1_copied(self, sel: np.ndarray, offs: np.ndarray, copied: np.ndarray, raw: np.ndarray) -> None:
        """check_oflag_copied() for the L1 entries: OFLAG_COPIED of each L2 table against its refcount."""
        nz = offs != 0
        if not nz.any():
            return
        rc, err = self.disk.get(offs >> self.cb)
        mism = nz & ~err & ((rc == 1) != copied)
        for i in np.nonzero(mism)[0][:MAX_PROBLEMS].tolist():
            self.problem(
                "corruption",
                f"OFLAG_COPIED L2 cluster: l1_index={int(sel[i])} l1_entry={int(raw[i]):x} refcount={int(rc[i])}",
                offset=int(offs[i]),
                table=f"active L1 entry {int(sel[i])}",
            )
        self.bulk("corruption", int(mism.sum()) - MAX_PROBLEMS)

    def read_snapshot_table(self) -> list[Any]:
        """qcow2_check_read_snapshot_table(): the table is validated and read by the check; what
        fails there ends the check (qemu-img: "Check failed: ...")."""
        img = self.img
        h = img.header
        try:
            img.validate_table(h.snapshots_offset, h.nb_snapshots, F.SNAPSHOT_HEADER_SIZE,
                               F.SNAPSHOT_HEADER_SIZE * F.QCOW_MAX_SNAPSHOTS, "snapshot table")
        except OpenError as exc:
            raise CheckFailed(img, f"ERROR {exc.reason}",
                              errno.EFBIG if exc.reason.endswith("too large") else errno.EINVAL) from None
        try:
            return img.snapshots()
        except OpenError as exc:
            raise CheckFailed(img, f"ERROR failed to read the snapshot table: {exc.reason}", errno.EFBIG) from None

    # -------------------------------------------------------------- the rest of the metadata
    def check_bitmaps(self) -> None:
        """qcow2_check_bitmaps_refcounts(): the directory, each table and the clusters it points at."""
        img = self.img
        bx = img.bitmaps_extension()
        if bx is None or bx.nb_bitmaps == 0:
            return
        self.inc1(bx.bitmap_directory_offset, bx.bitmap_directory_size, "bitmaps extension (bitmap directory)")
        for bm in img.bitmaps():
            self.inc1(bm.bitmap_table_offset, bm.bitmap_table_size * 8, f"bitmap {bm.name!r} directory entry")
            tab = img.bitmap_table(bm)  # up to the end of the file; zeros past it are valid, empty entries
            off = tab & U(F.BME_TABLE_ENTRY_OFFSET_MASK)
            bad = ((tab & U(F.BME_TABLE_ENTRY_RESERVED_MASK)) != 0) | (
                (off != 0) & (((tab & U(1)) != 0) | ((off % U(self.cs)) != 0))
            )
            for i in np.nonzero(bad)[0][:MAX_PROBLEMS].tolist():
                self.problem("corruption", f"invalid bitmap table entry {int(tab[i]):#x}",
                             table=f"bitmap {bm.name!r} table entry {i}")
            self.bulk("corruption", int(bad.sum()) - MAX_PROBLEMS)
            ok = ~bad & (off != 0)
            idx = np.nonzero(ok)[0]
            self.inc(off[ok].astype(np.int64), np.full(len(idx), self.cs, dtype=np.int64),
                     lambda i, idx=idx, bm=bm: f"bitmap {bm.name!r} table entry {int(idx[i])}")

    def check_refblocks(self) -> None:
        """check_refblocks(): each refcount block is counted and must have refcount 1."""
        cs = self.cs
        rt = self.disk.rt
        nb = max(len(self.imrt), self.file_clusters)
        resv = (rt & U(F.RT_RESERVED_MASK)) != 0
        offs_u = rt & U(F.RT_OFFSET_MASK)
        unal = ~resv & ((offs_u % U(cs)) != 0)
        for i in np.nonzero(resv)[0][:MAX_PROBLEMS].tolist():
            self.problem("corruption", f"refcount table entry {i} has reserved bits set", table=f"refcount table entry {i}")
        self.bulk("corruption", int(resv.sum()) - MAX_PROBLEMS)
        for i in np.nonzero(unal)[0][:MAX_PROBLEMS].tolist():
            self.problem("corruption", f"refcount block {i} is not cluster aligned; refcount table entry corrupted",
                         offset=int(offs_u[i]), table=f"refcount table entry {i}")
        self.bulk("corruption", int(unal.sum()) - MAX_PROBLEMS)
        rest = ~resv & ~unal
        outside = rest & ((offs_u >> U(self.cb)) >= U(nb))
        offs = np.where(outside, U(0), offs_u).astype(np.int64)
        for i in np.nonzero(outside)[0][:MAX_PROBLEMS].tolist():
            self.problem("corruption", f"refcount block {i} is outside the image", offset=int(offs_u[i]),
                         table=f"refcount table entry {i}")
        self.bulk("corruption", int(outside.sum()) - MAX_PROBLEMS)
        use = np.nonzero(rest & ~outside & (offs != 0))[0]
        if not len(use):
            return
        o = offs[use]
        c = o >> self.cb
        before = self.imrt.get(c)
        self.inc(o, np.full(len(o), cs, dtype=np.int64), lambda i: f"refcount table entry {int(use[i])}")
        # blocks are processed in table order: each sees the count right after its own increment
        order = np.argsort(c, kind="stable")
        c_sorted = c[order]
        group_start = np.ones(len(c), dtype=bool)
        group_start[1:] = c_sorted[1:] != c_sorted[:-1]
        first = np.maximum.accumulate(np.where(group_start, np.arange(len(c)), 0))
        rank = np.empty(len(c), dtype=np.int64)
        rank[order] = np.arange(len(c)) - first
        seen = np.minimum(before + rank + 1, self.refmax)
        for i in np.nonzero(seen != 1)[0][:MAX_PROBLEMS].tolist():
            self.problem("corruption", f"refcount block {int(use[i])} refcount={int(seen[i])}", offset=int(o[i]),
                         table=f"refcount table entry {int(use[i])}")
        self.bulk("corruption", int((seen != 1).sum()) - MAX_PROBLEMS)

    def compare(self) -> None:
        """compare_refcounts(): on-disk against computed refcount, cluster by cluster (in windows)."""
        nb = max(len(self.imrt), self.file_clusters)
        highest = -1
        listed = 0
        per = self.disk.per
        win = max(per, WINDOW // per * per)
        for w in range(0, nb, win):
            e = min(nb, w + win)
            ref = self.imrt.window(w, e)
            if int(ref.max(initial=0)) > self.refmax:  # qcow2_inc_refcounts_imrt() stops at refcount_max
                over = ref > self.refmax
                for i in np.flatnonzero(over)[:MAX_PROBLEMS].tolist():
                    self.note("corruption", f"refcount overflow: {int(ref[i])} references, at most {self.refmax} fit",
                              cluster=w + i, offset=(w + i) * self.cs)
                self.res.corruptions += int((ref[over] - self.refmax).sum())
                ref = np.minimum(ref, self.refmax)
            disk, err = self.disk.window(w, e)
            mism = disk != ref
            used = (disk != 0) | (ref != 0)
            if err.any():
                self.res.check_errors += int(err.sum())
                for i in np.flatnonzero(err)[:MAX_PROBLEMS].tolist():
                    self.note("check-error", f"cannot get the refcount of cluster {w + i} (refcount block unaligned)",
                              cluster=w + i)
                mism &= ~err
                used &= ~err
            if used.any():
                highest = w + len(used) - 1 - int(np.argmax(used[::-1]))
            if mism.any():
                mi = np.flatnonzero(mism)
                low = disk[mi] < ref[mi]
                self.res.corruptions += int(low.sum())
                self.res.leaks += int((~low).sum())
                for i, lw in zip(mi.tolist(), low.tolist()):
                    if listed >= MAX_PROBLEMS:
                        self.res.problems_not_listed += 1
                        continue
                    listed += 1
                    kind = "corruption" if lw else "leak"
                    what = (f"cluster {w + i} refcount={int(disk[i])} reference={int(ref[i])}"
                            + (" (refcount too low)" if lw else " (leaked)"))
                    self.note(kind, what, cluster=w + i, offset=(w + i) * self.cs)
        self.res.image_end_offset = (max(highest, 0) + 1) * self.cs

    def run(self) -> CheckResult:
        img = self.img
        h = img.header
        # bfi.total_clusters: clusters of the virtual disk (bs->total_sectors, whole sectors)
        self.res.total_clusters = (img.virtual_size + self.cs - 1) >> self.cb
        snaps = self.read_snapshot_table()
        if self.file_clusters > INT_MAX:  # qcow2_check_refcounts()
            raise CheckFailed(img, f"{self.file_clusters} clusters in the file, more than QEMU checks", errno.EFBIG)
        if h.version >= 3:
            for sn in snaps:
                if sn.extra_data_size < 16:
                    self.problem("corruption", f"snapshot table entry {sn.index} is incomplete",
                                 offset=sn.entry_offset, table="snapshot table")
        self.imrt = Computed(self.file_clusters)
        self.disk = OnDisk(img)
        l1n = int(np.count_nonzero(img.l1_entries())) if h.l1_size else 0
        self.bar = start_bar(self.progress, l1n, "qcow2 check", unit="L2")
        try:
            self.inc1(0, self.cs, "header")
            self.check_l1(h.l1_table_offset, h.l1_size, "active", True)
            if img.has_data_file and h.nb_snapshots:
                self.problem("corruption", f"{h.nb_snapshots} snapshots in an image with a data file")
            for sn in snaps:
                label = f"snapshot {sn.id} ({sn.name})"
                if sn.l1_table_offset % self.cs:
                    self.problem("corruption", f"{label}: L1 table is not cluster aligned; snapshot table entry corrupted",
                                 offset=sn.l1_table_offset, table="snapshot table")
                    continue
                if sn.l1_size > F.QCOW_MAX_L1_SIZE // 8:
                    self.problem("corruption", f"{label}: L1 table is too large", table="snapshot table")
                    continue
                self.check_l1(sn.l1_table_offset, sn.l1_size, label, False)
        finally:
            self.bar.close()
        if h.nb_snapshots:
            self.inc1(h.snapshots_offset, img.snapshot_table_size(), "header (snapshot table)")
        self.inc1(h.refcount_table_offset, h.refcount_table_clusters * self.cs, "header (refcount table)")
        for e in img.extensions:
            if e.type == F.EXT_CRYPTO_HEADER and len(e.data) >= 16:
                cx = F.CryptoHeaderExtension.parse(e.data[:16])
                if cx.length:
                    self.inc1(cx.offset, cx.length, "full disk encryption header extension")
        self.check_bitmaps()
        self.check_refblocks()
        if self.watch is not None:
            return self.res
        self.compare()
        return self.res


def check_image(path: PathLike, progress: Optional[ProgressFactory] = None) -> CheckResult:
    """Check a qcow2 image read-only, like `qemu-img check` (no repair): opened as qemu-img check
    opens it (BDRV_O_CHECK, with its backing chain), then qcow2_co_check_locked()."""
    with open_chain(path, mode=OpenMode.CHECK) as chain:
        img = chain.layers[0].img
        assert img is not None
        res = _Checker(img, os.fspath(path), progress).run()
        # which tables point at the clusters whose refcount is wrong: a second, targeted pass
        clusters = sorted({p.cluster for p in res.problems
                           if p.kind in ("corruption", "leak") and p.cluster is not None and p.what.startswith("cluster ")})
        if clusters:
            w = _Checker(img, os.fspath(path), None, watch=np.array(clusters, dtype=np.int64))
            w.run()
            for p in res.problems:
                if p.what.startswith("cluster ") and p.cluster is not None:
                    p.referrers = w.referrers.get(p.cluster, [])
        return res
