"""The shell and the capture window on a libvirt domain (the QMP client's libvirt transport): --domain,
libvirt's taint said once, /trace capture reading the domain's log (the tests' own libvirtd, KVM)."""

from __future__ import annotations

import json
import time

import pytest
from helpers import virtopt

from qemu_ext.qmp.capture import capture
from qemu_ext.qmp.client import connect_sync


@pytest.fixture(scope="module")
def dom(module_libvirt_domain_factory):
    return module_libvirt_domain_factory("shell", disk_io=["write -P 0x5a 0 64k"])


def test_shell_on_a_domain_says_once_that_libvirt_tainted_it(dom):
    cp = virtopt("shell", "--domain", dom.name, "--history", "", "-c", "query-name", "-c", "query-status")
    assert cp.returncode == 0, cp.stderr
    assert {"return": {"name": dom.name}} in [json.loads(ln) for ln in cp.stdout.splitlines()]
    notes = [ln for ln in cp.stderr.splitlines() if ln.startswith("note: ")]
    assert len(notes) == 1 and f"libvirt marked domain {dom.name} tainted (custom-monitor)" in notes[0]
    assert any("custom monitor" in m for m in dom.dom.messages(0))  # libvirt's own record says the same
    cp = virtopt("shell", "--domain", dom.name, "--history", "", "-c", "query-name")
    assert cp.returncode == 0 and "note:" not in cp.stderr  # already marked: nothing new to say
    cp = virtopt("shell", "/run/x.sock", "--domain", dom.name, "-c", "query-name")
    assert cp.returncode == 2 and "one of them" in cp.stderr


def test_trace_capture_on_a_domain_reads_its_log(dom):
    from qemu_ext.libvirt import domain

    log = domain.log_path(dom.name)
    _, start = domain.read_log(log, 0)

    async def io(s):
        await s.hmp('qemu-io libvirt-1-format "read 0 64k"')

    with connect_sync(f"libvirt:{dom.name}", timeout=30) as s:
        res = s.call(capture, "qcow2_cache_get*", 0, during=io)
        assert {e["state"] for e in s.execute("trace-event-get-state", {"name": "qcow2_cache_get*"})} == {"disabled"}
    assert res.backend == "log" and f"read QEMU's log file {log}" in res.notes
    truth: dict[str, int] = {}
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # virtlogd writes the lines a moment later
        lines, _ = domain.read_log(log, start)
        truth = {}
        for ln in lines:  # libvirt's QEMU logs "PID@SECONDS:name args"
            name = ln.split(":", 1)[-1].split(" ", 1)[0] if "@" in ln.split(" ", 1)[0] else ln.split(" ", 1)[0]
            if name.startswith("qcow2_cache_get"):
                truth[name] = truth.get(name, 0) + 1
        if truth == res.counts:
            break
        time.sleep(0.1)
    assert res.counts == truth and truth.get("qcow2_cache_get", 0) >= 1
