"""Trace summaries: counts per event, rate over time, begin/end latencies, dropped events.

Works on simpletrace files (bulk numpy decoding, no per-record Python) and on
log-backend text (through the columnar reader). The result is JSON-ready with kebab-case
keys (CONTRIBUTING.md); times are in ns (``-ns`` keys), as QEMU's trace timestamps are.
Event names (keys of ``by-event``) and argument names are QEMU's, spelt as QEMU spells them:
they are data, not virtopt's keys.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from qemu_ext.errors import BadInputError
from qemu_ext.trace.events import EventsFile
from qemu_ext.trace.records import DROPPED
from qemu_ext.trace.simple import EVENT_HEADER_LEN, _uint_at

EventsArg = Union[str, os.PathLike, EventsFile, None]

# (begin suffix, end suffix) pairs tried on every event name present in a trace
_END_SUFFIXES = ("_done", "_end", "_finish", "_complete", "_completed", "_exit", "_ret", "_return")
_BEGIN_SUFFIXES = ("_start", "_begin", "_enter", "_entry")
_KEY_NAMES = ("co", "req", "acb", "opaque", "task", "s", "bs", "dev")

MAX_BINS = 10000


@dataclass
class Pair:
    begin: str
    end: str
    key: Optional[str] = None  # argument both events carry that ties an end to its begin (None: order only)


class _Source:
    """What the summary needs from a decoded trace."""

    names: list[str]
    counts: dict[str, int]

    def timestamps(self) -> Optional[np.ndarray]:  # all records, file order, int64; None if unknown
        raise NotImplementedError

    def kind(self, name: str) -> tuple[np.ndarray, np.ndarray]:  # (record index, timestamp_ns) of one event
        raise NotImplementedError

    def arg(self, name: str, arg: str) -> Optional[np.ndarray]:
        raise NotImplementedError

    def arg_names(self, name: str) -> list[str]:
        raise NotImplementedError

    def arg_is_pointer(self, name: str, arg: str) -> bool:
        return True

    def merged(self, pair: Pair) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
        """(key, timestamp, is-end flag) of the begin and end records in file order, #begins, #ends."""
        bi, bt = self.kind(pair.begin)
        ei, et = self.kind(pair.end)
        bk = ek = None
        if pair.key is not None:
            bk = self.arg(pair.begin, pair.key)
            ek = self.arg(pair.end, pair.key)
        if bk is None or ek is None:
            bk = np.zeros(len(bi), np.uint64)
            ek = np.zeros(len(ei), np.uint64)
        # two sorted runs of record numbers, which a stable sort merges in one pass
        order = np.argsort(np.concatenate([bi, ei]), kind="stable")
        key = np.concatenate([bk.astype(np.uint64, copy=False), ek.astype(np.uint64, copy=False)])[order]
        ts = np.concatenate([bt, et]).astype(np.int64, copy=False)[order]
        flag = (order >= len(bi)).view(np.int8)
        return key, ts, flag, len(bi), len(ei)

    def rates_by_event(self, names: list[str], t0: int, width: int, nb: int) -> dict[str, list[int]]:
        out = {}
        for n in names:
            _, kt = self.kind(n)
            kt = kt[kt >= 0]
            out[n] = np.bincount(np.minimum((kt - t0) // width, nb - 1), minlength=nb).tolist()
        return out


class _SimpleSource(_Source):
    def __init__(self, st) -> None:
        self.st = st
        self.names = [st.kind_name(k) for k in range(len(st.kinds))]
        self.index = {n: k for k, n in enumerate(self.names)}
        self.counts = st.counts()

    def timestamps(self) -> Optional[np.ndarray]:
        return self.st.timestamps.view(np.int64)

    def kind(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        rows = self.st.kind_rows(self.index[name])
        return rows, self.st.timestamps[rows].view(np.int64)

    def arg_names(self, name: str) -> list[str]:
        return self.st.kind_event(self.index[name]).arg_names

    def arg_is_pointer(self, name: str, arg: str) -> bool:
        ev = self.st.kind_event(self.index[name])
        return any(a.name == arg and "*" in a.type and not a.is_string for a in ev.args)

    def merged(self, pair: Pair) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
        st = self.st
        kb, ke = self.index[pair.begin], self.index[pair.end]
        evb, eve = st.kind_event(kb), st.kind_event(ke)
        if evb.has_strings or eve.has_strings:
            return super().merged(pair)
        mask = st.codes == kb
        mask |= st.codes == ke
        sel = np.flatnonzero(mask)
        is_end = st.codes[sel] == ke
        ts = st.timestamps[sel].view(np.int64)
        if pair.key is not None and pair.key in evb.arg_names and pair.key in eve.arg_names:
            jb, je = evb.arg_names.index(pair.key), eve.arg_names.index(pair.key)
            off = st.offsets[sel] + (EVENT_HEADER_LEN + 8 * jb)
            if je != jb:
                off += is_end * (8 * (je - jb))
            key = _uint_at(st.data, off, "<u8", st._views)  # only the key argument, read from the file
        else:
            key = np.zeros(len(sel), np.uint64)
        nb = int(np.count_nonzero(~is_end))
        return key, ts, is_end.view(np.int8), nb, len(sel) - nb

    def rates_by_event(self, names: list[str], t0: int, width: int, nb: int) -> dict[str, list[int]]:
        idx = self.st.timestamps.view(np.int64) - t0
        idx //= width
        np.minimum(idx, nb - 1, out=idx)
        idx += self.st.codes.astype(np.int64) * nb
        m = np.bincount(idx, minlength=nb * len(self.names)).reshape(len(self.names), nb)
        return {n: m[self.index[n]].tolist() for n in names}

    def arg(self, name: str, arg: str) -> Optional[np.ndarray]:
        k = self.index[name]
        names = self.st.kind_event(k).arg_names
        if arg not in names:
            return None
        col = self.st.kind_column(k, names.index(arg))
        return col if isinstance(col, np.ndarray) else None


class _ColumnSource(_Source):
    def __init__(self, cols: dict[str, dict[str, np.ndarray]], total: int, events: Optional[EventsFile]) -> None:
        self.cols = cols
        self.names = list(cols)
        self.counts = {n: len(c["index"]) for n, c in cols.items()}
        self.total = total
        self.events = events

    def timestamps(self) -> Optional[np.ndarray]:
        ts = np.full(self.total, -1, np.int64)
        for c in self.cols.values():
            ts[c["index"]] = c["timestamp_ns"]
        if (ts < 0).all():
            return None
        return ts

    def kind(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        c = self.cols[name]
        return c["index"], c["timestamp_ns"]

    def arg_names(self, name: str) -> list[str]:
        return [k for k in self.cols[name] if k not in ("index", "timestamp_ns", "pid")]

    def arg_is_pointer(self, name: str, arg: str) -> bool:
        ev = self.events.get(name) if self.events is not None else None
        if ev is None:
            return True
        return any(a.name == arg and "*" in a.type and not a.is_string for a in ev.args)

    def arg(self, name: str, arg: str) -> Optional[np.ndarray]:
        v = self.cols[name].get(arg)
        if v is None or v.dtype == object:
            return None
        return v


def find_pairs(src: _Source, extra: Optional[list[Pair]] = None) -> list[Pair]:
    """Begin/end event pairs present in the trace: X -> X_done/_end/..., X_start -> X_done, X_start_req -> X_done_req."""
    present = set(src.names)
    pairs: list[Pair] = []
    seen: set[tuple[str, str]] = set()

    def add(b: str, e: str, key: Optional[str] = None) -> None:
        if (b, e) in seen or b not in present or e not in present or b == e:
            return
        seen.add((b, e))
        if key is None:
            bn, en = src.arg_names(b), src.arg_names(e)
            common = [a for a in bn if a in en and src.arg_is_pointer(b, a)]
            for cand in _KEY_NAMES:
                if cand in common:
                    key = cand
                    break
            else:
                key = common[0] if common else None
        pairs.append(Pair(b, e, key))

    for p in extra or []:
        if p.begin not in present or p.end not in present:
            raise BadInputError(f"--pair {p.begin}:{p.end}: both events must be in the trace")
        add(p.begin, p.end, p.key)
    for b in sorted(present):
        for es in _END_SUFFIXES:
            add(b, b + es)
        for bs in _BEGIN_SUFFIXES:
            if bs in b:
                i = b.rindex(bs)
                stem, rest = b[:i], b[i + len(bs) :]
                for es in _END_SUFFIXES:
                    add(b, stem + es + rest)
    return pairs


def pair_latencies(src: _Source, pair: Pair) -> tuple[np.ndarray, int, int]:
    """(latencies in ns, unmatched begins, unmatched ends): each end goes with the latest begin of its key."""
    key, ts, flag, nbeg, nend = src.merged(pair)
    # the common case: an end right after its begin (same key) in the begin/end sequence
    adj = (flag[:-1] == 0) & (flag[1:] == 1) & (key[1:] == key[:-1])
    # keys that appear anywhere else in a non-adjacent way are paired the general way
    used = np.zeros(len(key), bool)
    used[:-1] |= adj
    used[1:] |= adj
    if used.all():
        lat = ts[1:][adj] - ts[:-1][adj]
        nh = int(adj.sum())
        return lat, nbeg - nh, nend - nh
    srt = np.argsort(key, kind="stable")  # by key, then file order
    key, ts, flag = key[srt], ts[srt], flag[srt]
    hit = (key[1:] == key[:-1]) & (flag[:-1] == 0) & (flag[1:] == 1)
    lat = ts[1:][hit] - ts[:-1][hit]
    nh = int(hit.sum())
    return lat, nbeg - nh, nend - nh


def _percentiles(a: np.ndarray, qs: tuple[int, ...]) -> list[int]:
    """Nearest-rank percentiles (the smallest value with at least q% of the values at or below it)."""
    n = len(a)
    ranks = [max(1, -(-q * n // 100)) - 1 for q in qs]  # ceil(q * n / 100) - 1, exact in integers
    part = np.partition(a, sorted(set(ranks)))
    return [int(part[r]) for r in ranks]


def _latency_stats(lat: np.ndarray) -> dict:
    if len(lat) == 0:
        return {"pairs": 0}
    lat = np.maximum(lat, 0)
    q = _percentiles(lat, (50, 90, 99))
    # log2 histogram: bucket b holds latencies in [2^(b-1), 2^b) ns (b = 0: 0 ns)
    b = np.zeros(len(lat), np.int64)
    nz = lat > 0
    b[nz] = np.floor(np.log2(lat[nz])).astype(np.int64) + 1
    cnt = np.bincount(b)
    hist = [{"lt-ns": int(1 << i) if i > 0 else 1, "count": int(c)} for i, c in enumerate(cnt.tolist()) if c]
    return {
        "pairs": len(lat),
        "min-ns": int(lat.min()),
        "mean-ns": float(lat.mean()),
        "p50-ns": q[0],
        "p90-ns": q[1],
        "p99-ns": q[2],
        "max-ns": int(lat.max()),
        "histogram": hist,
    }


def _summarize(src: _Source, total: int, bins: int, pairs: Optional[list[Pair]]) -> dict:
    counts = dict(src.counts)
    dropped_records = counts.pop(DROPPED, 0)
    ts = src.timestamps()
    res: dict = {"records": total, "events": total - dropped_records}
    rate: Optional[dict] = None
    if ts is not None and len(ts):
        t0, t1 = int(ts.min()), int(ts.max())
        known = ts if t0 >= 0 else ts[ts >= 0]
        if t0 < 0:
            t0 = int(known.min())
        dur = t1 - t0
        res.update({"first-timestamp-ns": t0, "last-timestamp-ns": t1, "duration-ns": dur})
        nb = max(1, min(bins, MAX_BINS))
        width = max(1, -(-max(dur, 1) // nb))
        idx = known - t0
        idx //= width
        np.minimum(idx, nb - 1, out=idx)
        per_bin = np.bincount(idx, minlength=nb)
        rate = {
            "bin-ns": int(width),
            "start-ns": t0,
            "counts": per_bin.tolist(),
            "events-per-second": [c * 1e9 / width for c in per_bin.tolist()],
        }
        # per event, for the plot: the busiest few (keys are QEMU's event names)
        top = sorted(counts, key=lambda n: -counts[n])[:6]
        rate["by-event"] = src.rates_by_event(top, t0, width, nb)
    else:
        res.update({"first-timestamp-ns": None, "last-timestamp-ns": None, "duration-ns": None})
    dur_s = (res["duration-ns"] or 0) / 1e9
    nev = max(1, res["events"])
    res["counts"] = [
        {"event": n, "count": c, "fraction": c / nev, "per-second": (c / dur_s) if dur_s > 0 else None}
        for n, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    res["rate"] = rate
    lat_out = []
    for p in find_pairs(src, pairs):
        lat, ub, ue = pair_latencies(src, p)
        d = {"begin": p.begin, "end": p.end, "key": p.key, "unmatched-begin": ub, "unmatched-end": ue}
        if ts is None:  # log lines without the pid@sec.usec: prefix: pairs, but no times
            d["pairs"] = len(lat)
        else:
            d.update(_latency_stats(lat))
        lat_out.append(d)
    res["latency"] = lat_out
    return res


def summarize(
    path: Union[str, os.PathLike],
    events_file: EventsArg = None,
    bins: int = 60,
    pairs: Optional[list[Pair]] = None,
) -> dict:
    """Summary of a trace file (simpletrace or log text) as a dict (the JSON of `virtopt trace summary`)."""
    from qemu_ext.trace.api import _log_lines, detect_format
    from qemu_ext.trace.log import LogParser, optional_events
    from qemu_ext.trace.simple import decode_simple

    fmt = detect_format(path)
    if fmt == "simple":
        st = decode_simple(path, events_file)
        src: _Source = _SimpleSource(st)
        res = {"file": str(path), "format": "simpletrace", "version": st.version}
        body = _summarize(src, len(st), bins, pairs)
        res.update(body)
        res["dropped"] = {"records": st.dropped_records, "events": st.dropped_events}
        res["truncated-bytes"] = st.truncated_bytes
        return res
    events = optional_events(events_file)
    parser = LogParser(events)
    recs = []
    for line in _log_lines(path):
        r = parser.parse_line(line)
        if r is not None:
            recs.append(r)
    if not recs:
        raise BadInputError(f"{path}: no trace events in it (neither a simpletrace file nor log-backend lines)")
    from qemu_ext.trace.api import columns_from_records

    cols = columns_from_records(recs)
    src = _ColumnSource(cols, len(recs), events)
    res = {"file": str(path), "format": "log", "version": None}
    res.update(_summarize(src, len(recs), bins, pairs))
    res["dropped"] = {"records": 0, "events": 0}
    res["truncated-bytes"] = 0
    return res
