"""The internal snapshot table, read as block/qcow2-snapshot.c qcow2_do_read_snapshots() reads it
(QEMU 7.2 and 10.0, without repair): entry by entry from snapshots_offset, each 8-byte aligned,
bytes past the end of the file reading as zeros, refused with QEMU's reasons when an entry has
too much extra data or the table grows too big."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qemu_ext.qcow2 import format as F

if TYPE_CHECKING:
    from qemu_ext.qcow2.image import Qcow2Image

INT_MAX = (1 << 31) - 1


@dataclass
class Snapshot:
    """One internal snapshot: its table entry and where it points."""

    index: int
    entry_offset: int
    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int
    icount: int  # -1 when icount was disabled
    extra_data_size: int
    extra_data: bytes = b""

    def as_dict(self) -> dict[str, Any]:
        d = {k.replace("_", "-"): v for k, v in self.__dict__.items() if k != "extra_data"}
        d["extra-data"] = self.extra_data.hex()
        return d


class _Window:
    """Reads of the table through a 1 MiB window (zeros past the end of the file)."""

    SIZE = 1 << 20

    def __init__(self, img: Qcow2Image) -> None:
        self.img = img
        self.start = -1
        self.buf = b""

    def read(self, offset: int, n: int) -> bytes:
        if n > self.SIZE:
            return self.img.pread_zero_padded(offset, n)
        if not (self.start <= offset and offset + n <= self.start + len(self.buf)):
            self.start = offset
            self.buf = self.img.pread_zero_padded(offset, self.SIZE)
        return self.buf[offset - self.start : offset - self.start + n]


_HEADER = struct.Struct(">QIHHIIQII")  # F.SnapshotHeader, unpacked without construct (tables of 65536 entries)
_EXTRA = struct.Struct(">QQQ")  # F.SnapshotExtra
assert _HEADER.size == F.SNAPSHOT_HEADER_SIZE and _EXTRA.size == F.SNAPSHOT_EXTRA_SIZE


def read_snapshots(img: Qcow2Image) -> tuple[list[Snapshot], int]:
    """(snapshots, table size in bytes); what QEMU refuses raises OpenError with QEMU's text."""
    h = img.header
    win = _Window(img)
    out: list[Snapshot] = []
    offset = h.snapshots_offset
    table_length = 0
    for i in range(h.nb_snapshots):
        entry = offset = (offset + 7) & ~7
        table_length = (table_length + 7) & ~7
        (l1_off, l1_size, id_size, name_size, date_sec, date_nsec, vm_clock, vm_state,
         extra_size) = _HEADER.unpack(win.read(offset, F.SNAPSHOT_HEADER_SIZE))
        offset += F.SNAPSHOT_HEADER_SIZE
        if extra_size > F.QCOW_MAX_SNAPSHOT_EXTRA_DATA:
            raise img.refuse(f"Too much extra metadata in snapshot table entry {i}")
        extra = win.read(offset, extra_size)
        offset += extra_size
        sid = win.read(offset, id_size)
        offset += id_size
        name = win.read(offset, name_size)
        offset += name_size
        table_length += F.SNAPSHOT_HEADER_SIZE + extra_size + id_size + name_size
        if table_length > F.QCOW_MAX_SNAPSHOTS_SIZE or offset - h.snapshots_offset > INT_MAX:
            raise img.refuse("Snapshot table is too big")
        if extra_size:
            vm_large, disk_size, icount = _EXTRA.unpack(extra[: F.SNAPSHOT_EXTRA_SIZE].ljust(F.SNAPSHOT_EXTRA_SIZE, b"\0"))
        else:
            vm_large = disk_size = icount = 0
        out.append(Snapshot(
            i, entry,
            sid.split(b"\0", 1)[0].decode("utf-8", "replace") if id_size else "",
            name.split(b"\0", 1)[0].decode("utf-8", "replace") if name_size else "",
            l1_off, l1_size, date_sec, date_nsec, vm_clock,
            vm_large if extra_size >= 8 else vm_state,
            disk_size if extra_size >= 16 else img.virtual_size,
            (icount if icount < 1 << 63 else icount - (1 << 64)) if extra_size >= 24 else -1,
            extra_size, extra,
        ))
    return out, offset - h.snapshots_offset if h.nb_snapshots else 0
