"""A read-only qcow2 image, opened the way QEMU opens it.

``Qcow2Image(path, mode)`` follows block/qcow2.c qcow2_do_open() step by step (QEMU 7.2 and 10.0
agree on every rule here unless said otherwise): the header, the feature bits, the table limits
(qcow2_validate_table), the header extensions (qcow2_read_extensions), the backing file name, the
snapshot table (qcow2-snapshot.c qcow2_do_read_snapshots, snapshots.py) and the persistent
bitmaps (qcow2-bitmap.c qcow2_load_dirty_bitmaps, bitmaps.py). An image QEMU refuses to open is
refused with QEMU's reason (``OpenError``); one it opens is opened.

Like QEMU's file driver, bytes past the end of the file read as zeros, but nothing past the end is
materialised: tables are read up to the end of the file and the rest is known to be zeros, so
memory follows the file, not the header's fields. Large tables (L1, L2, refcount table and blocks)
are decoded with numpy.

The mode is what qemu-img opens the image for:
- ``INFO`` (qemu-img info: BDRV_O_NO_IO | BDRV_O_NO_BACKING) - the external data file is not
  opened and an encrypted image needs no key;
- ``CHECK`` (qemu-img check: BDRV_O_CHECK) - an empty refcount table is accepted and the snapshot
  table is left to the check (qcow2_check_read_snapshot_table);
- ``IO`` (map, convert, read) - everything, as for guest I/O.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np

from qemu_ext.errors import BadInputError, empty_file, not_a_file, open_error
from qemu_ext.qcow2 import format as F

PathLike = Union[str, os.PathLike]
# A progress-bar factory the front door may pass: (total, desc, unit=, unit_scale=) -> bar with
# update(n) and close() (qemu_ext.output.progress is one). The library never draws anything itself.
ProgressFactory = Callable[..., Any]

U64 = (1 << 64) - 1
INT64_MAX = (1 << 63) - 1
INT_MAX = (1 << 31) - 1
# bdrv_check_request(): no request may reach past BDRV_MAX_LENGTH (include/block/block_int-common.h)
BDRV_MAX_LENGTH = INT64_MAX & ~((1 << 30) - 1)


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


class OpenMode(Enum):
    INFO = "info"
    CHECK = "check"
    IO = "io"


class OpenError(BadInputError):
    """QEMU refuses to open the image: ``PATH: REASON`` with qemu-img's reason text."""

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.reason = reason


def c_hex(v: int) -> str:
    """printf's %#x: 0x1f, but 0 for zero (as QEMU's messages print offsets)."""
    return f"{v:#x}" if v else "0"


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
        d: dict[str, Any] = {"type": f"0x{self.type:08x}", "name": self.name, "offset": self.offset,
                             "length": self.length}
        if self.type in (F.EXT_BACKING_FORMAT, F.EXT_DATA_FILE):
            d["value"] = cstr(self.data)
        elif self.type == F.EXT_FEATURE_TABLE:
            d["features"] = [{"type": F.FEATURE_TYPES.get(t, str(t)), "bit": b, "name": n}
                             for t, b, n in decode_feature_table(self.data)]
        elif self.type == F.EXT_BITMAPS and len(self.data) >= F.BITMAPS_EXTENSION_SIZE:
            bx = F.BitmapsExtension.parse(self.data[: F.BITMAPS_EXTENSION_SIZE])
            d.update({"nb-bitmaps": bx.nb_bitmaps, "bitmap-directory-size": bx.bitmap_directory_size,
                      "bitmap-directory-offset": bx.bitmap_directory_offset})
        elif self.type == F.EXT_CRYPTO_HEADER and len(self.data) >= F.CRYPTO_HEADER_EXTENSION_SIZE:
            cx = F.CryptoHeaderExtension.parse(self.data[: F.CRYPTO_HEADER_EXTENSION_SIZE])
            d.update({"crypto-header-offset": cx.offset, "crypto-header-length": cx.length})
        else:
            d["data"] = self.data.hex()
        return d


def cstr(b: bytes) -> str:
    """A C string from a buffer: up to the first NUL (QEMU reads names into NUL-terminated strings)."""
    return b.split(b"\0", 1)[0].decode("utf-8", "replace")


def decode_feature_table(data: bytes) -> list[tuple[int, int, str]]:
    out = []
    for i in range(len(data) // F.FEATURE_NAME_ENTRY_SIZE):
        e = F.FeatureNameEntry.parse(data[i * F.FEATURE_NAME_ENTRY_SIZE : (i + 1) * F.FEATURE_NAME_ENTRY_SIZE])
        out.append((e.type, e.bit, cstr(e.name)))
    return out


@dataclass
class Features:
    """Feature bits with their names (from the feature name table when present)."""

    incompatible: list[str] = field(default_factory=list)
    compatible: list[str] = field(default_factory=list)
    autoclear: list[str] = field(default_factory=list)


def unsupported_features(data: Optional[bytes], mask: int) -> str:
    """report_unsupported_feature() (block/qcow2.c): the feature table's names of the unknown
    incompatible bits in table order (up to the first nameless entry), then the rest in hex."""
    names = []
    if data is not None:
        data += bytes(2 * F.FEATURE_NAME_ENTRY_SIZE)  # QEMU reads the table into a zeroed, longer buffer
        for i in range(len(data) // F.FEATURE_NAME_ENTRY_SIZE):
            e = data[i * F.FEATURE_NAME_ENTRY_SIZE : (i + 1) * F.FEATURE_NAME_ENTRY_SIZE]
            if e[2] == 0:
                break
            bit = 1 << (e[1] & 63)  # x86 shifts by the count modulo 64
            if e[0] == 0 and mask & bit:
                names.append(e[2:48].split(b"\0", 1)[0].decode("latin-1"))
                mask &= ~bit
    if mask:
        names.append(f"Unknown incompatible feature: {mask:x}")
    return "Unsupported qcow2 feature(s): " + ", ".join(names)


def open_child(path: str, owner: object) -> tuple[int, int]:
    """open_file() for a file QEMU opens as a child node (a backing file, an external data file), refused
    with file-posix's words (raw_open_common): a directory, FIFO or character device is not a
    regular file for the 'file' driver (block devices get the host_device driver)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise OpenError(owner, f"Could not open '{path}': {exc.strerror}") from None
    os.close(fd)
    try:
        return open_file(path)
    except BadInputError:
        raise OpenError(owner, f"'file' driver requires '{path}' to be a regular file") from None


def open_file(path: PathLike) -> tuple[int, int]:
    """(fd, length) of a regular file or block device opened read-only. A FIFO, socket or character
    device is refused at once: it is opened non-blocking (a FIFO without a writer would hang)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise open_error(path, exc) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise open_error(path, OSError(errno.EISDIR, os.strerror(errno.EISDIR)))
        if stat.S_ISBLK(st.st_mode):  # qcow2 on an LV or a disk: its size is where it ends
            length = os.lseek(fd, 0, os.SEEK_END)
        elif stat.S_ISREG(st.st_mode):
            length = st.st_size
        else:
            raise not_a_file(path)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd, length


class Qcow2Image:
    """A qcow2 image opened read-only (see the module docstring). Use as a context manager."""

    def __init__(self, path: PathLike, mode: OpenMode = OpenMode.IO, compat: tuple[int, int] = (10, 0)) -> None:
        self.path = Path(path)
        self.mode = mode
        self.compat = compat
        self._fd = -1
        self._fd, self.file_size = open_file(path)
        try:
            if self.file_size == 0:
                raise empty_file(path)
            self._do_open()
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

    def refuse(self, reason: str) -> OpenError:
        return OpenError(self.path, reason)

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
        """Read like QEMU's file driver does: bytes past the end of the file read as zeros.
        Only for short reads (headers, entries): tables use read_be64_prefix()."""
        if offset >= self.file_size:
            return bytes(length)
        data = os.pread(self._fd, min(length, self.file_size - offset), offset)
        return data + bytes(length - len(data))

    def read_be64_prefix(self, offset: int, count: int) -> np.ndarray:
        """The first entries of a table of count big-endian u64 at offset, up to the end of the file
        (the entries past it read as zeros in QEMU: they are left out, callers treat them as 0)."""
        n = max(0, min(count, (self.file_size - offset) // 8)) if offset < self.file_size else 0
        if not n:
            return np.zeros(0, dtype=np.uint64)
        raw = os.pread(self._fd, n * 8, offset)
        return np.frombuffer(raw[: len(raw) // 8 * 8], dtype=">u8").astype(np.uint64)

    def read_be64_array(self, offset: int, count: int, what: str) -> np.ndarray:
        raw = self.pread(offset, count * 8, what)
        return np.frombuffer(raw, dtype=">u8").astype(np.uint64)

    # ------------------------------------------------------------ qcow2_do_open()
    def _do_open(self) -> None:
        from qemu_ext.qcow2 import bitmaps, snapshots

        self._read_header()
        h = self.header
        cs = self.cluster_size
        if h.refcount_table_clusters == 0 and self.mode != OpenMode.CHECK:
            raise self.refuse("Image does not contain a reference count table")
        self.validate_table(h.refcount_table_offset, h.refcount_table_clusters, cs, F.QCOW_MAX_REFTABLE_SIZE,
                            "Reference count table")
        if self.mode != OpenMode.CHECK:
            # the total size of the snapshot table is checked when it is read
            self.validate_table(h.snapshots_offset, h.nb_snapshots, F.SNAPSHOT_HEADER_SIZE,
                                F.SNAPSHOT_HEADER_SIZE * F.QCOW_MAX_SNAPSHOTS, "Snapshot table")
        self.validate_table(h.l1_table_offset, h.l1_size, 8, F.QCOW_MAX_L1_SIZE, "Active L1 table")
        if self.l1_entries_needed(h.size) > INT_MAX:
            raise self.refuse("Image is too big")
        if h.l1_size < self.l1_entries_needed(h.size):
            raise self.refuse("L1 table is too small")
        self.extensions, _table = self._read_extensions(stop_on_error=False)
        ext = {e.type: e for e in self.extensions}
        self.backing_format: Optional[str] = (
            cstr(ext[F.EXT_BACKING_FORMAT].data) if F.EXT_BACKING_FORMAT in ext else None)
        self.data_file: Optional[str] = cstr(ext[F.EXT_DATA_FILE].data) if F.EXT_DATA_FILE in ext else None
        self.feature_table = decode_feature_table(ext[F.EXT_FEATURE_TABLE].data) if F.EXT_FEATURE_TABLE in ext else []
        self._check_data_file()
        self._check_crypto()
        self.backing_file: Optional[str] = None
        if h.backing_file_offset:
            n = h.backing_file_size
            if n > min(1023, cs - h.backing_file_offset) or n >= 4096:
                raise self.refuse("Backing file name too long")
            self.backing_file = cstr(self.pread_zero_padded(h.backing_file_offset, n)) or None
        # internal snapshots: skipped in check mode (the check reads them itself)
        self._snapshots: Optional[list[snapshots.Snapshot]] = None
        self._snapshot_table_size = 0
        if self.mode != OpenMode.CHECK:
            self._snapshots, self._snapshot_table_size = snapshots.read_snapshots(self)
        self._bitmaps = bitmaps.load_bitmaps(self)
        # bdrv_open_driver() -> bdrv_refresh_total_sectors(): the length in bytes must fit an int64
        if h.size // 512 > INT64_MAX // 512:
            raise self.refuse("Could not refresh total sector count: File too large")

    def _read_header(self) -> None:
        """The header part of qcow2_do_open(): the 112-byte QCowHeader (zeros past the end)."""
        head = self.pread_zero_padded(0, F.HEADER_V3_SIZE + 8)
        if head[:4] != F.QCOW_MAGIC:
            raise self.refuse("Image is not in qcow2 format")
        v2 = F.HeaderV2.parse(head[: F.HEADER_V2_SIZE])
        fields = {k: v for k, v in v2.items() if not k.startswith("_")}
        if v2.version < 2 or v2.version > 3:
            raise self.refuse(f"Unsupported qcow2 version {v2.version}")
        if v2.cluster_bits < F.MIN_CLUSTER_BITS or v2.cluster_bits > F.MAX_CLUSTER_BITS:
            raise self.refuse(f"Unsupported cluster size: 2^{v2.cluster_bits}")
        if v2.version == 3:
            tail = F.HeaderV3Tail.parse(head[F.HEADER_V2_SIZE : F.HEADER_V3_SIZE])
            fields.update({k: v for k, v in tail.items() if not k.startswith("_")})
            if tail.header_length < F.HEADER_V3_SIZE:
                raise self.refuse("qcow2 header too short")
        self.header = h = Header(**fields)
        cs = h.cluster_size
        if h.header_length > cs:
            raise self.refuse("qcow2 header exceeds cluster size")
        if h.backing_file_offset > cs:
            raise self.refuse("Invalid backing file offset")
        if h.header_length > F.COMPRESSION_TYPE_OFFSET:
            h.compression_type = head[F.COMPRESSION_TYPE_OFFSET]
        # validate_compression_type()
        if h.compression_type not in F.COMPRESSION_TYPES:
            raise self.refuse(f"qcow2: unknown compression type: {h.compression_type}")
        if h.compression_type == 0 and h.incompatible_features & F.INCOMPAT_COMPRESSION:
            raise self.refuse("qcow2: Compression type incompatible feature bit must not be set")
        if h.compression_type != 0 and not h.incompatible_features & F.INCOMPAT_COMPRESSION:
            raise self.refuse("qcow2: Compression type incompatible feature bit must be set")
        unknown = h.incompatible_features & ~F.INCOMPAT_KNOWN_MASK
        if unknown:
            _exts, table = self._read_extensions(stop_on_error=True)
            raise self.refuse(unsupported_features(table, unknown))
        if self.subcluster_size < 1 << F.MIN_CLUSTER_BITS:
            raise self.refuse(f"Unsupported subcluster size: {self.subcluster_size}")
        if h.refcount_order > 6:
            raise self.refuse("Reference count entry width too large; may not exceed 64 bits")

    def validate_table(self, offset: int, entries: int, entry_len: int, max_bytes: int, name: str) -> None:
        """qcow2_validate_table(): "NAME too large" / "NAME offset invalid" (also for empty tables)."""
        if entries > max_bytes // entry_len:
            raise self.refuse(f"{name} too large")
        if INT64_MAX - entries * entry_len < offset or offset % self.cluster_size:
            raise self.refuse(f"{name} offset invalid")

    def _read_extensions(self, stop_on_error: bool) -> tuple[list[Extension], Optional[bytes]]:
        """qcow2_read_extensions(): from the end of the header to the backing file name (or the end
        of the first cluster); returns the extensions and the feature name table's bytes. With
        stop_on_error (the unknown-feature path) errors end the scan instead of refusing."""
        h = self.header
        cs = self.cluster_size
        end = h.backing_file_offset if h.backing_file_offset else cs
        out: list[Extension] = []
        table: Optional[bytes] = None
        off = h.header_length
        while off < end:
            typ = int.from_bytes(self.pread_zero_padded(off, 4), "big")
            length = int.from_bytes(self.pread_zero_padded(off + 4, 4), "big")
            data_off = off + 8
            if data_off > end or length > end - data_off:
                if stop_on_error:
                    break
                raise self.refuse("Header extension too large")
            if typ == F.EXT_END:
                break
            data = self.pread_zero_padded(data_off, length)
            reason = self._extension_error(typ, length, data)
            if reason is not None:
                if stop_on_error:
                    break
                raise self.refuse(reason)
            if typ == F.EXT_FEATURE_TABLE:
                table = data
            out.append(Extension(typ, F.EXTENSION_NAMES.get(typ, "unknown"), off, length, data))
            off = data_off + F.align_up(length, 8)
        return out, table

    def _extension_error(self, typ: int, length: int, data: bytes) -> Optional[str]:
        """What qcow2_read_extensions() refuses in one extension (None: accepted)."""
        h = self.header
        if typ == F.EXT_BACKING_FORMAT and length >= 16:  # sizeof(bs->backing_format)
            return f"ERROR: ext_backing_format: len={length} too large (>=16)"
        if typ == F.EXT_CRYPTO_HEADER:
            if h.crypt_method != 2:
                return "CRYPTO header extension only expected with LUKS encryption method"
            if length != F.CRYPTO_HEADER_EXTENSION_SIZE:
                return f"CRYPTO header extension size {length}, but expected size {F.CRYPTO_HEADER_EXTENSION_SIZE}"
            cx = F.CryptoHeaderExtension.parse(data)
            if cx.offset % self.cluster_size:
                return f"Encryption header offset '{cx.offset}' is not a multiple of cluster size '{self.cluster_size}'"
            return self._luks_error(cx.offset, cx.length)
        if typ == F.EXT_BITMAPS:
            if length != F.BITMAPS_EXTENSION_SIZE:
                return "bitmaps_ext: Invalid extension length"
            if not h.autoclear_features & F.AUTOCLEAR_BITMAPS:
                return None  # written by a program without bitmap support: ignored (QEMU warns)
            if data[4:8] != bytes(4):
                return "bitmaps_ext: Reserved field is not zero"
            bx = F.BitmapsExtension.parse(data)
            if bx.nb_bitmaps > F.QCOW2_MAX_BITMAPS:
                return (f"bitmaps_ext: Image has {bx.nb_bitmaps} bitmaps, exceeding the QEMU supported maximum "
                        f"of {F.QCOW2_MAX_BITMAPS}")
            if bx.nb_bitmaps == 0:
                return "found bitmaps extension with zero bitmaps"
            if bx.bitmap_directory_offset % self.cluster_size:
                return "bitmaps_ext: invalid bitmap directory offset"
            if bx.bitmap_directory_size > F.QCOW2_MAX_BITMAP_DIRECTORY_SIZE:
                return (f"bitmaps_ext: bitmap directory size ({bx.bitmap_directory_size}) exceeds the maximum "
                        f"supported size ({F.QCOW2_MAX_BITMAP_DIRECTORY_SIZE})")
        return None

    def _luks_error(self, offset: int, length: int) -> Optional[str]:
        """The checks of QEMU's LUKS header reader (crypto/block-luks.c) that need no key: the header
        lies inside the extension's region and starts with LUKS version 1's magic."""
        if F.LUKS_HEADER_SIZE > length:
            return "Request for data outside of extension header"
        raw = self.pread_zero_padded(offset, F.LUKS_HEADER_SIZE)
        if raw[:6] != F.LUKS_MAGIC:
            return "Volume is not in LUKS format"
        version = int.from_bytes(raw[6:8], "big")
        if version != 1:
            return f"LUKS version {version} is not supported"
        return None

    def _check_data_file(self) -> None:
        """The external data file part of qcow2_do_open(): not opened for qemu-img info."""
        if self.mode == OpenMode.INFO:
            return
        if self.has_data_file:
            if self.data_file is None:
                raise self.refuse("'data-file' is required for this image")
            if self.mode == OpenMode.IO or self.mode == OpenMode.CHECK:
                self.data_file_path()  # opened by name, as QEMU does
        elif self.data_file_raw:
            raise self.refuse("data-file-raw requires a data file")

    def data_file_path(self) -> str:
        """The external data file: opened by the name in the image, relative to the current directory
        (QEMU opens it as a child node by that name), refused as QEMU refuses it."""
        name = self.data_file
        if name is None or not self.has_data_file:
            raise self.refuse("'data-file' is required for this image")
        if not name:
            raise self.refuse("The 'file' block driver requires a file name")
        fd, _length = open_child(name, self.path)
        os.close(fd)
        return name

    def _check_crypto(self) -> None:
        """The end of qcow2_do_open()'s crypto set-up: LUKS needs its header extension (QEMU 7.2
        lets qemu-img info through without it, 10.0 does not)."""
        m = self.header.crypt_method
        if not m or m == 1 or any(e.type == F.EXT_CRYPTO_HEADER for e in self.extensions):
            return
        if self.mode != OpenMode.INFO or self.compat >= (8, 0):
            raise self.refuse(f"Missing CRYPTO header for crypt method {m}")

    # ------------------------------------------------------------ geometry
    @property
    def cluster_bits(self) -> int:
        return self.header.cluster_bits

    @property
    def cluster_size(self) -> int:
        return self.header.cluster_size

    @property
    def virtual_size(self) -> int:
        """bs->total_sectors * 512: the header's size in whole sectors."""
        return self.header.size // 512 * 512

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
        """size_to_l1(): L1 entries for size bytes, in QEMU's unsigned 64-bit arithmetic."""
        shift = self.cluster_bits + (self.cluster_bits - (4 if self.extended_l2 else 3))
        return ((size + (1 << shift) - 1) & U64) >> shift

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

    # ------------------------------------------------------------ L1 / L2
    def l1_entries(self) -> np.ndarray:
        """Raw active L1 entries (numpy uint64) up to the end of the file; entries past it are 0."""
        h = self.header
        return self.read_be64_prefix(h.l1_table_offset, h.l1_size)

    def l2_table_offset(self, l1_index: int) -> int:
        """Host offset of the L2 table for l1_index (0 when unallocated or out of range)."""
        h = self.header
        if l1_index < 0 or l1_index >= h.l1_size:
            return 0
        raw = self.pread_zero_padded(h.l1_table_offset + 8 * l1_index, 8)
        return int.from_bytes(raw, "big") & F.L1E_OFFSET_MASK

    def read_l2_table(self, offset: int) -> np.ndarray:
        """One L2 table: uint64 array of shape (n,) or (n, 2) for extended L2 entries."""
        raw = self.pread(offset, self.cluster_size, "L2 table")
        a = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
        return a.reshape(-1, 2) if self.extended_l2 else a

    def read_l2_tables(self, offsets: np.ndarray, reuse: bool = False) -> np.ndarray:
        """Many L2 tables at once: rows of (n,) or (n, 2) entries.

        Like QEMU's file driver, bytes past the end of the file read as zeros (check reports such
        tables separately); offsets need not be aligned. Callers leave out tables that start past
        the end of the file (all zeros) instead of asking for them."""
        cs = self.cluster_size
        n = len(offsets)
        if reuse:  # one buffer for a whole scan (the previous result is overwritten)
            buf = getattr(self, "_l2buf", None)
            if buf is None or len(buf) != n * cs:
                buf = self._l2buf = bytearray(n * cs)
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
        if np.little_endian:
            a.byteswap(inplace=True)  # big endian on disk; one pass, no copy
        return a.reshape(n, -1, 2) if self.extended_l2 else a.reshape(n, -1)

    # ------------------------------------------------------------ refcounts
    def refcount_table(self) -> np.ndarray:
        """The refcount table up to the end of the file (entries past it are 0)."""
        h = self.header
        return self.read_be64_prefix(h.refcount_table_offset, h.refcount_table_clusters * self.cluster_size // 8)

    def decode_refcount_block(self, raw: bytes, narrow: bool = False) -> np.ndarray:
        """Refcounts of one block for refcount_bits 1..64: uint64, or (narrow) the smallest unsigned
        type that holds them (a 2 MiB block of 1-bit refcounts is 16 Mi entries)."""
        bits = self.refcount_bits
        if bits >= 8:
            dt = {8: ">u1", 16: ">u2", 32: ">u4", 64: ">u8"}[bits]
            a = np.frombuffer(raw, dtype=dt)
            return a.astype(a.dtype.newbyteorder("=")) if narrow else a.astype(np.uint64)
        # sub-byte widths: entry i lives in byte i*bits//8, bit 0 is the least significant bit
        b = np.frombuffer(raw, dtype=np.uint8)
        per = 8 // bits
        mask = np.uint8((1 << bits) - 1)
        shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
        out = ((b[:, None] >> shifts[None, :]) & mask).reshape(-1)
        return out if narrow else out.astype(np.uint64)

    def refcounts(self, rt: Optional[np.ndarray] = None, max_clusters: Optional[int] = None) -> np.ndarray:
        """Stored refcount of each cluster covered by the refcount table, up to max_clusters
        (default: the clusters of the file plus one). Blocks past EOF or unaligned read as 0."""
        if rt is None:
            rt = self.refcount_table()
        per = self.refcount_block_entries
        if max_clusters is None:
            max_clusters = self.file_size // self.cluster_size + 2
        rt = rt[: (max_clusters + per - 1) // per]
        offs = rt & np.uint64(F.RT_OFFSET_MASK)
        nz = np.nonzero(offs)[0]
        n = min((int(nz[-1]) + 1) * per, max_clusters) if len(nz) else 0
        out = np.zeros(n, dtype=np.uint64)
        cs = self.cluster_size
        for i in nz.tolist():
            off = int(offs[i])
            if off + cs > self.file_size or off % cs or i * per >= n:
                continue
            blk = self.decode_refcount_block(os.pread(self._fd, cs, off), narrow=True)
            out[i * per : min(n, (i + 1) * per)] = blk[: min(n, (i + 1) * per) - i * per]
        return out

    # ------------------------------------------------------------ snapshots
    def snapshots(self) -> list[Any]:
        """The internal snapshots (snapshots.Snapshot); in check mode they are read on first use."""
        if self._snapshots is None:
            from qemu_ext.qcow2 import snapshots

            self._snapshots, self._snapshot_table_size = snapshots.read_snapshots(self)
        return self._snapshots

    def snapshot_table_size(self) -> int:
        self.snapshots()
        return self._snapshot_table_size

    def snapshot_l1_entries(self, sn: Any) -> np.ndarray:
        """A snapshot's L1 table up to the end of the file (as QEMU loads it for convert -l)."""
        if sn.l1_size > F.QCOW_MAX_L1_SIZE // 8:
            raise self.refuse("Snapshot L1 table too large")
        if INT64_MAX - sn.l1_size * 8 < sn.l1_table_offset or sn.l1_table_offset % self.cluster_size:
            raise self.refuse("Snapshot L1 table offset invalid")
        return self.read_be64_prefix(sn.l1_table_offset, sn.l1_size)

    # ------------------------------------------------------------ bitmaps
    def bitmaps_extension(self) -> Optional[Any]:
        """The bitmaps extension QEMU uses (None when absent or ignored: no autoclear bit)."""
        if not self.header.autoclear_features & F.AUTOCLEAR_BITMAPS:
            return None
        for e in self.extensions:
            if e.type == F.EXT_BITMAPS:
                return F.BitmapsExtension.parse(e.data[: F.BITMAPS_EXTENSION_SIZE])
        return None

    def bitmaps(self) -> list[Any]:
        return self._bitmaps

    def bitmap_table(self, bm: Any) -> np.ndarray:
        """A bitmap's table up to the end of the file (entries past it are 0)."""
        return self.read_be64_prefix(bm.bitmap_table_offset, bm.bitmap_table_size)

    # ------------------------------------------------------------ iteration helpers
    def iter_l1_chunks(self, l1: np.ndarray, chunk: int = 256) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(L1 indexes, L2 offsets, L2 tables) for chunks of allocated L1 entries (bounded memory)."""
        offs = l1 & np.uint64(F.L1E_OFFSET_MASK)
        idx = np.nonzero(offs)[0]
        for s in range(0, len(idx), chunk):
            sel = idx[s : s + chunk]
            yield sel, offs[sel], self.read_l2_tables(offs[sel])


def open_image(path: PathLike, mode: OpenMode = OpenMode.IO, compat: tuple[int, int] = (10, 0)) -> Qcow2Image:
    """Open a qcow2 image read-only, as qemu-img opens it for ``mode`` (validated like qcow2_do_open)."""
    return Qcow2Image(path, mode, compat)
