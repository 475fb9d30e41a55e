"""Keep QEMU running whatever happens to the virtopt process that attached gdb to it.

Measured on this machine (gdb 13.1, QEMU 7.2 and 10.0): gdb that reads EOF on its stdin finishes
the command it runs, detaches and exits, and QEMU runs on; gdb killed by SIGTERM or SIGKILL while
attached leaves QEMU in state T (stopped): the kernel detaches the tracer, but the group stop of the
SIGSTOP that PTRACE_ATTACH sent stays in force until someone sends SIGCONT.

So ``Watchdog`` forks a small process in its own session (terminal signals do not reach it) that
holds the read end of a pipe from the virtopt process. The virtopt process tells it gdb's PID and
when it attaches, runs commands, detaches and is done. When the pipe closes without "done" (the
virtopt process died, e.g. SIGKILL), the watchdog waits for gdb to detach by itself (EOF on its
stdin), interrupts a command that runs on past the grace period, kills that gdb only if it is
still there; when the virtopt process stays stopped (SIGSTOP) for the grace period while gdb holds
QEMU, it ends that gdb the same way. Then it sends SIGCONT to QEMU if,
and only if, QEMU is left stopped (T), was not stopped before we attached, and is still the same
process (PID and start time). ``resume_if_left_stopped`` is the same check the driver runs after
every session.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import time
from dataclasses import dataclass
from typing import Optional

from qemu_ext.host import procfs


@dataclass(frozen=True)
class ProcessId:
    """A process named so that a reused PID is not mistaken for it: PID plus start time (stat field 22)."""

    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> Optional[ProcessId]:
        st = _stat(pid)
        return None if st is None else cls(pid, int(st[21]))

    def same(self) -> bool:
        st = _stat(self.pid)
        return st is not None and int(st[21]) == self.start and st[2] not in ("Z", "X")


def _stat(pid: int, tid: Optional[int] = None) -> Optional[list[str]]:
    try:
        return procfs.task_stat(pid, pid if tid is None else tid)
    except (OSError, ValueError):
        return None


def states(pid: int) -> dict[int, str]:
    """The state letter of every thread (R, S, D, t = ptrace stop, T = stopped by a signal, ...)."""
    out: dict[int, str] = {}
    try:
        tids = procfs.tids(pid)
    except OSError:
        return out
    for tid in tids:
        st = _stat(pid, tid)
        if st is not None:
            out[tid] = st[2]
    return out


def is_stopped(pid: int) -> bool:
    """True when a thread of pid is in a job-control stop (T), as SIGSTOP leaves it."""
    return "T" in states(pid).values()


def resume_if_left_stopped(qemu: ProcessId, was_stopped: bool, settle: float = 0.0) -> bool:
    """SIGCONT qemu when it is stopped (T) and was not before we attached: True when it was resumed.

    Only that process (same PID and start time); watched for ``settle`` seconds, because a
    SIGSTOP still queued for a thread when the tracer died takes effect a moment later."""
    if was_stopped:
        return False
    resumed = False
    deadline = time.monotonic() + settle
    while True:
        if not qemu.same():
            return resumed
        if is_stopped(qemu.pid):
            try:
                os.kill(qemu.pid, signal.SIGCONT)
                resumed = True
            except ProcessLookupError:
                return resumed
        if time.monotonic() >= deadline:
            return resumed
        time.sleep(0.02)


# ---------------------------------------------------------------- the watchdog process

_IGNORED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGTSTP, signal.SIGTTIN,
            signal.SIGTTOU, signal.SIGPIPE)


class Watchdog:
    """A forked guard for one gdb session on ``qemu`` (see the module docstring)."""

    def __init__(self, qemu: ProcessId, grace: float = 10.0) -> None:
        self.qemu = qemu
        self.was_stopped = is_stopped(qemu.pid)
        self.grace = grace
        rfd, wfd = os.pipe()  # O_CLOEXEC: gdb does not inherit the write end
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the forked child (the tests observe what it does)
            try:
                os.close(wfd)
                _guard(rfd, qemu, self.was_stopped, grace)
            finally:
                os._exit(0)
        os.close(rfd)
        self.pid = pid
        self._wfd: Optional[int] = wfd

    def _tell(self, msg: str) -> None:
        if self._wfd is None:
            return
        try:
            os.write(self._wfd, (msg + "\n").encode())
        except OSError:
            pass

    def gdb_started(self, gdb_pid: int) -> None:
        self._tell(f"G {gdb_pid}")

    def attaching(self) -> None:
        self._tell("A")

    def commands(self) -> None:
        """The attach is complete and gdb runs commands: SIGINT to gdb interrupts one safely now."""
        self._tell("C")

    def detaching(self) -> None:
        """gdb is asked to detach: no more SIGINT to it."""
        self._tell("R")

    def detached(self) -> None:
        self._tell("D")

    def done(self) -> None:
        """The session ended cleanly (gdb detached and exited): the watchdog exits too."""
        self._tell("X")
        self.close()

    def close(self) -> None:
        """Close the pipe (without "done" first, the watchdog acts as if we died) and reap the watchdog."""
        if self._wfd is not None:
            os.close(self._wfd)
            self._wfd = None
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass


def _guard(rfd: int, qemu: ProcessId, was_stopped: bool, grace: float) -> None:  # pragma: no cover - child
    owner = ProcessId.of(os.getppid())  # the virtopt process
    os.setsid()
    for s in _IGNORED:
        signal.signal(s, signal.SIG_IGN)
    high = fcntl.fcntl(rfd, fcntl.F_DUPFD_CLOEXEC, 10)  # out of the way of 0, 1, 2
    if high != rfd:
        os.close(rfd)
        rfd = high
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)  # never hold the caller's stdout/stderr pipes open
    os.closerange(3, rfd)
    os.closerange(rfd + 1, max(rfd + 1, os.sysconf("SC_OPEN_MAX")))
    gdb: Optional[ProcessId] = None
    pidfd: Optional[int] = None
    in_commands = attached = False
    owner_stopped_since: Optional[float] = None
    buf = b""
    while True:
        if attached and owner is not None:
            # virtopt stopped (SIGSTOP, a debugger) while gdb holds QEMU: QEMU must not wait for it
            ready, _, _ = select.select([rfd], [], [], 0.25)
            if not ready:
                st = _stat(owner.pid)
                if st is not None and st[2] in ("T", "t"):
                    owner_stopped_since = owner_stopped_since or time.monotonic()
                    if time.monotonic() - owner_stopped_since >= grace:
                        break  # treat it as gone: end that gdb below
                else:
                    owner_stopped_since = None
                continue
        try:
            chunk = os.read(rfd, 4096)
        except InterruptedError:
            continue
        if not chunk:
            break
        buf += chunk
        *lines, rest = buf.split(b"\n")
        buf = rest
        for line in lines:
            word, _, arg = line.decode().partition(" ")
            if word == "G" and arg.isdigit():
                gdb = ProcessId.of(int(arg))
                try:
                    pidfd = os.pidfd_open(int(arg))
                except (AttributeError, OSError):
                    pidfd = None
            elif word == "A":
                attached = True
            elif word == "C":
                in_commands = True
            elif word == "R":
                in_commands = False
            elif word == "D":
                in_commands = attached = False
            elif word == "X":
                return
    # The virtopt process is gone (or stopped) without saying "done": a dead one's gdb read EOF on its
    # stdin and is finishing; a stopped one's gdb waits for it and is ended.
    if gdb is not None and gdb.same() and owner_stopped_since is None:
        _wait_gone(gdb, pidfd, grace)
        if gdb.same() and in_commands:
            # a long command: interrupt it (QEMU is stopped under gdb, so gdb keeps the SIGINT to itself),
            # then gdb reads the EOF, detaches and exits
            try:
                os.kill(gdb.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
            _wait_gone(gdb, pidfd, 3.0)
    if gdb is not None and gdb.same():  # stuck, or waiting for a stopped virtopt: the kernel detaches QEMU
            try:
                os.kill(gdb.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    resume_if_left_stopped(qemu, was_stopped, settle=0.5)


def _wait_gone(proc: ProcessId, pidfd: Optional[int], seconds: float) -> None:  # pragma: no cover - child
    deadline = time.monotonic() + seconds
    while proc.same() and time.monotonic() < deadline:
        if pidfd is not None:
            select.select([pidfd], [], [], max(0.0, min(0.2, deadline - time.monotonic())))
        else:
            time.sleep(0.05)
