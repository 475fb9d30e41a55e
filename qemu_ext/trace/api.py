"""One door to every trace format: autodetection, typed records, columnar batches."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Optional, Union

from qemu_ext.errors import open_error
from qemu_ext.trace.events import EventsFile, get_events
from qemu_ext.trace.header import detect_format
from qemu_ext.trace.log import parse_log_lines
from qemu_ext.trace.records import TraceRecord

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

EventsArg = Union[None, str, os.PathLike, EventsFile]

MAX_LOG_BYTES = 8 << 30

__all__ = ["columns_from_records", "detect_format", "read_columns", "read_trace"]


def _log_lines(path: Union[str, os.PathLike]) -> Iterator[str]:
    p = Path(path)
    try:
        with open(p, encoding="utf-8", errors="replace") as f:
            yield from f
    except OSError as exc:
        raise open_error(p, exc) from None


def read_trace(path: Union[str, os.PathLike], events_file: EventsArg = None) -> Iterator[TraceRecord]:
    """Every event of a trace file (simpletrace binary or log-backend text, autodetected), in order.

    Simpletrace dropped-events records come as ``TraceRecord("dropped", {"num_events_dropped": n})``.
    """
    fmt = detect_format(path)
    if fmt == "simple":
        from qemu_ext.trace.simple import decode_simple

        st = decode_simple(path, events_file)
        return st.records()
    return parse_log_lines(_log_lines(path), events_file)


def columns_from_records(
    records: Iterable[TraceRecord], names: Optional[set[str]] = None
) -> dict[str, dict[str, np.ndarray]]:
    """Group TraceRecords into per-event numpy columns (``index``, ``timestamp_ns``, ``pid``, args).

    Unknown timestamps/pids are -1. Integer args become int64 (uint64 if a value does not fit),
    anything else an object array.
    """
    import numpy as np

    groups: dict[str, list[tuple[int, TraceRecord]]] = {}
    for i, r in enumerate(records):
        if names is not None and r.name not in names:
            continue
        groups.setdefault(r.name, []).append((i, r))
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, items in groups.items():
        cols: dict[str, np.ndarray] = {
            "index": np.array([i for i, _ in items], dtype=np.int64),
            "timestamp_ns": np.array([-1 if r.timestamp_ns is None else r.timestamp_ns for _, r in items], dtype=np.int64),
            "pid": np.array([-1 if r.pid is None else r.pid for _, r in items], dtype=np.int64),
        }
        keys: list[str] = []
        for _, r in items:
            for k in r.args:
                if k not in keys:
                    keys.append(k)
        for k in keys:
            vals = [r.args.get(k) for _, r in items]
            if all(isinstance(v, int) for v in vals):
                try:
                    cols[k] = np.array(vals, dtype=np.int64)
                except OverflowError:
                    try:
                        cols[k] = np.array(vals, dtype=np.uint64)
                    except OverflowError:
                        cols[k] = np.array(vals, dtype=object)
            else:
                cols[k] = np.array(vals, dtype=object)
        out[name] = cols
    return out


def read_columns(
    path: Union[str, os.PathLike], events_file: EventsArg = None, names: Optional[Iterable[str]] = None
) -> dict[str, dict[str, np.ndarray]]:
    """Columnar batches: ``{event name: {"index", "timestamp_ns", "pid", <arg name>...: numpy array}}``.

    ``index`` is the record's position in the file; ``names`` restricts to some events
    (e.g. ``{"qcow2_cache_get", "qcow2_cache_get_done"}``). Simpletrace files are decoded in bulk;
    log text goes through parse_log_lines (timestamps/pids -1 when the lines had no prefix).
    Integer args: uint64 or, for signed C types, int64 (simpletrace); int64 (log text).
    """
    wanted = set(names) if names is not None else None
    fmt = detect_format(path)
    if fmt == "simple":
        from qemu_ext.trace.simple import decode_simple

        return decode_simple(path, events_file).columns(wanted)
    recs = parse_log_lines(_log_lines(path), get_events(events_file) if events_file is not None else None)
    return columns_from_records(recs, wanted)
