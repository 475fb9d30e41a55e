"""A libvirtd (and its virtlogd) for the tests, and throw-away KVM domains on it.

Debian 12 without libvirt-daemon-system has no service manager for libvirt: the tests start
``virtlogd -d`` and ``libvirtd -d`` themselves (tests/libvirt/setup-libvirt prepares the host once:
the libvirt-qemu user libvirt 9.0's QEMU driver needs at start-up, /var/log/libvirt, and
``user = "root"`` in /etc/libvirt/qemu.conf so QEMU can open images in the tests' temp dirs).

Several test sessions may share one daemon: each registers in STATE_DIR under a lock; the daemons are
stopped (by the PIDs recorded when they were started) by the last session to leave, and only if a
test session started them — a libvirtd that was running before is left alone.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional
from xml.sax.saxutils import escape, quoteattr

from qemu_ext.errors import NotAvailableError, QemuError

STATE_DIR = Path("/run/virtopt-tests-libvirt")
STARTED = STATE_DIR / "started"  # "libvirtd PID\nvirtlogd PID\n" of daemons a test session started
USERS = STATE_DIR / "users"
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
SETUP = "tests/libvirt/setup-libvirt"
PREFIX = "virtopt-test-"  # every test domain's name starts with this


def missing_setup() -> Optional[str]:
    """What the host lacks for a private libvirtd (None when nothing)."""
    for exe in ("libvirtd", "virtlogd", "virsh"):
        if shutil.which(exe) is None and not os.path.exists(f"/usr/sbin/{exe}"):
            return f"{exe} is not installed (apt-get install --no-install-recommends libvirt-daemon " \
                   "libvirt-daemon-driver-qemu libvirt-clients python3-libvirt)"
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "the libvirt Python bindings are not importable (python3-libvirt, seen by the venv)"
    try:
        import pwd

        pwd.getpwnam("libvirt-qemu")
    except KeyError:
        return "there is no libvirt-qemu user (libvirt 9.0's QEMU driver refuses to start without it)"
    if os.geteuid() != 0:
        return "the tests' libvirtd runs as root"
    return None


@contextmanager
def _locked() -> Iterator[None]:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    USERS.mkdir(exist_ok=True)
    with open(STATE_DIR / "lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pidfile(path: str) -> Optional[int]:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and _alive(int(text)) else None


def answering(uri: str = "qemu:///system") -> bool:
    return subprocess.run(["virsh", "-q", "-c", uri, "version"], capture_output=True, timeout=30).returncode == 0


def _start(argv: list[str], pidfile: str, ready: Optional[Callable[[], bool]] = None, timeout: float = 20.0) -> int:
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if cp.returncode != 0:
        raise QemuError(f"{' '.join(argv)} failed: {cp.stderr.strip()[-300:]}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = _pidfile(pidfile)
        if pid is not None and (ready is None or ready()):
            return pid
        time.sleep(0.1)
    raise QemuError(f"{argv[0]} did not come up within {timeout:g} s")


def acquire(session: str) -> bool:
    """Register ``session`` (any unique text) as a user of the tests' libvirtd, starting virtlogd and
    libvirtd when none answers. True when this call started them."""
    why = missing_setup()
    if why:
        raise NotAvailableError(f"libvirt is not set up for the tests: {why}; run {SETUP} (make test does)")
    with _locked():
        (USERS / session).write_text(str(os.getpid()))
        if answering():
            return False
        Path("/var/log/libvirt/qemu").mkdir(parents=True, exist_ok=True)
        vl = _pidfile("/run/virtlogd.pid")
        started_vl = vl is None
        if vl is None:
            vl = _start(["virtlogd", "-d"], "/run/virtlogd.pid")
        lv = _start(["libvirtd", "-d"], "/run/libvirtd.pid", answering)
        STARTED.write_text(f"libvirtd {lv}\n" + (f"virtlogd {vl}\n" if started_vl else ""))
        return True


def _stop(pid: int, timeout: float = 15.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


def release(session: str) -> list[int]:
    """Unregister ``session``; the last live session stops the daemons a test session started (their
    recorded PIDs). Returns the PIDs stopped."""
    stopped: list[int] = []
    with _locked():
        try:
            (USERS / session).unlink()
        except FileNotFoundError:
            pass
        for u in USERS.iterdir():
            text = u.read_text().strip()
            if not (text.isdigit() and _alive(int(text))):
                u.unlink()  # a session that died without leaving
        if any(USERS.iterdir()) or not STARTED.exists():
            return stopped
        for line in STARTED.read_text().splitlines():
            _, _, pid = line.partition(" ")
            if pid.isdigit():
                _stop(int(pid))
                stopped.append(int(pid))
        STARTED.unlink()
    return stopped


def started_daemons() -> list[int]:
    """PIDs of the daemons a test session started that are still running."""
    try:
        lines = STARTED.read_text().splitlines()
    except OSError:
        return []
    return [int(p) for _, _, p in (ln.partition(" ") for ln in lines) if p.isdigit() and _alive(int(p))]


def domain_xml(name: str, disk: Optional[str] = None, vcpus: int = 1, memory_mib: int = 128, iothreads: int = 0,
               cputune: str = "", metadata_cache: Optional[int] = None, kvm: bool = True,
               extra_devices: str = "") -> str:
    """A minimal domain: no guest OS, a qcow2 ``vda`` (optionally with <metadata_cache>), no network."""
    disk_xml = ""
    if disk:
        mc = (f"<metadata_cache><max_size unit='bytes'>{metadata_cache}</max_size></metadata_cache>"
              if metadata_cache is not None else "")
        disk_xml = (f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'>{mc}</driver>"
                    f"<source file={quoteattr(disk)}/><target dev='vda' bus='virtio'/></disk>")
    return (f"<domain type='{'kvm' if kvm else 'qemu'}'><name>{escape(name)}</name>"
            f"<memory unit='MiB'>{memory_mib}</memory><vcpu>{vcpus}</vcpu>"
            + (f"<iothreads>{iothreads}</iothreads>" if iothreads else "")
            + (f"<cputune>{cputune}</cputune>" if cputune else "")
            + "<os><type arch='x86_64' machine='pc'>hvm</type></os>"
            + f"<devices>{disk_xml}{extra_devices}</devices></domain>")


def leftover_domains(names: list[str], uri: str = "qemu:///system") -> list[str]:
    """Which of these domains still exist (running or defined)."""
    from qemu_ext.libvirt.conn import open_connection

    if not names:
        return []
    c = open_connection(uri)
    try:
        have = {d.name() for d in c.listAllDomains()}
    finally:
        c.close()
    return sorted(n for n in names if n in have)


class TestDomain:
    """A domain a test started (transient, or defined with ``persistent``); ``stop()`` destroys (and
    undefines) it. ``pid`` is its QEMU."""

    __test__ = False  # not a pytest test class

    def __init__(self, name: str, xml: str, persistent: bool = False, uri: str = "qemu:///system") -> None:
        from qemu_ext.libvirt.conn import bindings, libvirt_error, open_connection

        libvirt, _ = bindings()
        self.name, self.uri, self.persistent = name, uri, persistent
        self.conn = open_connection(uri)
        try:
            if persistent:
                self.dom = self.conn.defineXML(xml)
                self.dom.create()
            else:
                self.dom = self.conn.createXML(xml, 0)
        except libvirt.libvirtError as exc:
            self.stop()
            raise QemuError(f"libvirt could not start domain {name}: {libvirt_error(exc)}") from None

    @property
    def pid(self) -> int:
        from qemu_ext.libvirt.domain import RUN_DIR

        return int((RUN_DIR / f"{self.name}.pid").read_text().strip())

    def xml(self) -> str:
        return str(self.dom.XMLDesc(0))

    def restart(self) -> None:
        """Destroy and start again (a persistent domain comes back with its defined XML)."""
        self.dom.destroy()
        self.dom.create()

    def stop(self) -> None:
        """Destroy (and undefine) the domain; never raises."""
        from qemu_ext.libvirt.conn import bindings

        libvirt, _ = bindings()
        try:
            dom = self.conn.lookupByName(self.name)
        except libvirt.libvirtError:
            dom = None
        if dom is not None:
            try:
                if dom.isActive():
                    dom.destroy()
            except libvirt.libvirtError:
                pass
            try:
                if dom.isPersistent():
                    dom.undefine()
            except libvirt.libvirtError:
                pass
        try:
            self.conn.close()
        except libvirt.libvirtError:
            pass
