"""`virtopt qcow2 info`: qemu-img info's fields (same JSON names) plus what qemu-img does not show."""

from __future__ import annotations

import datetime
import os
from typing import Any, Optional

import numpy as np
from construct import ConstructError

from qemu_ext.errors import BadInputError
from qemu_ext.qcow2 import format as F
from qemu_ext.qcow2.chain import Layer, open_chain, path_combine
from qemu_ext.qcow2.image import PathLike, Qcow2Image

U = np.uint64


def _actual_size(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return -1


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
    return d


def extras(img: Qcow2Image, progress: bool = False) -> dict[str, Any]:
    """What qemu-img info hides: L2 tables, metadata bytes, fragmentation, compression, snapshot sizes, bitmaps."""
    cs = img.cluster_size
    h = img.header
    l1 = img.l1_entries()
    l2_offs = l1 & U(F.L1E_OFFSET_MASK)
    used = np.nonzero(l2_offs)[0]
    normal = zero_alloc = zero_plain = compressed = fragmented = 0
    compressed_bytes = 0
    x, nbits = F.compressed_field_widths(img.cluster_bits)
    chunk = max(1, (2 << 20) // cs)
    active_l2 = set(int(v) for v in l2_offs[used].tolist())
    from qemu_ext.output import progress as make_bar

    bar = make_bar(len(used), "qcow2 info", unit="L2") if progress else None
    for s in range(0, len(used), chunk):
        if bar is not None:
            bar.update(min(chunk, len(used) - s))
        tabs = img.read_l2_tables(l2_offs[used[s : s + chunk]], reuse=True)
        ent = tabs[:, :, 0] if img.extended_l2 else tabs
        if not img.extended_l2 and not (ent & U(F.L2E_COMPRESSED | F.L2E_ZERO)).any():
            # only normal or unallocated entries: count and measure contiguity in a few passes
            o = (ent & U(F.L2E_OFFSET_MASK)).view(np.int64)
            a = o != 0
            if img.has_data_file:
                a |= ent >= U(F.L2E_COPIED)
            if a.all():
                normal += a.size
                brk = o[:, 1:] != o[:, :-1] + cs
                fragmented += int(np.count_nonzero(brk))
                continue
        comp = (ent & U(F.L2E_COMPRESSED)) != 0
        off = (ent & U(F.L2E_OFFSET_MASK)).astype(np.int64)
        zf = ~comp & ((ent & U(F.L2E_ZERO)) != 0) & (not img.extended_l2)
        alloc = (off != 0) | (((ent & U(F.L2E_COPIED)) != 0) & img.has_data_file)
        nrm = ~comp & ~zf & alloc
        za = zf & alloc
        normal += int(nrm.sum())
        zero_alloc += int(za.sum())
        zero_plain += int((zf & ~alloc).sum())
        compressed += int(comp.sum())
        if comp.any():
            e = ent[comp]
            coff = (e & U((1 << x) - 1)).astype(np.int64)
            nsec = ((e >> U(x)) & U((1 << nbits) - 1)).astype(np.int64) + 1
            compressed_bytes += int((nsec * 512 - (coff & 511)).sum())
        rr, jj = np.nonzero(nrm | za)
        o = off[rr, jj]
        if len(o) > 1:
            fragmented += int(((rr[1:] == rr[:-1]) & (o[1:] != o[:-1] + cs)).sum())
    if bar is not None:
        bar.close()
    fragmented += compressed
    rt = img.refcount_table()
    refblocks = int(np.count_nonzero(rt & U(F.RT_OFFSET_MASK)))
    snaps_out = []
    snap_l2: set[int] = set()
    rc = None
    for sn in img.snapshots():
        try:
            sl1 = img.snapshot_l1_entries(sn)
        except Exception:  # a broken snapshot L1 is check's business; info still shows the rest
            snaps_out.append({"id": sn.id, "name": sn.name, "error": "L1 table unreadable"})
            continue
        so = sl1 & U(F.L1E_OFFSET_MASK)
        su = so[so != 0]
        snap_l2.update(int(v) for v in su.tolist())
        if rc is None:
            rc = img.refcounts(rt)
        data_clusters = 0
        exclusive = 0
        for s in range(0, len(su), chunk):
            tabs = img.read_l2_tables(su[s : s + chunk])
            ent = tabs[:, :, 0] if img.extended_l2 else tabs
            off = (ent & U(F.L2E_OFFSET_MASK)).astype(np.int64)
            comp = (ent & U(F.L2E_COMPRESSED)) != 0
            a = (off != 0) & ~comp
            data_clusters += int(a.sum()) + int(comp.sum())
            ci = off[a] >> img.cluster_bits
            ci = ci[ci < len(rc)]
            exclusive += int((rc[ci] == 1).sum())
        snaps_out.append(
            {
                "id": sn.id,
                "name": sn.name,
                "date": datetime.datetime.fromtimestamp(sn.date_sec, datetime.timezone.utc).isoformat(),
                "disk-size": sn.disk_size,
                "vm-state-size": sn.vm_state_size,
                "l1-table-offset": sn.l1_table_offset,
                "l1-size": sn.l1_size,
                "l2-tables": len(su),
                "referenced-bytes": (F.align_up(sn.l1_size * 8, cs) + len(su) * cs + data_clusters * cs),
                "exclusive-data-bytes": exclusive * cs,
            }
        )
    bitmaps_out = []
    bitmap_meta = 0
    bx = img.bitmaps_extension()
    if bx is not None:
        bitmap_meta += F.align_up(bx.bitmap_directory_size, cs)
        for bm in img.bitmaps():
            try:
                tab = img.bitmap_table(bm)
                data_clusters = int(np.count_nonzero(tab & U(F.BME_TABLE_ENTRY_OFFSET_MASK)))
            except Exception:
                data_clusters = 0
            bitmap_meta += F.align_up(bm.bitmap_table_size * 8, cs) + data_clusters * cs
            bitmaps_out.append(
                {
                    "name": bm.name,
                    "granularity": bm.granularity,
                    "flags": bm.flag_names + (["extra-data-compatible"] if bm.flags & F.BME_FLAG_EXTRA_DATA_COMPATIBLE else []),
                    "raw-flags": bm.flags,
                    "type": bm.type,
                    "bitmap-table-offset": bm.bitmap_table_offset,
                    "bitmap-table-size": bm.bitmap_table_size,
                    "data-clusters": data_clusters,
                }
            )
    snap_only_l2 = len(snap_l2 - active_l2)
    metadata = (
        cs  # header cluster
        + F.align_up(h.l1_size * 8, cs)
        + len(used) * cs
        + h.refcount_table_clusters * cs
        + refblocks * cs
        + (F.align_up(img.snapshot_table_size(), cs) if h.nb_snapshots else 0)
        + sum(F.align_up(s.l1_size * 8, cs) for s in img.snapshots())
        + snap_only_l2 * cs
        + bitmap_meta
    )
    allocated = normal + zero_alloc + compressed
    feats = img.features()
    return {
        "version": h.version,
        "header-length": h.header_length,
        "refcount-bits": img.refcount_bits,
        "l2-entry-size": img.l2_entry_size,
        "l1-size": h.l1_size,
        "l2-tables-allocated": len(used),
        "l2-tables-snapshots-only": snap_only_l2,
        "refcount-blocks": refblocks,
        "metadata-bytes": metadata,
        "data-clusters": normal,
        "zero-clusters-preallocated": zero_alloc,
        "zero-clusters": zero_plain,
        "compressed-clusters": compressed,
        "compressed-bytes": compressed_bytes,
        "allocated-clusters": allocated,
        "fragmented-clusters": fragmented,
        "fragmentation": round(fragmented / allocated, 4) if allocated else 0.0,
        "file-size": img.file_size,
        "features": {"incompatible": feats.incompatible, "compatible": feats.compatible, "autoclear": feats.autoclear},
        "extensions": [e.name if e.name != "unknown" else f"0x{e.type:08x}" for e in img.extensions],
        "snapshots": snaps_out,
        "bitmaps": bitmaps_out,
    }


def image_info(path: PathLike, backing_chain: bool = False, with_extras: bool = True,
               progress: bool = False) -> list[dict[str, Any]]:
    """One dict per image (the top only, or the whole chain): qemu-img's fields plus "virtopt" extras."""
    out = []
    with open_chain(path, follow_backing=backing_chain) as chain:
        for layer in chain.layers:
            if layer.img is None:
                out.append(_raw_info(layer))
                continue
            d = qemu_info(layer.img, layer.filename)
            if with_extras:
                d["virtopt"] = extras(layer.img, progress)
            out.append(d)
    return out
