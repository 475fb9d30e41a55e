"""The internal snapshot table, read as block/qcow2-snapshot.c qcow2_do_read_snapshots() reads it
(QEMU 7.2 and 10.0, without repair): entry by entry from snapshots_offset, each 8-byte aligned,
bytes past the end of the file reading as zeros, refused with QEMU's reasons when an entry has
too much extra data or the table grows too big."""

from __future__ import annotations

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


def read_snapshots(img: Qcow2Image) -> tuple[list[Snapshot], int]:
    """(snapshots, table size in bytes); what QEMU refuses raises OpenError with QEMU's text."""
    h = img.header
    win = _Window(img)
    out: list[Snapshot] = []
    offset = h.snapshots_offset
    table_length = 0
    for i in range(h.nb_snapshots):
        entry = offset = F.align_up(offset, 8)
        table_length = F.align_up(table_length, 8)
        sh = F.SnapshotHeader.parse(win.read(offset, F.SNAPSHOT_HEADER_SIZE))
        offset += F.SNAPSHOT_HEADER_SIZE
        if sh.extra_data_size > F.QCOW_MAX_SNAPSHOT_EXTRA_DATA:
            raise img.refuse(f"Too much extra metadata in snapshot table entry {i}")
        extra = win.read(offset, sh.extra_data_size)
        known = F.SnapshotExtra.parse(extra[: F.SNAPSHOT_EXTRA_SIZE].ljust(F.SNAPSHOT_EXTRA_SIZE, b"\0"))
        offset += sh.extra_data_size
        sid = win.read(offset, sh.id_str_size)
        offset += sh.id_str_size
        name = win.read(offset, sh.name_size)
        offset += sh.name_size
        table_length += F.SNAPSHOT_HEADER_SIZE + sh.extra_data_size + sh.id_str_size + sh.name_size
        if table_length > F.QCOW_MAX_SNAPSHOTS_SIZE or offset - h.snapshots_offset > INT_MAX:
            raise img.refuse("Snapshot table is too big")
        n = sh.extra_data_size
        out.append(Snapshot(
            index=i,
            entry_offset=entry,
            id=sid.split(b"\0", 1)[0].decode("utf-8", "replace"),
            name=name.split(b"\0", 1)[0].decode("utf-8", "replace"),
            l1_table_offset=sh.l1_table_offset,
            l1_size=sh.l1_size,
            date_sec=sh.date_sec,
            date_nsec=sh.date_nsec,
            vm_clock_nsec=sh.vm_clock_nsec,
            vm_state_size=known.vm_state_size_large if n >= 8 else sh.vm_state_size,
            disk_size=known.disk_size if n >= 16 else img.virtual_size,
            icount=(known.icount if known.icount < 1 << 63 else known.icount - (1 << 64)) if n >= 24 else -1,
            extra_data_size=n,
            extra_data=extra,
        ))
    return out, offset - h.snapshots_offset if h.nb_snapshots else 0
