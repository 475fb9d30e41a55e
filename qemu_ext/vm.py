"""Start and stop real QEMU processes with a QMP socket (for `virtopt demo` and the tests).

A QemuProcess is always killed and reaped: use it as a context manager, or
call ``stop()`` in a ``finally``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from qemu_ext.errors import NotAvailableError, QemuError

DEBIAN_QEMU = "/usr/bin/qemu-system-x86_64"
FIRMWARE_DIRS = ("/usr/share/seabios", "/usr/share/qemu")


def kvm_available() -> bool:
    """True when /dev/kvm opens read-write (then -accel kvm works)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def cache_dir() -> Path:
    """Where virtopt keeps what it builds once (the debug QEMUs, QEMU 10.0): $VIRTOPT_CACHE or ~/.cache/virtopt."""
    return Path(os.environ.get("VIRTOPT_CACHE", Path.home() / ".cache" / "virtopt"))


# The QEMU series the tests compare against: Debian 12's own, and the current QEMU
# from bookworm-backports (tests/qemu/install-qemu-current). Versions between them
# (8.2, 9.x) have no oracle on this machine.
SERIES = ("7.2", "10.0")


@dataclass(frozen=True)
class QemuBuild:
    """One QEMU installation the harness can run: Debian's 7.2 from the system, QEMU 10.0 in a
    private prefix in the cache, or a debug build (DWARF, ``simple,log`` trace backends) of either.

    ``system``/``img``/``io`` are the binaries; run them with ``env()`` and, for QEMU itself,
    ``firmware_args()`` (``-L`` for the firmware of the same version).
    """

    series: str  # "7.2" / "10.0"
    version: str  # Debian version, e.g. "1:10.0.2+ds-2+deb13u1~bpo12+1"
    debug: bool
    bindir: Path  # holds qemu-system-x86_64, qemu-img, qemu-io
    firmware: tuple[str, ...] = ()  # -L directories; () for the system QEMU (it knows its own)
    module_dir: Optional[str] = None  # QEMU_MODULE_DIR (10.0 would load 7.2's modules without it)
    src: Optional[Path] = None  # source tree of a debug build (scripts/simpletrace.py, scripts/qemu-gdb.py)
    trace_events: Optional[Path] = None  # this QEMU's trace-events-all

    @property
    def label(self) -> str:
        return f"{self.series}-debug" if self.debug else self.series

    @property
    def system(self) -> str:
        return str(self.bindir / "qemu-system-x86_64")

    @property
    def img(self) -> str:
        return str(self.bindir / "qemu-img")

    @property
    def io(self) -> str:
        return str(self.bindir / "qemu-io")

    @property
    def simpletrace(self) -> Optional[Path]:
        """This version's scripts/simpletrace.py (debug builds carry the source tree)."""
        if self.src is None:
            return None
        p = self.src / "scripts" / "simpletrace.py"
        return p if p.is_file() else None

    def env(self, base: Optional[dict] = None) -> dict:
        """The environment to run this QEMU's binaries in."""
        env = dict(os.environ if base is None else base)
        if self.module_dir:
            env["QEMU_MODULE_DIR"] = self.module_dir
        else:
            env.pop("QEMU_MODULE_DIR", None)
        return env

    def firmware_args(self) -> list[str]:
        out: list[str] = []
        for d in self.firmware:
            out += ["-L", d]
        return out


def _series_of(version: str) -> str:
    v = version.split(":", 1)[-1]
    m = re.match(r"(\d+)\.(\d+)", v)
    return f"{m.group(1)}.{m.group(2)}" if m else v


def _system_build() -> Optional[QemuBuild]:
    if not Path(DEBIAN_QEMU).is_file():
        return None
    version = _dpkg_version("qemu-system-x86") or ""
    ev = Path("/usr/share/qemu/trace-events-all")
    return QemuBuild(_series_of(version) or "7.2", version, False, Path(DEBIAN_QEMU).parent,
                     trace_events=ev if ev.is_file() else None)


def _dpkg_version(pkg: str) -> Optional[str]:
    try:
        cp = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return cp.stdout.strip() if cp.returncode == 0 and cp.stdout.strip() else None


def _ready(d: Path) -> Optional[str]:
    try:
        return (d / "READY").read_text().strip() or None
    except OSError:
        return None


def _prefix_builds(root: Path) -> list[QemuBuild]:
    """QEMUs unpacked by tests/qemu/install-qemu-current: <cache>/qemu-<version>/root."""
    out = []
    for d in sorted(root.glob("qemu-[0-9]*")):
        version = _ready(d)
        prefix = d / "root"
        if version is None or not (prefix / "usr" / "bin" / "qemu-system-x86_64").is_file():
            continue
        share = prefix / "usr" / "share"
        ev = share / "qemu" / "trace-events-all"
        out.append(QemuBuild(
            _series_of(version), version, False, prefix / "usr" / "bin",
            firmware=(str(share / "qemu"), str(share / "seabios")),
            module_dir=str(prefix / "usr" / "lib" / "x86_64-linux-gnu" / "qemu"),
            trace_events=ev if ev.is_file() else None,
        ))
    return out


def _debug_builds(root: Path, stock: list[QemuBuild]) -> list[QemuBuild]:
    """Builds made by tests/qemu/build-debug-qemu: <cache>/qemu-debug-<version>/src/build."""
    out = []
    for d in sorted(root.glob("qemu-debug-*")):
        version = _ready(d)
        build = d / "src" / "build"
        if version is None or not (build / "qemu-system-x86_64").is_file():
            continue
        series = _series_of(version)
        # firmware of the same version: 10.0 wants a newer SeaBIOS than Debian 12's
        same = [b for b in stock if b.series == series and b.firmware]
        firmware = same[0].firmware if same else FIRMWARE_DIRS
        ev = None
        for cand in (build / "qemu-bundle" / "usr" / "local" / "share" / "qemu" / "trace-events-all",
                     build / "trace" / "trace-events-all"):
            if cand.is_file():
                ev = cand
                break
        # no modules in these builds: an empty module dir keeps QEMU from loading another version's
        out.append(QemuBuild(series, version, True, build, firmware=firmware, module_dir=str(build),
                             src=d / "src", trace_events=ev))
    return out


def qemu_builds() -> list[QemuBuild]:
    """Every QEMU installed for virtopt's tests and demo, stock builds first, oldest series first."""
    stock: list[QemuBuild] = []
    sysb = _system_build()
    if sysb is not None:
        stock.append(sysb)
    root = cache_dir()
    if root.is_dir():
        stock += [b for b in _prefix_builds(root) if all(b.series != s.series for s in stock)]
    debug = _debug_builds(root, stock) if root.is_dir() else []
    key = lambda b: tuple(int(x) for x in b.series.split(".") if x.isdigit())  # noqa: E731
    return sorted(stock, key=key) + sorted(debug, key=key)


def find_build(series: str, debug: bool = False) -> Optional[QemuBuild]:
    """The installed QEMU of that series (``"7.2"``, ``"10.0"``), stock or debug build."""
    for b in qemu_builds():
        if b.series == series and b.debug == debug:
            return b
    return None


def debug_qemu_dir(series: str = "7.2") -> Optional[Path]:
    """The source tree of the debug QEMU of that series, when it is built."""
    b = find_build(series, debug=True)
    return b.src if b is not None else None


@dataclass
class QemuProcess:
    """A running QEMU with a QMP unix socket."""

    binary: str
    argv: list[str]
    workdir: Path
    qmp_path: Path
    proc: subprocess.Popen
    accel: str
    stderr_path: Path
    build: Optional[QemuBuild] = None
    _own_workdir: bool = True
    _clients: list = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def qmp(self, timeout: float = 10.0):
        """A connected synchronous QMP client (qemu.qmp.legacy.QEMUMonitorProtocol)."""
        from qemu.qmp.legacy import QEMUMonitorProtocol

        client = QEMUMonitorProtocol(str(self.qmp_path))
        client.connect()
        client.settimeout(timeout)
        self._clients.append(client)
        return client

    def hmp(self, command: str) -> str:
        """Run an HMP command through QMP human-monitor-command and return its text."""
        client = self._clients[0] if self._clients else self.qmp()
        return client.cmd("human-monitor-command", **{"command-line": command})

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Kill QEMU and reap it; close clients; remove the work directory."""
        for c in self._clients:
            try:
                c.close()
            except Exception:  # closing a dead socket may fail in many ways
                pass
        self._clients.clear()
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not fail
            pass
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> QemuProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_qemu(
    binary: Optional[str] = None,
    build: Optional[QemuBuild] = None,
    name: str = "virtopt",
    drives: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    accel: str = "auto",
    memory_mb: int = 128,
    smp: int = 1,
    workdir: Optional[Path] = None,
    timeout: float = 20.0,
) -> QemuProcess:
    """Start QEMU with ``-name NAME,debug-threads=on -display none -nodefaults`` and a QMP socket.

    drives: values for ``-drive`` (e.g. ``file=x.qcow2,if=none,id=d0``).
    accel: ``kvm``, ``tcg`` or ``auto`` (KVM when /dev/kvm opens, else TCG).
    build: a QemuBuild (its binary, firmware and module directory); else ``binary`` (default
    Debian's QEMU; any other binary gets Debian's firmware directories).
    """
    if build is not None:
        binary = build.system
    binary = binary or DEBIAN_QEMU
    if not Path(binary).exists() and not shutil.which(binary):
        raise NotAvailableError(f"QEMU binary {binary} not found (apt-get install qemu-system-x86)")
    if accel == "auto":
        accel = "kvm" if kvm_available() else "tcg"
    own = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="virtopt-qemu-")) if workdir is None else Path(workdir)
    qmp_path = wd / "qmp.sock"
    stderr_path = wd / "qemu.stderr"
    argv = [
        binary,
        "-name", f"{name},debug-threads=on",
        "-display", "none",
        "-nodefaults",
        "-no-user-config",
        "-machine", "pc",
        "-accel", accel,
        "-m", str(memory_mb),
        "-smp", str(smp),
        "-qmp", f"unix:{qmp_path},server=on,wait=off",
    ]
    if build is not None:
        argv += build.firmware_args()
    elif binary != DEBIAN_QEMU:
        for d in FIRMWARE_DIRS:
            argv += ["-L", d]
    for d in drives:
        argv += ["-drive", d]
    argv += list(extra_args)
    with open(stderr_path, "wb") as err:
        env = build.env() if build is not None else None
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, cwd=wd, env=env)
    qp = QemuProcess(binary, argv, wd, qmp_path, proc, accel, stderr_path, build, own)
    try:
        # every QMP unix socket on the command line, ours first: QEMU opens them one after another
        for path in [qmp_path, *_extra_qmp_sockets(extra_args, wd)]:
            wait_for_socket(path, proc, timeout, qp.stderr_text)
    except BaseException:
        qp.stop()
        raise
    return qp


def _extra_qmp_sockets(args: Sequence[str], cwd: Path) -> list[Path]:
    out = []
    for opt, val in zip(args, args[1:]):
        if opt in ("-qmp", "-qmp-pretty") and val.startswith("unix:"):
            p = Path(val[5:].split(",", 1)[0])
            out.append(p if p.is_absolute() else cwd / p)
    return out


def wait_for_socket(path: Path, proc: subprocess.Popen, timeout: float, why=lambda: "") -> None:
    """Wait until the unix socket at path accepts a connection (closed at once), or fail
    with QEMU's own words when it exits first."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise QemuError(f"QEMU exited with status {proc.returncode}: {why().strip()[-400:]}")
        if path.exists():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(path))
                return
            except OSError:
                pass
            finally:
                s.close()
        if time.monotonic() > deadline:
            raise QemuError(f"QEMU did not open its QMP socket {path} within {timeout:.0f} s")
        time.sleep(0.02)
