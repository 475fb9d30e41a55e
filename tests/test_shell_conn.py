"""The shell's connection handling: dead sockets, garbage, QEMU killed mid-command, reconnect after restart."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from shell_util import LAUNCHER, Repl, connect_ctl, shell_cmd


class FakeServer:
    """A unix socket server that answers every connection with fixed bytes (not QMP)."""

    def __init__(self, path: Path, payload: bytes, close: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.payload = payload
        self.close_after = close
        self.conns: list[socket.socket] = []
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            try:
                if self.payload:
                    c.sendall(self.payload)
            except OSError:
                pass
            if self.close_after:
                c.close()
            else:
                self.conns.append(c)

    def stop(self) -> None:
        self._stop = True
        self.thread.join(2)
        for c in self.conns:
            c.close()
        self.sock.close()


@pytest.fixture
def fake(tmp_path: Path) -> Iterator:
    servers: list[FakeServer] = []

    def start(payload: bytes, close: bool = False) -> Path:
        p = tmp_path / f"fake{len(servers)}.sock"
        servers.append(FakeServer(p, payload, close))
        return p

    yield start
    for s in servers:
        s.stop()


def one_line_failure(cp: subprocess.CompletedProcess) -> str:
    assert cp.returncode == 1, (cp.returncode, cp.stdout, cp.stderr)
    assert "Traceback" not in cp.stderr
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1, cp.stderr
    return lines[0]


@pytest.mark.parametrize(
    "payload,close,expect",
    [
        (b"\x00\xff\xfe garbage that is not JSON\n", False, "does not speak QMP"),
        (b'{"hello": "world"}\n', False, "does not speak QMP"),
        (b"SSH-2.0-OpenSSH_9.2\r\n", False, "does not speak QMP"),
        (b"", True, "closed the connection before a QMP greeting"),
        (b"", False, "sent no QMP greeting within 1 s (not a QMP server?)"),
    ],
    ids=["binary-junk", "json-not-greeting", "ssh-banner", "hangs-up", "silent"],
)
def test_garbage_on_the_socket_gives_one_clear_line(fake, payload: bytes, close: bool, expect: str):
    path = fake(payload, close)
    cp = shell_cmd(str(path), "--timeout", "1", "-c", "query-status")
    assert expect in one_line_failure(cp)


def test_what_is_not_a_qmp_socket_gets_one_line_each(tmp_path: Path):
    dead = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(dead))
    s.close()  # the socket file stays, nobody listens: what a crashed QEMU leaves behind
    plain = tmp_path / "file.txt"
    plain.write_text("x")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with socket.socket() as probe:  # TCP: a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cases = {
        str(dead): "Connection refused (a socket file nobody listens on: QEMU exited?)",
        str(tmp_path / "nothing.sock"): "No such file or directory (is QEMU running with -qmp unix:",
        str(tmp_path): "Is a directory",
        str(plain): "not a socket (a regular file)",
        str(fifo): "not a socket (a FIFO)",
        f"127.0.0.1:{port}": "Connection refused",
    }
    for addr, reason in cases.items():
        line = one_line_failure(shell_cmd(addr, "-c", "query-status"))
        assert line.startswith(f"virtopt: cannot connect to QMP at {addr}: {reason}"), line


def test_bad_options_are_usage_errors(tmp_path: Path):
    for args, needle in ((["--timeout", "-1"], "--timeout: -1 is out of range (above 0 and at most 3600)"),
                         (["--timeout", "x"], "--timeout: not a number: 'x'"),
                         (["--events", "both"], "--events: invalid choice")):
        cp = shell_cmd(str(tmp_path / "x.sock"), *args, "-c", "query-status")
        assert cp.returncode == 2 and needle in cp.stderr and "Traceback" not in cp.stderr, cp.stderr
    cp = shell_cmd("localhost:99999", "-c", "query-status")
    assert cp.returncode == 2 and cp.stderr.strip() == "virtopt: bad TCP port in QMP address 'localhost:99999' (1 to 65535)"


def test_qemu_killed_mid_command(qemu_factory, tmp_path: Path):
    ctl = tmp_path / "ctl.sock"
    qp = qemu_factory(extra_args=["-qmp", f"unix:{ctl},server=on,wait=off"])
    client = connect_ctl(ctl)
    try:
        proc = subprocess.Popen(
            [sys.executable, str(LAUNCHER), str(qp.qmp_path), "--history", "",
             "-c", "/trace capture qcow2_cache_get 60"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 20
            # the capture is under way once QEMU reports the event enabled
            while client.cmd("trace-event-get-state", name="qcow2_cache_get")[0]["state"] != "enabled":
                assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
                time.sleep(0.05)
            qp.proc.kill()
            _out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        client.close()
    assert proc.returncode == 1
    assert "Traceback" not in err
    line, = err.strip().splitlines()
    assert "went away" in line


def test_reconnect_when_qemu_returns_on_the_same_socket(qemu_factory):
    first = qemu_factory(name="virtopt-first")
    r = Repl(str(first.qmp_path))
    second = None
    try:
        r.wait_line("Connected to QEMU")
        r.send("query-name\n")
        r.wait_line('{"return": {"name": "virtopt-first"}}')
        # QEMU dies while the shell runs a long built-in: one error line, then the shell waits for it
        r.send("/trace capture qcow2_cache_get 60\n")
        time.sleep(0.5)
        first.proc.kill()
        first.proc.wait()
        r.wait_line("went away; waiting for it to come back")
        r.wait_for(lambda t: any(ln.startswith("error: ") and "went away" in ln for ln in t.splitlines()))
        assert "Traceback" not in r.text()
        # a command typed while QEMU is away fails with one line
        r.send("query-name\n")
        r.wait_line("error: not connected: QEMU at")
        second = qemu_factory(name="virtopt-second", workdir=first.workdir)
        assert second.qmp_path == first.qmp_path
        r.wait_line("reconnected: Connected to QEMU")
        r.send("query-name\n")
        r.wait_line('{"return": {"name": "virtopt-second"}}')
    finally:
        rc = r.close()
    assert rc == 0
