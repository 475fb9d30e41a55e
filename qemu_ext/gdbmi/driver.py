"""Drive gdb for `virtopt gdb`: attach to a live QEMU (or open a core), source the virtopt pack, run
commands, detach, and never harm QEMU on the way.

The order keeps QEMU's pause short: gdb reads the executable's symbols and loads the pack while QEMU
runs; only then does it attach (QEMU stops), run the commands and detach (QEMU runs again). The pause,
from the attach request to the detach answer, is measured and returned (``paused_seconds``).

Safety (issue 12, "never harm the inspected QEMU"):
- gdb runs in its own session (qemu_ext.gdbmi.mi): a terminal's Ctrl-C, SIGHUP or SIGTSTP never
  reaches it, so it never forwards a signal to QEMU (gdb's SIGINT during an attach kills QEMU).
- SIGINT, SIGTERM and SIGHUP to virtopt (``guard_signals``): an attach in progress completes, a
  running command is interrupted (SIGINT to gdb alone, only once QEMU is stopped under gdb, where gdb
  turns it into a KeyboardInterrupt of the Python command), gdb detaches, and ``Interrupted`` is
  raised. A third signal gives up on gdb: it is killed and QEMU resumed. SIGTSTP (Ctrl-Z) does the
  same, then suspends virtopt: QEMU never waits for a suspended virtopt.
- Every exit path detaches (``close`` runs in ``finally``); a command that does not answer within
  the timeout is interrupted, then gdb is killed and QEMU resumed.
- A watchdog process (qemu_ext.gdbmi.watchdog) covers the death of virtopt itself (SIGKILL).
- After every session QEMU is checked: left stopped (T) by us, it gets SIGCONT.
- Commands that would let QEMU run under gdb or end the session are refused before gdb starts; on a
  core, so are the commands that write QEMU's memory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from qemu_ext.errors import BadInputError, NotAvailableError, QemuError, VirtoptError

#: what the pack prints instead of JSON when virtopt-json-dir is set (large JSON through MI is slow)
JSON_MARKER = "@virtopt-json-file "

#: first words that are virtopt gdb commands (so `-c threads` means `virtopt threads`)
VIRTOPT_COMMANDS = ("info", "threads", "vcpus", "mtree", "timers", "trace", "qcow2", "coroutines", "block",
                    "waiters", "locks", "bt", "cpustate")
#: virtopt words that are gdb commands too: (virtopt's when alone?, next words that make it virtopt's);
#: a `--option` next makes it virtopt's too. `info registers`, `trace LOCATION`, `bt`, `bt 5`,
#: `bt -full` stay gdb's; `info`, `trace list`, `bt all`, `bt --json` are virtopt's.
SHARED_WORDS: dict[str, tuple[bool, tuple[str, ...]]] = {
    "info": (True, ()), "trace": (True, ("list", "enable", "disable")), "bt": (False, ("all",))}
#: virtopt commands that write QEMU's memory (refused on a core)
WRITE_COMMANDS = ("virtopt trace enable", "virtopt trace disable")
#: gdb commands (and their abbreviations) that resume, kill or signal QEMU, or end or switch the session
RUN_CONTROL = frozenset((
    "run r start starti continue c cont fg next n step s stepi si nexti ni until u advance finish fin "
    "jump j signal queue-signal kill k attach detach disconnect quit q target file exec-file "
    "symbol-file core-file core checkpoint restart record rec reverse-continue rc "
    "reverse-step rs reverse-next rn").split())

GRACE_SECONDS = 5.0  # for gdb to answer after being interrupted, before it is killed
SETUP_SECONDS = 300.0  # reading symbols, loading the pack, attaching: slow on a busy machine, never a user's command


def pack_path() -> Path:
    """The gdb pack users `source`: $VIRTOPT_GDB_PACK, gdb/virtopt-gdb.py beside this qemu_ext
    (a checkout), or <prefix>/share/virtopt/gdb/virtopt-gdb.py (an installed virtualenv)."""
    here = Path(__file__).resolve()
    cands = [Path(os.environ["VIRTOPT_GDB_PACK"])] if os.environ.get("VIRTOPT_GDB_PACK") else []
    cands += [here.parent.parent.parent / "gdb" / "virtopt-gdb.py",
              Path(sys.prefix) / "share" / "virtopt" / "gdb" / "virtopt-gdb.py"]
    for cand in cands:
        if cand.is_file():
            return cand
    raise NotAvailableError(f"the virtopt gdb pack is not installed (looked for {', '.join(map(str, cands))})")


@dataclass
class GdbResult:
    """What one console command printed, and gdb's error line when it failed."""

    command: str
    ok: bool
    output: str
    error: Optional[str] = None
    seconds: float = 0.0

    @property
    def data(self) -> Any:
        """The JSON the command printed (commands run with --json), else None."""
        try:
            return json.loads(self.output)
        except ValueError:
            return None

    def to_dict(self) -> dict[str, Any]:
        return {"command": self.command, "ok": self.ok, "data": self.data,
                "output": self.output, "error": self.error, "seconds": round(self.seconds, 4)}

    def raise_for_error(self) -> None:
        if not self.ok:
            raise error_for(self.error or "gdb command failed")


def error_for(message: str) -> VirtoptError:
    """The VirtoptError (and so the exit code) matching a gdb error line."""
    low = message.lower()
    if ("needs qemu's debug info" in low or " needs " in low or "not available" in low
            or "core file: nothing to change" in low):
        return NotAvailableError(message)
    return QemuError(message)


# ---------------------------------------------------------------- commands


def normalize(command: str) -> str:
    """`threads --json` -> `virtopt threads --json`; gdb's own commands (`info registers rip`,
    `trace LOCATION`, `bt`) are passed to gdb as is (see SHARED_WORDS)."""
    c = command.strip()
    words = c.split()
    if not words or words[0] not in VIRTOPT_COMMANDS:
        return c
    if words[0] in SHARED_WORDS:
        alone, nexts = SHARED_WORDS[words[0]]
        nxt = words[1] if len(words) > 1 else ""
        if not nxt:
            mine = alone
        else:
            mine = nxt.startswith("--") or nxt in nexts or (nxt.startswith("-") and words[0] != "bt")
        if not mine:
            return c
    return f"virtopt {c}"


def refusal(command: str, core: bool) -> Optional[VirtoptError]:
    """Why virtopt will not send ``command`` to gdb (None when it will)."""
    c = normalize(command)
    words = c.split()
    first = words[0] if words else ""
    if first in RUN_CONTROL:
        return NotAvailableError(
            f"{first!r} is not run by virtopt gdb: it would resume, signal or leave QEMU under gdb, or end the "
            "session; virtopt gdb only inspects (use gdb -p PID for that)")
    if core and any(c == w or c.startswith(w + " ") for w in WRITE_COMMANDS):
        return NotAvailableError(f"{' '.join(words[:3])} changes a running QEMU's memory; a core file has no QEMU "
                                 "to change")
    return None


# ---------------------------------------------------------------- results


class Interrupted(VirtoptError):
    """A signal asked virtopt to stop; gdb detached (or never attached) and QEMU runs on."""

    def __init__(self, signum: int, pid: Optional[int], attached: bool, paused: Optional[float],
                 qemu_running: Optional[bool], was_stopped: bool = False) -> None:
        self.was_stopped = was_stopped
        self.signum = signum
        self.signame = signal.Signals(signum).name
        self.pid = pid
        self.attached = attached
        self.paused_seconds = paused
        self.qemu_running = qemu_running
        where = f"QEMU {pid}" if pid else "the core"
        super().__init__(f"interrupted by {self.signame} ({where}: gdb {'detached' if attached else 'not attached'})",
                         exit_code=128 + signum)


@dataclass
class GdbRun:
    """One `virtopt gdb` run: the target, each command's result, how long QEMU was paused."""

    pid: Optional[int]
    core: Optional[str]
    exe: Optional[str]
    build_id: Optional[str]
    results: list[GdbResult]
    paused_seconds: Optional[float]  # None for a core
    resumed: bool = False  # QEMU was left stopped and virtopt sent it SIGCONT
    was_stopped: bool = False  # QEMU was stopped (T) before gdb attached: left as it was

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "core": self.core, "exe": self.exe, "build-id": self.build_id,
                "paused-seconds": None if self.paused_seconds is None else round(self.paused_seconds, 4),
                "was-stopped": self.was_stopped, "resumed": self.resumed,
                "commands": [r.to_dict() for r in self.results]}


# ---------------------------------------------------------------- targets


def live_exe(pid: int) -> str:
    """The path gdb should read QEMU's symbols from: the executable's path when that file is still
    the one running, else /proc/PID/exe (a binary replaced or deleted since QEMU started)."""
    from qemu_ext.host import procfs

    link = procfs.proc_path(pid, "exe")
    try:
        path = os.readlink(link)
        if os.path.isabs(path) and os.path.samestat(os.stat(path), os.stat(link)):
            return path
    except OSError:
        pass
    return link


def _exe_build_id(path: str) -> Optional[str]:
    from qemu_ext.gdbmi import elfsyms

    return elfsyms.build_id(path)


def known_qemus() -> list[str]:
    """QEMU system emulators on this host, to find a core's executable by build-id: the QEMUs virtopt
    installed (qemu_ext.vm) and the usual install paths."""
    import glob

    from qemu_ext import vm

    out = [b.system for b in vm.qemu_builds()]
    for pattern in ("/usr/bin/qemu-system-*", "/usr/local/bin/qemu-system-*", "/usr/libexec/qemu-kvm"):
        out += sorted(glob.glob(pattern))
    return list(dict.fromkeys(os.path.realpath(p) for p in out))


def check_core_exe(core: str, exe: Optional[str]) -> tuple[str, Optional[str], Any]:
    """The executable to open a core with and its build-id: the one given; else the one the core
    names when its build-id matches the core's; else a QEMU on this host with that build-id. One line
    when there is none, when the core is not QEMU's, or when the given binary is not the one that ran."""
    from qemu_ext.gdbmi import corefile
    from qemu_ext.host import procfs

    info = corefile.read_core(core)
    if info.exe and not procfs.is_qemu_executable(info.exe):
        raise VirtoptError(f"{core} is not a core of QEMU ({info.fname or '?'}, {info.exe})")
    if exe is None:
        exe = _find_core_exe(core, info)
    bid = _exe_build_id(exe)
    if info.build_id and bid != info.build_id:
        raise BadInputError(f"{exe} is not the QEMU that made {core}: build-id {bid or 'none'} != "
                            f"{info.build_id} (the core's {info.exe}); give the matching binary with --exe")
    return exe, bid or info.build_id, info


def _find_core_exe(core: str, info: Any) -> str:
    named = info.exe
    if not named and not info.build_id:
        raise BadInputError(f"{core}: the core does not name its executable: give the QEMU that made it with --exe")
    if named and os.path.exists(named) and (info.build_id is None or _same_build(named, info.build_id)):
        return named
    if info.build_id:
        for cand in known_qemus():
            if cand != named and _same_build(cand, info.build_id):
                return cand
    if named and os.path.exists(named):
        bid = _exe_build_id(named)
        raise BadInputError(f"{named} is not the QEMU that made {core}: build-id {bid or 'none'} != "
                            f"{info.build_id} and no QEMU here has that build-id; give the matching binary with "
                            "--exe")
    raise BadInputError(f"cannot open {named or 'the executable'}: No such file or directory (the executable "
                        f"{core} names; no QEMU here has its build-id {info.build_id}): give the QEMU that made "
                        "the core with --exe")


def _same_build(path: str, build_id: str) -> bool:
    try:
        return _exe_build_id(path) == build_id
    except BadInputError:
        return False


def check_not_traced(pid: int) -> None:
    """One line when another debugger already holds QEMU (ptrace allows one tracer)."""
    from qemu_ext.host import procfs

    try:
        tracer = int(procfs.status(pid).get("TracerPid", "0") or 0)
    except (OSError, ValueError):
        return
    if tracer:
        try:
            name = procfs.comm(tracer)
        except OSError:
            name = "?"
        raise QemuError(f"QEMU {pid} is already traced by process {tracer} ({name}): a process has one tracer; "
                        "detach that debugger first")


def check_live_exe(pid: int, exe: Optional[str]) -> tuple[str, Optional[str]]:
    """The executable to read QEMU pid's symbols from and its build-id; a given one must match."""
    from qemu_ext.host import procfs

    running = live_exe(pid)
    try:
        bid_running = _exe_build_id(procfs.proc_path(pid, "exe"))
    except BadInputError:
        bid_running = None  # not readable (another user's QEMU): gdb will say whether it may attach
    if exe is None:
        return running, bid_running
    bid = _exe_build_id(exe)
    if bid_running is not None and bid != bid_running:
        raise BadInputError(f"{exe} is not the executable of QEMU {pid}: build-id {bid or 'none'} != {bid_running} "
                            f"({os.readlink(procfs.proc_path(pid, 'exe'))}); leave --exe out or give the matching "
                            "binary")
    return exe, bid


def index_cache_args() -> list[str]:
    """gdb's index cache in virtopt's cache directory: gdb indexes a debug QEMU's DWARF once per
    build-id (about 1 s of CPU for QEMU 7.2) and reads the index from there afterwards (0.2 s)."""
    # vm.cache_dir()'s rule, without importing qemu_ext.vm (socket, ...) on this path
    d = Path(os.environ.get("VIRTOPT_CACHE", Path.home() / ".cache" / "virtopt")) / "gdb-index"
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError:
        return []
    return ["-iex", "set index-cache enabled on", "-iex", f"set index-cache directory {d}"]


def spawn_gdb(exe_gdb: str) -> Any:
    """gdb/MI in its own session, with virtopt's settings (no debuginfod, the index cache)."""
    from qemu_ext.gdbmi import mi

    return mi.MiProcess(exe_gdb, ["-iex", "set debuginfod enabled off", *index_cache_args()])


def prestart(gdb: str = "gdb") -> Any:
    """Start gdb now (it attaches to nothing until told), so that it initialises while the caller
    resolves and checks its target; hand it to run(early=...), which releases it if unused. None
    when gdb is missing (run() then says so)."""
    exe_gdb = shutil.which(gdb)
    return spawn_gdb(exe_gdb) if exe_gdb is not None else None


# ---------------------------------------------------------------- the session


class Stop:
    """Stop requests (signal numbers) for a session, safe to make from a signal handler: the
    session's waits wake up on them through a pipe. Made before the session when signals must be
    caught from the very start (the CLI), else by the session itself."""

    def __init__(self) -> None:
        self.signals: list[int] = []
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def request(self, signum: int) -> None:
        self.signals.append(signum)
        try:
            os.write(self.wake_w, b"!")
        except OSError:
            pass

    @property
    def first(self) -> Optional[int]:
        return self.signals[0] if self.signals else None

    def close(self) -> None:
        for fd in (self.wake_r, self.wake_w):
            if fd >= 0:
                os.close(fd)
        self.wake_r = self.wake_w = -1


@dataclass
class GdbSession:
    """One gdb with the virtopt pack loaded, attached to QEMU ``pid`` or holding ``core``.
    Use as a context manager (it always detaches)."""

    pid: Optional[int] = None
    gdb: str = "gdb"
    timeout: float = 30.0
    pack: Optional[Path] = None
    core: Optional[str] = None
    exe: Optional[str] = None
    build_id: Optional[str] = None
    paused_seconds: Optional[float] = None
    attached: bool = False
    resumed: bool = False
    was_stopped: bool = False
    early: Any = None  # a gdb started by prestart() before the session knew its target
    stop: Optional[Stop] = None  # stop requests (made by the session when not given)
    log: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self._mi: Any = None
        self._watchdog: Any = None
        self._qemu: Any = None
        self._json_dir: Optional[str] = None
        self._attach_t0: Optional[float] = None
        self._phase = "idle"  # idle, setup, attach, command, detach, closed
        self._stop_seen = 0
        self._own_stop = self.stop is None
        self._pending = False  # a command was sent and its answer not read (e.g. a KeyboardInterrupt)
        self._forced = False

    # -- lifecycle

    def __enter__(self) -> GdbSession:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def stop_signal(self) -> Optional[int]:
        """The first signal that asked this session to stop, if any."""
        return self.stop.first if self.stop is not None else None

    @property
    def _stop_requests(self) -> list[int]:
        return self.stop.signals if self.stop is not None else []

    def request_stop(self, signum: int) -> None:
        """Ask the session to stop (safe to call from a signal handler): see the module docstring."""
        if self.stop is None:
            self.stop = Stop()
        self.stop.request(signum)

    def start(self) -> None:
        if (self.pid is None) == (self.core is None):
            if self.early is not None:
                self.early.release()
            raise VirtoptError("give a QEMU process or a core file", exit_code=2)
        try:
            exe_gdb = shutil.which(self.gdb)
            if exe_gdb is None:
                raise NotAvailableError(f"{self.gdb} not found: apt-get install gdb")
            pack = self.pack or pack_path()
            if self.stop is None:
                self.stop = Stop()
            self._start(exe_gdb, pack)
        except BaseException:
            if self.early is not None:
                self.early.release()
                self.early = None
            self.close()
            raise

    def _start(self, exe_gdb: str, pack: Path) -> None:
        from qemu_ext.gdbmi import mi

        self._phase = "setup"
        # gdb starts up while the target is checked (it attaches to nothing until told)
        early, self.early = self.early, None
        self._mi = early if early is not None and early.alive() else spawn_gdb(exe_gdb)
        if early is not None and early is not self._mi:
            early.release()
        self._mi.on_record = self.log.append
        if self.core is not None:
            self.exe, self.build_id, _info = check_core_exe(self.core, self.exe)
        else:
            from qemu_ext.gdbmi import watchdog
            from qemu_ext.host.target import require_qemu

            require_qemu(self.pid)  # type: ignore[arg-type]
            check_not_traced(self.pid)  # type: ignore[arg-type]
            self.exe, self.build_id = check_live_exe(self.pid, self.exe)  # type: ignore[arg-type]
            self._qemu = watchdog.ProcessId.of(self.pid)  # type: ignore[arg-type]
            if self._qemu is None:
                from qemu_ext import errors

                raise errors.no_process(self.pid)  # type: ignore[arg-type]
            # the watchdog closes every descriptor it inherits but its pipe: gdb's stdin is ours alone
            self._watchdog = watchdog.Watchdog(self._qemu, grace=min(self.timeout, 10.0))
            self._watchdog.gdb_started(self._mi.pid)
            self.was_stopped = self._watchdog.was_stopped
        # while QEMU runs: symbols of the executable, the pack, the JSON directory (sent at once)
        self._json_dir = tempfile.mkdtemp(prefix="virtopt-gdb-")
        tokens = [self._mi.send(c) for c in (
            f"-file-exec-and-symbols {mi.mi_quote(self.exe or '')}",
            f"-interpreter-exec console {mi.mi_quote(f'source {pack}')}",
            f"-interpreter-exec console {mi.mi_quote(f'set virtopt-json-dir {self._json_dir}')}")]
        ans = self._wait(tokens[0], "-file-exec-and-symbols", self._setup_timeout)
        if not ans.ok:
            raise QemuError(f"gdb cannot read the symbols of {self.exe}: {ans.message}")
        ans = self._wait(tokens[1], "source", self._setup_timeout)
        said = "".join(r.text for r in ans.records if r.kind in ("console", "log")).strip()
        if not ans.ok or "did not load" in said:
            raise QemuError(f"the virtopt gdb pack did not load: {ans.message or said.splitlines()[-1]}")
        self._wait(tokens[2], "set virtopt-json-dir", self._setup_timeout)
        if self.core is not None:
            ans = self._exchange(f"-interpreter-exec console {mi.mi_quote('core-file ' + self.core)}",
                                 self._setup_timeout)
            if not ans.ok:
                raise BadInputError(f"gdb cannot open the core {self.core}: {ans.message}")
            self._phase = "command"
            return
        if self._stop_requests:
            return  # asked to stop before QEMU was touched: never attach
        self._phase = "attach"
        self._watchdog.attaching()
        self._attach_t0 = time.monotonic()
        # gdb reads the command after the attach once the attach is complete (QEMU stopped, libraries loaded)
        tokens = [self._mi.send(f"-target-attach {self.pid}"), self._mi.send("-gdb-show confirm")]
        ans = self._wait(tokens[0], "-target-attach", self._setup_timeout)
        if not ans.ok:
            raise QemuError(f"gdb cannot attach to QEMU {self.pid}: {ans.message}"
                            + (" (see /proc/sys/kernel/yama/ptrace_scope)" if "not permitted" in (ans.message or "")
                               else ""))
        self.attached = True
        self._wait(tokens[1], "-gdb-show confirm", self._setup_timeout)
        self._phase = "command"
        self._watchdog.commands()

    @property
    def _setup_timeout(self) -> float:
        return max(self.timeout, SETUP_SECONDS)

    def close(self) -> None:
        """Detach (QEMU runs on), end gdb, check QEMU is not left stopped, end the watchdog."""
        if self._phase == "closed":
            return
        try:
            self._close_gdb()
        finally:
            self._phase = "closed"
            if self._qemu is not None and self._attach_t0 is not None:  # an attach was at least begun
                from qemu_ext.gdbmi import watchdog

                self.resumed = watchdog.resume_if_left_stopped(
                    self._qemu, self.was_stopped, settle=0.5 if self._forced else 0.0) or self.resumed
            if self._watchdog is not None:
                self._watchdog.done()
                self._watchdog = None
            if self._json_dir:
                shutil.rmtree(self._json_dir, ignore_errors=True)
                self._json_dir = None
            if self._own_stop and self.stop is not None:
                self.stop.close()

    def _close_gdb(self) -> None:
        from qemu_ext.gdbmi import mi

        m = self._mi
        if m is None:
            return
        try:
            if self.attached and m.alive() and not self._forced:
                if self._pending and self._safe_to_interrupt():
                    m.interrupt()  # a command left running (KeyboardInterrupt in a caller): cut it short
                self._phase = "detach"
                if self._watchdog is not None:
                    self._watchdog.detaching()
                try:
                    self._exchange("-target-detach", max(self.timeout, 30.0))
                    self._paused_until(time.monotonic())
                    if self._watchdog is not None:
                        self._watchdog.detached()
                except (VirtoptError, mi.MiError):
                    self._give_up()
        finally:
            self._paused_until(time.monotonic())
            if m.alive() and not self._forced:
                m.release()  # detached: gdb's own exit (freeing its symbol tables) is no business of QEMU's
            else:
                m.close()
            self._mi = None

    def _paused_until(self, t: float) -> None:
        if self._attach_t0 is not None and self.paused_seconds is None:
            self.paused_seconds = t - self._attach_t0

    def _give_up(self) -> None:
        """gdb does not answer: kill it (the kernel detaches QEMU); close() then resumes QEMU."""
        self._forced = True
        self._paused_until(time.monotonic())
        if self._mi is not None:
            self._mi.kill()

    # -- talking to gdb

    def _safe_to_interrupt(self) -> bool:
        """SIGINT to gdb is safe only while QEMU is stopped under gdb and gdb runs a command."""
        return self._phase == "command" and self.attached and self._mi is not None and not self._mi.running

    def _exchange(self, command: str, timeout: Optional[float] = None) -> Any:
        from qemu_ext.gdbmi import mi

        if self._mi is None or self._forced:
            raise QemuError("gdb is not running")
        try:
            token = self._mi.send(command)
        except mi.MiError:
            self._forced = True
            self._paused_until(time.monotonic())
            raise QemuError(f"gdb exited before {command!r}") from None
        return self._wait(token, command, timeout)

    def _wait(self, token: int, command: str, timeout: Optional[float] = None) -> Any:
        """The answer to ``token``, with the stop requests, timeouts and gdb's death handled."""
        from qemu_ext.gdbmi import mi

        if self._mi is None or self._forced:
            raise QemuError("gdb is not running")
        limit = timeout or self.timeout
        deadline = time.monotonic() + limit
        interrupted = False
        self._pending = True  # until the answer is in (an exception from the caller's side leaves it set)
        while True:
            try:
                ans = self._mi.wait_result(token, deadline, command, self.stop.wake_r if self.stop else None,
                                           lambda: len(self._stop_requests) > self._stop_seen)
                self._pending = False
                return ans
            except mi.MiInterrupted:
                self._stop_seen = len(self._stop_requests)
                if self._phase == "setup":  # QEMU not touched yet: just end gdb
                    self._forced = True
                    self._mi.kill()
                    raise QemuError("stopped before gdb attached") from None
                if len(self._stop_requests) >= 3:
                    self._give_up()  # the user insists: do not wait for gdb any longer
                    raise QemuError(f"gdb abandoned while running {command!r}") from None
                if not interrupted and self._safe_to_interrupt():
                    self._mi.interrupt()
                    interrupted = True
                    deadline = min(deadline, time.monotonic() + GRACE_SECONDS)
            except mi.MiTimeout:
                if not interrupted and self._safe_to_interrupt():
                    self._mi.interrupt()
                    interrupted = True
                    deadline = time.monotonic() + GRACE_SECONDS
                    continue
                self._give_up()
                raise QemuError(f"gdb did not answer {command!r} within {limit:.0f} s") from None
            except mi.MiError:
                self._forced = True
                self._paused_until(time.monotonic())
                raise QemuError(f"gdb exited while running {command!r}") from None

    def mi(self, command: str, timeout: Optional[float] = None) -> GdbResult:
        """Send one MI command and wait for its result record; console output is collected."""
        ans = self._exchange(command, timeout)
        err = None
        if not ans.ok:
            err = "; ".join(ln.strip() for ln in str(ans.message).splitlines() if ln.strip())
        return GdbResult(command, ans.ok, ans.console, err, ans.seconds)

    def console(self, command: str, timeout: Optional[float] = None) -> GdbResult:
        """Run a CLI command (e.g. `virtopt threads --json`) and return what it printed."""
        from qemu_ext.gdbmi import mi

        res = self.mi(f"-interpreter-exec console {mi.mi_quote(command)}", timeout)
        res.command = command
        if self._json_dir and JSON_MARKER in res.output:
            res.output = self._take_json_files(res.output)
        return res

    def _take_json_files(self, output: str) -> str:
        parts = []
        for line in output.splitlines(keepends=True):
            if line.startswith(JSON_MARKER):
                path = Path(line[len(JSON_MARKER):].strip())
                if path.parent == Path(self._json_dir or ""):
                    try:
                        parts.append(path.read_text())
                        path.unlink()
                        continue
                    except OSError:
                        pass
            parts.append(line)
        return "".join(parts)

    def run(self, command: str, timeout: Optional[float] = None) -> GdbResult:
        """A virtopt command (`threads --json`) or a gdb command, refused when it would resume or
        signal QEMU (or, on a core, write memory)."""
        why = refusal(command, self.core is not None)
        if why is not None:
            return GdbResult(normalize(command), False, "", str(why))
        return self.console(normalize(command), timeout)

    def describe(self) -> GdbRun:
        return GdbRun(self.pid, self.core, self.exe, self.build_id, [], self.paused_seconds, self.resumed,
                      self.was_stopped)


# ---------------------------------------------------------------- signals


@contextmanager
def guard_signals(stop: Any) -> Iterator[None]:
    """While the block runs, SIGINT/SIGTERM/SIGHUP/SIGTSTP ask ``stop`` (a Stop or a session) to stop (it detaches
    first); a SIGTSTP (Ctrl-Z) then suspends virtopt once QEMU runs again. Only in the main thread
    (elsewhere signals are not ours)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    suspend: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        if signum == signal.SIGTSTP:
            suspend.append(signum)
        (stop.request if isinstance(stop, Stop) else stop.request_stop)(signum)

    wanted = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGTSTP)
    old = {s: signal.signal(s, on_signal) for s in wanted}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if suspend and old[signal.SIGTSTP] in (signal.SIG_DFL, None):
            os.kill(os.getpid(), signal.SIGTSTP)  # gdb detached, QEMU runs: now the shell may stop us


def _qemu_running(pid: Optional[int]) -> Optional[bool]:
    if pid is None:
        return None
    from qemu_ext.gdbmi import watchdog

    st = watchdog.states(pid)
    return bool(st) and not any(s in ("t", "T", "Z", "X") for s in st.values())


def run(commands: Sequence[str], pid: Optional[int] = None, core: Optional[str] = None, exe: Optional[str] = None,
        gdb: str = "gdb", timeout: float = 30.0, handle_signals: bool = True, early: Any = None,
        stop: Optional[Stop] = None) -> GdbRun:
    """Attach once (or open the core), run every command, detach. Commands gdb must not run are
    refused before gdb is used; a signal ends the run with ``Interrupted`` after gdb detached.
    ``early``: a gdb from prestart() (released here whatever happens); ``stop``: the caller's stop
    requests when it guards the signals itself (guard_signals(stop) around prestart and run)."""
    for c in commands:
        why = refusal(c, core is not None)
        if why is not None:
            if early is not None:
                early.release()
            raise why
    session = GdbSession(pid, gdb=gdb, timeout=timeout, core=core, exe=exe, early=early, stop=stop)
    results: list[GdbResult] = []
    guard = guard_signals(session) if handle_signals else _nothing()
    with guard:
        try:
            if session.stop_signal is not None:  # a signal before gdb was used: touch nothing
                if early is not None:
                    early.release()
                    session.early = None
            else:
                session.start()
            for c in commands:
                if session.stop_signal is not None:
                    break
                results.append(session.run(c))
        except VirtoptError:
            if session.stop_signal is None:
                raise
        finally:
            session.close()
    if session.stop_signal is not None:
        raise Interrupted(session.stop_signal, pid, session.attached, session.paused_seconds, _qemu_running(pid),
                          session.was_stopped)
    out = session.describe()
    out.results = results
    return out


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def run_commands(pid: int, commands: Sequence[str], gdb: str = "gdb", timeout: float = 30.0) -> list[GdbResult]:
    """Attach once, run every command (virtopt sub-commands or plain gdb commands), detach."""
    return run(commands, pid=pid, gdb=gdb, timeout=timeout).results


def query(pid: int, command: str, *args: str, gdb: str = "gdb", timeout: float = 30.0) -> Any:
    """The data of one `virtopt COMMAND ARGS --json` in QEMU pid; raises VirtoptError on failure."""
    line = " ".join(["virtopt", command, *args, "--json"])
    (res,) = run_commands(pid, [line], gdb=gdb, timeout=timeout)
    res.raise_for_error()
    data = res.data
    if data is None:
        raise QemuError(f"{line}: gdb printed no JSON: {res.output.strip()[:200]}")
    return data
