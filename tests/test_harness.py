"""The foundation: the CLI's contract and the QEMU fixtures themselves."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import virtopt

from qemu_ext import __version__, vm
from qemu_ext.cli import GROUPS


def test_version_and_help_show_examples():
    cp = virtopt("--version")
    assert cp.returncode == 0 and cp.stdout.strip() == f"virtopt {__version__}"
    cp = virtopt("--help")
    assert cp.returncode == 0
    assert "examples:" in cp.stdout
    for group in GROUPS:
        assert group in cp.stdout


def test_unknown_command_is_a_usage_error():
    cp = virtopt("no-such-group")
    assert cp.returncode == 2
    assert "Traceback" not in cp.stderr


def test_qemu_fixture_answers_qmp_and_names_its_threads(qemu):
    ver = qemu.client.cmd("query-version")
    assert ver["qemu"]["major"] >= 7
    status = qemu.client.cmd("query-status")
    assert status["status"] in ("running", "prelaunch", "paused")
    comms = {(p / "comm").read_text().strip() for p in Path(f"/proc/{qemu.pid}/task").iterdir()}
    # debug-threads=on names the vCPU thread after the accelerator in use
    assert f"CPU 0/{qemu.accel.upper()}" in comms
    accel = qemu.client.cmd("human-monitor-command", **{"command-line": "info kvm"})
    assert ("enabled" in accel) == (qemu.accel == "kvm")


def test_qemu_is_killed_and_reaped_even_when_the_body_fails():
    pid = None
    with pytest.raises(RuntimeError):
        with vm.start_qemu(name="virtopt-reap") as qp:
            pid = qp.pid
            assert qp.alive()
            raise RuntimeError("test body failed")
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped: not even a zombie is left


def test_image_factory_makes_real_qcow2(image_factory):
    import json
    import subprocess

    img = image_factory("a.qcow2", size="16M", options={"cluster_size": "4k"}, io=["write -P 0x11 0 8k"])
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(img)],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["format"] == "qcow2" and info["cluster-size"] == 4096
    assert info["virtual-size"] == 16 << 20


def test_each_series_runs_its_own_version(qemu, qemu_build):
    """The fixture's QEMU is the series it says (10.0 must not fall back to 7.2's binary or modules)."""
    import subprocess

    ver = qemu.client.cmd("query-version")["qemu"]
    assert f"{ver['major']}.{ver['minor']}" == qemu_build.series
    img = subprocess.run([qemu_build.img, "--version"], capture_output=True, text=True, env=qemu_build.env()).stdout
    assert f"version {qemu_build.series}." in img
    # a device from a loadable module (10.0 loads 7.2's modules and loses it without its own
    # QEMU_MODULE_DIR): hw-display-virtio-gpu-pci.so
    devs = {d["name"] for d in qemu.client.cmd("qom-list-types", abstract=False)}
    assert "virtio-gpu-pci" in devs


def test_debug_qemu_is_the_same_version_with_dwarf_and_simple_trace(debug_qemu, debug_build, tmp_path):
    import subprocess

    debug_src = debug_build.src
    stock = vm.find_build(debug_build.series, debug=False)
    assert stock is not None, f"no stock QEMU {debug_build.series} beside its debug build"
    ver = debug_qemu.client.cmd("query-version")["qemu"]
    deb = subprocess.run([stock.system, "--version"], capture_output=True, text=True, env=stock.env()).stdout
    assert f"{ver['major']}.{ver['minor']}.{ver['micro']}" in deb
    # the simple backend answers HMP trace-file (Debian's log-only build says "unknown command")
    out = debug_qemu.hmp(f"trace-file set {tmp_path / 't.bin'}")
    assert "unknown command" not in out
    # DWARF: gdb knows QEMU's types in the debug build
    sec = subprocess.run(["readelf", "-S", str(debug_src / "build" / "qemu-system-x86_64")],
                         capture_output=True, text=True).stdout
    assert ".debug_info" in sec
