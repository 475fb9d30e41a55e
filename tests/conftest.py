"""Fixtures on real QEMU: every test that takes a QEMU runs once per series (Debian's 7.2 and the
current 10.0 from bookworm-backports, see qemu_ext.vm.QemuBuild), stock or debug build.

Every QEMU a fixture starts is killed and reaped at teardown, also when the test
fails; the session checks at its end that none of them is left.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

import pytest
from helpers import REPO, make_qcow2

from qemu_ext import vm

_STARTED: list[vm.QemuProcess] = []


def _factory(build: vm.QemuBuild) -> Callable[..., vm.QemuProcess]:
    started: list[vm.QemuProcess] = []

    def start(**kw) -> vm.QemuProcess:
        qp = vm.start_qemu(build=build, **kw)
        started.append(qp)
        _STARTED.append(qp)
        return qp

    start.started = started  # type: ignore[attr-defined]
    start.build = build  # type: ignore[attr-defined]
    return start


def _factory_fixture(build: vm.QemuBuild) -> Iterator[Callable[..., vm.QemuProcess]]:
    start = _factory(build)
    try:
        yield start
    finally:
        for qp in start.started:  # type: ignore[attr-defined]
            qp.stop()


def _require(series: str, debug: bool) -> vm.QemuBuild:
    """The installed QEMU of that series, or skip (fail under make test) when it is missing."""
    b = vm.find_build(series, debug)
    if b is not None:
        return b
    if debug:
        what, how = f"the debug QEMU {series} is not built", f"tests/qemu/build-debug-qemu {series}"
    elif series == "7.2":
        what, how = "Debian's QEMU 7.2 is not installed", "apt-get install qemu-system-x86 qemu-utils"
    else:
        what, how = f"QEMU {series} is not installed", "tests/qemu/install-qemu-current"
    msg = f"{what}: run {how} (make test does)"
    if os.environ.get("VIRTOPT_REQUIRE_DEBUG_QEMU"):
        pytest.fail(msg)
    # A user running pytest by hand before installing it: a real condition.
    pytest.skip(msg)


def _series_id(s: str) -> str:
    return f"qemu{s}"


@pytest.fixture(scope="module", params=vm.SERIES, ids=_series_id)
def qemu_build(request) -> vm.QemuBuild:
    """Each stock QEMU in turn (Debian's 7.2, the current 10.0): ``.system``, ``.img``, ``.io``,
    ``.env()``. A test that takes it runs once per QEMU: the comparison suite."""
    return _require(request.param, debug=False)


@pytest.fixture(scope="module", params=vm.SERIES, ids=_series_id)
def debug_build(request) -> vm.QemuBuild:
    """Each debug QEMU in turn (DWARF, simple+log trace backends): ``.src`` is its source tree."""
    return _require(request.param, debug=True)


@pytest.fixture
def qemu_factory(qemu_build) -> Iterator[Callable[..., vm.QemuProcess]]:
    """Start any number of stock QEMUs of the series under test: ``qemu_factory(drives=[...], extra_args=[...])``."""
    yield from _factory_fixture(qemu_build)


@pytest.fixture(scope="module")
def module_qemu_factory(qemu_build) -> Iterator[Callable[..., vm.QemuProcess]]:
    """Like qemu_factory, for module-scoped fixtures (one QEMU shared by a module's tests, per series)."""
    yield from _factory_fixture(qemu_build)


@pytest.fixture(scope="module")
def module_debug_qemu_factory(debug_build) -> Iterator[Callable[..., vm.QemuProcess]]:
    """Like debug_qemu_factory, for module-scoped fixtures."""
    yield from _factory_fixture(debug_build)


@pytest.fixture
def qemu(qemu_factory) -> vm.QemuProcess:
    """One running stock QEMU per series (KVM when /dev/kvm opens, else TCG) with a QMP socket.

    ``qemu.pid``, ``qemu.qmp_path``, ``qemu.client`` (connected sync QMP client), ``qemu.build``.
    QEMU's QMP socket serves one client at a time: a test that runs the CLI or
    the shell against ``qemu.qmp_path`` calls ``qemu.client.close()`` first.
    """
    qp = qemu_factory(name="virtopt-test")
    qp.client = qp.qmp()  # type: ignore[attr-defined]
    return qp


def debug_qemu_src(series: str = "7.2") -> Path:
    b = _require(series, debug=True)
    assert b.src is not None
    return b.src


@pytest.fixture
def debug_qemu_factory(debug_build) -> Iterator[Callable[..., vm.QemuProcess]]:
    yield from _factory_fixture(debug_build)


@pytest.fixture
def debug_qemu(debug_qemu_factory) -> vm.QemuProcess:
    """One running debug-build QEMU per series (DWARF, simple+log trace backends) with a QMP socket."""
    qp = debug_qemu_factory(name="virtopt-test")
    qp.client = qp.qmp()  # type: ignore[attr-defined]
    return qp


@pytest.fixture
def debug_src(debug_build) -> Path:
    """The debug QEMU's source tree (scripts/simpletrace.py, scripts/qemu-gdb.py, build/)."""
    assert debug_build.src is not None
    return debug_build.src


@pytest.fixture
def image_factory(tmp_path: Path) -> Callable[..., Path]:
    """``image_factory("a.qcow2", size="64M", options={...}, io=["write 0 64k"])`` via qemu-img/qemu-io."""

    def make(name: str = "disk.qcow2", **kw) -> Path:
        return make_qcow2(tmp_path / name, **kw)

    return make


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    left = [qp.pid for qp in _STARTED if qp.alive()]
    if left:
        print(f"\nvirtopt tests: QEMU processes left running: {left}")
        session.exitstatus = 1


__all__ = ["REPO"]
