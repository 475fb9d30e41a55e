"""`virtopt l2cache tune` and `/l2cache tune` on a real QEMU (7.2 and 10.0): a 16 GiB
metadata-preallocated image behind -blockdev l2-cache-size=128K, I/O driven during the captures
through HMP qemu-io (a second QMP socket, as a second client would), --apply raises QEMU's
measured warm hit ratio to the target; a -drive node is refused with the alternatives; the events
are off afterwards on every exit path (normal end, Ctrl-C, an error, QEMU gone)."""

from __future__ import annotations

import contextlib
import json
import random
import signal
import subprocess
import sys
import threading
import time
from typing import Iterator

import pytest
from helpers import REPO, make_qcow2, virtopt

from qemu_ext.l2cache import tune as T
from qemu_ext.qmp.client import connect_sync

SLICE_SPAN = 32 << 20  # guest bytes one 4 KiB L2 slice maps (512 entries x 64 KiB clusters)
HOT = 100  # slices the workload cycles over: 32 entries (128K) thrash, 100+ hold them all


@pytest.fixture(scope="module")
def vmt(tmp_path_factory, qemu_build, module_qemu_factory):
    d = tmp_path_factory.mktemp(f"tune{qemu_build.series}")
    big = make_qcow2(d / "big.qcow2", size="16G", options={"preallocation": "metadata"}, build=qemu_build)
    small = make_qcow2(d / "small.qcow2", size="1G", options={"preallocation": "metadata"}, build=qemu_build)
    bd = {"driver": "qcow2", "node-name": "disk0", "l2-cache-size": 131072, "detect-zeroes": "on",
          "file": {"driver": "file", "filename": str(big)}}
    io_sock = d / "io.sock"
    qp = module_qemu_factory(name="l2tune", extra_args=[
        "-blockdev", json.dumps(bd), "-device", "ide-hd,drive=disk0,id=hd0,bus=ide.0",
        "-drive", f"file={small},if=none,id=drive0,format=qcow2",
        "-qmp", f"unix:{io_sock},server=on,wait=off"])
    qp.io_sock = io_sock  # type: ignore[attr-defined]
    return qp


@contextlib.contextmanager
def driving(qp, target: str = "-d hd0", hot: int = HOT) -> Iterator[list[int]]:
    """Reads cycling over `hot` L2 slices from a second QMP client, until the block ends."""
    from qemu.qmp.legacy import QEMUMonitorProtocol

    c = QEMUMonitorProtocol(str(qp.io_sock))
    c.connect()
    stop = threading.Event()
    done = [0]

    def run() -> None:
        r = random.Random(5)
        while not stop.is_set():
            off = (done[0] % hot) * SLICE_SPAN + r.randrange(0, SLICE_SPAN // 4096) * 4096
            c.cmd("human-monitor-command", **{"command-line": f'qemu-io {target} "read {off} 4k"'})
            done[0] += 1

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield done
    finally:
        stop.set()
        t.join(30)
        c.close()


def example(qp, *words: str, seconds: str = "1.5") -> list[str]:
    """The --help example (virtopt l2cache --help, tune --help) with these words, as the arguments
    to run against the test VM: its socket, and captures of `seconds` instead of the example's."""
    from qemu_ext.l2cache import cli, tune_cli

    text = cli.EPILOG + tune_cli.TUNE_EPILOG
    lines = {ln.strip() for ln in text.splitlines() if ln.strip().startswith("virtopt l2cache") and "/run/vm.qmp" in ln}
    found = [ln.split()[1:] for ln in sorted(lines) if all(w in ln.split() for w in words)
             and len(ln.split()) - 1 == min(len(x.split()) - 1 for x in lines if all(w in x.split() for w in words))]
    assert found, words
    argv = [str(qp.qmp_path) if w == "/run/vm.qmp" else w for w in found[0]]
    i = argv.index("--seconds")
    argv[i + 1] = seconds
    return argv


def events_enabled(qp) -> set[str]:
    from qemu.qmp.legacy import QEMUMonitorProtocol

    c = QEMUMonitorProtocol(str(qp.io_sock))
    c.connect()
    try:
        return {e["name"] for e in c.cmd("trace-event-get-state", name="qcow2_cache_*") if e["state"] == "enabled"}
    finally:
        c.close()


def test_drive_node_is_refused_with_the_alternatives(vmt):
    with driving(vmt, target="drive0", hot=8):
        cp = virtopt(*example(vmt, "drive0", "--apply", seconds="1"))
    assert cp.returncode == 1, cp.stderr
    err = cp.stderr.strip().splitlines()
    assert len(err) == 1 and "automatic name" in err[0] and "nothing was changed" in err[0], cp.stderr
    out = cp.stdout
    assert "not applied:" in out and "-blockdev '{\"driver\":\"qcow2\"" in out and "-drive file=" in out
    assert "<metadata_cache><max_size unit='bytes'>" in out and "cache-size, the total of both caches" in out
    assert "before (" in out and "L2 lookups" in out
    assert not events_enabled(vmt)


def test_ctrl_c_during_the_capture_turns_the_events_off(vmt):
    # the plain example: a baseline with the events off, then the capture, interrupted
    p = subprocess.Popen([sys.executable, "-m", "qemu_ext", *example(vmt, "disk0", seconds="2")], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not events_enabled(vmt):
            assert time.monotonic() < deadline and p.poll() is None, p.stderr.read() if p.stderr else ""
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)  # the CLI's Ctrl-C, never QEMU's
        _out, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130 and "Traceback" not in err, err
    assert not events_enabled(vmt)
    assert vmt.alive()


def test_watch_updates_and_ctrl_c_prints_the_final_answer(vmt):
    """recommend --watch: window after window (each capture file deleted once read), updates with
    the time covered; Ctrl-C prints the final recommendation and the events are off."""
    import glob
    import os

    before = set(glob.glob(os.path.join(os.environ.get("TMPDIR", "/tmp"), "virtopt-capture-*")))
    with driving(vmt):
        p = subprocess.Popen([sys.executable, "-m", "qemu_ext", *example(vmt, "--watch", seconds="0.5")], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            updates = 0
            assert p.stdout is not None
            while updates < 2:
                line = p.stdout.readline()
                assert line, p.stderr.read() if p.stderr else ""
                updates += line.startswith("node disk0: ")
            p.send_signal(signal.SIGINT)
            out, err = p.communicate(timeout=20)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert p.returncode == 0, err
    assert "final: node disk0: " in out and "covered" in out and "smallest for a warm hit ratio of 99.0%" in out
    assert not events_enabled(vmt)
    assert set(glob.glob(os.path.join(os.environ.get("TMPDIR", "/tmp"), "virtopt-capture-*"))) <= before


def test_an_error_inside_the_capture_turns_the_events_off(vmt):
    async def boom(s):
        states = await s.execute("trace-event-get-state", {"name": "qcow2_cache_get*"})
        assert {e["state"] for e in states} == {"enabled"}  # the capture window is open
        raise RuntimeError("the workload failed")

    with connect_sync(str(vmt.qmp_path), timeout=10) as s, pytest.raises(RuntimeError, match="workload failed"):
        s.call(T.tune, "disk0", seconds=1, baseline=0, during=boom)
    assert not events_enabled(vmt)


def test_qemu_gone_during_the_capture_is_one_line(qemu_factory, tmp_path):
    img = make_qcow2(tmp_path / "g.qcow2", size="1G", build=qemu_factory.build)
    qp = qemu_factory(name="l2gone", extra_args=["-blockdev", json.dumps(
        {"driver": "qcow2", "node-name": "g0", "file": {"driver": "file", "filename": str(img)}})])
    p = subprocess.Popen([sys.executable, "-m", "qemu_ext", "l2cache", "tune", str(qp.qmp_path), "--node", "g0",
                          "--seconds", "30", "--baseline", "0"], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        qp.stop()  # this test's own QEMU goes away
        _out, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_apply_raises_the_measured_warm_hit_ratio_to_the_target(vmt, tmp_path):
    with driving(vmt) as done:
        cp = virtopt(*example(vmt, "--apply", "--output=json"))
    assert cp.returncode == 0, cp.stderr
    assert done[0] > 200
    r = json.loads(cp.stdout)
    for key in ("before", "predicted", "recommended-l2-cache-size", "applied", "after"):
        assert key in r
    from test_l2cache_cli import kebab_only

    assert kebab_only(r) == []
    b, a = r["before"], r["after"]
    assert r["node"]["l2-cache-size"] == 131072 and r["node"]["settings-source"] == "command line"
    # 32 entries for 100 slices read in turn: every re-reference misses; QEMU's own count
    assert b["lookups"] > HOT and b["warm-hit-ratio"] < 0.1
    # the simulator at 128K predicts QEMU's misses after the cold start exactly
    assert r["prediction-exact"] is True and r["predicted"]["warm-misses"] == r["predicted"]["measured-warm-misses"]
    rec = r["recommended"]
    assert r["recommended-l2-cache-size"] == rec["l2-cache-size"] and rec["warm-hit-ratio"] >= 0.95
    assert rec["memory"] <= 2 << 20  # at most full coverage of 16 GiB
    assert r["applied"]["done"] is True and r["applied"]["options"]["l2-cache-size"] == rec["l2-cache-size"]
    # measured by QEMU after the reopen: the target is reached, as predicted, with the new cache exactly simulated
    assert a["lookups"] > HOT and a["warm-hit-ratio"] >= 0.95 and a["prediction-exact"] is True
    assert a["predicted-warm-hit-ratio"] == rec["warm-hit-ratio"]
    # the node's other options were kept by the reopen
    from qemu.qmp.legacy import QEMUMonitorProtocol

    c = QEMUMonitorProtocol(str(vmt.io_sock))
    c.connect()
    try:
        node = next(n for n in c.cmd("query-named-block-nodes", flat=True) if n["node-name"] == "disk0")
    finally:
        c.close()
    assert node["detect_zeroes"] == "on"
    cost = r["tracing-cost"]
    assert cost["method"] and cost["probe-seconds-per-read-off"] > 0 and cost["probe-seconds-per-read-on"] > 0
    assert r["events-left-enabled"] == [] and not events_enabled(vmt)


def test_shell_l2cache_tune_reports_the_loop(vmt):
    from shell_util import shell_cmd

    with driving(vmt, hot=20):
        cp = shell_cmd(str(vmt.qmp_path), "-c", "/l2cache tune disk0 --seconds 0.7 --baseline 0 --target 0.9")
    assert cp.returncode == 0, cp.stderr
    assert "node disk0:" in cp.stdout and "before (" in cp.stdout and "predicted at the current setting" in cp.stdout
    assert not events_enabled(vmt)




def test_apply_on_the_simple_backend(debug_qemu_factory, tmp_path):
    """The same loop on a debug QEMU (simple and log backends compiled in): tune captures through
    the simple backend's own trace file (HMP trace-file), predicts QEMU's misses exactly, applies,
    reaches the target, and leaves the events and the trace file as it found them."""
    big = make_qcow2(tmp_path / "big.qcow2", size="16G", options={"preallocation": "metadata"},
                     build=debug_qemu_factory.build)
    bd = {"driver": "qcow2", "node-name": "disk0", "l2-cache-size": 131072,
          "file": {"driver": "file", "filename": str(big)}}
    io_sock = tmp_path / "io.sock"
    qp = debug_qemu_factory(name="l2simple", extra_args=[
        "-blockdev", json.dumps(bd), "-device", "ide-hd,drive=disk0,id=hd0,bus=ide.0",
        "-qmp", f"unix:{io_sock},server=on,wait=off"])
    qp.io_sock = io_sock  # type: ignore[attr-defined]

    def trace_file_status() -> str:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        c = QEMUMonitorProtocol(str(io_sock))
        c.connect()
        try:
            return c.cmd("human-monitor-command", **{"command-line": "trace-file"})
        finally:
            c.close()

    status_before = trace_file_status()
    with driving(qp) as done:
        cp = virtopt("l2cache", "tune", str(qp.qmp_path), "--node", "disk0", "--seconds", "1.5", "--target", "0.95",
                     "--apply", "--output=json")
    assert cp.returncode == 0, cp.stderr
    assert done[0] > 200
    r = json.loads(cp.stdout)
    assert r["trace-backend"] == "simple"
    assert r["before"]["lookups"] > HOT and r["before"]["warm-hit-ratio"] < 0.1
    assert r["prediction-exact"] is True
    assert r["applied"]["done"] is True
    assert r["after"]["warm-hit-ratio"] >= 0.95 and r["after"]["prediction-exact"] is True, json.dumps({k: r[k] for k in ("recommended", "after", "before", "predicted")}, indent=1)
    assert r["events-left-enabled"] == [] and not events_enabled(qp)
    assert trace_file_status() == status_before  # the trace file QEMU had, on or off, is back
