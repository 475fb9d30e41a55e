"""Fixtures on real QEMU: every test that takes a QEMU runs once per series (Debian's 7.2 and the
current 10.0 from bookworm-backports, see qemu_ext.vm.QemuBuild), stock or debug build.

Every QEMU a fixture starts is killed and reaped at teardown, also when the test
fails; the session checks at its end that none of them is left.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

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


# ---- libvirt (qemu_ext.libvirt.daemon): the tests' own libvirtd and throw-away KVM domains on it

_LIBVIRT_SESSION = f"pytest-{os.getpid()}"
_LIBVIRT_DOMAINS: list[str] = []  # every domain a fixture started (leak-checked at session end)
_LIBVIRT_USED: list[bool] = []


@pytest.fixture(scope="session")
def libvirt_daemon() -> Iterator[str]:
    """A libvirtd answering on qemu:///system (started with its virtlogd when none runs; stopped by the
    last test session using it). Skips when the host is not set up for it (tests/libvirt/setup-libvirt;
    under make test that is a failure). Yields the connection URI."""
    from qemu_ext.errors import NotAvailableError
    from qemu_ext.libvirt import daemon

    try:
        daemon.acquire(_LIBVIRT_SESSION)
    except NotAvailableError as exc:
        if os.environ.get("VIRTOPT_REQUIRE_DEBUG_QEMU"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))  # a user running pytest before setting libvirt up: a real condition
    _LIBVIRT_USED.append(True)
    try:
        yield "qemu:///system"
    finally:
        daemon.release(_LIBVIRT_SESSION)


def _libvirt_factory(libvirt_daemon: str, tmp_dir: Path) -> Iterator[Callable[..., object]]:
    from qemu_ext.libvirt import daemon

    started: list[daemon.TestDomain] = []

    def start(name: str = "dom", disk_size: Optional[str] = "64M", persistent: bool = False,
              disk_io: Sequence[str] = (), **kw) -> daemon.TestDomain:
        """A KVM domain (no guest OS) named virtopt-test-NAME-PID with a fresh qcow2 vda of disk_size,
        written first with the qemu-io commands disk_io (a running domain's disk is not writable
        through HMP qemu-io: its device does not share write); ``image=`` path to use another image,
        ``disk_size=None`` for none; other kw go to daemon.domain_xml."""
        full = f"{daemon.PREFIX}{name}-{os.getpid()}"
        image = kw.pop("image", None)
        if image is None and disk_size:
            image = make_qcow2(tmp_dir / f"{full}.qcow2", size=disk_size, io=disk_io)
        xml = daemon.domain_xml(full, str(image) if image else None, **kw)
        _LIBVIRT_DOMAINS.append(full)
        d = daemon.TestDomain(full, xml, persistent, libvirt_daemon)
        d.image = image  # type: ignore[attr-defined]
        started.append(d)
        return d

    try:
        yield start
    finally:
        for d in started:
            d.stop()


@pytest.fixture
def libvirt_domain_factory(libvirt_daemon: str, tmp_path: Path) -> Iterator[Callable[..., object]]:
    """Start libvirt domains for one test: ``libvirt_domain_factory("x", vcpus=2, iothreads=1,
    cputune="<vcpupin vcpu='0' cpuset='1'/>", metadata_cache=N)`` -> daemon.TestDomain (.name, .pid,
    .dom, .image, .xml(), .restart()); destroyed (and undefined) at teardown, leak-checked."""
    yield from _libvirt_factory(libvirt_daemon, tmp_path)


@pytest.fixture(scope="module")
def module_libvirt_domain_factory(libvirt_daemon: str, tmp_path_factory) -> Iterator[Callable[..., object]]:
    """Like libvirt_domain_factory, for domains shared by a module's tests."""
    yield from _libvirt_factory(libvirt_daemon, tmp_path_factory.mktemp("libvirt"))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    left = [qp.pid for qp in _STARTED if qp.alive()]
    if left:
        print(f"\nvirtopt tests: QEMU processes left running: {left}")
        session.exitstatus = 1
    if _LIBVIRT_USED:
        from qemu_ext.errors import VirtoptError
        from qemu_ext.host import procfs
        from qemu_ext.libvirt import daemon

        try:
            doms = daemon.leftover_domains(_LIBVIRT_DOMAINS) if daemon.answering() else []
        except VirtoptError:
            doms = []
        doms += [f"{p.vm_name} (QEMU pid {p.pid})" for p in procfs.qemu_processes() if p.vm_name in _LIBVIRT_DOMAINS]
        if doms:
            print(f"\nvirtopt tests: libvirt domains left behind: {doms}")
            session.exitstatus = 1
        users = [u for u in daemon.USERS.iterdir()] if daemon.USERS.exists() else []
        daemons = daemon.started_daemons()
        if daemons and not users:
            print(f"\nvirtopt tests: libvirt daemons left running: {daemons}")
            session.exitstatus = 1


__all__ = ["REPO"]
