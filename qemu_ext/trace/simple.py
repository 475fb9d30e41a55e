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

import mmap
import os
import stat
import struct
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

import construct as cs
import numpy as np
from numpy.lib.stride_tricks import as_strided

from qemu_ext.errors import BadInputError
from qemu_ext.trace.events import DROPPED_EVENT, EventsFile, TraceEvent, events_for_trace
from qemu_ext.trace.header import (
    DROPPED_EVENT_ID,
    EVENT_HEADER_LEN,
    HEADER_EVENT_ID,
    HEADER_MAGIC,
    HEADER_VERSION,
    MAX_NAME_LEN,
    RECORD_TYPE_EVENT,
    RECORD_TYPE_MAPPING,
    check_header,
    looks_like_simpletrace,
    open_trace,
)
from qemu_ext.trace.records import DROPPED, ArgValue, TraceRecord

Buffer = Union[bytes, mmap.mmap]

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


def is_signed_type(ctype: str) -> bool:
    t = ctype.replace("const", "").strip()
    if "*" in t:
        return False
    if "unsigned" in t or t.startswith("uint") or t in ("size_t", "bool", "uintptr_t"):
        return False
    return True


__all__ = [
    "DROPPED_EVENT",
    "DROPPED_EVENT_ID",
    "EVENT_HEADER_LEN",
    "HEADER_EVENT_ID",
    "HEADER_MAGIC",
    "HEADER_VERSION",
    "DroppedRecord",
    "EventRecordHeader",
    "MappingRecord",
    "SimpleTrace",
    "TraceLogHeader",
    "check_header",
    "decode_simple",
    "event_record_struct",
    "looks_like_simpletrace",
]


# --- the decoded file -----------------------------------------------------------------------------


class StringColumn:
    """A string argument of many records: where each string sits in the file, and how long it is."""

    __slots__ = ("_unique", "lens", "starts")

    def __init__(self, starts: np.ndarray, lens: np.ndarray) -> None:
        self.starts = starts
        self.lens = lens
        self._unique: Optional[tuple[list[bytes], np.ndarray]] = None

    def __len__(self) -> int:
        return len(self.starts)

    def values(self, data: Buffer) -> list[bytes]:
        return [data[s : s + n] for s, n in zip(self.starts.tolist(), self.lens.tolist())]

    def unique(self, data: Buffer) -> tuple[list[bytes], np.ndarray]:
        """(distinct strings, index of each record's string among them), without a Python loop per record."""
        if self._unique is None:
            self._unique = self._compute_unique(data)
        return self._unique

    def _compute_unique(self, data: Buffer) -> tuple[list[bytes], np.ndarray]:
        n = len(self.starts)
        inverse = np.zeros(n, np.int64)
        uniq: list[bytes] = []
        if n == 0:
            return uniq, inverse
        u8 = np.frombuffer(data, np.uint8)
        for L in np.flatnonzero(np.bincount(self.lens)).tolist():
            rows = np.flatnonzero(self.lens == L)
            if L == 0:
                inverse[rows] = len(uniq)
                uniq.append(b"")
                continue
            st_rows = self.starts[rows]
            if L <= 8 and int(st_rows.max()) + 8 <= len(data):
                # the bytes themselves are the key: one unaligned u64 read per string, masked to L bytes
                key = _uint_at(data, st_rows, "<u8", {})
                if L < 8:
                    key &= np.uint64((1 << (8 * L)) - 1)
                strs, inv = _few_distinct(key)
                if strs is not None:
                    inverse[rows] = len(uniq) + inv
                    uniq.extend(bytes(data[int(st_rows[f]) : int(st_rows[f]) + L]) for f in strs)
                    continue
            mat = u8[st_rows[:, None] + np.arange(L)]
            # a 64-bit hash of every string, then a check that equal hashes are equal strings
            h = np.zeros(len(rows), np.uint64)
            for i in range(L):
                h = h * np.uint64(1099511628211) + mat[:, i].astype(np.uint64) + np.uint64(1)
            _u, first, inv = np.unique(h, return_index=True, return_inverse=True)
            inv = inv.reshape(-1)
            if not np.array_equal(mat, mat[first[inv]]):
                u, inv = np.unique(mat, axis=0, return_inverse=True)
                inv = inv.reshape(-1)
                strs_b = [bytes(r) for r in u]
            else:
                strs_b = [bytes(mat[f]) for f in first.tolist()]
            inverse[rows] = len(uniq) + inv
            uniq.extend(strs_b)
        return uniq, inverse


def _few_distinct(key: np.ndarray, limit: int = 16) -> tuple[Optional[list[int]], np.ndarray]:
    """(row of the first occurrence of each distinct key, index of each row's key) when there are few."""
    inv = np.full(len(key), -1, np.int64)
    firsts: list[int] = []
    todo = 0
    while True:
        left = np.flatnonzero(inv[todo:] < 0)
        if len(left) == 0:
            return firsts, inv
        if len(firsts) >= limit:
            return None, inv
        f = todo + int(left[0])
        inv[key == key[f]] = len(firsts)
        firsts.append(f)
        todo = f


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
    data: Buffer = field(repr=False, default=b"")
    # filled by _resolve():
    codes: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, np.int32))  # index into kinds
    kinds: list[int] = field(default_factory=list)  # distinct event ids, in order of codes
    _rows: dict[int, np.ndarray] = field(repr=False, default_factory=dict)
    _args: dict[int, list] = field(repr=False, default_factory=dict)
    _views: dict[int, np.ndarray] = field(repr=False, default_factory=dict)
    _plans: dict[int, list] = field(repr=False, default_factory=dict)

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
        r = self._rows.get(k)
        if r is None:
            r = self._rows[k] = np.flatnonzero(self.codes == k)
        return r

    def kind_args(self, k: int) -> list:
        """The arguments of every record of kind k: a uint64 array per integer argument, a StringColumn per string."""
        a = self._args.get(k)
        if a is None:
            a = self._args[k] = _decode_args(self, self.kind_event(k), self.kind_rows(k), self._plans.pop(k, None))
        return a

    def kind_column(self, k: int, j: int):
        """Argument j of every record of kind k (uint64 array, or StringColumn), reading only that argument."""
        a = self._args.get(k)
        ev = self.kind_event(k)
        if a is not None or ev.has_strings:
            return self.kind_args(k)[j]
        return _uint_at(self.data, self.offsets[self.kind_rows(k)] + (EVENT_HEADER_LEN + 8 * j), "<u8", self._views)

    def check(self) -> None:
        """Check every string-carrying event against its record lengths (decoding does the others)."""
        for k in range(len(self.kinds)):
            if self.kind_event(k).has_strings:
                self.kind_args(k)

    def counts(self) -> dict[str, int]:
        c = np.bincount(self.codes, minlength=len(self.kinds)) if len(self.codes) else np.zeros(0, np.int64)
        return {self.kind_name(k): int(c[k]) for k in range(len(self.kinds))}

    @property
    def dropped_records(self) -> int:
        if DROPPED_EVENT_ID not in self.kinds:
            return 0
        return len(self.kind_rows(self.kinds.index(DROPPED_EVENT_ID)))

    @property
    def dropped_events(self) -> int:
        """Sum of num_events_dropped over the dropped records."""
        if DROPPED_EVENT_ID not in self.kinds:
            return 0
        return int(self.kind_args(self.kinds.index(DROPPED_EVENT_ID))[0].sum())

    def records(self) -> Iterator[TraceRecord]:
        """TraceRecords in file order (Python objects: for convenience, not for millions of records)."""
        nk = len(self.kinds)
        kinds_ev = [self.kind_event(k) for k in range(nk)]
        names = [self.kind_name(k) for k in range(nk)]
        signed = [[is_signed_type(a.type) for a in ev.args] for ev in kinds_ev]
        per_kind: list[list[list]] = []
        pos_in_kind = np.zeros(len(self), np.int64)
        for k in range(nk):
            rows = self.kind_rows(k)
            pos_in_kind[rows] = np.arange(len(rows))
            cols = []
            for col in self.kind_args(k):
                if isinstance(col, StringColumn):
                    cols.append([v.decode("utf-8", "backslashreplace") for v in col.values(self.data)])
                else:
                    cols.append(col.tolist())
            per_kind.append(cols)
        codes = self.codes.tolist()
        ts = self.timestamps.tolist()
        pids = self.pids.tolist()
        pik = pos_in_kind.tolist()
        for i, k in enumerate(codes):
            j = pik[i]
            args: dict[str, ArgValue] = {}
            for a, col, sg in zip(kinds_ev[k].args, per_kind[k], signed[k]):
                v = col[j]
                args[a.name] = v - (1 << 64) if sg and isinstance(v, int) and v >= (1 << 63) else v
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
            for a, col in zip(ev.args, self.kind_args(k)):
                if isinstance(col, StringColumn):
                    cols[a.name] = np.array(
                        [v.decode("utf-8", "backslashreplace") for v in col.values(self.data)], dtype=object
                    )
                else:
                    cols[a.name] = col.view(np.int64) if is_signed_type(a.type) else col
            out[name] = cols
        return out


# --- bulk access to the file ----------------------------------------------------------------------


def _view(data: Buffer, dtype: str, phase: int, cache: dict) -> np.ndarray:
    key = (dtype, phase)
    v = cache.get(key)
    if v is None:
        item = np.dtype(dtype).itemsize
        n = (len(data) - phase) // item
        v = np.frombuffer(data, dtype=dtype, count=n, offset=phase) if n > 0 else np.zeros(0, dtype)
        cache[key] = v
    return v


def _uint_at(data: Buffer, pos: np.ndarray, dtype: str, cache: dict) -> np.ndarray:
    """The little-endian integer of dtype ('<u8' or '<u4') at each byte offset in pos (all inside data)."""
    item = np.dtype(dtype).itemsize
    pos = np.asarray(pos, dtype=np.int64)
    if len(pos) == 0:
        return np.zeros(0, dtype)
    ph = pos & (item - 1)
    p0 = int(ph[0])
    if not np.any(ph != p0):
        return _view(data, dtype, p0, cache)[(pos - p0) // item]
    out = np.empty(len(pos), dtype)
    for p in np.flatnonzero(np.bincount(ph)).tolist():  # (np.unique would import numpy.ma)
        m = ph == p
        out[m] = _view(data, dtype, p, cache)[(pos[m] - p) // item]
    return out


def _words_at(data: Buffer, pos: np.ndarray, nwords: int, cache: dict) -> np.ndarray:
    """(len(pos), nwords) matrix of the consecutive little-endian u64 words at each byte offset in pos."""
    pos = np.asarray(pos, dtype=np.int64)
    if len(pos) == 0 or nwords == 0:
        return np.zeros((len(pos), nwords), np.uint64)

    def rows(p: int) -> np.ndarray:  # overlapping rows of nwords words: row i starts at word i
        v = _view(data, "<u8", p, cache)
        st = v.strides[0]
        return as_strided(v, shape=(max(len(v) - nwords + 1, 0), nwords), strides=(st, st), writeable=False)

    ph = pos & 7
    p0 = int(ph[0])
    if not np.any(ph != p0):
        return rows(p0)[(pos - p0) >> 3]
    out = np.empty((len(pos), nwords), np.uint64)
    for p in np.flatnonzero(np.bincount(ph)).tolist():  # (np.unique would import numpy.ma)
        m = np.flatnonzero(ph == p)
        out[m] = rows(p)[(pos[m] - p) >> 3]
    return out


class _IntRun:
    """A run of integer arguments of a string-carrying event: gathered when first asked for."""

    __slots__ = ("nw", "q")

    def __init__(self, q: np.ndarray, nw: int) -> None:
        self.q = q
        self.nw = nw


def _layout_args(st: SimpleTrace, ev: TraceEvent, rows: np.ndarray) -> list:
    """Check the records `rows` (all of event ev) against their length fields; a plan of their arguments."""
    base = st.offsets[rows]
    if not ev.has_strings:
        return [_IntRun(base + EVENT_HEADER_LEN, len(ev.args))] if ev.args else []
    end = base + 8 + st.lengths[rows].astype(np.int64)
    q = base + EVENT_HEADER_LEN
    plan: list = []
    args = ev.args
    i = 0
    while i < len(args):
        if args[i].is_string:
            if np.any(q + 4 > end):
                _args_mismatch(st, ev, rows, q + 4 > end)
            ln = _uint_at(st.data, q, "<u4", st._views).astype(np.int64)
            plan.append(StringColumn(q + 4, ln))
            q = q + 4 + ln
            i += 1
            continue
        j = i
        while j < len(args) and not args[j].is_string:
            j += 1
        nw = j - i
        if np.any(q + 8 * nw > end):
            _args_mismatch(st, ev, rows, q + 8 * nw > end)
        plan.append(_IntRun(q, nw))
        q = q + 8 * nw
        i = j
    if np.any(q != end):
        _args_mismatch(st, ev, rows, q != end)
    return plan


def _decode_args(st: SimpleTrace, ev: TraceEvent, rows: np.ndarray, plan: Optional[list] = None) -> list:
    """Argument columns of the records `rows` (all of event ev): uint64 arrays and StringColumns."""
    if plan is None:
        plan = _layout_args(st, ev, rows)
    cols: list = []
    for item in plan:
        if isinstance(item, StringColumn):
            cols.append(item)
        else:
            m = _words_at(st.data, item.q, item.nw, st._views)
            cols += [m[:, t] for t in range(item.nw)]  # column views of one gathered matrix
    return cols


def _args_mismatch(st: SimpleTrace, ev: TraceEvent, rows: np.ndarray, bad: np.ndarray) -> None:
    r = int(rows[np.flatnonzero(bad)[0]])
    raise BadInputError(
        f"{st.path}: the '{ev.name}' record at offset {int(st.offsets[r])} ({int(st.lengths[r]) - 24} bytes of arguments) "
        f"does not match its declaration in {st.events.path}: wrong trace-events file for this trace?"
    )


_U64 = struct.Struct("<Q")
_MAP_HDR = struct.Struct("<QQI")
_EV_HDR = struct.Struct("<QQQII")


class _Scanner:
    """Finds every record of a file.

    Event records are found in bulk: every place where the record header's pid field could be
    (any byte offset: string arguments break alignment) is a candidate, and a candidate is proven
    a record start when the previous proven record's length field points at it. Everything else
    (mapping records, a record of another pid, a truncated tail) is walked one record at a time.
    """

    def __init__(self, data: Buffer, name: str) -> None:
        self.data = data
        self.name = name
        self.size = len(data)
        self.cache: dict = {}
        self.mapping: dict[int, str] = {}
        self.chunks: list[tuple[np.ndarray, Optional[np.ndarray]]] = []  # (offsets, their 4 header words)
        self.singles: list[int] = []
        self.cand_hdr: Optional[np.ndarray] = None
        self.truncated_at: Optional[int] = None
        self.cand: Optional[np.ndarray] = None
        self.cand_next: Optional[np.ndarray] = None
        self.breaks: Optional[np.ndarray] = None
        self.cand_start = 0
        self.cand_pid = 0
        self.all_phases = False

    def _flush_singles(self) -> None:
        if self.singles:
            self.chunks.append((np.array(self.singles, dtype=np.int64), None))
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
            if ln > MAX_NAME_LEN:
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
                raise BadInputError(
                    f"{self.name}: mapping record at offset {pos} has a bad event name {raw[:40]!r}: corrupt trace"
                )
            self.mapping[eid] = nm
            return pos + 20 + ln
        if rtype == RECORD_TYPE_EVENT:
            if rem < EVENT_HEADER_LEN:
                return None
            _, _eid, _ts, ln, pid = _EV_HDR.unpack_from(data, pos)
            if ln < 24:
                raise BadInputError(f"{self.name}: event record at offset {pos} has length {ln} (< 24): corrupt trace")
            if ln > rem - 8:
                return None
            if self.cand is None:
                self._find_candidates(pos, pid)
                if len(self.cand) and int(self.cand[0]) == pos:
                    return pos  # the bulk pass takes it from here
            self.singles.append(pos)
            return pos + 8 + ln
        raise BadInputError(
            f"{self.name}: record at offset {pos} has type {rtype} (0 mapping or 1 event expected): corrupt trace"
        )

    def _find_candidates(self, start: int, pid: int, all_phases: bool = False) -> None:
        """Every offset >= start whose u32 at +28 is pid and u64 at +0 is 1 (record type 'event').

        First only offsets of start's alignment (records without strings keep it); all four
        alignments when that does not cover the file.
        """
        self.cand_start, self.cand_pid, self.all_phases = start, pid, all_phases
        if all_phases:
            parts = []
            for ph in range(4):
                v = _view(self.data, "<u4", ph, self.cache)
                m = np.flatnonzero(v == pid)
                p = ph + 4 * m.astype(np.int64) - 28
                parts.append(p[p >= start])
            c = np.sort(np.concatenate(parts), kind="stable")  # a few sorted runs: a merge
        else:
            # only records 8-byte aligned like the first one: their pid is every other u32
            ph = start & 3
            v = _view(self.data, "<u4", ph, self.cache)
            q = (((start - ph) >> 2) + 7) & 1
            c = np.flatnonzero(v[q::2] == pid)  # int64 indices
            c <<= 3
            c += ph + 4 * q - 28
            c = c[np.searchsorted(c, start) :]
        c = c[c + EVENT_HEADER_LEN <= self.size]
        hdr = _words_at(self.data, c, 4, self.cache)
        ln = hdr.view(np.uint32)[:, 6]  # the length field: low half of the 4th word (a view)
        ok = (hdr[:, 0] == RECORD_TYPE_EVENT) & (ln >= 24)
        if not ok.all():
            c, hdr = c[ok], hdr[ok]
            ln = hdr.view(np.uint32)[:, 6]
        self.cand = c
        self.cand_hdr = hdr
        nxt = c + 8
        nxt += ln
        self.cand_next = nxt
        self.breaks = np.flatnonzero(c[1:] != self.cand_next[:-1])  # i: cand[i + 1] does not follow cand[i]

    def _follow(self, pos: int) -> int:
        """Follow proven records from pos (a candidate) in bulk; return where the run stops."""
        c, nxt, breaks = self.cand, self.cand_next, self.breaks
        assert c is not None and nxt is not None and breaks is not None
        n = len(c)
        i = int(np.searchsorted(c, pos))
        while i < n and c[i] == pos:
            b = int(np.searchsorted(breaks, i))
            j_end = int(breaks[b]) + 1 if b < len(breaks) else n  # c[i:j_end] follow each other
            # records that run past the end of the file are a truncated tail
            k = j_end
            if nxt[j_end - 1] > self.size:
                k = i + int(np.searchsorted(nxt[i:j_end], self.size, side="right"))
            if k > i:
                self._flush_singles()
                assert self.cand_hdr is not None
                self.chunks.append((c[i:k], self.cand_hdr[i:k]))
                pos = int(nxt[k - 1])
            if k < j_end:
                return pos
            # the run broke: skip candidates that were false (inside the last record), if the next one is there
            i = int(np.searchsorted(c, pos))
        return pos

    def scan(self, start: int) -> int:
        pos = start
        size = self.size
        while pos < size:
            if self.cand is not None and len(self.cand):
                npos = self._follow(pos)
                if npos != pos:
                    pos = npos
                    continue
            if (
                self.cand is not None
                and not self.all_phases
                and size - pos >= EVENT_HEADER_LEN
                and _U64.unpack_from(self.data, pos)[0] == RECORD_TYPE_EVENT
            ):
                # an event record off the first alignment (strings): look at every alignment
                self._find_candidates(self.cand_start, self.cand_pid, all_phases=True)
                continue
            nxt = self._walk_one(pos)
            if nxt is None:
                self.truncated_at = pos
                break
            pos = nxt
        self._flush_singles()
        return pos


def _read_file(path: Union[str, os.PathLike]) -> tuple[str, Buffer]:
    """The file's bytes: a read-only memory map for regular files (no copy), else read()."""
    f, _size = open_trace(path)
    with f:
        st = os.fstat(f.fileno())
        if stat.S_ISREG(st.st_mode):
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            try:
                return str(path), mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ)
            except (OSError, ValueError):
                pass
        try:
            return str(path), f.read()
        except OSError as exc:
            from qemu_ext.errors import open_error

            raise open_error(path, exc) from None


def decode_simple(
    path: Union[str, os.PathLike],
    events_file: Union[str, os.PathLike, EventsFile, None] = None,
    data: Optional[Buffer] = None,
    use_native: bool = True,
) -> SimpleTrace:
    """Decode a simpletrace v4 file. Raises BadInputError with one clear line for anything wrong.

    A truncated tail is not an error: every complete record is decoded and
    ``truncated_bytes`` says how many bytes were left over. The records are found by the C
    scanner of qemu_ext.trace.native where it can be had (use_native), else by numpy (_Scanner):
    the same index, the same errors.
    """
    if data is None:
        name, data = _read_file(path)
    else:
        name = str(path)
    version = check_header(data[:TraceHeaderLen], name)
    # the records' index: the C scanner where it can be had (qemu_ext.trace.native), else numpy's
    from qemu_ext.trace import native

    found = native.index(data, name) if use_native else None
    cache: dict = {}
    if found is not None:
        mapping, offsets, hdr, end, truncated_at = found
    else:
        sc = _Scanner(data, name)
        end = sc.scan(TraceHeaderLen)
        mapping, truncated_at, cache = sc.mapping, sc.truncated_at, sc.cache
        hdrs = [h if h is not None else _words_at(data, o, 4, sc.cache) for o, h in sc.chunks]
        if len(sc.chunks) == 1:  # the usual case: one proven run from the first record to the end
            offsets, hdr = sc.chunks[0][0], hdrs[0]
        else:
            offsets = np.concatenate([o for o, _ in sc.chunks]) if sc.chunks else np.zeros(0, np.int64)
            hdr = np.concatenate(hdrs) if hdrs else np.zeros((0, 4), np.uint64)
    events = events_for_trace(events_file, dict.fromkeys(mapping.values()))
    st = SimpleTrace(
        path=name,
        size=len(data),
        version=version,
        mapping=mapping,
        events=events,
        offsets=offsets,
        event_ids=np.zeros(0, np.uint64),
        timestamps=np.zeros(0, np.uint64),
        pids=np.zeros(0, np.uint32),
        lengths=np.zeros(0, np.uint32),
        end_offset=end if truncated_at is None else truncated_at,
        truncated_bytes=0 if truncated_at is None else len(data) - truncated_at,
        data=data,
    )
    st._views = cache
    st.event_ids = hdr[:, 1]  # column views: no copies
    st.timestamps = hdr[:, 2]
    h32 = hdr.view(np.uint32)  # little-endian: word 3 is (length, pid)
    st.lengths = h32[:, 6]
    st.pids = h32[:, 7]
    _resolve(st)
    return st


def _resolve(st: SimpleTrace) -> None:
    """Map event ids to kinds, check them against the mapping and trace-events and the record lengths."""
    ids = st.event_ids
    n = len(ids)
    if n == 0:
        st.codes = np.zeros(0, np.int32)
        st.kinds = []
        return
    is_drop = ids == np.uint64(DROPPED_EVENT_ID)
    any_drop = bool(is_drop.any())
    small = np.where(is_drop, np.uint64(0), ids) if any_drop else ids
    mx = int(small.max())
    if mx < (1 << 22):
        small_i = small.view(np.int64) if not any_drop else small.astype(np.int64)
        present = np.bincount(small_i[~is_drop] if any_drop else small_i, minlength=mx + 1)
        uniq = np.flatnonzero(present).tolist()
        lut = np.full(mx + 2, -1, np.int32)
        lut[uniq] = np.arange(len(uniq), dtype=np.int32)
        kinds = [int(u) for u in uniq]
        if any_drop:
            lut[mx + 1] = len(kinds)
            kinds.append(DROPPED_EVENT_ID)
            small_i[is_drop] = mx + 1
        codes = lut[small_i]
    else:
        u, inv = np.unique(ids, return_inverse=True)
        kinds = [int(x) for x in u]
        codes = inv.reshape(-1).astype(np.int32)
    st.codes = codes
    st.kinds = kinds
    for k, eid in enumerate(kinds):
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
        rows = st.kind_rows(k)
        if size is not None:
            bad = st.lengths[rows] != 24 + size
            if np.any(bad):
                _args_mismatch(st, ev, rows, bad)
        # events with strings are checked against their record lengths when their arguments are read
