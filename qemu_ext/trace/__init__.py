"""QEMU traces: trace-events files, simpletrace v4 binary files and log-backend text.

Public API (stable):

- ``read_trace(path, events_file=None) -> Iterator[TraceRecord]``: simpletrace binary or log text, autodetected.
- ``parse_log_lines(lines, events_file=None) -> Iterator[TraceRecord]``: log-backend lines.
- ``read_columns(path, events_file=None, names=None) -> dict[event name, dict[column, numpy array]]``.
- ``decode_simple(path, events_file=None) -> SimpleTrace``: the bulk decoder (numpy arrays in file order).
- ``TraceRecord(name, args, timestamp_ns, pid)``; ``load_events``/``find_events_file`` for trace-events files.
- ``arg_labels(event)``: declared argument name -> the word the log text prints for it
  (args are keyed by declared names, as simpletrace.py prints them: qcow2_cache_get's ``c`` is
  the log's ``is_l2_cache``).
"""

from __future__ import annotations

from qemu_ext.trace.api import detect_format, read_columns, read_trace
from qemu_ext.trace.events import EventsFile, TraceEvent, find_events_file, load_events
from qemu_ext.trace.log import arg_labels, parse_log_lines
from qemu_ext.trace.records import TraceRecord
from qemu_ext.trace.simple import SimpleTrace, decode_simple

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
]
