"""`virtopt gdb` never harms the QEMU it inspects (issue 12, section 1).

Each test runs the real `virtopt gdb` in its own session (as a shell runs a job: the signal goes to
its process group, which is what a terminal's Ctrl-C does) against a real QEMU, sends a signal at
a moment told apart by what the processes show (gdb started but QEMU not stopped yet: symbols and
pack loading; QEMU in ptrace stop: the attach; a command that has begun: a marker file), and checks
what a user would: the one line and the exit code, QEMU not left stopped (t/T) and QMP
`query-status` answering `running`. One QEMU per series for the whole module.

VIRTOPT_SIGNAL_REPEAT=10 runs the full matrix (every signal at every moment) ten times (the issue's
10-of-10); bench/bench_gdb.py runs it ten times too and prints the tally.
"""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
from helpers import REPO

from qemu_ext.gdbmi import watchdog

REPEAT = int(os.environ.get("VIRTOPT_SIGNAL_REPEAT", "1"))
SLEEPER = "python import time; open({marker!r}, 'w').close(); time.sleep(60)"


@pytest.fixture(scope="module")
def vm(module_qemu_factory):
    qp = module_qemu_factory(name=f"virtopt-sig-{os.getpid()}")
    qp.client = qp.qmp()
    return qp


def launch(*args: str, **kw) -> subprocess.Popen:
    """`virtopt ARGS` as a job in its own process group (killpg reaches it and only it)."""
    env = dict(os.environ)
    env.pop("VIRTOPT_DEBUG", None)
    return subprocess.Popen([sys.executable, "-m", "qemu_ext", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def children(pid: int) -> dict[int, str]:
    out = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = (task / "children").read_text().split()
        except OSError:
            continue
        for k in kids:
            try:
                out[int(k)] = Path(f"/proc/{k}/comm").read_text().strip()
            except OSError:
                pass
    return out


def gdb_of(proc: subprocess.Popen) -> Optional[int]:
    return next((p for p, name in children(proc.pid).items() if name == "gdb"), None)


def traced(pid: int) -> bool:
    """QEMU's main thread is in ptrace stop (gdb stops every thread; the main one is enough to tell)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "t"
    except OSError:
        return False


def wait_for(cond, what: str, timeout: float = 30.0, step: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(step)


def reach(moment: str, proc: subprocess.Popen, pid: int, marker: Path) -> None:
    """Return at ``moment`` of a `virtopt gdb` run: symbols (gdb up, QEMU not stopped yet), attach
    (QEMU just entered ptrace stop: gdb attaches and loads libraries), command (the command began)."""
    if moment == "symbols":
        wait_for(lambda: gdb_of(proc) is not None or proc.poll() is not None, "gdb to start")
        assert not traced(pid)
    elif moment == "attach":
        # the attach and the libraries' symbols keep QEMU stopped for 100 ms and more: 2 ms steps catch it
        wait_for(lambda: traced(pid) or proc.poll() is not None, "QEMU to enter ptrace stop", step=0.002)
    else:
        wait_for(lambda: marker.exists() or proc.poll() is not None, "the command to begin")
    assert proc.poll() is None, proc.communicate()


def assert_running(qp, settle: float = 0.0) -> None:
    """QEMU is not stopped (t/T) — after ``settle`` seconds at most — and QMP says it runs."""
    deadline = time.monotonic() + settle
    while set(watchdog.states(qp.pid).values()) & {"t", "T"} and time.monotonic() < deadline:
        time.sleep(0.02)
    states = watchdog.states(qp.pid)
    assert states and not set(states.values()) & {"t", "T", "Z"}, states
    assert qp.client.cmd("query-status")["status"] == "running"


MOMENTS = ("symbols", "attach", "command")
# SIGINT at every moment; SIGTERM and SIGHUP (the same path in virtopt) at the attach, where gdb's own
# handling of a signal would kill QEMU; VIRTOPT_SIGNAL_REPEAT or bench_gdb.py run the full matrix.
CASES = [(signal.SIGINT, m) for m in MOMENTS] + [(s, "attach") for s in (signal.SIGTERM, signal.SIGHUP)]
if REPEAT > 1:
    CASES = [(s, m) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) for m in MOMENTS]


@pytest.mark.parametrize("rep", range(REPEAT), ids=lambda r: f"run{r}")
@pytest.mark.parametrize("sig,moment", CASES, ids=[f"{s.name}-{m}" for s, m in CASES])
def test_signal_to_the_process_group_detaches_and_exits_with_one_line(vm, tmp_path, sig, moment, rep):
    marker = tmp_path / "started"
    proc = launch("gdb", str(vm.pid), "-c", SLEEPER.format(marker=str(marker)))
    reach(moment, proc, vm.pid, marker)
    t0 = time.monotonic()
    os.killpg(proc.pid, sig)
    out, err = proc.communicate(timeout=30)
    took = time.monotonic() - t0
    # QEMU runs the moment virtopt has exited: it detached first (and resumed nothing it left stopped)
    assert_running(vm)
    assert proc.returncode == 128 + sig, err
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"virtopt: interrupted by {sig.name}")
    if moment == "symbols":
        assert "before gdb attached" in err and "was not paused" in err
    else:
        assert f"gdb detached from QEMU {vm.pid} after a " in err and "QEMU runs again" in err
    if moment == "command":  # the 60 s command was interrupted, not waited for
        assert took < 10, took


@pytest.fixture(scope="module")
def dvm(module_debug_qemu_factory):
    qp = module_debug_qemu_factory(name=f"virtopt-sig-dbg-{os.getpid()}")
    qp.client = qp.qmp()
    return qp


@pytest.mark.parametrize("moment", ("attach", "command"))
def test_ctrl_c_on_a_debug_build(dvm, tmp_path, moment):
    """The debug build (DWARF: more to load while attached) under the same Ctrl-C."""
    marker = tmp_path / "started"
    proc = launch("gdb", str(dvm.pid), "-c", "threads", "-c", SLEEPER.format(marker=str(marker)))
    reach(moment, proc, dvm.pid, marker)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert_running(dvm)
    assert proc.returncode == 130 and out == "" and err.count("\n") == 1, err
    assert err.startswith(f"virtopt: interrupted by SIGINT: gdb detached from QEMU {dvm.pid}")


@pytest.mark.parametrize("moment", MOMENTS)
def test_sigkill_of_virtopt_leaves_qemu_running(vm, tmp_path, moment):
    """SIGKILL cannot be caught: gdb (own session) reads EOF, detaches and exits; the watchdog checks."""
    marker = tmp_path / "started"
    proc = launch("gdb", str(vm.pid), "-c", "info", "-c", "threads", "-c", "trace list")
    reach(moment if moment != "command" else "attach", proc, vm.pid, marker)
    if moment == "command":
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert_running(vm, settle=15)


def test_virtopt_and_gdb_killed_together_watchdog_resumes_qemu(vm, tmp_path):
    """gdb killed while attached leaves QEMU stopped (T), measured: the watchdog sends SIGCONT."""
    marker = tmp_path / "started"
    proc = launch("gdb", str(vm.pid), "-c", SLEEPER.format(marker=str(marker)))
    reach("command", proc, vm.pid, marker)
    gdb = gdb_of(proc)
    assert gdb is not None
    os.killpg(proc.pid, signal.SIGKILL)
    os.kill(gdb, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert_running(vm, settle=5)


def test_watchdog_ends_a_stuck_gdb_and_resumes_qemu(vm, tmp_path):
    """virtopt killed during a command that never ends: the watchdog interrupts (then kills) that gdb
    after the grace period (--timeout) and QEMU runs again."""
    marker = tmp_path / "started"
    proc = launch("gdb", str(vm.pid), "--timeout", "2", "-c", SLEEPER.format(marker=str(marker)))
    reach("command", proc, vm.pid, marker)
    gdb = gdb_of(proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert traced(vm.pid)  # the gdb of the dead virtopt still holds QEMU ...
    assert_running(vm, settle=10)  # ... until the watchdog acts
    assert gdb is not None
    wait_for(lambda: watchdog.ProcessId.of(gdb) is None or watchdog.states(gdb).get(gdb) == "Z",
             "the stuck gdb to end", timeout=10, step=0.05)


def test_a_stopped_virtopt_does_not_keep_qemu_paused(vm, tmp_path):
    """SIGSTOP cannot be caught: the watchdog ends the gdb of a virtopt stopped past the grace period
    (--timeout), QEMU runs again, and virtopt, continued, says gdb went away."""
    marker = tmp_path / "started"
    proc = launch("gdb", str(vm.pid), "--timeout", "2", "-c", SLEEPER.format(marker=str(marker)))
    reach("command", proc, vm.pid, marker)
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        assert_running(vm, settle=15)
        assert watchdog.states(proc.pid).get(proc.pid) == "T"  # virtopt is still stopped
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and out == "" and "Traceback" not in err, err
    assert err.splitlines()[0].startswith("virtopt: gdb exited"), err
    assert_running(vm)


def test_gdb_dying_mid_command_is_one_line_and_qemu_runs(vm, tmp_path):
    marker = tmp_path / "started"
    proc = launch("gdb", str(vm.pid), "-c", SLEEPER.format(marker=str(marker)), "-c", "info")
    reach("command", proc, vm.pid, marker)
    gdb = gdb_of(proc)
    assert gdb is not None
    os.kill(gdb, signal.SIGKILL)
    out, err = proc.communicate(timeout=30)
    assert_running(vm)
    assert proc.returncode == 1 and out == "", err
    assert err.splitlines()[0].startswith("virtopt: gdb exited while running"), err
    assert "Traceback" not in err


def test_a_command_past_its_timeout_is_interrupted_and_qemu_runs(vm, tmp_path):
    marker = tmp_path / "started"
    t0 = time.monotonic()
    proc = launch("gdb", str(vm.pid), "--timeout", "1", "-c", SLEEPER.format(marker=str(marker)),
                  "-c", "python print('next', 6 * 7)")  # a next command that takes no time, even on a busy host
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 20
    assert_running(vm)
    assert marker.exists()
    assert proc.returncode == 1, err
    lines = err.splitlines()
    assert lines[0].startswith("virtopt: ") and lines[-1].startswith(f"QEMU {vm.pid} was paused "), err
    assert out == "next 42\n"  # the next command still ran


def _pty_run(vm, marker: Path) -> tuple[int, int]:
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child execs at once
        os.chdir(REPO)
        os.execv(sys.executable, [sys.executable, "-m", "qemu_ext", "gdb", str(vm.pid), "-c",
                                  SLEEPER.format(marker=str(marker))])
    return pid, fd


def _pty_wait_marker(fd: int, marker: Path, timeout: float = 30.0) -> bytes:
    """Drain the terminal until the command has begun; what virtopt wrote is in the failure message."""
    text = b""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert time.monotonic() < deadline, f"the command did not begin; the terminal shows {text!r}"
        text += _pty_read(fd, 0.05)
    return text


def _pty_read(fd: int, seconds: float) -> bytes:
    text = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            text += chunk
    return text


# A job-control shell in miniature: the job in its own process group in the foreground of the pty
# (a stop of a session leader's own, orphaned, group would be discarded by the kernel).
MINI_SHELL = """
import os, signal, sys
signal.signal(signal.SIGTTOU, signal.SIG_IGN)
pid = os.fork()
if pid == 0:
    os.setpgid(0, 0)
    os.tcsetpgrp(0, os.getpgrp())
    os.execv(sys.executable, sys.argv[1:])
try:
    os.setpgid(pid, pid)  # as shells do; EACCES once the child has exec'd (it set its group itself)
    os.tcsetpgrp(0, pid)
except OSError:
    pass
_, st = os.waitpid(pid, os.WUNTRACED)
print("SHELL", "stopped" if os.WIFSTOPPED(st) else "exited", pid, flush=True)
if os.WIFSTOPPED(st):
    _, st = os.waitpid(pid, 0)
print("SHELL rc", os.waitstatus_to_exitcode(st), flush=True)
"""


def test_ctrl_z_in_a_real_terminal_detaches_before_suspending(vm, tmp_path):
    """^Z: virtopt detaches (the command is cut short), then stops; QEMU runs while it is suspended."""
    marker = tmp_path / "started"
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child execs at once
        os.chdir(REPO)
        os.execv(sys.executable, [sys.executable, "-c", MINI_SHELL, sys.executable, "-m", "qemu_ext", "gdb",
                                  str(vm.pid), "-c", SLEEPER.format(marker=str(marker))])
    try:
        _pty_wait_marker(fd, marker)
        os.write(fd, b"\x1a")
        text = b""
        deadline = time.monotonic() + 30
        while b"SHELL stopped" not in text and b"SHELL exited" not in text and time.monotonic() < deadline:
            text += _pty_read(fd, 0.2)
        assert b"SHELL stopped" in text, text
        assert_running(vm)  # virtopt is suspended, QEMU is not
        job = int(text.split(b"SHELL stopped ")[1].split()[0])
        os.kill(job, signal.SIGCONT)
        text += _pty_read(fd, 10)
        os.waitpid(pid, 0)
    finally:
        os.close(fd)
    lines = [ln for ln in text.decode().replace("\r", "").replace("^Z", "").splitlines() if ln.strip()]
    assert lines[-1] == f"SHELL rc {128 + signal.SIGTSTP}", text
    said = [ln for ln in lines if not ln.startswith("SHELL")]
    assert len(said) == 1 and said[0].startswith("virtopt: interrupted by SIGTSTP: gdb detached"), text


def test_ctrl_c_in_a_real_terminal(vm, tmp_path):
    """^C typed into a pty: the terminal driver signals the foreground group; gdb is not in it."""
    marker = tmp_path / "started"
    pid, fd = _pty_run(vm, marker)
    try:
        _pty_wait_marker(fd, marker)
        os.write(fd, b"\x03")
        text = _pty_read(fd, 20)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 130, text
    lines = [ln for ln in text.decode().replace("\r", "").replace("^C", "").splitlines() if ln.strip()]  # ^C: the echo
    assert len(lines) == 1 and lines[0].startswith("virtopt: interrupted by SIGINT: gdb detached"), text
    assert_running(vm)
