"""The one QMP client and the capture window as other front doors use them (threads, doctor, l2cache tune),
on real QEMU 7.2 and 10.0: the sync API, its messages, a second transport through the same interface,
and events turned off on every exit path of a capture (error, Ctrl-C, QEMU gone)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Optional

import pytest
from helpers import REPO
from shell_util import connect_ctl, json_lines, run_lines

from qemu_ext.qmp import capture as cap
from qemu_ext.qmp import client
from qemu_ext.qmp.errors import QmpCommandError, QmpConnectError, QmpGoneError


@pytest.fixture(scope="module")
def vm(module_qemu_factory, tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("clientvm")
    ctl = d / "ctl.sock"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    qp = module_qemu_factory(name="clientvm", extra_args=["-qmp", f"unix:{ctl},server=on,wait=off",
                                                          "-qmp", f"tcp:127.0.0.1:{port},server=on,wait=off"])
    qp.ctl = connect_ctl(ctl)  # type: ignore[attr-defined]
    qp.tcp = f"127.0.0.1:{port}"  # type: ignore[attr-defined]
    yield qp
    qp.ctl.close()


def state(vm, name: str) -> str:
    return vm.ctl.cmd("trace-event-get-state", name=name)[0]["state"]


def test_sync_session_over_unix_and_tcp(vm):
    for address in (str(vm.qmp_path), vm.tcp):
        with client.connect_sync(address) as s:
            assert s.pid == vm.pid  # the QEMU behind the socket, also over TCP on this host
            assert s.execute("query-name") == {"name": "clientvm"}
            assert s.execute("query-cpus-fast") == vm.ctl.cmd("query-cpus-fast")
            assert s.hmp("info status").strip() == vm.ctl.cmd("human-monitor-command",
                                                               **{"command-line": "info status"}).strip()
            with pytest.raises(QmpCommandError) as ei:
                s.execute("device_del", {"id": "nosuch"})
            truth = vm.ctl.cmd_obj({"execute": "device_del", "arguments": {"id": "nosuch"}})["error"]
            assert (ei.value.error_class, ei.value.desc) == (truth["class"], truth["desc"])
            assert s.version_text.startswith(f"{vm.build.series}.")
    # run_sync: one call
    assert client.run_sync(str(vm.qmp_path), lambda s: s.execute("query-name")) == {"name": "clientvm"}


def test_sync_connect_errors_are_the_shells(tmp_path: Path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for address, reason in ((str(tmp_path), "Is a directory"), (str(fifo), "not a socket (a FIFO)"),
                            (str(tmp_path / "none"), "No such file or directory")):
        with pytest.raises(QmpConnectError) as ei:
            client.connect_sync(address)
        assert str(ei.value).startswith(f"cannot connect to QMP at {address}: {reason}")


class Relay(client.Transport):
    """A second transport through the interface alone (what a libvirt transport implements): it relays
    to the socket transport of the address after ``relay:``."""

    def __init__(self, rest: str, timeout: float = 5.0, negotiate: bool = True) -> None:
        self.inner = client.SocketTransport(rest, timeout, negotiate)
        self.name = f"relay:{rest}"
        self.greeting = {}
        self.calls: list[str] = []

    async def connect(self) -> None:
        await self.inner.connect()
        self.pid, self.greeting = self.inner.pid, self.inner.greeting

    async def execute(self, command: str, arguments: Optional[dict[str, Any]] = None, oob: bool = False) -> Any:
        return await self.inner.execute(command, arguments, oob)

    async def next_event(self) -> dict[str, Any]:
        return await self.inner.next_event()

    async def close(self) -> None:
        await self.inner.close()

    @property
    def connected(self) -> bool:
        return self.inner.connected

    async def wait_disconnected(self) -> None:
        await self.inner.wait_disconnected()


def test_a_second_transport_plugs_in_by_its_scheme(vm, monkeypatch):
    monkeypatch.setitem(client.SCHEMES, "relay", f"{__name__}:Relay")
    rc, out, err = run_lines(f"relay:{vm.qmp_path}", "query-name", "stop", "cont", "/trace list qcow2_cache_get",
                             "/json threads")
    assert rc == 0, err
    replies = json_lines(out)
    assert replies[0] == {"return": {"name": "clientvm"}}
    assert [m.get("event") for m in replies if "event" in m] == ["STOP", "RESUME"]  # its event stream
    assert "qcow2_cache_get  disabled" in out and replies[-1]["pid"] == vm.pid
    with client.connect_sync(f"relay:{vm.qmp_path}") as s:
        assert s.where == f"relay:{vm.qmp_path}" and s.execute("query-name") == {"name": "clientvm"}


def test_capture_turns_its_events_off_when_during_fails(vm):
    async def boom(s):
        assert (await cap.trace_list(s, "qcow2_cache_get"))[0].state == "enabled"
        raise RuntimeError("the workload failed")

    vm.ctl.cmd("trace-event-set-state", name="qcow2_cache_flush", enable=True)  # on before: stays on
    try:
        with client.connect_sync(str(vm.qmp_path)) as s, pytest.raises(RuntimeError):
            s.call(cap.capture, "qcow2_cache_*", 30, during=boom)
        assert state(vm, "qcow2_cache_get") == "disabled" and state(vm, "qcow2_cache_flush") == "enabled"
    finally:
        vm.ctl.cmd("trace-event-set-state", name="qcow2_cache_flush", enable=False)


CAPTURE_SCRIPT = textwrap.dedent("""\
    import sys
    sys.path.insert(0, {repo!r})
    from qemu_ext.qmp import capture, client
    with client.connect_sync({addr!r}) as s:
        print("connected", flush=True)
        try:
            s.call(capture.capture, "qcow2_cache_get", 60)
        except KeyboardInterrupt:
            print("KeyboardInterrupt", flush=True)
            raise SystemExit(130)
""")


def test_ctrl_c_during_a_sync_capture_turns_its_events_off(vm):
    proc = subprocess.Popen([sys.executable, "-c", CAPTURE_SCRIPT.format(repo=str(REPO), addr=str(vm.qmp_path))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while state(vm, "qcow2_cache_get") != "enabled":
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and "KeyboardInterrupt" in out, err
    assert state(vm, "qcow2_cache_get") == "disabled" and vm.alive()


def test_qemu_gone_during_a_capture_is_one_error(qemu_factory):
    qp = qemu_factory(name="goner")

    async def kill(s):
        qp.proc.kill()

    with client.connect_sync(str(qp.qmp_path)) as s, pytest.raises(QmpGoneError) as ei:
        s.call(cap.capture, "qcow2_cache_get", 30, during=kill)
    assert "went away" in str(ei.value)
