"""simpletrace.py's text from a simpletrace file, rendered by a small C library (``_render.c``).

The library is compiled once with the system's C compiler (``$CC``, else ``cc``) into virtopt's
cache (``$VIRTOPT_CACHE`` or ``~/.cache/virtopt``, under ``native/``) and loaded with ctypes. Where
there is no compiler, or ``VIRTOPT_NATIVE=0``, or the trace has what the C side leaves to Python
(event ids beyond 65535, very many huge time steps), `decode_text` returns None and the caller
uses the numpy renderer (qemu_ext.trace.decode), which prints the same bytes.

This path imports neither numpy nor construct: decoding a trace to text starts in a few
milliseconds. The checks and their messages are the numpy decoder's (qemu_ext.trace.simple),
in the same order.
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys
from pathlib import Path
from typing import BinaryIO, Callable, Optional, Union

from qemu_ext.errors import BadInputError
from qemu_ext.trace.events import DROPPED_EVENT, EventsFile, TraceEvent
from qemu_ext.trace.header import HEADER_LEN, check_header, delta_text, open_trace

SRC = Path(__file__).with_name("_render.c")
NIDS = 65536
SLOW_CAP = 4096  # deltas Python formats itself; more than that: the numpy path
OUT_BYTES = 1 << 20  # text rendered per window

_MAP = struct.Struct("<QI")  # a mapping record's event id and name length, as vt_names packs them

ERR_MAPPING_LEN, ERR_MAPPING_NAME, ERR_EVENT_LEN, ERR_RECORD_TYPE, UNSUPPORTED = 1, 2, 3, 4, 5


class ScanOut(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in
                ("end", "truncated", "n_events", "n_map", "n_ids", "n_slow", "err", "err_off", "err_val",
                 "map_bytes")]


class Prog(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in ("name_off", "name_len", "nargs", "arg0", "label_total", "fixed_len")]


class Arg(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in ("is_str", "label_off", "label_len")]


class State(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("pos", "end", "prev_ts", "index", "slow_i", "started", "need")]


_LIB: Optional[ctypes.CDLL] = None
_TRIED = False


def _cache_dir() -> Path:
    return Path(os.environ.get("VIRTOPT_CACHE") or Path.home() / ".cache" / "virtopt") / "native"


def _compile(src: bytes, so: Path) -> bool:
    import shutil
    import subprocess
    import tempfile

    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return False
    so.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=so.name + ".", dir=so.parent)
    os.close(fd)
    try:
        cp = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", tmp, str(SRC)], capture_output=True, timeout=120)
        if cp.returncode != 0:
            if os.environ.get("VIRTOPT_DEBUG"):
                sys.stderr.write(cp.stderr.decode(errors="replace"))
            return False
        os.replace(tmp, so)  # atomic: a concurrent run loads either nothing or the whole library
        return True
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def library() -> Optional[ctypes.CDLL]:
    """The compiled renderer, compiling it on first use; None when it cannot be had here."""
    global _LIB, _TRIED
    if _TRIED:
        return _LIB
    _TRIED = True
    if os.environ.get("VIRTOPT_NATIVE") == "0":
        return None
    import zlib

    try:
        src = SRC.read_bytes()
        so = _cache_dir() / f"trace-render-{zlib.crc32(src):08x}-{os.uname().machine}.so"
        if not so.is_file() and not _compile(src, so):
            return None
        lib = ctypes.CDLL(str(so))
    except Exception as exc:  # compiling or loading failed in any way (no cc, timeout, read-only cache): numpy
        if os.environ.get("VIRTOPT_DEBUG"):
            sys.stderr.write(f"virtopt: native trace renderer unavailable: {exc}\n")
        return None
    P = ctypes.c_void_p
    u64 = ctypes.c_uint64
    lib.vt_map.argtypes = [ctypes.c_int, u64]
    lib.vt_map.restype = P
    lib.vt_unmap.argtypes = [P, u64]
    lib.vt_unmap.restype = None
    lib.vt_scan.argtypes = [P, u64, u64, ctypes.POINTER(ScanOut), P, u64, P, P, P, u64]
    lib.vt_scan.restype = ctypes.c_int
    lib.vt_names.argtypes = [P, P, u64, P]
    lib.vt_names.restype = u64
    lib.vt_index.argtypes = [P, u64, u64, P, P, u64]
    lib.vt_index.restype = None
    lib.vt_check.argtypes = [P, u64, u64, P, P, P, P]
    lib.vt_check.restype = None
    lib.vt_render.argtypes = [P, ctypes.POINTER(State), P, P, P, P, ctypes.c_uint32, P, P, P, u64, P, u64]
    lib.vt_render.restype = u64
    _LIB = lib
    return lib


class _Mapped:
    """The trace file mapped read-only by the library (or read into bytes when it cannot be mapped)."""

    def __init__(self, lib: ctypes.CDLL, f: BinaryIO, size: int) -> None:
        self.lib = lib
        self.size = size
        self.keep: Optional[bytes] = None
        self.mapped = lib.vt_map(f.fileno(), size)
        if not self.mapped:
            self.keep = f.read()
            self.size = len(self.keep)
        self.addr: int = self.mapped or ctypes.cast(ctypes.c_char_p(self.keep), ctypes.c_void_p).value or 0

    def bytes_at(self, off: int, n: int) -> bytes:
        return ctypes.string_at(self.addr + off, n)

    def close(self) -> None:
        if self.mapped:
            self.lib.vt_unmap(self.mapped, self.size)
            self.mapped = None


def _mismatch(path: str, ev: TraceEvent, off: int, data: _Mapped, events: EventsFile) -> BadInputError:
    ln = int.from_bytes(data.bytes_at(off + 24, 4), "little")
    return BadInputError(
        f"{path}: the '{ev.name}' record at offset {off} ({ln - 24} bytes of arguments) "
        f"does not match its declaration in {events.path}: wrong trace-events file for this trace?"
    )


class TextResult:
    def __init__(self, records: int, end_offset: int, truncated_bytes: int) -> None:
        self.records = records
        self.end_offset = end_offset
        self.truncated_bytes = truncated_bytes


def decode_text(
    path: Union[str, os.PathLike],
    choose_events: Callable[[list[str]], EventsFile],
    compat: Optional[str],
    write: Callable[[memoryview], object],
) -> Optional[TextResult]:
    """Write simpletrace.py's text for the trace at path through write(); None: use the numpy path.

    choose_events(mapping names) gives the events file (the one given, or the installed one that
    declares the trace's events); compat is "7.2"/"10.0" or None for the events file's own QEMU.
    """
    lib = library()
    if lib is None:
        return None
    name = str(path)
    f, size = open_trace(path)
    try:
        check_header(f.read(HEADER_LEN), name)
        f.seek(0)
        data = _Mapped(lib, f, size)
    finally:
        f.close()
    try:
        return _decode(lib, data, name, choose_events, compat, write)
    finally:
        data.close()


def _decode(lib, data: _Mapped, name: str, choose_events, compat, write) -> Optional[TextResult]:
    from qemu_ext.trace.events import qemu_series

    scan = _scan(lib, data.addr, data.size, name, SLOW_CAP)
    if scan is None:
        return None
    so, mapping, first_off, ids, slow = scan
    events = choose_events(list(dict.fromkeys(mapping.values())))
    series = compat or qemu_series(events)

    # kinds in the numpy decoder's order (ascending event id, dropped last): same first error
    slots = sorted(ids[i] for i in range(int(so.n_ids)))
    prog_of = (ctypes.c_int32 * (NIDS + 1))()
    ctypes.memset(prog_of, 0xFF, ctypes.sizeof(prog_of))  # -1: no event of that id in the trace
    progs = (Prog * max(1, len(slots)))()
    arg_list: list[Arg] = []
    blob = bytearray()
    kinds: list[Optional[TraceEvent]] = []
    problems: list[Optional[BadInputError]] = []
    for k, slot in enumerate(slots):
        ev: Optional[TraceEvent] = None
        problem: Optional[BadInputError] = None
        if slot == NIDS:
            ev = DROPPED_EVENT
        else:
            nm = mapping.get(slot)
            if nm is None:
                problem = BadInputError(
                    f"{name}: the event record at offset {first_off[slot]} has event id {slot}, "
                    "which no mapping record names: corrupt trace"
                )
            else:
                ev = events.get(nm)
                if ev is None:
                    problem = BadInputError(
                        f"{name}: event '{nm}' is in the trace but not in {events.path}: "
                        "use the trace-events-all of the QEMU that wrote it (--events FILE)"
                    )
        kinds.append(ev)
        problems.append(problem)
        prog_of[slot] = k
        p = progs[k]
        p.name_off, p.name_len = len(blob), 0
        if ev is None:
            continue
        p.name_len = len(ev.name) + 1
        blob += ev.name.encode("ascii") + b" "
        p.nargs, p.arg0 = len(ev.args), len(arg_list)
        total = 0
        for a in ev.args:
            label = f" {a.name}=".encode() if a.is_string else f" {a.name}=0x".encode()
            arg_list.append(Arg(1 if a.is_string else 0, len(blob), len(label)))
            blob += label
            total += len(label)
        p.label_total = total
        p.fixed_len = 0 if ev.has_strings else 24 + 8 * len(ev.args)
    args = (Arg * max(1, len(arg_list)))(*arg_list)
    blob_c = ctypes.create_string_buffer(bytes(blob), len(blob) + 32)  # padded: the C side copies 16 bytes at a time
    bad = (ctypes.c_uint64 * max(1, len(slots)))()
    lib.vt_check(data.addr, HEADER_LEN, so.end, prog_of, progs, args, bad)
    # the numpy decoder's order (simple._resolve, then the string-carrying events when their
    # arguments are read): per kind its mapping, its declaration, its record size; then strings
    for k, ev in enumerate(kinds):
        if problems[k] is not None:
            raise problems[k]  # type: ignore[misc]
        assert ev is not None
        if bad[k] and not ev.has_strings:
            raise _mismatch(name, ev, int(bad[k]), data, events)
    for k, ev in enumerate(kinds):
        if bad[k] and ev is not None and ev.has_strings:
            raise _mismatch(name, ev, int(bad[k]), data, events)

    qemu10 = series != "7.2"
    n_slow = int(so.n_slow)
    slow_idx = (ctypes.c_uint64 * max(1, n_slow))()
    texts = bytearray()
    offs = [0]
    for i in range(n_slow):
        slow_idx[i] = slow[3 * i]
        d = int(slow[3 * i + 1]) - int(slow[3 * i + 2])
        texts += delta_text(d, qemu10).encode()  # Python's float formatting, as that simpletrace.py
        offs.append(len(texts))
    slow_off = (ctypes.c_uint32 * len(offs))(*offs)
    slow_txt = ctypes.create_string_buffer(bytes(texts), max(1, len(texts)))

    st = State(pos=HEADER_LEN, end=so.end)
    cap = OUT_BYTES
    out = ctypes.create_string_buffer(cap)
    while st.pos < st.end:
        n = lib.vt_render(data.addr, ctypes.byref(st), prog_of, progs, args, blob_c, qemu10,
                          slow_idx, slow_off, slow_txt, n_slow, out, cap)
        if n == 0 and st.need == (1 << 64) - 1:
            raise BadInputError(f"{name}: the file changed while it was read (a QEMU still writing it?): decode it again")
        if n == 0 and st.need:
            cap = int(st.need)
            out = ctypes.create_string_buffer(cap)
            continue
        write(memoryview(out).cast("B")[:n])
    return TextResult(int(so.n_events), int(so.end), data.size - int(so.end))


def _scan(lib, addr: int, size: int, name: str, slow_cap: int):
    """vt_scan of the file at addr: (ScanOut, mapping, first_off, ids, slow), None where the numpy
    decoder must do it (an event id beyond 65535, too many huge time steps). The numpy scanner's
    messages for a corrupt file (qemu_ext.trace.simple._Scanner)."""
    so = ScanOut()
    map_cap = 1 << 14
    while True:
        map_off = (ctypes.c_uint64 * map_cap)()
        first_off = (ctypes.c_uint64 * (NIDS + 1))()
        ids = (ctypes.c_uint64 * (NIDS + 1))()
        slow = (ctypes.c_uint64 * max(1, 3 * slow_cap))()
        rc = lib.vt_scan(addr, size, HEADER_LEN, ctypes.byref(so), map_off, map_cap, first_off, ids, slow, slow_cap)
        if rc == 0 and so.n_map > map_cap:
            map_cap = int(so.n_map)
            continue
        break
    if rc != 0:
        off = int(so.err_off)
        if so.err == UNSUPPORTED:
            return None
        if so.err == ERR_MAPPING_LEN:
            raise BadInputError(f"{name}: mapping record at offset {off} names an event of {so.err_val} bytes: corrupt trace")
        if so.err == ERR_MAPPING_NAME:
            ln = int.from_bytes(ctypes.string_at(addr + off + 16, 4), "little")
            raw = ctypes.string_at(addr + off + 20, min(ln, 64))
            raise BadInputError(f"{name}: mapping record at offset {off} has a bad event name {raw[:40]!r}: corrupt trace")
        if so.err == ERR_EVENT_LEN:
            raise BadInputError(f"{name}: event record at offset {off} has length {so.err_val} (< 24): corrupt trace")
        raise BadInputError(
            f"{name}: record at offset {off} has type {so.err_val} (0 mapping or 1 event expected): corrupt trace"
        )
    mapping: dict[int, str] = {}
    n_map = int(so.n_map)
    packed = ctypes.create_string_buffer(max(1, int(so.map_bytes)))
    n_packed = lib.vt_names(addr, map_off, n_map, packed)
    raw = packed.raw[:n_packed]
    pos = 0
    for _ in range(n_map):
        eid, ln = _MAP.unpack_from(raw, pos)
        mapping[eid] = raw[pos + 12 : pos + 12 + ln].decode("ascii")  # vt_scan checked: an identifier
        pos += 12 + ln
    return so, mapping, first_off, ids, slow


def index(data, name: str):
    """The numpy decoder's index of a simpletrace file held in data (bytes or an mmap), found by the
    C scanner: (mapping, offsets int64[n], header words uint64[n, 4], end offset, truncated-at or
    None); None where the library cannot be had (the numpy scanner does it then)."""
    lib = library()
    if lib is None:
        return None
    import numpy as np

    u8 = np.frombuffer(data, np.uint8)
    addr = u8.ctypes.data
    scan = _scan(lib, addr, len(u8), name, 0)
    if scan is None:
        return None
    so, mapping = scan[0], scan[1]
    n = int(so.n_events)
    offsets = np.empty(n, np.int64)
    hdr = np.empty((n, 4), np.uint64)
    lib.vt_index(addr, HEADER_LEN, so.end, offsets.ctypes.data, hdr.ctypes.data, n)
    return mapping, offsets, hdr, int(so.end), (int(so.end) if so.truncated else None)
