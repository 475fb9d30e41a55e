"""gdb/MI, the part virtopt needs: start gdb in its own session, send tokenised commands, read records.

gdb runs with ``--interpreter=mi3`` in a new session (``setsid``): a terminal's Ctrl-C, SIGHUP or
SIGTSTP reaches the process group of the virtopt process, never gdb, so gdb never forwards a signal
to QEMU while it attaches. Only ``MiProcess.interrupt()`` sends gdb a SIGINT, and the driver calls it
only when QEMU is known to be stopped under gdb (then gdb turns it into a Python KeyboardInterrupt
of the running command; it is not passed to QEMU).

Records (gdb manual, "GDB/MI Output Syntax"): ``~"console"``, ``@"target"``, ``&"log"`` streams,
``TOKEN^done|running|connected|error|exit[,results]`` results, ``*stopped``/``*running`` exec
records, ``=notify`` records and the ``(gdb)`` prompt. Strings are C strings with gdb's escapes.
"""

from __future__ import annotations

import collections
import os
import re
import select
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

_ESC = re.compile(rb"\\(?:([0-7]{1,3})|(.))", re.S)
_SIMPLE = {b"n": b"\n", b"t": b"\t", b"r": b"\r", b'"': b'"', b"\\": b"\\", b"a": b"\a", b"b": b"\b",
           b"f": b"\f", b"v": b"\v", b"e": b"\x1b", b"'": b"'"}
_CSTRING = re.compile(rb'"((?:[^"\\]|\\.)*)"', re.S)
_RESULT = re.compile(rb"^(\d*)([\^*=])([a-z-]+)(?:,(.*))?$", re.S)


def c_string(body: bytes) -> str:
    """The text of an MI C string (without its quotes): gdb escapes \\n, \\t, \\", \\\\ and octal bytes."""
    if b"\\" not in body:
        return body.decode("utf-8", "replace")

    def repl(mo: re.Match) -> bytes:
        if mo.group(1) is not None:
            return bytes([int(mo.group(1), 8) & 0xFF])
        return _SIMPLE.get(mo.group(2), mo.group(2))

    return _ESC.sub(repl, body).decode("utf-8", "replace")


def mi_quote(text: str) -> str:
    """``text`` as an MI C-string argument."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


@dataclass
class Record:
    """One MI output line. ``kind``: console, target, log, result, exec, notify, prompt or raw."""

    kind: str
    text: str = ""  # the stream's text; for result/exec/notify the class (done, error, stopped, ...)
    token: Optional[int] = None
    rest: bytes = b""  # the results after the class, unparsed

    def field(self, name: str) -> Optional[str]:
        """The value of a top-level ``name="..."`` result (e.g. ``msg`` of an error)."""
        mo = re.search(rb"(?:^|,)" + re.escape(name.encode()) + rb'="((?:[^"\\]|\\.)*)"', self.rest, re.S)
        return c_string(mo.group(1)) if mo else None


def parse(line: bytes) -> Record:
    line = line.rstrip(b"\r\n")
    if line[:1] in (b"~", b"@", b"&") and line[1:2] == b'"' and line.endswith(b'"'):
        kind = {b"~": "console", b"@": "target", b"&": "log"}[line[:1]]
        return Record(kind, c_string(line[2:-1]))
    if line.startswith(b"(gdb)"):
        return Record("prompt")
    mo = _RESULT.match(line)
    if mo:
        kind = {b"^": "result", b"*": "exec", b"=": "notify"}[mo.group(2)]
        token = int(mo.group(1)) if mo.group(1) else None
        return Record(kind, mo.group(3).decode(), token, mo.group(4) or b"")
    return Record("raw", line.decode("utf-8", "replace"))


class MiError(Exception):
    """gdb went away or did not answer: the driver turns it into one clear line."""


class MiTimeout(MiError):
    pass


class MiInterrupted(MiError):
    """The wait was cut short because the owner asked to stop (a signal arrived)."""


@dataclass
class Answer:
    """What one MI command produced: its result class, error message and console text."""

    command: str
    result: str  # done, running, connected, error, exit
    message: Optional[str]
    console: str
    seconds: float
    records: list[Record] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.result != "error"


class MiProcess:
    """gdb with the MI interpreter, in its own session, with stdout and stderr on one pipe."""

    def __init__(self, gdb: str, args: Sequence[str] = (), env: Optional[dict] = None) -> None:
        self.proc = subprocess.Popen(
            [gdb, "-q", "-nx", "--interpreter=mi3", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True, bufsize=0, env=env)
        self._buf = b""  # an incomplete last line
        self._lines: collections.deque[bytes] = collections.deque()
        self._token = 0
        self.on_record: Optional[Callable[[Record], None]] = None
        self.stopped_seen = 0  # *stopped records so far (attach completion)
        self.running = False  # the last exec record was *running without a later *stopped

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, command: str) -> int:
        """Write one tokenised command; returns its token."""
        self._token += 1
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(f"{self._token}{command}\n".encode())
        except (BrokenPipeError, ValueError, OSError) as exc:
            raise MiError(f"gdb is not running ({exc})") from None
        return self._token

    def read_record(self, deadline: float, wake_fd: Optional[int] = None,
                    should_stop: Callable[[], bool] = lambda: False) -> Record:
        """The next record; MiTimeout at the deadline, MiInterrupted when should_stop() turns true,
        MiError when gdb closes its output (it exited)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            if self._lines:
                rec = parse(self._lines.popleft())
                if rec.kind == "exec":
                    if rec.text == "stopped":
                        self.stopped_seen += 1
                        self.running = False
                    elif rec.text == "running":
                        self.running = True
                if self.on_record is not None:
                    self.on_record(rec)
                return rec
            if should_stop():
                raise MiInterrupted()
            left = deadline - time.monotonic()
            if left <= 0:
                raise MiTimeout()
            fds = [fd] if wake_fd is None else [fd, wake_fd]
            try:
                ready, _, _ = select.select(fds, [], [], min(left, 1.0))
            except InterruptedError:  # pragma: no cover - PEP 475 retries select itself
                continue
            if wake_fd is not None and wake_fd in ready:
                try:
                    os.read(wake_fd, 512)
                except BlockingIOError:
                    pass
            if fd in ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise MiError("gdb exited")
                *lines, self._buf = (self._buf + chunk).split(b"\n")
                self._lines.extend(lines)

    def wait_result(self, token: int, deadline: float, command: str = "", wake_fd: Optional[int] = None,
                    should_stop: Callable[[], bool] = lambda: False) -> Answer:
        """Read until the result record of ``token``; console text on the way is collected."""
        t0 = time.monotonic()
        out: list[str] = []
        recs: list[Record] = []
        while True:
            rec = self.read_record(deadline, wake_fd, should_stop)
            recs.append(rec)
            if rec.kind == "console":
                out.append(rec.text)
            elif rec.kind == "result" and rec.token == token:
                msg = rec.field("msg") if rec.text == "error" else None
                return Answer(command, rec.text, msg, "".join(out), time.monotonic() - t0, recs)

    def interrupt(self) -> None:
        """SIGINT to gdb alone (never to QEMU: gdb is in its own session and process group)."""
        if self.alive():
            try:
                os.kill(self.proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass

    def close_input(self) -> None:
        """EOF on gdb's stdin: gdb finishes what it runs, detaches from what it attached, and exits."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass

    def kill(self) -> None:
        if self.alive():
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass

    def wait(self, timeout: float) -> bool:
        """True when gdb exited (and was reaped) within timeout seconds."""
        try:
            self.proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def release(self) -> None:
        """Tell gdb to exit and do not wait for it (once it detached, its exit is only cleanup):
        EOF on its stdin, our end of its output closed; Python's subprocess module reaps it later."""
        try:
            self.send("-gdb-exit")
        except MiError:
            pass
        self.close_input()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc.poll()

    def close(self) -> None:
        """Reap gdb and close the pipes (gdb must be gone or going)."""
        self.close_input()
        if not self.wait(2.0):
            self.kill()
            self.wait(2.0)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
