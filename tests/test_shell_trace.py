"""Trace files and captures on the debug QEMU (simple + log backends), checked with QEMU's own simpletrace.py."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from helpers import make_qcow2
from shell_util import connect_ctl, shell_cmd
from trace_util import simpletrace_py

from qemu_ext.qmp.builtins import l2cache as l2b
from qemu_ext.qmp.capture import capture
from qemu_ext.qmp.client import connect_sync

pytestmark = pytest.mark.debug_qemu

SIMPLETRACE_HEADER = struct.pack("<QQQ", 0xFFFFFFFFFFFFFFFF, 0xF2B177CB0AA429B4, 4)


@pytest.fixture
def dbg(debug_qemu_factory, tmp_path: Path):
    ctl = tmp_path / "ctl.sock"
    qp = debug_qemu_factory(extra_args=["-qmp", f"unix:{ctl},server=on,wait=off"])
    client = connect_ctl(ctl)
    qp.ctl = client  # type: ignore[attr-defined]
    qp.hmp_ctl = lambda line: client.cmd("human-monitor-command", **{"command-line": line})  # type: ignore[attr-defined]
    try:
        yield qp
    finally:
        client.close()


def test_trace_file_status_set_on_flush_off(dbg, tmp_path: Path):
    cp = shell_cmd(str(dbg.qmp_path), "-c", "/trace-file")
    assert cp.returncode == 0, cp.stderr
    hmp = dbg.hmp_ctl("trace-file").strip()  # 'Trace file "trace-PID" off.'
    assert cp.stdout.strip() == "t" + hmp[1:].rstrip(".")
    out = tmp_path / "t.simpletrace"
    cp = shell_cmd(str(dbg.qmp_path), "--output=json", "-c", f"/trace-file set {out}", "-c", "/trace-file on",
                   "-c", "/trace-file flush")
    assert cp.returncode == 0, cp.stderr
    assert dbg.hmp_ctl("trace-file").strip() == f'Trace file "{out}" on.'
    assert out.read_bytes()[:24] == SIMPLETRACE_HEADER  # QEMU opened it and wrote its header
    cp = shell_cmd(str(dbg.qmp_path), "-c", "/trace-file off")
    assert cp.returncode == 0 and cp.stdout.strip() == f'trace file "{out}" off'
    assert dbg.hmp_ctl("trace-file").strip() == f'Trace file "{out}" off.'
    cp = shell_cmd(str(dbg.qmp_path), "-c", "/trace-file set /nonexistent-dir/x.bin", "-c", "/trace-file on")
    assert cp.returncode == 1 and "could not open trace file /nonexistent-dir/x.bin" in cp.stderr


def _simpletrace_counts(build, path: str) -> dict[str, int]:
    """Event counts of QEMU's own simpletrace.py of that version (ground truth)."""
    counts: dict[str, int] = {}
    for ln in simpletrace_py(build, Path(path)).stdout.decode().splitlines():
        name = ln.split(" ", 1)[0]
        counts[name] = counts.get(name, 0) + 1
    return counts


def test_capture_on_the_simple_backend_matches_simpletrace_py(dbg, debug_build, tmp_path: Path):
    img = make_qcow2(tmp_path / "d.qcow2", size="256M", io=[f"write {i * 16}M 64k" for i in range(8)])
    dbg.ctl.cmd("blockdev-add", **{"driver": "qcow2", "node-name": "cap", "l2-cache-entry-size": 4096,
                                   "file": {"driver": "file", "filename": str(img)}})
    before = dbg.hmp_ctl("trace-file")

    async def io(s):
        for i in range(8):
            await s.hmp(f'qemu-io cap "read {i * 16}M 4k"')

    out = tmp_path / "cap.simpletrace"
    with connect_sync(str(dbg.qmp_path), timeout=30) as s:
        res = s.call(capture, "qcow2_cache_*", 0.1, during=io, file=str(out))
        geo = s.call(l2b.l2cache_info, "cap", {"cap": {"l2-cache-entry-size": 4096}})
    assert res.backend == "simple" and res.file == str(out)
    truth = _simpletrace_counts(debug_build, str(out))
    assert res.counts == truth and truth.get("qcow2_cache_get", 0) >= 8
    # the L2 lookups go to the simulator with the node's geometry; a fresh cache: it misses where QEMU did
    sim = l2b.simulate_capture(res.records, geo[0], res.notes)
    assert sim["node"] == "cap" and sim["simulated-current"]["l2-cache-entry-size"] == 4096
    assert sim["observed"]["misses"] == truth["qcow2_cache_get_replace_entry"] == sim["simulated-current"]["misses"]
    # the user's trace file and its state are back, the events are off again
    assert dbg.hmp_ctl("trace-file") == before
    assert {e["state"] for e in dbg.ctl.cmd("trace-event-get-state", name="qcow2_cache_*")} == {"disabled"}
    # through the shell: the human rendering names the backend and the file
    out2 = tmp_path / "cap2.simpletrace"
    cp = shell_cmd(str(dbg.qmp_path), "-c", f"/trace capture qcow2_cache_get 0.1 {out2}")
    assert cp.returncode == 0, cp.stderr
    assert f"(simple backend) -> {out2}" in cp.stdout.splitlines()[0]
    assert out2.read_bytes()[:24] == SIMPLETRACE_HEADER


def test_capture_into_a_trace_file_that_is_already_on_keeps_its_records(dbg, debug_build, tmp_path: Path):
    img = make_qcow2(tmp_path / "d.qcow2", size="64M", io=["write 0 64k", "write 32M 64k"])
    dbg.ctl.cmd("blockdev-add", **{"driver": "qcow2", "node-name": "n", "file": {"driver": "file", "filename": str(img)}})
    mine = tmp_path / "mine.simpletrace"
    dbg.hmp_ctl(f"trace-file set {mine}")
    dbg.hmp_ctl("trace-file on")
    dbg.ctl.cmd("trace-event-set-state", name="qcow2_cache_get", enable=True)
    dbg.hmp_ctl('qemu-io n "read 0 4k"')
    dbg.ctl.cmd("trace-event-set-state", name="qcow2_cache_get", enable=False)
    dbg.hmp_ctl("trace-file flush")
    before = _simpletrace_counts(debug_build, str(mine))
    assert before.get("qcow2_cache_get", 0) >= 1

    async def io(s):
        await s.hmp('qemu-io n "read 32M 4k"')
        await s.hmp('qemu-io n "read 0 4k"')

    with connect_sync(str(dbg.qmp_path), timeout=30) as s:
        res = s.call(capture, "qcow2_cache_get*", 0, during=io)
    assert res.file == str(mine) and any("was on" in n for n in res.notes)
    after = _simpletrace_counts(debug_build, str(mine))
    assert after["qcow2_cache_get"] > before["qcow2_cache_get"]  # the old records are still there
    assert res.counts == {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
    assert dbg.hmp_ctl("trace-file").strip() == f'Trace file "{mine}" on.'
    cp = shell_cmd(str(dbg.qmp_path), "-c", f"/trace capture qcow2_cache_get 0 {tmp_path / 'other.bin'}")
    assert cp.returncode == 1 and "is on and the capture goes there" in cp.stderr


def test_capture_leaves_out_what_qemu_buffered_while_its_trace_file_was_off(dbg, debug_build, tmp_path: Path):
    """Events that fire while the trace file is off wait in QEMU's ring buffer and land in the next
    file turned on: a capture counts only its own window (the L2 tuner's tracing-cost probe fires
    the events with the file off just before its second capture)."""
    img = make_qcow2(tmp_path / "d.qcow2", size="64M", io=["write 0 64k", "write 32M 64k"])
    dbg.ctl.cmd("blockdev-add", **{"driver": "qcow2", "node-name": "n", "file": {"driver": "file", "filename": str(img)}})
    assert dbg.hmp_ctl("trace-file").strip().endswith("off.")
    dbg.ctl.cmd("trace-event-set-state", name="qcow2_cache_get", enable=True)
    for _ in range(5):
        dbg.hmp_ctl('qemu-io n "read 0 4k"')  # 5 lookups into the ring buffer, no file to write them to
    dbg.ctl.cmd("trace-event-set-state", name="qcow2_cache_get", enable=False)

    async def io(s):
        await s.hmp('qemu-io n "read 32M 4k"')

    out = tmp_path / "cap.simpletrace"
    with connect_sync(str(dbg.qmp_path), timeout=30) as s:
        res = s.call(capture, "qcow2_cache_get", 0, during=io, file=str(out))
    truth = _simpletrace_counts(debug_build, str(out))  # the file holds the 5 buffered lookups and the window's
    assert truth["qcow2_cache_get"] == res.counts["qcow2_cache_get"] + 5
    assert res.counts == {"qcow2_cache_get": 1}
    assert any("buffered while its trace file was off" in n for n in res.notes)
