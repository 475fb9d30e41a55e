"""A read-only qcow2 image: header, extensions, snapshots, bitmaps and bulk table decoding.

Every size read from the file is checked against the file size (and QEMU's own
limits) before anything is allocated from it, so hostile images give one
`BadInputError` line and bounded memory.  Large tables (L1, L2, refcount table
and blocks) are decoded with numpy in one go per table.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
from construct import ConstructError

from qemu_ext.errors import BadInputError, NotAvailableError
from qemu_ext.qcow2 import format as F

PathLike = Union[str, os.PathLike]
# A progress-bar factory the front door may pass: (total, desc, unit=, unit_scale=) -> bar with
# update(n) and close() (qemu_ext.output.progress is one). The library never draws anything itself.
ProgressFactory = Callable[..., Any]


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def start_bar(progress: Optional[ProgressFactory], total: Optional[int], desc: str, unit: str = "it",
              unit_scale: bool = False) -> Any:
    """A bar from the caller's factory, or one that does nothing."""
    if not progress:
        return _NoBar()
    return progress(total, desc, unit=unit, unit_scale=unit_scale)


@dataclass
class Header:
    """The decoded image header (v2 fields, v3 fields with their defaults for v2)."""

    magic: bytes
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = F.HEADER_V2_SIZE
    compression_type: int = 0

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items()}
        d["magic"] = "0x" + self.magic.hex()
        return d


@dataclass
class Extension:
    """One header extension (unknown types are kept raw)."""

    type: int
    name: str
    offset: int  # of its 8-byte header in the file
    length: int
    data: bytes

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": f"0x{self.type:08x}", "name": self.name, "offset": self.offset, "length": self.length}
        if self.type in (F.EXT_BACKING_FORMAT, F.EXT_DATA_FILE):
            d["value"] = self.data.decode("utf-8", "replace")
        elif self.type == F.EXT_FEATURE_TABLE:
            d["features"] = [
                {"type": F.FEATURE_TYPES.get(t, str(t)), "bit": b, "name": n} for t, b, n in decode_feature_table(self.data)
            ]
        elif self.type == F.EXT_BITMAPS and len(self.data) >= F.BITMAPS_EXTENSION_SIZE:
            bx = F.BitmapsExtension.parse(self.data[: F.BITMAPS_EXTENSION_SIZE])
            d.update(nb_bitmaps=bx.nb_bitmaps, bitmap_directory_size=bx.bitmap_directory_size,
                     bitmap_directory_offset=bx.bitmap_directory_offset)
        elif self.type == F.EXT_CRYPTO_HEADER and len(self.data) >= F.CRYPTO_HEADER_EXTENSION_SIZE:
            cx = F.CryptoHeaderExtension.parse(self.data[: F.CRYPTO_HEADER_EXTENSION_SIZE])
            d.update(crypto_header_offset=cx.offset, crypto_header_length=cx.length)
        else:
            d["data"] = self.data.hex()
        return d


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
        d = {k: v for k, v in self.__dict__.items() if k != "extra_data"}
        d["extra_data"] = self.extra_data.hex()
        return d


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
        d = {k: v for k, v in self.__dict__.items()}
        d["granularity"] = self.granularity
        d["flag_names"] = self.flag_names
        return d


def decode_feature_table(data: bytes) -> list[tuple[int, int, str]]:
    out = []
    for i in range(len(data) // F.FEATURE_NAME_ENTRY_SIZE):
        e = F.FeatureNameEntry.parse(data[i * F.FEATURE_NAME_ENTRY_SIZE : (i + 1) * F.FEATURE_NAME_ENTRY_SIZE])
        out.append((e.type, e.bit, e.name.split(b"\0", 1)[0].decode("utf-8", "replace")))
    return out


@dataclass
class Features:
    """Feature bits with their names (from the feature name table when present)."""

    incompatible: list[str] = field(default_factory=list)
    compatible: list[str] = field(default_factory=list)
    autoclear: list[str] = field(default_factory=list)


class Qcow2Image:
    """A qcow2 image opened read-only.  Use as a context manager (``open_image``)."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise BadInputError(f"{path}: cannot open: {exc.strerror}") from None
        try:
            st = os.fstat(self._fd)
            if stat.S_ISDIR(st.st_mode):
                raise BadInputError(f"{path}: is a directory, not an image")
            if stat.S_ISBLK(st.st_mode):  # qcow2 on an LV or a disk: its size is where it ends
                self.file_size = os.lseek(self._fd, 0, os.SEEK_END)
            elif stat.S_ISREG(st.st_mode):
                self.file_size = st.st_size
            else:
                raise BadInputError(f"{path}: not a regular file or block device")
            self._parse()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ basics
    def close(self) -> None:
        fd = getattr(self, "_fd", -1)
        if fd >= 0:
            os.close(fd)
            self._fd = -1

    def __enter__(self) -> Qcow2Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def bad(self, msg: str) -> BadInputError:
        return BadInputError(f"{self.path}: {msg}")

    def pread(self, offset: int, length: int, what: str) -> bytes:
        """Read exactly length bytes at offset, refusing anything past the end of the file."""
        if offset < 0 or length < 0 or offset + length > self.file_size:
            raise self.bad(
                f"{what} at offset {offset:#x} ({length} bytes) is past the end of the file ({self.file_size} bytes)"
            )
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise self.bad(f"short read of {what} at offset {offset:#x}")
        return data

    def pread_zero_padded(self, offset: int, length: int) -> bytes:
        """Read like QEMU's file driver does: bytes past the end of the file read as zeros."""
        if offset >= self.file_size:
            return bytes(length)
        data = os.pread(self._fd, min(length, self.file_size - offset), offset)
        return data + bytes(length - len(data))

    def read_be64_array(self, offset: int, count: int, what: str) -> np.ndarray:
        raw = self.pread(offset, count * 8, what)
        return np.frombuffer(raw, dtype=">u8").astype(np.uint64)

    # ------------------------------------------------------------ header
    def _parse(self) -> None:
        if self.file_size < 4:
            raise self.bad("not a qcow2 image (file too short)")
        head = os.pread(self._fd, min(self.file_size, F.HEADER_V3_SIZE + 8), 0)
        if head[:4] != F.QCOW_MAGIC:
            raise self.bad("not a qcow2 image (bad magic)")
        if len(head) < F.HEADER_V2_SIZE:
            raise self.bad(f"truncated qcow2 header (file is {self.file_size} bytes)")
        try:
            v2 = F.HeaderV2.parse(head[: F.HEADER_V2_SIZE])
        except ConstructError as exc:
            raise self.bad(f"cannot decode the qcow2 header: {exc}") from None
        fields = {k: v for k, v in v2.items() if not k.startswith("_")}
        if v2.version not in (2, 3):
            raise self.bad(f"unsupported qcow2 version {v2.version}")
        if v2.version == 3:
            if len(head) < F.HEADER_V3_SIZE:
                raise self.bad(f"truncated qcow2 v3 header (file is {self.file_size} bytes)")
            tail = F.HeaderV3Tail.parse(head[F.HEADER_V2_SIZE : F.HEADER_V3_SIZE])
            fields.update({k: v for k, v in tail.items() if not k.startswith("_")})
            if tail.header_length > F.COMPRESSION_TYPE_OFFSET and len(head) > F.COMPRESSION_TYPE_OFFSET:
                fields["compression_type"] = head[F.COMPRESSION_TYPE_OFFSET]
        self.header = h = Header(**fields)
        cb = h.cluster_bits
        if cb < F.MIN_CLUSTER_BITS or cb > F.MAX_CLUSTER_BITS:
            raise self.bad(f"unsupported cluster size: 2^{cb}")
        cs = h.cluster_size
        if h.version == 3:
            if h.header_length < F.HEADER_V3_SIZE:
                raise self.bad("qcow2 header too short")
            if h.header_length > cs:
                raise self.bad("qcow2 header exceeds cluster size")
            if h.header_length > self.file_size:
                raise self.bad(f"header_length {h.header_length} is past the end of the file")
        if h.refcount_order > 6:
            raise self.bad(f"reference count entry width too large; may not exceed 64 bits (order {h.refcount_order})")
        if h.incompatible_features & F.INCOMPAT_COMPRESSION:
            if h.compression_type == 0:
                raise self.bad("compression type incompatible feature bit is set, but compression type is zlib")
        elif h.compression_type != 0:
            raise self.bad("compression_type is not zlib but the compression type feature bit is not set")
        if h.compression_type not in F.COMPRESSION_TYPES:
            raise self.bad(f"unknown compression type {h.compression_type}")
        if self.extended_l2 and cb < 14:
            raise self.bad("extended L2 entries are only supported with cluster sizes of at least 16 KiB")
        if h.backing_file_offset:
            if h.backing_file_offset > cs or h.backing_file_size > 1023:
                raise self.bad("backing file name too long")
            if h.backing_file_offset + h.backing_file_size > self.file_size:
                raise self.bad("backing file name is past the end of the file")
        # refcount table
        rt_bytes = h.refcount_table_clusters * cs
        if rt_bytes > F.QCOW_MAX_REFTABLE_SIZE:
            raise self.bad(f"reference count table too large ({h.refcount_table_clusters} clusters)")
        if h.refcount_table_clusters == 0:
            raise self.bad("image does not contain a reference count table")
        self._check_table("reference count table", h.refcount_table_offset, rt_bytes)
        # L1
        if h.l1_size > F.QCOW_MAX_L1_SIZE // 8:
            raise self.bad(f"active L1 table too large ({h.l1_size} entries)")
        if h.l1_size < self.l1_entries_needed(h.size):
            raise self.bad(f"L1 table is too small ({h.l1_size} entries for {h.size} bytes)")
        if h.l1_size:
            self._check_table("active L1 table", h.l1_table_offset, h.l1_size * 8)
        # snapshots
        if h.nb_snapshots > F.QCOW_MAX_SNAPSHOTS:
            raise self.bad(f"too many snapshots ({h.nb_snapshots})")
        if h.nb_snapshots:
            self._check_table("snapshot table", h.snapshots_offset, h.nb_snapshots * F.SNAPSHOT_HEADER_SIZE)
        self.extensions = self._read_extensions()
        self.backing_file: Optional[str] = None
        if h.backing_file_offset:
            self.backing_file = self.pread(h.backing_file_offset, h.backing_file_size, "backing file name").decode(
                "utf-8", "replace"
            )
        ext = {e.type: e for e in self.extensions}
        self.backing_format: Optional[str] = (
            ext[F.EXT_BACKING_FORMAT].data.decode("utf-8", "replace") if F.EXT_BACKING_FORMAT in ext else None
        )
        self.data_file: Optional[str] = (
            ext[F.EXT_DATA_FILE].data.decode("utf-8", "replace") if F.EXT_DATA_FILE in ext else None
        )
        self.feature_table = decode_feature_table(ext[F.EXT_FEATURE_TABLE].data) if F.EXT_FEATURE_TABLE in ext else []
        self._snapshots: Optional[list[Snapshot]] = None
        self._bitmaps: Optional[list[Bitmap]] = None

    def _check_table(self, what: str, offset: int, nbytes: int) -> None:
        if offset % self.cluster_size:
            raise self.bad(f"invalid {what} offset {offset:#x} (not cluster aligned)")
        if offset + nbytes > self.file_size:
            raise self.bad(
                f"{what} at offset {offset:#x} ({nbytes} bytes) is past the end of the file ({self.file_size} bytes)"
            )

    def _read_extensions(self) -> list[Extension]:
        h = self.header
        start = h.header_length if h.version == 3 else F.HEADER_V2_SIZE
        end = h.backing_file_offset if h.backing_file_offset else h.cluster_size
        end = min(end, self.file_size)
        out: list[Extension] = []
        off = start
        while off + 8 <= end:
            eh = F.ExtensionHeader.parse(os.pread(self._fd, 8, off))
            data_off = off + 8
            if eh.length > end - data_off:
                raise self.bad(f"header extension too large (type 0x{eh.type:08x}, {eh.length} bytes at {off:#x})")
            if eh.type == F.EXT_END:
                break
            data = self.pread(data_off, eh.length, "header extension")
            out.append(Extension(eh.type, F.EXTENSION_NAMES.get(eh.type, "unknown"), off, eh.length, data))
            off = data_off + F.align_up(eh.length, 8)
        return out

    # ------------------------------------------------------------ geometry
    @property
    def cluster_bits(self) -> int:
        return self.header.cluster_bits

    @property
    def cluster_size(self) -> int:
        return self.header.cluster_size

    @property
    def virtual_size(self) -> int:
        return self.header.size

    @property
    def version(self) -> int:
        return self.header.version

    @property
    def extended_l2(self) -> bool:
        return bool(self.header.incompatible_features & F.INCOMPAT_EXTL2)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries_per_table(self) -> int:
        return self.cluster_size // self.l2_entry_size

    @property
    def subcluster_size(self) -> int:
        return self.cluster_size // F.SUBCLUSTERS_PER_CLUSTER if self.extended_l2 else self.cluster_size

    @property
    def refcount_bits(self) -> int:
        return self.header.refcount_bits

    @property
    def refcount_block_entries(self) -> int:
        return self.cluster_size * 8 // self.refcount_bits

    @property
    def compression_type(self) -> str:
        return F.COMPRESSION_TYPES.get(self.header.compression_type, str(self.header.compression_type))

    @property
    def has_data_file(self) -> bool:
        return bool(self.header.incompatible_features & F.INCOMPAT_DATA_FILE)

    @property
    def data_file_raw(self) -> bool:
        return bool(self.header.autoclear_features & F.AUTOCLEAR_DATA_FILE_RAW)

    @property
    def dirty(self) -> bool:
        return bool(self.header.incompatible_features & F.INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.header.incompatible_features & F.INCOMPAT_CORRUPT)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.header.compatible_features & F.COMPAT_LAZY_REFCOUNTS)

    def l1_entries_needed(self, size: int) -> int:
        per_l1 = self.cluster_size * (self.cluster_size // self.l2_entry_size)
        return (size + per_l1 - 1) // per_l1

    def features(self) -> Features:
        """Feature bits set in the header, named from the feature name table when present."""
        names = {(F.FEATURE_TYPES.get(t, str(t)), b): n for t, b, n in self.feature_table}
        out = Features()
        h = self.header
        for kind, value in (
            ("incompatible", h.incompatible_features),
            ("compatible", h.compatible_features),
            ("autoclear", h.autoclear_features),
        ):
            lst = getattr(out, kind)
            for bit in range(64):
                if value >> bit & 1:
                    lst.append(names.get((kind, bit)) or F.KNOWN_FEATURE_NAMES.get((kind, bit)) or f"unknown bit {bit}")
        return out

    def require_known_features(self) -> None:
        """Refuse (like QEMU) to interpret guest data when an unknown incompatible feature bit is set."""
        unknown = self.header.incompatible_features & ~F.INCOMPAT_KNOWN_MASK
        if unknown:
            names = self.features().incompatible
            known = {F.KNOWN_FEATURE_NAMES[("incompatible", b)] for b in range(5)}
            raise NotAvailableError(
                f"{self.path}: unsupported qcow2 feature(s): {', '.join(n for n in names if n not in known)}"
            )

    # ------------------------------------------------------------ L1 / L2
    def l1_entries(self) -> np.ndarray:
        """Raw active L1 entries (numpy uint64)."""
        h = self.header
        if not h.l1_size:
            return np.zeros(0, dtype=np.uint64)
        return self.read_be64_array(h.l1_table_offset, h.l1_size, "active L1 table")

    def l2_table_offset(self, l1_index: int) -> int:
        """Host offset of the L2 table for l1_index (0 when unallocated or out of range)."""
        h = self.header
        if l1_index < 0 or l1_index >= h.l1_size:
            return 0
        raw = self.pread(h.l1_table_offset + 8 * l1_index, 8, "L1 entry")
        return int.from_bytes(raw, "big") & F.L1E_OFFSET_MASK

    def read_l2_table(self, offset: int) -> np.ndarray:
        """One L2 table: uint64 array of shape (n,) or (n, 2) for extended L2 entries."""
        raw = self.pread(offset, self.cluster_size, "L2 table")
        a = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
        return a.reshape(-1, 2) if self.extended_l2 else a

    def read_l2_tables(self, offsets: np.ndarray, reuse: bool = False) -> np.ndarray:
        """Many L2 tables at once: rows of (n,) or (n, 2) entries.

        Like QEMU's file driver, bytes past the end of the file read as zeros (check
        reports such tables separately); offsets need not be aligned."""
        cs = self.cluster_size
        n = len(offsets)
        if reuse:  # one buffer for a whole scan (the previous result is overwritten)
            buf = getattr(self, "_l2buf", None)
            if buf is None or len(buf) != n * cs:
                buf = self._l2buf = bytearray(n * cs)
            else:
                pass  # every table is either read in full or zeroed below
        else:
            buf = bytearray(n * cs)
        mv = memoryview(buf)
        fd = self._fd
        fsize = self.file_size
        for i, off in enumerate(offsets.tolist()):
            if off >= fsize or off + cs > fsize:
                mv[i * cs : (i + 1) * cs] = bytes(cs)  # past the end of the file reads as zeros
            if off >= fsize:
                continue
            want = min(cs, fsize - off)
            got = os.preadv(fd, [mv[i * cs : i * cs + want]], off)
            if got != want:
                raise self.bad(f"short read of L2 table at {off:#x}")
        a = np.frombuffer(buf, dtype=np.uint64)
        if a.dtype.byteorder != ">" and np.little_endian:
            a.byteswap(inplace=True)  # big endian on disk; one pass, no copy
        return a.reshape(n, -1, 2) if self.extended_l2 else a.reshape(n, -1)

    # ------------------------------------------------------------ refcounts
    def refcount_table(self) -> np.ndarray:
        h = self.header
        n = h.refcount_table_clusters * self.cluster_size // 8
        return self.read_be64_array(h.refcount_table_offset, n, "refcount table")

    def decode_refcount_block(self, raw: bytes) -> np.ndarray:
        """Refcounts of one block (uint64 array), for refcount_bits 1..64."""
        bits = self.refcount_bits
        b = np.frombuffer(raw, dtype=np.uint8)
        if bits >= 8:
            dt = {8: ">u1", 16: ">u2", 32: ">u4", 64: ">u8"}[bits]
            return np.frombuffer(raw, dtype=dt).astype(np.uint64)
        # sub-byte widths: entry i lives in byte i*bits//8, bit 0 is the least significant bit
        per = 8 // bits
        mask = (1 << bits) - 1
        shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
        out = (b[:, None] >> shifts[None, :]) & mask
        return out.reshape(-1).astype(np.uint64)

    def refcounts(self, rt: Optional[np.ndarray] = None, max_clusters: Optional[int] = None) -> np.ndarray:
        """Stored refcount of each cluster covered by the refcount table, up to max_clusters
        (default: the clusters of the file plus one).  Blocks past EOF or unaligned read as 0."""
        if rt is None:
            rt = self.refcount_table()
        per = self.refcount_block_entries
        if max_clusters is None:
            max_clusters = self.file_size // self.cluster_size + 2
        rt = rt[: (max_clusters + per - 1) // per]
        offs = rt & np.uint64(F.RT_OFFSET_MASK)
        # only cover up to the last allocated block
        nz = np.nonzero(offs)[0]
        nblocks = int(nz[-1]) + 1 if len(nz) else 0
        out = np.zeros(nblocks * per, dtype=np.uint64)
        cs = self.cluster_size
        for i in nz.tolist():
            off = int(offs[i])
            if off + cs > self.file_size or off % cs:
                continue
            out[i * per : (i + 1) * per] = self.decode_refcount_block(os.pread(self._fd, cs, off))
        return out

    def refcount_of(self, host_offset: int) -> int:
        idx = host_offset // self.cluster_size
        per = self.refcount_block_entries
        rt_i, rb_i = divmod(idx, per)
        if rt_i >= self.header.refcount_table_clusters * self.cluster_size // 8:
            return 0
        e = int.from_bytes(self.pread(self.header.refcount_table_offset + 8 * rt_i, 8, "refcount table"), "big")
        blk = e & F.RT_OFFSET_MASK
        if not blk:
            return 0
        return int(self.decode_refcount_block(self.pread(blk, self.cluster_size, "refcount block"))[rb_i])

    # ------------------------------------------------------------ snapshots
    def snapshots(self) -> list[Snapshot]:
        if self._snapshots is None:
            self._snapshots = self._read_snapshots()
        return self._snapshots

    def _read_snapshots(self) -> list[Snapshot]:
        h = self.header
        out: list[Snapshot] = []
        off = h.snapshots_offset
        limit = F.QCOW_MAX_SNAPSHOTS * 1024
        for i in range(h.nb_snapshots):
            start = off
            sh = F.SnapshotHeader.parse(self.pread(off, F.SNAPSHOT_HEADER_SIZE, "snapshot table entry"))
            off += F.SNAPSHOT_HEADER_SIZE
            if sh.extra_data_size > F.QCOW_MAX_SNAPSHOT_EXTRA_DATA:
                raise self.bad(f"snapshot {i}: too much extra metadata ({sh.extra_data_size} bytes)")
            extra = self.pread(off, sh.extra_data_size, "snapshot extra data")
            off += sh.extra_data_size
            sid = self.pread(off, sh.id_str_size, "snapshot id")
            off += sh.id_str_size
            name = self.pread(off, sh.name_size, "snapshot name")
            off += sh.name_size
            off = F.align_up(off, 8)
            if off - h.snapshots_offset > limit:
                raise self.bad("snapshot table too big")
            vm_state = sh.vm_state_size
            disk_size = h.size
            icount = -1
            if sh.extra_data_size >= 8:
                vm_state = int.from_bytes(extra[0:8], "big")
            if sh.extra_data_size >= 16:
                disk_size = int.from_bytes(extra[8:16], "big")
            if sh.extra_data_size >= 24:
                icount = int.from_bytes(extra[16:24], "big", signed=True)
            out.append(
                Snapshot(
                    index=i,
                    entry_offset=start,
                    id=sid.decode("utf-8", "replace"),
                    name=name.decode("utf-8", "replace"),
                    l1_table_offset=sh.l1_table_offset,
                    l1_size=sh.l1_size,
                    date_sec=sh.date_sec,
                    date_nsec=sh.date_nsec,
                    vm_clock_nsec=sh.vm_clock_nsec,
                    vm_state_size=vm_state,
                    disk_size=disk_size,
                    icount=icount,
                    extra_data_size=sh.extra_data_size,
                    extra_data=extra,
                )
            )
        self._snapshot_table_size = off - h.snapshots_offset
        return out

    def snapshot_table_size(self) -> int:
        self.snapshots()
        return getattr(self, "_snapshot_table_size", 0)

    def snapshot_l1_entries(self, sn: Snapshot) -> np.ndarray:
        if sn.l1_size > F.QCOW_MAX_L1_SIZE // 8:
            raise self.bad(f"snapshot {sn.id}: L1 table too large ({sn.l1_size} entries)")
        if not sn.l1_size:
            return np.zeros(0, dtype=np.uint64)
        if sn.l1_table_offset % self.cluster_size:
            raise self.bad(f"snapshot {sn.id}: L1 table offset {sn.l1_table_offset:#x} is not cluster aligned")
        return self.read_be64_array(sn.l1_table_offset, sn.l1_size, f"L1 table of snapshot {sn.id}")

    # ------------------------------------------------------------ bitmaps
    def bitmaps_extension(self) -> Optional[Any]:
        for e in self.extensions:
            if e.type == F.EXT_BITMAPS:
                if len(e.data) < F.BITMAPS_EXTENSION_SIZE:
                    raise self.bad("bitmaps extension too short")
                return F.BitmapsExtension.parse(e.data[: F.BITMAPS_EXTENSION_SIZE])
        return None

    def bitmaps(self) -> list[Bitmap]:
        if self._bitmaps is None:
            self._bitmaps = self._read_bitmaps()
        return self._bitmaps

    def _read_bitmaps(self) -> list[Bitmap]:
        bx = self.bitmaps_extension()
        if bx is None:
            return []
        if bx.nb_bitmaps > 65535:
            raise self.bad(f"too many persistent bitmaps ({bx.nb_bitmaps})")
        size = bx.bitmap_directory_size
        off0 = bx.bitmap_directory_offset
        if size > 1024 * 65535 * 64 or off0 + size > self.file_size:
            raise self.bad("bitmap directory is past the end of the file")
        raw = self.pread(off0, size, "bitmap directory")
        out: list[Bitmap] = []
        pos = 0
        for _ in range(bx.nb_bitmaps):
            if pos + F.BITMAP_DIR_ENTRY_HEADER_SIZE > size:
                raise self.bad("bitmap directory entry is past the end of the directory")
            bh = F.BitmapDirEntryHeader.parse(raw[pos : pos + F.BITMAP_DIR_ENTRY_HEADER_SIZE])
            npos = pos + F.BITMAP_DIR_ENTRY_HEADER_SIZE + bh.extra_data_size
            name = raw[npos : npos + bh.name_size]
            if npos + bh.name_size > size:
                raise self.bad("bitmap directory entry is past the end of the directory")
            out.append(
                Bitmap(
                    entry_offset=off0 + pos,
                    name=name.decode("utf-8", "replace"),
                    bitmap_table_offset=bh.bitmap_table_offset,
                    bitmap_table_size=bh.bitmap_table_size,
                    flags=bh.flags,
                    type=bh.type,
                    granularity_bits=bh.granularity_bits,
                    extra_data_size=bh.extra_data_size,
                )
            )
            pos = F.align_up(npos + bh.name_size, 8)
        return out

    def bitmap_table(self, bm: Bitmap) -> np.ndarray:
        if bm.bitmap_table_size > F.QCOW_MAX_L1_SIZE // 8:
            raise self.bad(f"bitmap {bm.name}: bitmap table too large")
        return self.read_be64_array(bm.bitmap_table_offset, bm.bitmap_table_size, f"bitmap table of {bm.name}")

    # ------------------------------------------------------------ iteration helpers
    def iter_l1_chunks(self, l1: np.ndarray, chunk: int = 256) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(first l1 index, L2 offsets, L2 tables) for chunks of allocated L1 entries (bounded memory)."""
        offs = l1 & np.uint64(F.L1E_OFFSET_MASK)
        idx = np.nonzero(offs)[0]
        for s in range(0, len(idx), chunk):
            sel = idx[s : s + chunk]
            yield sel, offs[sel], self.read_l2_tables(offs[sel])


def open_image(path: PathLike) -> Qcow2Image:
    """Open a qcow2 image read-only (validated header, extensions and table bounds)."""
    return Qcow2Image(path)
