"""`virtopt qcow2 dump`: the decoded structures, table by table."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from qemu_ext.errors import BadInputError
from qemu_ext.qcow2 import DUMP_STRUCTURES
from qemu_ext.qcow2 import format as F
from qemu_ext.qcow2.entries import ClusterType, cluster_type
from qemu_ext.qcow2.image import OpenMode, PathLike, Qcow2Image, open_image
from qemu_ext.qcow2.snapshots import Snapshot

U = np.uint64
WHAT = DUMP_STRUCTURES
MAX_ROWS = 1 << 20


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
    """Decoded structure `what` (one of WHAT) of an image, as plain data."""
    if what not in WHAT:
        raise BadInputError(f"unknown structure {what!r}; choose from {', '.join(WHAT)}")
    with open_image(path, OpenMode.INFO) as img:
        h = img.header
        cs = img.cluster_size
        if what == "header":
            f = img.features()
            d = h.as_dict()
            d.update(cluster_size=cs, refcount_bits=img.refcount_bits, l2_entry_size=img.l2_entry_size,
                     compression=img.compression_type, crypt=F.CRYPT_METHODS.get(h.crypt_method, str(h.crypt_method)),
                     backing_file=img.backing_file, file_size=img.file_size,
                     features={"incompatible": f.incompatible, "compatible": f.compatible, "autoclear": f.autoclear})
            return d
        if what == "extensions":
            return {"extensions": [e.as_dict() for e in img.extensions]}
        if what == "snapshots":
            return {"snapshots": [s.as_dict() for s in img.snapshots()], "table_size": img.snapshot_table_size()}
        if what == "bitmaps":
            out = []
            for bm in img.bitmaps():
                d = bm.as_dict()
                tab = img.bitmap_table(bm)
                d["table"] = []
                for i, v in enumerate(tab[:MAX_ROWS].tolist()):
                    be = F.BitmapTableEntry.parse(int(v).to_bytes(8, "big"))
                    d["table"].append({"index": i, "raw": f"{int(v):#018x}", "offset": be.offset_9 << 9,
                                       "all_ones": be.all_ones and not be.offset_9})
                out.append(d)
            return {"bitmaps": out}
        if what == "l1":
            l1 = img.l1_entries()
            label = "active"
            if snapshot is not None:
                sn = _find_snapshot(img, snapshot)
                l1 = img.snapshot_l1_entries(sn)
                label = f"snapshot {sn.id}"
            idx = np.nonzero(l1)[0][:MAX_ROWS]
            return {
                "table": label,
                "l1_size": len(l1),
                "entries": [_l1_row(int(i), int(l1[i])) for i in idx.tolist()],
            }
        if what == "l2":
            if l1_index is None:
                raise BadInputError("dump l2 needs --l1-index N")
            if snapshot is not None:
                sn = _find_snapshot(img, snapshot)
                l1 = img.snapshot_l1_entries(sn)
                table = f"snapshot {sn.id}"
            else:
                l1 = img.l1_entries()
                table = "active"
            if not 0 <= l1_index < len(l1):
                raise BadInputError(f"--l1-index {l1_index} is outside the {table} L1 table ({len(l1)} entries)")
            off = int(l1[l1_index]) & F.L1E_OFFSET_MASK
            if not off:
                return {"table": table, "l1_index": l1_index, "l2_offset": 0, "entries": []}
            tab = img.read_l2_tables(np.array([off], dtype=U))[0]
            per = img.l2_entries_per_table
            rows = []
            comp = F.L2CompressedEntry(img.cluster_bits)
            for j in range(per):
                if img.extended_l2:
                    e, bmp = int(tab[j, 0]), int(tab[j, 1])
                else:
                    e, bmp = int(tab[j]), 0
                if not e and not bmp:
                    continue
                t = _l2_type(img, e, bmp)
                raw = e.to_bytes(8, "big")
                row: dict[str, Any] = {"index": j, "guest_offset": (l1_index * per + j) * cs, "raw": f"{e:#018x}",
                                       "type": t}
                if t == "compressed":
                    c = comp.parse(raw)
                    row.update(copied=c.copied, compressed_offset=c.host_offset,
                               compressed_bytes=(c.additional_sectors + 1) * 512 - (c.host_offset & 511))
                else:
                    d = F.L2StandardEntry.parse(raw)
                    row.update(copied=d.copied, host_offset=d.host_offset_9 << 9, zero_flag=d.zero,
                               reserved_bits=(d.reserved_hi << 56) | (d.reserved_lo << 1))
                if img.extended_l2:
                    b = F.L2SubclusterBitmap.parse(bmp.to_bytes(8, "big"))
                    row.update(alloc_bitmap=f"{b.alloc:032b}"[::-1], zero_bitmap=f"{b.zero:032b}"[::-1])
                rows.append(row)
            return {"table": table, "l1_index": l1_index, "l2_offset": off, "entries": rows}
        # refcounts
        rt = img.refcount_table()
        per = img.refcount_block_entries
        rows = []
        for i in np.nonzero(rt)[0][:MAX_ROWS].tolist():
            re_ = F.RefcountTableEntry.parse(int(rt[i]).to_bytes(8, "big"))
            o = re_.block_offset_9 << 9
            blk = img.decode_refcount_block(img.pread_zero_padded(o, cs)) if o and o % cs == 0 else np.zeros(0, U)
            nz = np.nonzero(blk)[0]
            hist = dict(zip(*(a.tolist() for a in np.unique(blk[nz], return_counts=True)))) if len(nz) else {}
            rows.append({"index": i, "raw": f"{int(rt[i]):#018x}", "block_offset": o, "first_cluster": i * per,
                         "used_clusters": len(nz), "refcount_histogram": {str(k): v for k, v in hist.items()}})
        return {"refcount_bits": img.refcount_bits, "refcount_table_offset": h.refcount_table_offset,
                "refcount_table_entries": len(rt), "entries_per_block": per, "blocks": rows}


def _l1_row(i: int, v: int) -> dict[str, Any]:
    e = F.L1Entry.parse(v.to_bytes(8, "big"))
    return {"index": i, "raw": f"{v:#018x}", "l2_offset": e.l2_offset_9 << 9, "copied": e.copied,
            "reserved_bits": (e.reserved_hi << 56) | e.reserved_lo}


def _find_snapshot(img: Qcow2Image, key: str) -> Snapshot:
    for sn in img.snapshots():
        if key in (sn.id, sn.name):
            return sn
    raise BadInputError(f"{img.path}: no snapshot with id or name {key!r}")


def render_human(d: dict[str, Any], indent: str = "") -> str:
    """A readable key: value rendering of nested dicts/lists."""
    lines: list[str] = []
    for k, v in d.items():
        if isinstance(v, dict):
            lines.append(f"{indent}{k}:")
            lines.append(render_human(v, indent + "    "))
        elif isinstance(v, list):
            lines.append(f"{indent}{k}: ({len(v)})")
            for item in v:
                if isinstance(item, dict):
                    lines.append(indent + "  - " + ", ".join(f"{a}={b}" for a, b in item.items()))
                else:
                    lines.append(f"{indent}  - {item}")
        else:
            if isinstance(v, int) and not isinstance(v, bool) and k.endswith(("offset", "features")):
                v = f"{v} ({v:#x})"
            lines.append(f"{indent}{k}: {v}")
    return "\n".join(x for x in lines if x != "")
