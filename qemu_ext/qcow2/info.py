"""`virtopt qcow2 info`: qemu-img info's fields (same JSON names) plus what qemu-img does not show."""

from __future__ import annotations

import datetime
import os
import stat
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from construct import ConstructError

from qemu_ext.errors import BadInputError, VirtoptError
from qemu_ext.qcow2 import format as F
from qemu_ext.qcow2.chain import Layer, open_chain, path_combine
from qemu_ext.qcow2.entries import (
    COMPRESSED,
    COPIED,
    OFFSET_MASK,
    ZERO,
    ClusterType,
    cluster_types,
    compressed_span,
)
from qemu_ext.qcow2.image import OpenMode, PathLike, ProgressFactory, Qcow2Image, start_bar

U = np.uint64


def _actual_size(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return -1


def file_child(filename: str, length: int) -> dict[str, Any]:
    """The protocol node under an image (QEMU 8.0+ show it as the "file" child): file-posix's
    BlockNodeInfo for a regular file ("file") or a block device ("host_device")."""
    try:
        blk = stat.S_ISBLK(os.stat(filename).st_mode)
    except OSError:
        blk = False
    d: dict[str, Any] = {"filename": filename, "format": "host_device" if blk else "file", "dirty-flag": False}
    actual = _actual_size(filename)
    if actual >= 0:
        d["actual-size"] = actual
    d["virtual-size"] = F.align_up(length, 512)  # bdrv_getlength(): whole sectors
    d["format-specific"] = {"type": "file", "data": {}}
    return {"name": "file", "info": d}


def qemu_info(img: Qcow2Image, filename: str) -> dict[str, Any]:
    """The dict `qemu-img info --output=json` prints for one qcow2 image."""
    h = img.header
    # keys in QAPI schema order (ImageInfo); the CLI prints them in QEMU's QDict order
    d: dict[str, Any] = {"filename": filename, "format": "qcow2", "dirty-flag": img.dirty}
    actual = _actual_size(filename)
    if actual >= 0:
        d["actual-size"] = actual
    d["virtual-size"] = h.size
    d["cluster-size"] = img.cluster_size
    if h.crypt_method:
        d["encrypted"] = True
    if img.backing_file:
        d["backing-filename"] = img.backing_file
        d["full-backing-filename"] = path_combine(filename, img.backing_file)
        if img.backing_format:
            d["backing-filename-format"] = img.backing_format
    snaps = img.snapshots()
    if snaps:
        out = []
        for sn in snaps:
            s: dict[str, Any] = {
                "id": sn.id,
                "name": sn.name,
                "vm-state-size": sn.vm_state_size,
                "date-sec": sn.date_sec,
                "date-nsec": sn.date_nsec,
                "vm-clock-sec": sn.vm_clock_nsec // 1_000_000_000,
                "vm-clock-nsec": sn.vm_clock_nsec % 1_000_000_000,
            }
            if sn.icount != -1:
                s["icount"] = sn.icount
            out.append(s)
        d["snapshots"] = out
    data: dict[str, Any]
    if h.version == 2:
        data = {"compat": "0.10", "refcount-bits": img.refcount_bits, "compression-type": img.compression_type}
    else:
        data = {"compat": "1.1"}
        if img.data_file:
            data["data-file"] = img.data_file
        if img.has_data_file:
            data["data-file-raw"] = img.data_file_raw
        data["extended-l2"] = img.extended_l2
        data["lazy-refcounts"] = img.lazy_refcounts
        data["corrupt"] = img.corrupt
        data["refcount-bits"] = img.refcount_bits
        if h.autoclear_features & F.AUTOCLEAR_BITMAPS and img.bitmaps_extension() is not None:
            data["bitmaps"] = [
                {"name": bm.name, "granularity": bm.granularity, "flags": bm.flag_names} for bm in img.bitmaps()
            ]
        data["compression-type"] = img.compression_type
    if h.crypt_method == 2:
        enc = luks_info(img)
        if enc is not None:
            data["encrypt"] = enc
    elif h.crypt_method == 1:
        data["encrypt"] = {"format": "aes"}
    d["format-specific"] = {"type": "qcow2", "data": data}
    d["children"] = [file_child(filename, img.file_size)]
    return d


def _cstr(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode("ascii", "replace")


def luks_info(img: Qcow2Image) -> Optional[dict[str, Any]]:
    """The "encrypt" object qemu-img info shows for LUKS images (crypto/block-luks.c get_info)."""
    ext = next((e for e in img.extensions if e.type == F.EXT_CRYPTO_HEADER and len(e.data) >= 16), None)
    if ext is None:
        return None
    cx = F.CryptoHeaderExtension.parse(ext.data[:16])
    try:
        h = F.LuksHeader.parse(img.pread(cx.offset, F.LUKS_HEADER_SIZE, "LUKS header"))
    except ConstructError:
        raise BadInputError(f"{img.path}: the encryption header is not a LUKS header") from None
    mode_spec = _cstr(h.cipher_mode)
    mode, _, ivgen = mode_spec.partition("-")
    ivgen_alg, _, ivgen_hash = ivgen.partition(":")
    key_bytes = h.master_key_len // 2 if mode == "xts" else h.master_key_len
    d: dict[str, Any] = {
        "format": "luks",
        "cipher-alg": f"{_cstr(h.cipher_name)}-{key_bytes * 8}",
        "cipher-mode": mode,
        "ivgen-alg": ivgen_alg,
    }
    if ivgen_alg == "essiv":
        d["ivgen-hash-alg"] = ivgen_hash
    d["hash-alg"] = _cstr(h.hash_spec)
    d["detached-header"] = False  # shown since QEMU 9.0 (the header is in the image)
    d["payload-offset"] = h.payload_offset_sector * 512
    d["master-key-iters"] = h.master_key_iterations
    d["uuid"] = _cstr(h.uuid)
    slots = []
    for ks in h.key_slots:
        active = ks.active == F.LUKS_KEY_SLOT_ENABLED
        slot: dict[str, Any] = {"active": active}
        if active:
            slot["iters"] = ks.iterations
            slot["stripes"] = ks.stripes
        slot["key-offset"] = ks.key_offset_sector * 512
        slots.append(slot)
    d["slots"] = slots
    return d


def _raw_info(layer: Layer) -> dict[str, Any]:
    d: dict[str, Any] = {"virtual-size": layer.size, "filename": layer.filename, "format": "raw"}
    actual = _actual_size(layer.filename)
    if actual >= 0:
        d["actual-size"] = actual
    d["dirty-flag"] = False
    d["children"] = [file_child(layer.filename, layer.file_size)]
    return d


@dataclass
class L2Stats:
    """Cluster counts of the active L2 tables (qemu-img check's allocation figures and more)."""

    l2_tables: int = 0
    normal: int = 0
    zero_alloc: int = 0
    zero_plain: int = 0
    compressed: int = 0
    compressed_bytes: int = 0
    fragmented: int = 0

    @property
    def allocated(self) -> int:
        return self.normal + self.zero_alloc + self.compressed


def _count_chunk(img: Qcow2Image, ent: np.ndarray, st: L2Stats) -> None:
    """Add one chunk of L2 tables (rows) to the counts; fragmentation as qemu-img check counts it."""
    cs = img.cluster_size
    if not img.extended_l2 and not (ent & U(COMPRESSED | ZERO)).any():
        o = (ent & U(OFFSET_MASK)).view(np.int64)
        a = (o != 0) | ((ent & U(COPIED)) != 0) if img.has_data_file else o != 0
        if a.all():  # fully allocated tables: count and measure contiguity in one pass
            st.normal += a.size
            st.fragmented += int(np.count_nonzero(o[:, 1:] != o[:, :-1] + cs))
            return
    ct = cluster_types(ent, img.extended_l2, img.has_data_file)
    off = (ent & U(OFFSET_MASK)).astype(np.int64)
    nrm = ct == ClusterType.NORMAL
    za = ct == ClusterType.ZERO_ALLOC
    comp = ct == ClusterType.COMPRESSED
    st.normal += int(nrm.sum())
    st.zero_alloc += int(za.sum())
    st.zero_plain += int((ct == ClusterType.ZERO_PLAIN).sum())
    st.compressed += int(comp.sum())
    if comp.any():
        _off, nbytes = compressed_span(ent[comp], img.cluster_bits)
        st.compressed_bytes += int(nbytes.sum())
    rr, jj = np.nonzero(nrm | za)
    o = off[rr, jj]
    if len(o) > 1:
        st.fragmented += int(((rr[1:] == rr[:-1]) & (o[1:] != o[:-1] + cs)).sum())


def active_l2_stats(img: Qcow2Image, progress: Optional[ProgressFactory] = None) -> tuple[L2Stats, set[int]]:
    """Counts over the active L2 tables and the set of their offsets. Tables past the end of the
    file read as zeros (nothing allocated there): they are counted without being read."""
    l1 = img.l1_entries()
    l2_offs = l1 & U(F.L1E_OFFSET_MASK)
    used = np.nonzero(l2_offs)[0]
    st = L2Stats(l2_tables=len(used))
    inside = used[l2_offs[used] < U(img.file_size)]
    chunk = max(1, (2 << 20) // img.cluster_size)
    bar = start_bar(progress, len(inside), "qcow2 info", unit="L2")
    try:
        for s in range(0, len(inside), chunk):
            bar.update(min(chunk, len(inside) - s))
            tabs = img.read_l2_tables(l2_offs[inside[s : s + chunk]], reuse=True)
            _count_chunk(img, tabs[:, :, 0] if img.extended_l2 else tabs, st)
    finally:
        bar.close()
    st.fragmented += st.compressed
    return st, {int(v) for v in l2_offs[used].tolist()}


def snapshot_stats(img: Qcow2Image, rt: np.ndarray) -> tuple[list[dict[str, Any]], set[int]]:
    """Per internal snapshot: size of what it references and of the data only it holds."""
    cs = img.cluster_size
    chunk = max(1, (2 << 20) // cs)
    out: list[dict[str, Any]] = []
    snap_l2: set[int] = set()
    rc = None
    for sn in img.snapshots():
        try:
            sl1 = img.snapshot_l1_entries(sn)
        except VirtoptError:  # a broken snapshot L1 is check's business; info still shows the rest
            out.append({"id": sn.id, "name": sn.name, "error": "L1 table unreadable"})
            continue
        so = sl1 & U(F.L1E_OFFSET_MASK)
        su = so[so != 0]
        snap_l2.update(int(v) for v in su.tolist())
        inside = su[su < U(img.file_size)]
        if rc is None:
            rc = img.refcounts(rt)
        data_clusters = exclusive = 0
        for s in range(0, len(inside), chunk):
            tabs = img.read_l2_tables(inside[s : s + chunk])
            ent = tabs[:, :, 0] if img.extended_l2 else tabs
            ct = cluster_types(ent, img.extended_l2, img.has_data_file)
            a = (ct == ClusterType.NORMAL) | (ct == ClusterType.ZERO_ALLOC)
            data_clusters += int(a.sum()) + int((ct == ClusterType.COMPRESSED).sum())
            ci = (ent[a] & U(OFFSET_MASK)).astype(np.int64) >> img.cluster_bits
            ci = ci[ci < len(rc)]
            exclusive += int((rc[ci] == 1).sum())
        out.append({
            "id": sn.id,
            "name": sn.name,
            "date": datetime.datetime.fromtimestamp(sn.date_sec, datetime.timezone.utc).isoformat(),
            "disk-size": sn.disk_size,
            "vm-state-size": sn.vm_state_size,
            "l1-table-offset": sn.l1_table_offset,
            "l1-size": sn.l1_size,
            "l2-tables": len(su),
            "referenced-bytes": F.align_up(sn.l1_size * 8, cs) + len(su) * cs + data_clusters * cs,
            "exclusive-data-bytes": exclusive * cs,
        })
    return out, snap_l2


def bitmap_stats(img: Qcow2Image) -> tuple[list[dict[str, Any]], int]:
    """Per persistent bitmap: flags, table and data clusters; and the bytes of bitmap metadata."""
    cs = img.cluster_size
    out: list[dict[str, Any]] = []
    meta = 0
    bx = img.bitmaps_extension()
    if bx is None:
        return out, meta
    meta += F.align_up(bx.bitmap_directory_size, cs)
    for bm in img.bitmaps():
        try:
            tab = img.bitmap_table(bm)
            data_clusters = int(np.count_nonzero(tab & U(F.BME_TABLE_ENTRY_OFFSET_MASK)))
        except VirtoptError:
            data_clusters = 0
        meta += F.align_up(bm.bitmap_table_size * 8, cs) + data_clusters * cs
        out.append({
            "name": bm.name,
            "granularity": bm.granularity,
            "flags": bm.flag_names + (["extra-data-compatible"] if bm.flags & F.BME_FLAG_EXTRA_DATA_COMPATIBLE else []),
            "raw-flags": bm.flags,
            "type": bm.type,
            "bitmap-table-offset": bm.bitmap_table_offset,
            "bitmap-table-size": bm.bitmap_table_size,
            "data-clusters": data_clusters,
        })
    return out, meta


def extras(img: Qcow2Image, progress: Optional[ProgressFactory] = None) -> dict[str, Any]:
    """What qemu-img info hides: L2 tables, metadata bytes, fragmentation, compression, snapshot sizes, bitmaps."""
    cs = img.cluster_size
    h = img.header
    st, active_l2 = active_l2_stats(img, progress)
    rt = img.refcount_table()
    refblocks = int(np.count_nonzero(rt & U(F.RT_OFFSET_MASK)))
    snaps_out, snap_l2 = snapshot_stats(img, rt)
    bitmaps_out, bitmap_meta = bitmap_stats(img)
    snap_only_l2 = len(snap_l2 - active_l2)
    metadata = (
        cs  # header cluster
        + F.align_up(h.l1_size * 8, cs)
        + st.l2_tables * cs
        + h.refcount_table_clusters * cs
        + refblocks * cs
        + (F.align_up(img.snapshot_table_size(), cs) if h.nb_snapshots else 0)
        + sum(F.align_up(s.l1_size * 8, cs) for s in img.snapshots())
        + snap_only_l2 * cs
        + bitmap_meta
    )
    allocated = st.allocated
    feats = img.features()
    return {
        "version": h.version,
        "header-length": h.header_length,
        "refcount-bits": img.refcount_bits,
        "l2-entry-size": img.l2_entry_size,
        "l1-size": h.l1_size,
        "l2-tables-allocated": st.l2_tables,
        "l2-tables-snapshots-only": snap_only_l2,
        "refcount-blocks": refblocks,
        "metadata-bytes": metadata,
        "data-clusters": st.normal,
        "zero-clusters-preallocated": st.zero_alloc,
        "zero-clusters": st.zero_plain,
        "compressed-clusters": st.compressed,
        "compressed-bytes": st.compressed_bytes,
        "allocated-clusters": allocated,
        "fragmented-clusters": st.fragmented,
        "fragmentation": round(st.fragmented / allocated, 4) if allocated else 0.0,
        "file-size": img.file_size,
        "features": {"incompatible": feats.incompatible, "compatible": feats.compatible, "autoclear": feats.autoclear},
        "extensions": [e.name if e.name != "unknown" else f"0x{e.type:08x}" for e in img.extensions],
        "snapshots": snaps_out,
        "bitmaps": bitmaps_out,
    }


def image_info(path: PathLike, backing_chain: bool = False, with_extras: bool = True,
               progress: Optional[ProgressFactory] = None, compat: tuple[int, int] = (10, 0)) -> list[dict[str, Any]]:
    """One dict per image (the top only, or the whole chain): qemu-img's fields plus "virtopt" extras."""
    out = []
    with open_chain(path, follow_backing=backing_chain, mode=OpenMode.INFO, compat=compat) as chain:
        for layer in chain.layers:
            if layer.img is None:
                out.append(_raw_info(layer))
                continue
            d = qemu_info(layer.img, layer.filename)
            if with_extras:
                d["virtopt"] = extras(layer.img, progress)
            out.append(d)
    return out
