"""QEMU traces: trace-events files, simpletrace v4 binary files and log-backend text.

Public API (stable):

- ``read_trace(path, events_file=None) -> Iterator[TraceRecord]``: simpletrace binary or log text, autodetected.
- ``parse_log_lines(lines, events_file=None) -> Iterator[TraceRecord]``: log-backend lines.
- ``read_columns(path, events_file=None, names=None) -> dict[event name, dict[column, numpy array]]``.
- ``decode_simple(path, events_file=None) -> SimpleTrace``: the bulk decoder (numpy arrays in file order).
- ``summarize(path, events_file=None, bins=60, pairs=None) -> dict``: what `virtopt trace summary` prints.
- ``TraceRecord(name, args, timestamp_ns, pid)``; ``load_events``/``find_events_file`` for trace-events files.
- ``arg_labels(event)``: declared argument name -> the word the log text prints for it
  (args are keyed by declared names, as simpletrace.py prints them: qcow2_cache_get's ``c`` is
  the log's ``is_l2_cache``).

Text as QEMU's scripts/simpletrace.py prints it: ``native.decode_text`` (a C renderer compiled
once with the system's cc, no numpy) or ``decode.write_simpletrace_fd`` (numpy), both for 7.2's
and 10.0's simpletrace.py (``events.qemu_series`` tells the events files apart).

The names are imported on first use, so that importing ``qemu_ext.trace.cli`` (which
`virtopt --help` does) does not load numpy and construct.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "EventsFile": "qemu_ext.trace.events",
    "TraceEvent": "qemu_ext.trace.events",
    "find_events_file": "qemu_ext.trace.events",
    "load_events": "qemu_ext.trace.events",
    "TraceRecord": "qemu_ext.trace.records",
    "arg_labels": "qemu_ext.trace.log",
    "parse_log_lines": "qemu_ext.trace.log",
    "SimpleTrace": "qemu_ext.trace.simple",
    "decode_simple": "qemu_ext.trace.simple",
    "detect_format": "qemu_ext.trace.api",
    "read_columns": "qemu_ext.trace.api",
    "read_trace": "qemu_ext.trace.api",
    "summarize": "qemu_ext.trace.summary",
}

__all__ = [
    "EventsFile",
    "SimpleTrace",
    "TraceEvent",
    "TraceRecord",
    "arg_labels",
    "decode_simple",
    "detect_format",
    "find_events_file",
    "load_events",
    "parse_log_lines",
    "read_columns",
    "read_trace",
    "summarize",
]

if TYPE_CHECKING:  # pragma: no cover
    from qemu_ext.trace.api import detect_format, read_columns, read_trace
    from qemu_ext.trace.events import EventsFile, TraceEvent, find_events_file, load_events
    from qemu_ext.trace.log import arg_labels, parse_log_lines
    from qemu_ext.trace.records import TraceRecord
    from qemu_ext.trace.simple import SimpleTrace, decode_simple
    from qemu_ext.trace.summary import summarize


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'qemu_ext.trace' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
