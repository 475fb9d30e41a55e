"""Trace events of a running QEMU through QMP: their state, the simple backend's trace file, and
the capture window (events on, wait or drive I/O, events off) that returns the decoded records.

Stable API (the shell's ``/trace``, ``virtopt l2cache tune``):

- ``session = await connect(address)`` (:func:`qemu_ext.qmp.client.connect`; sync callers use
  ``client.connect_sync(address).call(capture, ...)``).
- ``await capture(session, pattern, seconds, during=None, file=None) -> Capture``: enables the
  disabled events matching ``pattern``, runs ``await during(session)`` (drive I/O) and/or waits
  ``seconds``, disables them again, and decodes what QEMU wrote (simple backend: a trace file through
  HMP trace-file; log backend: what QEMU appended to its ``-D`` file or its stderr file, or the
  transport's ``log_path()``). ``Capture.records`` are :class:`qemu_ext.trace.TraceRecord`.
  The events it enabled are disabled on every exit path: normal end, an error, Ctrl-C
  (cancellation; the clean-up is shielded from a second one) and QEMU going away (then there is
  nothing left to disable). Events that were already on stay on.
- ``async with window(session, names): ...``: just the on/off part, with the same guarantee.
- ``await trace_list(session, pattern)``, ``trace_set(session, pattern, enable)``,
  ``trace_file(session, op, path)``: the state of events and of the trace file.

A pattern that matches no event is :class:`qemu_ext.qmp.errors.NoMatchError` (exit 1), everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

from qemu_ext.errors import BadInputError, NotAvailableError
from qemu_ext.qmp import address as addr
from qemu_ext.qmp.client import QmpSession, connect
from qemu_ext.qmp.errors import HmpError, NoMatchError, QmpCommandError, QmpError, QmpGoneError

During = Callable[[QmpSession], Awaitable[Any]]

NO_SIMPLE_BACKEND = (
    "this QEMU has no simple trace backend (HMP answers \"unknown command: 'trace-file'\"); "
    "its trace events go to the log backend instead: start QEMU with -D FILE (or keep its stderr in a file) "
    "and use '/trace on PATTERN', or '/trace capture PATTERN SECONDS' which reads that log"
)
MAX_SECONDS = 24 * 3600


# -- event state -----------------------------------------------------------------------------------


@dataclass
class TraceEventState:
    name: str
    state: str  # enabled | disabled | unavailable

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state}


async def trace_list(s: QmpSession, pattern: str = "*") -> list[TraceEventState]:
    """Trace events matching the glob ``pattern`` with their state (trace-event-get-state);
    NoMatchError when none matches (QEMU's 7.2 and 10.0 answer a GenericError for a plain name and []
    for a glob: one rule here)."""
    try:
        evs = await s.execute("trace-event-get-state", {"name": pattern})
    except QmpCommandError as exc:
        # 7.2 and 10.0: "No trace events found" for a glob, 'unknown event "NAME"' for a plain name
        if exc.error_class == "GenericError" and ("No trace events found" in exc.desc or "unknown event" in exc.desc):
            evs = []
        else:
            raise
    if not evs:
        raise NoMatchError("trace event", pattern)
    return sorted((TraceEventState(e["name"], e["state"]) for e in evs), key=lambda e: e.name)


async def trace_set(s: QmpSession, pattern: str, enable: bool) -> list[TraceEventState]:
    """Enable/disable the events matching ``pattern``; return their states afterwards."""
    await trace_list(s, pattern)
    await s.execute("trace-event-set-state", {"name": pattern, "enable": enable})
    return await trace_list(s, pattern)


async def _set_events(s: QmpSession, names: list[str], enable: bool) -> None:
    for n in names:
        await s.execute("trace-event-set-state", {"name": n, "enable": enable})


@contextlib.asynccontextmanager
async def window(s: QmpSession, names: list[str]) -> AsyncIterator[None]:
    """Events ``names`` on for the body, off again on every exit path (see the module docstring)."""
    try:
        await _set_events(s, names, True)
        yield
    finally:
        await _always(_events_off(s, names))


async def _events_off(s: QmpSession, names: list[str]) -> None:
    if not s.connected:
        return  # QEMU went away: nothing left to disable
    try:
        await _set_events(s, names, False)
    except QmpGoneError:
        pass


async def _always(coro: Awaitable[Any]) -> None:
    """Run a clean-up to its end even when the caller is cancelled (again) meanwhile (Ctrl-C twice)."""
    task = asyncio.ensure_future(coro)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    task.result()
    if cancelled:
        raise asyncio.CancelledError


# -- trace file (simple backend) ---------------------------------------------------------------------


@dataclass
class TraceFileStatus:
    file: str
    enabled: bool
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "enabled": self.enabled, "message": self.message}


_TF_STATUS = re.compile(r'Trace file "(?P<file>.*)" (?P<state>on|off)\.')


async def _trace_file_hmp(s: QmpSession, args: str = "") -> str:
    text = await s.hmp(f"trace-file {args}".strip())
    if "unknown command" in text and "trace-file" in text:
        raise NotAvailableError(NO_SIMPLE_BACKEND)
    return text


async def trace_file_status(s: QmpSession) -> TraceFileStatus:
    text = await _trace_file_hmp(s)
    m = _TF_STATUS.search(text)
    if not m:
        raise HmpError(f"unexpected answer to HMP trace-file: {text.strip()!r}")
    return TraceFileStatus(m["file"], m["state"] == "on")


async def has_simple_backend(s: QmpSession) -> bool:
    try:
        await trace_file_status(s)
    except NotAvailableError:
        return False
    return True


async def trace_file(s: QmpSession, op: str = "", path: Optional[str] = None) -> TraceFileStatus:
    """HMP ``trace-file on|off|flush|set FILE`` (or the status with no op); returns the status after it.

    ``set`` with a relative path is made absolute here (QEMU would resolve it in its own cwd).
    """
    if op not in ("", "status", "on", "off", "flush", "set"):
        raise BadInputError(f"trace-file: unknown operation {op!r} (on|off|flush|set FILE)")
    if op == "set":
        if not path:
            raise BadInputError("trace-file set needs a FILE")
        path = os.path.abspath(path)
        if any(c in path for c in "\"\n"):
            raise BadInputError("trace-file: the file name may not contain quotes or newlines")
    if op in ("", "status"):
        return await trace_file_status(s)
    text = await _trace_file_hmp(s, f'{op} "{path}"' if op == "set" else op)
    st = await trace_file_status(s)
    if text.strip():
        st.message = text.strip()
    if op == "on" and not st.enabled:
        raise HmpError(f"QEMU could not open trace file {st.file} for writing")
    return st


# -- where QEMU's log and trace-events file are ----------------------------------------------------------


def log_destination(pid: int) -> Path:
    """Where QEMU's log backend writes: the ``-D FILE`` of its command line, else its stderr when that is a file."""
    argv = addr.proc_cmdline(pid)
    cwd = addr.proc_cwd(pid) or Path("/")
    for i, a in enumerate(argv):
        p = None
        if a == "-D" and i + 1 < len(argv):
            p = argv[i + 1]
        elif a.startswith("-D") and len(a) > 2:
            p = a[2:]
        if p is not None:
            return Path(p) if os.path.isabs(p) else cwd / p
    from qemu_ext.host import procfs

    fd2 = Path(procfs.proc_path(pid, "fd/2"))
    try:
        if stat.S_ISREG(os.stat(fd2).st_mode):
            return fd2
        target = procfs.fd_target(pid, 2)
    except OSError as exc:
        raise NotAvailableError(f"cannot see where QEMU (pid {pid}) logs: {exc.strerror}") from exc
    raise NotAvailableError(
        f"QEMU's log backend writes to its stderr ({target}), which is not a file virtopt can read: "
        "start QEMU with -D FILE to capture trace events"
    )


def events_file_for(pid: Optional[int]) -> Optional[Path]:
    """The trace-events-all of the QEMU binary that runs as ``pid`` (installed next to it in
    PREFIX/share/qemu, or in a build tree's qemu-bundle); None: the trace area's default."""
    exe = addr.proc_exe(pid) if pid else None
    if exe is None:
        return None
    for cand in (exe.parent.parent / "share" / "qemu" / "trace-events-all",
                 exe.parent / "qemu-bundle" / "usr" / "local" / "share" / "qemu" / "trace-events-all"):
        if cand.is_file():
            return cand
    # a build tree that made only the binaries (virtopt's debug builds): the stock package of its series
    from qemu_ext import vm

    for b in vm.qemu_builds():
        if b.debug and Path(b.system) == exe:
            stock = vm.find_build(b.series, debug=False)
            return stock.trace_events if stock is not None else None
    return None


# -- capture ------------------------------------------------------------------------------------------


@dataclass
class Capture:
    """What one capture window saw. ``records`` (decoded, in order) are not part of the JSON."""

    pattern: str
    seconds: float  # how long the events were on
    backend: str  # simple | log
    file: str
    events: list[str]  # the events the pattern names (those already on stayed on)
    enabled: list[str]  # the events the capture turned on and off again
    counts: dict[str, int]
    total: int
    started: float  # time.time() when the events went on
    notes: list[str] = field(default_factory=list)
    records: list[Any] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "seconds": round(self.seconds, 6), "backend": self.backend,
                "file": self.file, "events": self.events, "enabled": self.enabled, "counts": self.counts,
                "total": self.total, "started": self.started, "notes": self.notes}


def _record_name(rec: Any) -> str:
    return str(getattr(rec, "name", rec))


def _decode(path: str, events_file: Optional[Path]) -> list[Any]:
    from qemu_ext.trace import read_trace

    return list(read_trace(path, str(events_file) if events_file else None))


async def run_for(s: QmpSession, seconds: float, during: Optional[During]) -> None:
    """Run ``during`` and/or wait until ``seconds`` passed; QmpGoneError as soon as QEMU goes away
    (a capture window here, ``l2cache tune``'s windows)."""
    t0 = time.monotonic()
    if during is not None:
        await during(s)
    left = seconds - (time.monotonic() - t0)
    if left <= 0:
        return
    gone = asyncio.ensure_future(s.wait_disconnected())
    try:
        done, _ = await asyncio.wait({gone}, timeout=left)
    finally:
        gone.cancel()
    if done:
        raise QmpGoneError(f"QEMU at {s.where} went away during the capture")


async def capture(s: QmpSession, pattern: str, seconds: float, during: Optional[During] = None,
                  file: Optional[str] = None) -> Capture:
    """Enable the events matching ``pattern`` for ``seconds`` (and while ``during`` runs), then
    disable them and decode what QEMU wrote (see the module docstring).

    Simple backend (HMP trace-file works): records into ``file`` (default: a new file in the temp dir)
    through trace-file set/on/flush/off, then restores the previous trace file name. When the trace
    file is already on, the capture goes into it (reopening it would truncate it) and only the records
    added during the capture are counted. Log backend: what QEMU appended to its log meanwhile, saved
    to ``file`` when given.
    """
    if not 0 <= seconds <= MAX_SECONDS:
        raise BadInputError(f"capture time must be between 0 and {MAX_SECONDS} seconds")
    before = await trace_list(s, pattern)
    names = [e.name for e in before]
    to_enable = [e.name for e in before if e.state == "disabled"]
    notes: list[str] = []
    events_file = events_file_for(s.pid)
    skip = 0
    t_on = time.time()
    t0 = time.monotonic()
    if await has_simple_backend(s):
        backend = "simple"
        prev = await trace_file_status(s)
        if prev.enabled:
            # Switching files would make QEMU truncate the user's trace file when it is reopened:
            # capture into it instead and count only the records added meanwhile.
            if file:
                raise BadInputError(f'the trace file "{prev.file}" is on and the capture goes there; '
                                    "turn it off (/trace-file off) to capture into another FILE")
            if os.path.isabs(prev.file):
                out = prev.file
            elif s.pid is not None:
                out = os.path.join(addr.proc_cwd(s.pid) or "/", prev.file)
            else:
                raise NotAvailableError(f'cannot locate the relative trace file "{prev.file}" of a QEMU on '
                                        "another host")
            await trace_file(s, "flush")
            skip = len(_decode(out, events_file))
            notes.append(f"the trace file {out} was on: captured into it, counting only the new records")
            t0 = time.monotonic()
            async with window(s, to_enable):
                await run_for(s, seconds, during)
            took = time.monotonic() - t0
            await trace_file(s, "flush")
        else:
            if file:
                out = os.path.abspath(file)
            else:  # QEMU (same host) truncates and writes it
                fd, out = tempfile.mkstemp(prefix=f"virtopt-capture-{s.pid or 'qemu'}-", suffix=".simpletrace")
                os.close(fd)
            await trace_file(s, "set", out)
            await trace_file(s, "on")
            try:
                # Records of events that fired while the trace file was off wait in QEMU's ring buffer
                # (trace/simple.c, 7.2 and 10.0: trace_record_start() buffers whatever the writeout
                # state) and are written into the next file turned on: another capture's probe, the
                # user's own events. Write them out now and leave them out of this capture.
                await trace_file(s, "flush")
                skip = len(_decode(out, events_file))
                if skip:
                    notes.append(f"{skip} record(s) QEMU had buffered while its trace file was off were left out")
                t0 = time.monotonic()
                async with window(s, to_enable):
                    await run_for(s, seconds, during)
                took = time.monotonic() - t0
                await trace_file(s, "flush")
            finally:
                if s.connected:
                    await _always(_restore_trace_file(s, prev.file))
    else:
        backend = "log"
        log = s.transport.log_path()
        if log is None:
            if s.pid is None:
                raise NotAvailableError(
                    "this QEMU uses the log backend and virtopt cannot tell its process (TCP to another host?), "
                    "so it cannot read its log: connect through its unix socket on the QEMU host, or read its -D "
                    "file with 'virtopt trace'")
            log = log_destination(s.pid)
        try:
            fh = open(log, "rb")
        except OSError as exc:
            raise NotAvailableError(f"cannot read QEMU's log {log}: {exc.strerror}") from None
        with fh:
            fh.seek(0, os.SEEK_END)
            start = fh.tell()
            t0 = time.monotonic()
            async with window(s, to_enable):
                await run_for(s, seconds, during)
            took = time.monotonic() - t0
            await asyncio.sleep(0.05)  # let the last lines reach the file
            fh.seek(start)
            data = fh.read()
            data = data[: data.rfind(b"\n") + 1]  # a line still being written (virtlogd copies in chunks): not yet
        wanted = set(names)
        lines = [ln for ln in data.decode(errors="replace").splitlines(keepends=True) if _log_event(ln) in wanted]
        if file:
            out = os.path.abspath(file)
        else:
            fd, out = tempfile.mkstemp(prefix=f"virtopt-capture-{s.pid}-", suffix=".log")
            os.close(fd)
        Path(out).write_text("".join(lines))
        where = os.readlink(log) if log.is_symlink() and log.name == "2" else None  # /proc/PID/fd/2
        notes.append(f"read QEMU's stderr ({where})" if where else f"read QEMU's log file {log}")
    if backend == "log" and not Path(out).stat().st_size:
        records: list[Any] = []
        notes.append("no event fired during the capture")
    else:
        # only what the capture asked for: not older records, not other events the user had enabled
        wanted = set(names)
        records = [r for r in _decode(out, events_file)[skip:] if _record_name(r) in wanted]
    counts: dict[str, int] = {}
    for rec in records:
        n = _record_name(rec)
        counts[n] = counts.get(n, 0) + 1
    return Capture(pattern, took, backend, out, names, to_enable, dict(sorted(counts.items())),
                   sum(counts.values()), t_on, notes, records)


async def _restore_trace_file(s: QmpSession, prev: str) -> None:
    try:
        await trace_file(s, "off")
        await _trace_file_hmp(s, f'set "{prev}"')
    except QmpGoneError:
        pass


_LOG_LINE = re.compile(r"^(?:\d+@[\d.]+:)?([A-Za-z0-9_]+)")


def _log_event(line: str) -> str:
    """The event name of a log-backend line (``name args`` or ``PID@SEC.USEC:name args``)."""
    m = _LOG_LINE.match(line)
    return m.group(1) if m else ""


__all__ = [
    "Capture",
    "QmpError",
    "TraceEventState",
    "TraceFileStatus",
    "capture",
    "connect",
    "events_file_for",
    "log_destination",
    "trace_file",
    "trace_list",
    "trace_set",
    "window",
]
