"""Fixtures on real QEMU: Debian's qemu-system-x86_64 and a debug build of the same version.

Every QEMU a fixture starts is killed and reaped at teardown, also when the test
fails; the session checks at its end that none of them is left.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Callable, Iterator

import pytest
from helpers import REPO, make_qcow2

from qemu_ext import vm

_STARTED: list[vm.QemuProcess] = []


def _factory(binary: str | None) -> Callable[..., vm.QemuProcess]:
    started: list[vm.QemuProcess] = []

    def start(**kw) -> vm.QemuProcess:
        qp = vm.start_qemu(binary=binary, **kw)
        started.append(qp)
        _STARTED.append(qp)
        return qp

    start.started = started  # type: ignore[attr-defined]
    return start


def _factory_fixture(binary: str | None) -> Iterator[Callable[..., vm.QemuProcess]]:
    start = _factory(binary)
    try:
        yield start
    finally:
        for qp in start.started:  # type: ignore[attr-defined]
            qp.stop()


@pytest.fixture
def qemu_factory() -> Iterator[Callable[..., vm.QemuProcess]]:
    """Start any number of Debian QEMUs: ``qemu_factory(drives=[...], extra_args=[...])``."""
    yield from _factory_fixture(None)


@pytest.fixture
def qemu(qemu_factory) -> vm.QemuProcess:
    """One running Debian QEMU (KVM when /dev/kvm opens, else TCG) with a QMP socket.

    ``qemu.pid``, ``qemu.qmp_path``, ``qemu.client`` (connected sync QMP client).
    QEMU's QMP socket serves one client at a time: a test that runs the CLI or
    the shell against ``qemu.qmp_path`` calls ``qemu.client.close()`` first.
    """
    qp = qemu_factory(name="virtopt-test")
    qp.client = qp.qmp()  # type: ignore[attr-defined]
    return qp


def debug_qemu_src() -> Path:
    d = vm.debug_qemu_dir()
    if d is None:
        msg = "the debug QEMU is not built: run tests/qemu/build-debug-qemu (make test does)"
        if os.environ.get("VIRTOPT_REQUIRE_DEBUG_QEMU"):
            pytest.fail(msg)
        # A user running pytest by hand before building it: a real condition.
        pytest.skip(msg)
    return d


@pytest.fixture
def debug_qemu_factory() -> Iterator[Callable[..., vm.QemuProcess]]:
    yield from _factory_fixture(str(debug_qemu_src() / "build" / "qemu-system-x86_64"))


@pytest.fixture
def debug_qemu(debug_qemu_factory) -> vm.QemuProcess:
    """One running debug-build QEMU (DWARF, simple+log trace backends) with a QMP socket."""
    qp = debug_qemu_factory(name="virtopt-test")
    qp.client = qp.qmp()  # type: ignore[attr-defined]
    return qp


@pytest.fixture
def debug_src() -> Path:
    """The debug QEMU's source tree (scripts/simpletrace.py, scripts/qemu-gdb.py, build/)."""
    return debug_qemu_src()


@pytest.fixture
def image_factory(tmp_path: Path) -> Callable[..., Path]:
    """``image_factory("a.qcow2", size="64M", options={...}, io=["write 0 64k"])`` via qemu-img/qemu-io."""

    def make(name: str = "disk.qcow2", **kw) -> Path:
        return make_qcow2(tmp_path / name, **kw)

    return make


def _qemu_pids() -> list[int]:
    cp = subprocess.run(["pgrep", "-f", "qemu-system-x86_64"], capture_output=True, text=True)
    return [int(x) for x in cp.stdout.split()]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    left = [qp.pid for qp in _STARTED if qp.alive()]
    if left:
        print(f"\nvirtopt tests: QEMU processes left running: {left}")
        session.exitstatus = 1


__all__ = ["REPO"]
