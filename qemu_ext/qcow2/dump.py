"""`virtopt qcow2 dump`: the decoded on-disk structures, table by table, as plain data (kebab-case keys).

``header`` and ``extensions`` read the header as QEMU's tests/qemu-iotests/qcow2.py does (the fields
as they are on disk, extensions up to the first end marker or the first one that does not fit), so
an image QEMU refuses to open can still be looked at; the other structures need an image QEMU opens.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

from qemu_ext.errors import BadInputError, UsageError, empty_file
from qemu_ext.qcow2 import DUMP_STRUCTURES
from qemu_ext.qcow2 import format as F
from qemu_ext.qcow2.entries import ClusterType, cluster_type, compressed_span
from qemu_ext.qcow2.image import OpenMode, PathLike, Qcow2Image, open_file, open_image
from qemu_ext.qcow2.snapshots import Snapshot

U = np.uint64
WHAT = DUMP_STRUCTURES
MAX_ROWS = 1 << 20

# the header fields in the order and with the names of qcow2.py (QcowHeader.fields)
HEADER_FIELDS = (
    "magic", "version", "backing_file_offset", "backing_file_size", "cluster_bits", "size", "crypt_method",
    "l1_size", "l1_table_offset", "refcount_table_offset", "refcount_table_clusters", "nb_snapshots",
    "snapshot_offset", "incompatible_features", "compatible_features", "autoclear_features", "refcount_order",
    "header_length",
)
_HEADER_FMT = ">IIQIIQIIQQIIQQQQII"


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def raw_header(path: PathLike) -> dict[str, Any]:
    """The header and its extensions as qcow2.py dump-header reads them (v2 fields defaulted, as it does)."""
    import struct

    fd, length = open_file(path)
    try:
        if length == 0:
            raise empty_file(path)  # the same words as every other open of an image
        head = os.pread(fd, struct.calcsize(_HEADER_FMT), 0)
        if len(head) < 4 or head[:4] != F.QCOW_MAGIC:
            raise BadInputError(f"{path}: Image is not in qcow2 format")
        head = head.ljust(struct.calcsize(_HEADER_FMT), b"\0")
        h = dict(zip(HEADER_FIELDS, struct.unpack(_HEADER_FMT, head)))
        if h["version"] == 2:
            h.update(incompatible_features=0, compatible_features=0, autoclear_features=0, refcount_order=4,
                     header_length=72)
        cs = 1 << min(h["cluster_bits"], 63)
        end = min(cs, h["backing_file_offset"]) if h["backing_file_offset"] else cs
        exts = []
        pos = h["header_length"]
        while pos + 8 <= min(end, length):
            magic, n = struct.unpack(">II", os.pread(fd, 8, pos))
            if magic == 0 or pos + 8 + n > min(end, length):
                break
            data = os.pread(fd, n, pos + 8)
            ext: dict[str, Any] = {"magic": magic, "name": _EXT_NAMES.get(magic, "<unknown>"), "offset": pos,
                                   "length": n, "data": data.hex()}
            if magic == F.EXT_BITMAPS and n >= F.BITMAPS_EXTENSION_SIZE:
                ext["bitmap-directory"] = _raw_bitmap_directory(fd, length, cs, data)
            exts.append(ext)
            pos += 8 + (n + 7) // 8 * 8
        backing = None
        if h["backing_file_offset"] and h["backing_file_size"] <= 4096 and h["backing_file_offset"] < length:
            backing = os.pread(fd, h["backing_file_size"], h["backing_file_offset"]).decode("utf-8", "replace")
    finally:
        os.close(fd)
    return {"header": {_kebab(k): v for k, v in h.items()}, "extensions": exts, "backing-file": backing,
            "cluster-size": cs, "file-size": length}


def _raw_bitmap_directory(fd: int, length: int, cs: int, ext: bytes) -> list[dict[str, Any]]:
    """The bitmap directory as qcow2.py reads it (Qcow2BitmapExt), bounded by the file."""
    import struct

    nb, _res, _size, off = struct.unpack(">IIQQ", ext[:24])
    out = []
    pos = off
    for _ in range(min(nb, F.QCOW2_MAX_BITMAPS)):
        if pos + 24 > length:
            break
        toff, tsize, flags, typ, gbits, nsize, esize = struct.unpack(">QIIBBHI", os.pread(fd, 24, pos))
        name = os.pread(fd, nsize, pos + 24 + esize).decode("utf-8", "replace")
        n = max(0, min(tsize, MAX_ROWS, (length - toff) // 8)) if toff < length else 0
        tab = np.frombuffer(os.pread(fd, n * 8, toff)[: n * 8 // 8 * 8], dtype=">u8").astype(U) if n else []
        table = []
        for i, v in enumerate(int(x) for x in tab):
            o = v & F.BME_TABLE_ENTRY_OFFSET_MASK
            kind = ("invalid" if v & 1 else "serialized") if o else ("all-ones" if v & 1 else "all-zeroes")
            table.append({"index": i, "type": kind, "offset": o, "reserved": v & F.BME_TABLE_ENTRY_RESERVED_MASK})
        out.append({"name": name, "bitmap-table-offset": toff, "bitmap-table-size": tsize, "flags": flags,
                    "type": typ, "granularity-bits": gbits, "name-size": nsize, "extra-data-size": esize,
                    "table": table})
        pos += (24 + nsize + esize + 7) // 8 * 8
    return out


# qcow2.py's names of the extension magics (QcowHeaderExtension.Magic)
_EXT_NAMES = {
    F.EXT_BACKING_FORMAT: "Backing format",
    F.EXT_FEATURE_TABLE: "Feature table",
    F.EXT_CRYPTO_HEADER: "Crypto header",
    F.EXT_BITMAPS: "Bitmaps",
    F.EXT_DATA_FILE: "Data file",
}

_TYPE_NAMES = {
    ClusterType.COMPRESSED: "compressed",
    ClusterType.ZERO_ALLOC: "zero-alloc",
    ClusterType.ZERO_PLAIN: "zero",
    ClusterType.NORMAL: "normal",
    ClusterType.UNALLOCATED: "unallocated",
}


def _l2_type(img: Qcow2Image, e: int, bmp: int) -> str:
    """The entry's QCow2ClusterType by name; an unallocated extended entry whose subclusters all
    read as zeros is shown as "zero"."""
    t = cluster_type(e, img.extended_l2, img.has_data_file)
    if img.extended_l2 and t == ClusterType.UNALLOCATED and bmp >> 32 == 0xFFFFFFFF:
        return "zero"
    return _TYPE_NAMES[t]


def dump(path: PathLike, what: str, l1_index: Optional[int] = None, snapshot: Optional[str] = None) -> dict[str, Any]:
    """Decoded structure `what` (one of WHAT) of an image, as plain data with kebab-case keys."""
    if what not in WHAT:
        raise BadInputError(f"unknown structure {what!r}; choose from {', '.join(WHAT)}")
    if what in ("header", "extensions"):
        d = raw_header(path)
        d["what"] = what
        return d
    with open_image(path, OpenMode.INFO) as img:
        if what == "snapshots":
            return {"what": what, "snapshots": [s.as_dict() for s in img.snapshots()],
                    "table-size": img.snapshot_table_size()}
        if what == "bitmaps":
            return {"what": what, "cluster-size": img.cluster_size, "bitmaps": [_bitmap(img, bm) for bm in img.bitmaps()]}
        if what == "l1":
            return _l1(img, snapshot)
        if what == "l2":
            return _l2(img, l1_index, snapshot)
        return _refcounts(img)


def _bitmap(img: Qcow2Image, bm: Any) -> dict[str, Any]:
    d = bm.as_dict()
    tab = img.bitmap_table(bm)
    rows = []
    for i in range(min(bm.bitmap_table_size, MAX_ROWS)):
        v = int(tab[i]) if i < len(tab) else 0
        off = v & F.BME_TABLE_ENTRY_OFFSET_MASK
        kind = ("invalid" if v & 1 else "serialized") if off else ("all-ones" if v & 1 else "all-zeroes")
        rows.append({"index": i, "type": kind, "offset": off, "reserved": v & F.BME_TABLE_ENTRY_RESERVED_MASK})
    d["table"] = rows
    return d


def _l1_of(img: Qcow2Image, snapshot: Optional[str]) -> tuple[np.ndarray, int, str]:
    if snapshot is None:
        return img.l1_entries(), img.header.l1_size, "active"
    sn = _find_snapshot(img, snapshot)
    return img.snapshot_l1_entries(sn), sn.l1_size, f"snapshot {sn.id}"


def _l1(img: Qcow2Image, snapshot: Optional[str]) -> dict[str, Any]:
    l1, size, label = _l1_of(img, snapshot)
    rows = []
    for i in np.nonzero(l1)[0][:MAX_ROWS].tolist():
        v = int(l1[i])
        rows.append({"index": i, "raw": v, "l2-offset": v & F.L1E_OFFSET_MASK, "copied": bool(v >> 63),
                     "reserved-bits": v & F.L1E_RESERVED_MASK})
    return {"what": "l1", "table": label, "l1-size": size, "entries": rows}


def _l2(img: Qcow2Image, l1_index: Optional[int], snapshot: Optional[str]) -> dict[str, Any]:
    if l1_index is None:
        raise UsageError("dump l2 needs --l1-index N")
    l1, size, label = _l1_of(img, snapshot)
    if not 0 <= l1_index < size:
        raise BadInputError(f"--l1-index {l1_index} is outside the {label} L1 table ({size} entries)")
    off = int(l1[l1_index]) & F.L1E_OFFSET_MASK if l1_index < len(l1) else 0
    base = {"what": "l2", "table": label, "l1-index": l1_index, "l2-offset": off, "cluster-size": img.cluster_size,
            "extended-l2": img.extended_l2}
    if not off or off >= img.file_size:  # unallocated, or past the end of the file (reads as zeros)
        return {**base, "entries": []}
    tab = img.read_l2_tables(np.array([off], dtype=U))[0]
    ent = tab[:, 0] if img.extended_l2 else tab
    bmp = tab[:, 1] if img.extended_l2 else np.zeros_like(ent)
    return {**base, "entries": l2_rows(img, l1_index, ent, bmp)}


def l2_rows(img: Qcow2Image, l1_index: int, ent: np.ndarray, bmp: np.ndarray) -> list[dict[str, Any]]:
    """The entries of one L2 table in use, decoded with the masks of format.py in bulk (the
    BitStructs there describe the same fields; tests check both decoders agree)."""
    per = len(ent)
    used = np.flatnonzero((ent != 0) | (bmp != 0))[:MAX_ROWS]
    e, b = ent[used], bmp[used]
    coff, cbytes = compressed_span(e, img.cluster_bits)
    types = [_l2_type(img, int(x), int(y)) for x, y in zip(e.tolist(), b.tolist())]
    host = (e & U(F.L2E_OFFSET_MASK)).tolist()
    resv = (e & U(F.L2E_STD_RESERVED_MASK)).tolist()
    rows = []
    for k, j in enumerate(used.tolist()):
        v = int(e[k])
        row: dict[str, Any] = {"index": j, "guest-offset": (l1_index * per + j) * img.cluster_size, "raw": v,
                               "type": types[k], "copied": bool(v >> 63)}
        if types[k] == "compressed":
            row.update({"compressed-offset": int(coff[k]), "compressed-bytes": int(cbytes[k])})
        else:
            row.update({"host-offset": host[k], "zero-flag": bool(v & 1), "reserved-bits": resv[k]})
        if img.extended_l2:
            bb = int(b[k])
            row.update({"alloc-bitmap": f"{bb & 0xFFFFFFFF:032b}"[::-1], "zero-bitmap": f"{bb >> 32:032b}"[::-1]})
        rows.append(row)
    return rows


def _refcounts(img: Qcow2Image) -> dict[str, Any]:
    rt = img.refcount_table()
    per = img.refcount_block_entries
    cs = img.cluster_size
    rows = []
    seen: dict[int, tuple[int, dict[int, int]]] = {}  # block offset -> (clusters in use, histogram)
    for i in np.nonzero(rt)[0][:MAX_ROWS].tolist():
        o = int(rt[i]) & F.RT_OFFSET_MASK
        if o not in seen:
            ok = o and o % cs == 0 and o + cs <= img.file_size
            blk = img.decode_refcount_block(img.pread(o, cs, "refcount block")) if ok else np.zeros(0, U)
            nzb = blk[blk != 0]
            seen[o] = (len(nzb), dict(zip(*(a.tolist() for a in np.unique(nzb, return_counts=True)))) if len(nzb) else {})
        n_used, hist = seen[o]
        rows.append({"index": i, "raw": int(rt[i]), "block-offset": o, "first-cluster": i * per,
                     "used-clusters": n_used, "refcount-histogram": {str(k): v for k, v in hist.items()}})
    return {"what": "refcounts", "refcount-bits": img.refcount_bits,
            "refcount-table-offset": img.header.refcount_table_offset,
            "refcount-table-entries": img.header.refcount_table_clusters * cs // 8, "entries-per-block": per,
            "blocks": rows}


def _find_snapshot(img: Qcow2Image, key: str) -> Snapshot:
    for sn in img.snapshots():
        if key in (sn.id, sn.name):
            return sn
    raise BadInputError(f"{img.path}: no snapshot with id or name {key!r}")
