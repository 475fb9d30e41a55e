"""`make demo`'s job, end to end, as a user runs it: real QEMU, live capture, the L2 advice."""

from __future__ import annotations

import re
import subprocess

from helpers import virtopt


def _qemu_pids() -> set[int]:
    cp = subprocess.run(["pgrep", "-f", "virtopt-demo"], capture_output=True, text=True)
    return {int(p) for p in cp.stdout.split()}


def test_demo_reports_on_a_live_vm_and_leaves_nothing_running(tmp_path):
    before = _qemu_pids()
    cp = virtopt("demo", "--seconds", "1.5", "--keep", str(tmp_path), timeout=240)
    assert cp.returncode == 0, cp.stderr
    out = cp.stdout
    assert "Traceback" not in cp.stderr and "internal error" not in cp.stderr
    # the image it wrote is what qemu-img sees, and check finds it clean
    img = tmp_path / "demo.qcow2"
    qi = subprocess.run(["qemu-img", "check", "--output=json", str(img)], capture_output=True, text=True)
    assert qi.returncode == 0
    assert "No errors were found on the image." in out
    # the thread map names the vCPUs (2 of them) and the main loop
    assert re.search(r"vCPU 1\s+CPU 1/(KVM|TCG)", out)
    assert "main loop" in out
    # the live capture saw QEMU's own L2 lookups and the advice covers the whole 16 GiB disk:
    # 16 GiB * 8 / 64 KiB = 2 MiB
    m = re.search(r"L2 lookups seen: (\d+) \((\d+) hits, (\d+) misses", out)
    assert m and int(m.group(1)) > 0 and int(m.group(3)) > 0
    assert "full coverage: l2-cache-size 2 MiB" in out
    assert "l2-cache-size=2097152" in out
    # the capture file is a real log-backend trace of qcow2_cache_get events
    text = (tmp_path / "capture.log").read_text()
    assert text.count("qcow2_cache_get ") == int(m.group(1))
    # the port 0x70 lookup names the RTC, as `info mtree` does
    assert "port 0x70 -> rtc" in out
    # every QEMU the demo started is gone
    assert _qemu_pids() <= before
