"""The simple trace backend's binary files (simpletrace v4), described with construct, decoded in bulk with numpy.

The writer is QEMU's trace/simple.c, the reader scripts/simpletrace.py. A file is::

    TraceLogHeader   u64 header_event_id (~0), u64 magic 0xf2b177cb0aa429b4, u64 version (4)
    then records, each introduced by a u64 record type:
    0 mapping        u64 event_id, u32 len, char name[len]
    1 event          u64 event_id, u64 timestamp_ns, u32 length (header + arguments), u32 pid,
                     arguments: u64 each, or for strings u32 len + bytes
                     event_id ~0-1 is "dropped" with one u64 argument num_events_dropped

All numbers are in the writer's byte order (little-endian on x86). The construct
structs below describe the format and parse the header and mapping records; event
records are located and decoded in bulk with numpy, since there can be millions.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Union

import construct as cs
import numpy as np

from qemu_ext.errors import BadInputError
from qemu_ext.trace.events import EventArg, EventsFile, TraceEvent, get_events
from qemu_ext.trace.records import DROPPED, ArgValue, TraceRecord

HEADER_EVENT_ID = 0xFFFFFFFFFFFFFFFF
HEADER_MAGIC = 0xF2B177CB0AA429B4
HEADER_VERSION = 4
DROPPED_EVENT_ID = 0xFFFFFFFFFFFFFFFE
RECORD_TYPE_MAPPING = 0
RECORD_TYPE_EVENT = 1
MAX_TRACE_STRLEN = 512  # trace/simple.h: strings are cut to this length by the writer

# --- the format, as construct structs -------------------------------------------------------------

TraceLogHeader = cs.Struct(
    "header_event_id" / cs.Int64ul,
    "header_magic" / cs.Int64ul,
    "header_version" / cs.Int64ul,
)

MappingRecord = cs.Struct(
    "type" / cs.Const(RECORD_TYPE_MAPPING, cs.Int64ul),
    "event_id" / cs.Int64ul,
    "len" / cs.Int32ul,
    "name" / cs.Bytes(cs.this.len),
)

EventRecordHeader = cs.Struct(
    "type" / cs.Const(RECORD_TYPE_EVENT, cs.Int64ul),
    "event" / cs.Int64ul,
    "timestamp_ns" / cs.Int64ul,
    "length" / cs.Int32ul,  # bytes of this header (24, without the type word) plus the arguments
    "pid" / cs.Int32ul,
)

StringArg = cs.Prefixed(cs.Int32ul, cs.GreedyBytes)

DroppedRecord = cs.Struct(
    "type" / cs.Const(RECORD_TYPE_EVENT, cs.Int64ul),
    "event" / cs.Const(DROPPED_EVENT_ID, cs.Int64ul),
    "timestamp_ns" / cs.Int64ul,
    "length" / cs.Const(32, cs.Int32ul),
    "pid" / cs.Int32ul,
    "num_events_dropped" / cs.Int64ul,
)


def event_record_struct(ev: TraceEvent) -> cs.Struct:
    """The construct struct of one event's records (header + its declared arguments)."""
    fields = [a.name / (StringArg if a.is_string else cs.Int64ul) for a in ev.args]
    return cs.Struct("header" / EventRecordHeader, "args" / cs.Struct(*fields))


TraceHeaderLen = TraceLogHeader.sizeof()  # 24
EVENT_HEADER_LEN = 32  # type word + TraceRecord header

# simpletrace.py's stand-in for dropped records
DROPPED_EVENT = TraceEvent("Dropped_Event", [EventArg("uint64_t", "num_events_dropped")], "", [], 0, "simpletrace.py")


def is_signed_type(ctype: str) -> bool:
    t = ctype.replace("const", "").strip()
    if "*" in t:
        return False
    if "unsigned" in t or t.startswith("uint") or t in ("size_t", "bool", "uintptr_t"):
        return False
    return True


_SIMPLE_MAGIC_PREFIX = struct.pack("<QQ", HEADER_EVENT_ID, HEADER_MAGIC)


def looks_like_simpletrace(head: bytes) -> bool:
    return head[:16] == _SIMPLE_MAGIC_PREFIX or head[:16] == struct.pack(">QQ", HEADER_EVENT_ID, HEADER_MAGIC)


def check_header(data: bytes, name: str) -> int:
    """Validate the TraceLogHeader; return the version (4). One clear error otherwise."""
    if len(data) < TraceHeaderLen:
        raise BadInputError(f"{name}: not a simpletrace file ({len(data)} bytes, shorter than its 24-byte header)")
    h = TraceLogHeader.parse(data[:TraceHeaderLen])
    if h.header_event_id != HEADER_EVENT_ID:
        raise BadInputError(f"{name}: not a simpletrace file (header id 0x{h.header_event_id:x}, expected 0x{HEADER_EVENT_ID:x})")
    if h.header_magic != HEADER_MAGIC:
        if h.header_magic == int.from_bytes(HEADER_MAGIC.to_bytes(8, "little"), "big"):
            raise BadInputError(f"{name}: a big-endian simpletrace file: only little-endian traces are supported")
        raise BadInputError(f"{name}: not a simpletrace file (header magic 0x{h.header_magic:x}, expected 0x{HEADER_MAGIC:x})")
    if h.header_version != HEADER_VERSION:
        if h.header_version in (0, 2, 3):
            raise BadInputError(
                f"{name}: simpletrace format version {h.header_version} is not supported (this QEMU writes and reads version 4)"
            )
        raise BadInputError(f"{name}: unknown simpletrace format version {h.header_version} (expected 4)")
    return int(h.header_version)


# --- the decoded file -----------------------------------------------------------------------------


@dataclass
class SimpleTrace:
    """A decoded simpletrace file: one entry per event record (dropped records included), in file order."""

    path: str
    size: int
    version: int
    mapping: dict[int, str]  # event id -> event name, from the mapping records
    events: EventsFile
    offsets: np.ndarray  # int64: file offset of each record (its type word)
    event_ids: np.ndarray  # uint64
    timestamps: np.ndarray  # uint64, ns of QEMU's monotonic clock
    pids: np.ndarray  # uint32
    lengths: np.ndarray  # uint32, the record's length field
    end_offset: int  # where the last complete record ends
    truncated_bytes: int  # bytes after end_offset that do not form a complete record
    data: bytes = field(repr=False, default=b"")
    # filled by _resolve():
    codes: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, np.int32))  # index into kinds
    kinds: list[int] = field(default_factory=list)  # distinct event ids, in order of codes
    string_args: dict[int, tuple] = field(repr=False, default_factory=dict)  # record index -> raw args

    def __len__(self) -> int:
        return len(self.offsets)

    # ---- per-kind information
    def kind_name(self, k: int) -> str:
        eid = self.kinds[k]
        return DROPPED if eid == DROPPED_EVENT_ID else self.mapping[eid]

    def kind_event(self, k: int) -> TraceEvent:
        eid = self.kinds[k]
        return DROPPED_EVENT if eid == DROPPED_EVENT_ID else self.events[self.mapping[eid]]

    def kind_rows(self, k: int) -> np.ndarray:
        return np.flatnonzero(self.codes == k)

    def raw_args(self, rows: np.ndarray, nargs: int) -> np.ndarray:
        """(len(rows), nargs) uint64 matrix of the argument words of records without strings."""
        if nargs == 0 or len(rows) == 0:
            return np.zeros((len(rows), nargs), np.uint64)
        base = self.offsets[rows]
        out = np.empty((len(rows), nargs), np.uint64)
        for i in range(nargs):
            out[:, i] = _u64_at(self, base + (EVENT_HEADER_LEN + 8 * i))
        return out

    @property
    def dropped_events(self) -> int:
        """Sum of num_events_dropped over the dropped records."""
        if DROPPED_EVENT_ID not in self.kinds:
            return 0
        k = self.kinds.index(DROPPED_EVENT_ID)
        rows = self.kind_rows(k)
        return int(self.raw_args(rows, 1).sum())

    def records(self) -> Iterator[TraceRecord]:
        """TraceRecords in file order (Python objects: for convenience, not for millions of records)."""
        kinds_ev = [self.kind_event(k) for k in range(len(self.kinds))]
        names = [self.kind_name(k) for k in range(len(self.kinds))]
        signed = [[is_signed_type(a.type) for a in ev.args] for ev in kinds_ev]
        # numeric args for all records, chunked per kind
        cache: dict[int, np.ndarray] = {}
        pos_in_kind = np.zeros(len(self), np.int64)
        for k, ev in enumerate(kinds_ev):
            rows = self.kind_rows(k)
            pos_in_kind[rows] = np.arange(len(rows))
            if not ev.has_strings:
                cache[k] = self.raw_args(rows, len(ev.args))
        codes = self.codes.tolist()
        ts = self.timestamps.tolist()
        pids = self.pids.tolist()
        pik = pos_in_kind.tolist()
        for i, k in enumerate(codes):
            ev = kinds_ev[k]
            if ev.has_strings:
                vals: list = list(self.string_args[i])
            else:
                vals = cache[k][pik[i]].tolist()
            args: dict[str, ArgValue] = {}
            for a, v, sg in zip(ev.args, vals, signed[k]):
                if isinstance(v, bytes):
                    args[a.name] = v.decode("utf-8", "backslashreplace")
                else:
                    args[a.name] = v - (1 << 64) if sg and v >= (1 << 63) else v
            yield TraceRecord(names[k], args, ts[i], pids[i])

    def columns(self, names: Optional[set[str]] = None) -> dict[str, dict[str, np.ndarray]]:
        """Per event name: numpy arrays ``index`` (record number), ``timestamp_ns``, ``pid`` and one per argument.

        Integer arguments are uint64, or int64 for signed C types; string arguments are object arrays of str.
        """
        out: dict[str, dict[str, np.ndarray]] = {}
        for k in range(len(self.kinds)):
            name = self.kind_name(k)
            if names is not None and name not in names:
                continue
            ev = self.kind_event(k)
            rows = self.kind_rows(k)
            cols: dict[str, np.ndarray] = {
                "index": rows.astype(np.int64),
                "timestamp_ns": self.timestamps[rows].astype(np.int64),
                "pid": self.pids[rows].astype(np.int64),
            }
            if ev.has_strings:
                for j, a in enumerate(ev.args):
                    vals = [self.string_args[int(r)][j] for r in rows]
                    if a.is_string:
                        cols[a.name] = np.array([v.decode("utf-8", "backslashreplace") for v in vals], dtype=object)
                    else:
                        arr = np.array(vals, dtype=np.uint64)
                        cols[a.name] = arr.view(np.int64) if is_signed_type(a.type) else arr
            else:
                m = self.raw_args(rows, len(ev.args))
                for j, a in enumerate(ev.args):
                    col = np.ascontiguousarray(m[:, j])
                    cols[a.name] = col.view(np.int64) if is_signed_type(a.type) else col
            out[name] = cols
        return out


# --- bulk location of the records -----------------------------------------------------------------


def _u64_view(data: bytes, phase: int, cache: dict[int, np.ndarray]) -> np.ndarray:
    v = cache.get(phase)
    if v is None:
        n = (len(data) - phase) // 8
        v = np.frombuffer(data, dtype="<u8", count=max(n, 0), offset=phase) if n > 0 else np.zeros(0, "<u8")
        cache[phase] = v
    return v


def _u64_at(st: SimpleTrace, pos: np.ndarray) -> np.ndarray:
    """The little-endian u64 at each byte offset in pos (all in the file)."""
    cache = st.__dict__.setdefault("_views", {})
    pos = np.asarray(pos, dtype=np.int64)
    if len(pos) == 0:
        return np.zeros(0, np.uint64)
    ph = pos & 7
    p0 = int(ph[0])
    if not np.any(ph != p0):
        return _u64_view(st.data, p0, cache)[(pos - p0) >> 3]
    out = np.empty(len(pos), np.uint64)
    for p in np.unique(ph).tolist():
        m = ph == p
        out[m] = _u64_view(st.data, p, cache)[(pos[m] - p) >> 3]
    return out


_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_MAP_HDR = struct.Struct("<QQI")
_EV_HDR = struct.Struct("<QQQII")


class _Scanner:
    """Finds every record of a file: a vectorized pass over runs of 8-byte-aligned event records,
    a plain walk over everything else (mapping records, strings, a truncated tail)."""

    def __init__(self, data: bytes, name: str) -> None:
        self.data = data
        self.name = name
        self.size = len(data)
        self.views: dict[int, np.ndarray] = {}
        self.mapping: dict[int, str] = {}
        self.chunks: list[np.ndarray] = []
        self.singles: list[int] = []
        self.truncated_at: Optional[int] = None

    def _flush_singles(self) -> None:
        if self.singles:
            self.chunks.append(np.array(self.singles, dtype=np.int64))
            self.singles = []

    def _walk_one(self, pos: int) -> Optional[int]:
        """Decode the record at pos; return the next position, or None at a truncated tail."""
        data, size = self.data, self.size
        rem = size - pos
        if rem < 8:
            return None
        (rtype,) = _U64.unpack_from(data, pos)
        if rtype == RECORD_TYPE_MAPPING:
            if rem < 20:
                return None
            _, eid, ln = _MAP_HDR.unpack_from(data, pos)
            if ln > 4096:
                raise BadInputError(
                    f"{self.name}: mapping record at offset {pos} names an event of {ln} bytes: corrupt trace"
                )
            if ln > rem - 20:
                return None
            raw = data[pos + 20 : pos + 20 + ln]
            try:
                nm = raw.decode("ascii")
            except UnicodeDecodeError:
                nm = ""
            if not nm.isidentifier():
                raise BadInputError(f"{self.name}: mapping record at offset {pos} has a bad event name {raw[:40]!r}: corrupt trace")
            self.mapping[eid] = nm
            return pos + 20 + ln
        if rtype == RECORD_TYPE_EVENT:
            if rem < EVENT_HEADER_LEN:
                return None
            _, _eid, _ts, ln, _pid = _EV_HDR.unpack_from(data, pos)
            if ln < 24:
                raise BadInputError(f"{self.name}: event record at offset {pos} has length {ln} (< 24): corrupt trace")
            if ln > rem - 8:
                return None
            self.singles.append(pos)
            return pos + 8 + ln
        raise BadInputError(
            f"{self.name}: record at offset {pos} has type {rtype} (0 mapping or 1 event expected): corrupt trace"
        )

    def _fast(self, pos: int, window: int) -> tuple[int, int]:
        """Vectorized run of event records from pos (an event record). Returns (next pos, count)."""
        ph = pos & 7
        w = _u64_view(self.data, ph, self.views)
        j0 = (pos - ph) >> 3
        seg = w[j0 : j0 + window + 3]
        if len(seg) < 4:
            return pos, 0
        hdr = seg[3:]
        typ = seg[: len(hdr)]
        pid0 = int(hdr[0]) >> 32
        lens = hdr & np.uint64(0xFFFFFFFF)
        cand = (typ == 1) & ((hdr >> np.uint64(32)) == np.uint64(pid0)) & (lens >= 24) & ((lens & np.uint64(7)) == 0)
        js = np.flatnonzero(cand)
        if len(js) == 0 or js[0] != 0:
            return pos, 0
        c = pos + 8 * js.astype(np.int64)
        nxt = c + 8 + lens[js].astype(np.int64)
        bad = np.flatnonzero(c[1:] != nxt[:-1])
        k = int(bad[0]) + 1 if len(bad) else len(c)  # c[:k] is a proven chain
        # drop records that run past the end of the file (truncated tail)
        if nxt[k - 1] > self.size:
            k = int(np.searchsorted(nxt[:k], self.size, side="right"))
        if k == 0:
            return pos, 0
        self._flush_singles()
        self.chunks.append(c[:k])
        return int(nxt[k - 1]), k

    def scan(self, start: int) -> int:
        pos = start
        size = self.size
        window = 1 << 18
        walked = 0
        while pos < size:
            if size - pos >= EVENT_HEADER_LEN and _U64.unpack_from(self.data, pos)[0] == RECORD_TYPE_EVENT and walked == 0:
                npos, n = self._fast(pos, window)
                if n:
                    pos = npos
                    window = min(window * 2, 1 << 24) if n > window // 8 else window
                    continue
                walked = 64  # the vectorized pass found nothing here: walk a little before trying again
                window = 1 << 12
            nxt = self._walk_one(pos)
            if nxt is None:
                self.truncated_at = pos
                break
            pos = nxt
            if walked:
                walked -= 1
        self._flush_singles()
        return pos


def _read_file(path: Union[str, os.PathLike]) -> tuple[str, bytes]:
    p = Path(path)
    try:
        if p.is_dir():
            raise BadInputError(f"{p}: is a directory, not a trace file")
        data = p.read_bytes()
    except OSError as exc:
        raise BadInputError(f"cannot read {p}: {exc.strerror or exc}") from None
    return str(p), data


def decode_simple(
    path: Union[str, os.PathLike], events_file: Union[str, os.PathLike, EventsFile, None] = None, data: Optional[bytes] = None
) -> SimpleTrace:
    """Decode a simpletrace v4 file. Raises BadInputError with one clear line for anything wrong.

    A truncated tail is not an error: every complete record is decoded and
    ``truncated_bytes`` says how many bytes were left over.
    """
    if data is None:
        name, data = _read_file(path)
    else:
        name = str(path)
    version = check_header(data, name)
    events = get_events(events_file)
    sc = _Scanner(data, name)
    end = sc.scan(TraceHeaderLen)
    offsets = np.concatenate(sc.chunks) if sc.chunks else np.zeros(0, np.int64)
    st = SimpleTrace(
        path=name,
        size=len(data),
        version=version,
        mapping=sc.mapping,
        events=events,
        offsets=offsets,
        event_ids=np.zeros(0, np.uint64),
        timestamps=np.zeros(0, np.uint64),
        pids=np.zeros(0, np.uint32),
        lengths=np.zeros(0, np.uint32),
        end_offset=end if sc.truncated_at is None else sc.truncated_at,
        truncated_bytes=0 if sc.truncated_at is None else len(data) - sc.truncated_at,
        data=data,
    )
    st.event_ids = _u64_at(st, offsets + 8)
    st.timestamps = _u64_at(st, offsets + 16)
    lw = _u64_at(st, offsets + 24)
    st.lengths = (lw & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    st.pids = (lw >> np.uint64(32)).astype(np.uint32)
    _resolve(st)
    return st


def _resolve(st: SimpleTrace) -> None:
    """Map event ids to kinds, check them against the mapping and trace-events, decode string arguments."""
    ids = st.event_ids
    n = len(ids)
    if n == 0:
        st.codes = np.zeros(0, np.int32)
        st.kinds = []
        return
    is_drop = ids == np.uint64(DROPPED_EVENT_ID)
    small = np.where(is_drop, np.uint64(0), ids)
    mx = int(small.max())
    if mx < (1 << 22):
        present = np.bincount(small[~is_drop].astype(np.int64), minlength=mx + 1) if (~is_drop).any() else np.zeros(mx + 1, np.int64)
        uniq = np.flatnonzero(present).tolist()
        lut = np.full(mx + 2, -1, np.int32)
        lut[uniq] = np.arange(len(uniq), dtype=np.int32)
        kinds = [int(u) for u in uniq]
        if is_drop.any():
            lut[mx + 1] = len(kinds)
            kinds.append(DROPPED_EVENT_ID)
            idx = np.where(is_drop, mx + 1, small.astype(np.int64))
        else:
            idx = small.astype(np.int64)
        codes = lut[idx]
    else:
        u, inv = np.unique(ids, return_inverse=True)
        kinds = [int(x) for x in u]
        codes = inv.astype(np.int32)
    st.codes = codes
    st.kinds = kinds
    for k, eid in enumerate(kinds):
        rows = None
        if eid == DROPPED_EVENT_ID:
            ev = DROPPED_EVENT
        else:
            nm = st.mapping.get(eid)
            if nm is None:
                rows = st.kind_rows(k)
                raise BadInputError(
                    f"{st.path}: the event record at offset {int(st.offsets[rows[0]])} has event id {eid}, "
                    "which no mapping record names: corrupt trace"
                )
            ev0 = st.events.get(nm)
            if ev0 is None:
                raise BadInputError(
                    f"{st.path}: event '{nm}' is in the trace but not in {st.events.path}: "
                    "use the trace-events-all of the QEMU that wrote it (--events FILE)"
                )
            ev = ev0
        size = ev.simple_size()
        if rows is None:
            rows = st.kind_rows(k)
        if size is not None:
            bad = np.flatnonzero(st.lengths[rows] != 24 + size)
            if len(bad):
                r = int(rows[bad[0]])
                raise BadInputError(
                    f"{st.path}: the '{ev.name}' record at offset {int(st.offsets[r])} has {int(st.lengths[r]) - 24} bytes "
                    f"of arguments but {st.events.path} declares {size}: wrong trace-events file for this trace?"
                )
        else:
            _decode_strings(st, ev, rows)


def _decode_strings(st: SimpleTrace, ev: TraceEvent, rows: np.ndarray) -> None:
    data = st.data
    for r in rows.tolist():
        off = int(st.offsets[r])
        end = off + 8 + int(st.lengths[r])
        q = off + EVENT_HEADER_LEN
        vals: list = []
        for a in ev.args:
            if a.is_string:
                if q + 4 > end:
                    q = end + 1
                    break
                (ln,) = _U32.unpack_from(data, q)
                q += 4
                if q + ln > end:
                    q = end + 1
                    break
                vals.append(data[q : q + ln])
                q += ln
            else:
                if q + 8 > end:
                    q = end + 1
                    break
                vals.append(_U64.unpack_from(data, q)[0])
                q += 8
        if q != end:
            raise BadInputError(
                f"{st.path}: the '{ev.name}' record at offset {off} does not match its declaration in "
                f"{st.events.path}: wrong trace-events file for this trace?"
            )
        st.string_args[r] = tuple(vals)
