"""Persistent dirty bitmaps, loaded as QEMU loads them at open (block/qcow2-bitmap.c
qcow2_load_dirty_bitmaps: bitmap_list_load, check_dir_entry, bdrv_create_dirty_bitmap, load_bitmap;
7.2 and 10.0 agree): a directory QEMU refuses is refused with QEMU's reason. Only what decides
that is read; the bitmaps' bits are not materialised (their table is checked entry by entry)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from qemu_ext.qcow2 import format as F
from qemu_ext.qcow2.image import BDRV_MAX_LENGTH

if TYPE_CHECKING:
    from qemu_ext.qcow2.image import Qcow2Image


@dataclass
class Bitmap:
    """One persistent bitmap directory entry."""

    entry_offset: int
    name: str
    bitmap_table_offset: int
    bitmap_table_size: int
    flags: int
    type: int
    granularity_bits: int
    extra_data_size: int

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    @property
    def flag_names(self) -> list[str]:
        return [n for bit, n in F.BME_FLAG_NAMES.items() if self.flags & bit]

    def as_dict(self) -> dict[str, Any]:
        d = {k.replace("_", "-"): v for k, v in self.__dict__.items()}
        d["granularity"] = self.granularity
        d["flag-names"] = self.flag_names
        return d


def _int32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def dir_entry_size(name_size: int, extra_data_size: int) -> int:
    """calc_dir_entry_size(): ROUND_UP(24 + name + extra, 8) in C int arithmetic."""
    size = _int32(F.BITMAP_DIR_ENTRY_HEADER_SIZE + name_size + extra_data_size)
    return _int32((size + 7) & ~7)


def check_dir_entry(img: Qcow2Image, e: Any) -> bool:
    """check_dir_entry(): the constraints QEMU puts on a directory entry."""
    if (e.bitmap_table_size == 0 or e.bitmap_table_offset == 0 or e.bitmap_table_offset % img.cluster_size
            or e.bitmap_table_size > F.BME_MAX_TABLE_SIZE
            or e.granularity_bits > F.BME_MAX_GRANULARITY_BITS or e.granularity_bits < F.BME_MIN_GRANULARITY_BITS
            or e.flags & F.BME_RESERVED_FLAGS or e.name_size > F.BME_MAX_NAME_SIZE
            or e.type != F.BT_DIRTY_TRACKING_BITMAP):
        return False
    phys = e.bitmap_table_size * img.cluster_size
    if phys > F.BME_MAX_PHYS_SIZE:
        return False
    if not e.flags & F.BME_FLAG_IN_USE and img.virtual_size > ((phys * 8) << e.granularity_bits):
        return False
    return True


def check_table_entry(tab: np.ndarray, cluster_size: int) -> np.ndarray:
    """check_table_entry() for a whole table: True where the entry is invalid."""
    off = tab & np.uint64(F.BME_TABLE_ENTRY_OFFSET_MASK)
    return ((tab & np.uint64(F.BME_TABLE_ENTRY_RESERVED_MASK)) != 0) | (
        (off != 0) & (((tab & np.uint64(F.BME_TABLE_ENTRY_FLAG_ALL_ONES)) != 0) | ((off % np.uint64(cluster_size)) != 0))
    )


def table_clusters_needed(virtual_size: int, granularity_bits: int, cluster_size: int) -> int:
    """load_bitmap_data()'s tab_size: clusters of the serialised bitmap (whole 64-bit words)."""
    bits = (virtual_size + (1 << granularity_bits) - 1) >> granularity_bits
    nbytes = (bits + 63) // 64 * 8
    return (nbytes + cluster_size - 1) // cluster_size


def bitmap_list_load(img: Qcow2Image, offset: int, size: int, nb_bitmaps: int) -> list[Bitmap]:
    """bitmap_list_load(): the directory's entries, or OpenError with QEMU's reason."""
    if size == 0:
        raise img.refuse("Requested bitmap directory size is zero")
    if size > F.QCOW2_MAX_BITMAP_DIRECTORY_SIZE:
        raise img.refuse("Requested bitmap directory size is too big")
    # the directory is at most 64 MiB; what lies past the end of the file reads as zeros
    inside = img.pread_zero_padded(offset, min(size, max(0, img.file_size - offset)))

    def raw(pos: int, n: int) -> bytes:
        b = inside[pos : pos + n]
        return b + bytes(n - len(b))

    out: list[Bitmap] = []
    pos = 0
    while pos < size:
        if pos + F.BITMAP_DIR_ENTRY_HEADER_SIZE > size:
            raise img.refuse("Broken bitmap directory")
        if len(out) + 1 > nb_bitmaps:
            raise img.refuse("More bitmaps found than specified in header extension")
        e = F.BitmapDirEntryHeader.parse(raw(pos, F.BITMAP_DIR_ENTRY_HEADER_SIZE))
        step = dir_entry_size(e.name_size, e.extra_data_size)
        if pos + step > size:
            raise img.refuse("Broken bitmap directory")
        name_off = pos + F.BITMAP_DIR_ENTRY_HEADER_SIZE + e.extra_data_size
        name = raw(name_off, e.name_size).split(b"\0", 1)[0].decode("utf-8", "replace") \
            if 0 <= name_off < size else ""
        if e.extra_data_size != 0:
            raise img.refuse("Bitmap extra data is not supported")
        if not check_dir_entry(img, e):
            raise img.refuse(f"Bitmap '{name}' doesn't satisfy the constraints")
        out.append(Bitmap(offset + pos, name, e.bitmap_table_offset, e.bitmap_table_size, e.flags, e.type,
                          e.granularity_bits, e.extra_data_size))
        if step <= 0:  # a negative C size walks backwards; QEMU's loop would not end either way
            raise img.refuse("Broken bitmap directory")
        pos += step
    if len(out) != nb_bitmaps:
        raise img.refuse("Less bitmaps found than specified in header extension")
    if pos != size:
        raise img.refuse("Broken bitmap directory")
    return out


def load_bitmaps(img: Qcow2Image) -> list[Bitmap]:
    """qcow2_load_dirty_bitmaps(): every bitmap of the directory, each created (names unique) and,
    unless in use, its table loaded and checked (load_bitmap, bitmap_table_load, load_bitmap_data)."""
    bx = img.bitmaps_extension()
    if bx is None:
        return []
    bms = bitmap_list_load(img, bx.bitmap_directory_offset, bx.bitmap_directory_size, bx.nb_bitmaps)
    seen: set[str] = set()
    for bm in bms:
        if bm.name in seen:  # bdrv_create_dirty_bitmap()
            raise img.refuse(f"Bitmap already exists: {bm.name}")
        seen.add(bm.name)
        if bm.flags & F.BME_FLAG_IN_USE:
            continue  # its data is unusable: not loaded
        if bm.bitmap_table_offset + bm.bitmap_table_size * 8 > BDRV_MAX_LENGTH:  # bdrv_pread() fails
            raise img.refuse(f"Could not read bitmap_table table from image for bitmap '{bm.name}': "
                             "Input/output error")
        tab = img.bitmap_table(bm)  # the entries past the end of the file are 0, which are valid
        if check_table_entry(tab, img.cluster_size).any():
            raise img.refuse(f"Could not read bitmap_table table from image for bitmap '{bm.name}': Invalid argument")
        if table_clusters_needed(img.virtual_size, bm.granularity_bits, img.cluster_size) != bm.bitmap_table_size:
            raise img.refuse(f"Could not read bitmap '{bm.name}' from image: Invalid argument")
    return bms
