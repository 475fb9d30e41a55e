"""The typed record every trace reader yields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

ArgValue = Union[int, str]


@dataclass
class TraceRecord:
    """One trace event.

    name: the event name (``"dropped"`` stands for a simpletrace dropped-events record,
    whose one argument is ``num_events_dropped``).
    args: argument name (as declared in trace-events) -> int, or str for string arguments.
    timestamp_ns: simpletrace: QEMU's monotonic clock in ns; log backend with the
    ``pid@sec.usec:`` prefix: wall-clock ns (microsecond resolution); None when unknown.
    pid: simpletrace: the QEMU process id; log backend: the thread id of the prefix; None when unknown.
    """

    name: str
    args: dict[str, ArgValue] = field(default_factory=dict)
    timestamp_ns: Optional[int] = None
    pid: Optional[int] = None

    def to_dict(self) -> dict:
        """JSON-ready, kebab-case keys; the keys of ``args`` are QEMU's argument names as trace-events
        spells them (data, not virtopt's keys)."""
        return {"event": self.name, "timestamp-ns": self.timestamp_ns, "pid": self.pid, "args": dict(self.args)}


DROPPED = "dropped"
