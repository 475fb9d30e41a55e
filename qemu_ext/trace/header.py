"""The simpletrace v4 file header and record constants (QEMU's trace/simple.c, scripts/simpletrace.py).

Kept apart from the bulk decoder (qemu_ext.trace.simple, numpy and construct) so that the native
text renderer and format detection import nothing heavy. simple.py describes the same layout
as construct Structs.
"""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path
from typing import Union

from qemu_ext.errors import BadInputError, binary_file, empty_file, not_a_file, open_error

HEADER_EVENT_ID = 0xFFFFFFFFFFFFFFFF
HEADER_MAGIC = 0xF2B177CB0AA429B4
HEADER_VERSION = 4
DROPPED_EVENT_ID = 0xFFFFFFFFFFFFFFFE
RECORD_TYPE_MAPPING = 0
RECORD_TYPE_EVENT = 1
HEADER_LEN = 24  # TraceLogHeader: header_event_id, header_magic, header_version (u64 each)
EVENT_HEADER_LEN = 32  # record type word + TraceRecord header (event, timestamp_ns, length, pid)
MAX_NAME_LEN = 4096  # longer mapping names are taken for corruption

_HDR = struct.Struct("<QQQ")
_SIMPLE_MAGIC_PREFIX = struct.pack("<QQ", HEADER_EVENT_ID, HEADER_MAGIC)
_SIMPLE_MAGIC_PREFIX_BE = struct.pack(">QQ", HEADER_EVENT_ID, HEADER_MAGIC)


def looks_like_simpletrace(head: bytes) -> bool:
    return head[:16] in (_SIMPLE_MAGIC_PREFIX, _SIMPLE_MAGIC_PREFIX_BE)


def check_header(data: bytes, name: str) -> int:
    """Validate the TraceLogHeader at the start of data; return the version (4). One clear error otherwise.

    scripts/simpletrace.py read_trace_header (7.2, 10.0) accepts versions 0, 2, 3, 4 as known
    and decodes only 4.
    """
    if len(data) < HEADER_LEN:
        raise BadInputError(f"{name}: not a simpletrace file ({len(data)} bytes, shorter than its 24-byte header)")
    event_id, magic, version = _HDR.unpack_from(data, 0)
    if event_id != HEADER_EVENT_ID:
        raise BadInputError(f"{name}: not a simpletrace file (header id 0x{event_id:x}, expected 0x{HEADER_EVENT_ID:x})")
    if magic != HEADER_MAGIC:
        if magic == int.from_bytes(HEADER_MAGIC.to_bytes(8, "little"), "big"):
            raise BadInputError(f"{name}: a big-endian simpletrace file: only little-endian traces are supported")
        raise BadInputError(f"{name}: not a simpletrace file (header magic 0x{magic:x}, expected 0x{HEADER_MAGIC:x})")
    if version != HEADER_VERSION:
        if version in (0, 2, 3):
            raise BadInputError(
                f"{name}: simpletrace format version {version} is not supported (this QEMU writes and reads version 4)"
            )
        raise BadInputError(f"{name}: unknown simpletrace format version {version} (expected 4)")
    return int(version)


def open_trace(path: Union[str, os.PathLike]):
    """Open a trace file for reading: (binary file object, size). One line for each condition
    (CONTRIBUTING.md): cannot open (the OS's words, also for a directory), not a regular file, empty."""
    p = Path(path)
    try:
        # O_NONBLOCK: a FIFO without a writer must not hang the open (it is refused below)
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise open_error(p, exc) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise open_error(p, IsADirectoryError(21, os.strerror(21)))
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise not_a_file(p)
        os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    try:
        size = st.st_size if stat.S_ISREG(st.st_mode) else f.seek(0, os.SEEK_END)
        f.seek(0)
        if size == 0:
            raise empty_file(p)
    except BaseException:
        f.close()
        raise
    return f, size


def detect_format(path: Union[str, os.PathLike]) -> str:
    """``"simple"`` for a simpletrace binary file, ``"log"`` for log-backend text; BadInputError otherwise
    (CONTRIBUTING.md's wordings: cannot open, not a regular file, empty file, binary data)."""
    f, _size = open_trace(path)
    with f:
        try:
            head = f.read(4096)
        except OSError as exc:
            raise open_error(path, exc) from None
    if looks_like_simpletrace(head) or head[:8] == HEADER_EVENT_ID.to_bytes(8, "little"):
        return "simple"
    if b"\0" in head:
        raise binary_file(path, "trace file")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not merely a character cut at the 4 KiB boundary
            raise binary_file(path, "trace file") from None
    return "log"


def delta_text(d: int, qemu10: bool) -> str:
    """simpletrace.py's time step field for a step of d ns, where the two versions differ (steps of
    2**52 ns and more): 7.2 prints ``'%0.3f' % (d / 1000.0)`` (d made a float first, then divided),
    10.0 ``f'{d / 1000:0.3f}'`` (int true division: one rounding)."""
    return f"{d / 1000:0.3f}" if qemu10 else "%0.3f" % (d / 1000.0)
