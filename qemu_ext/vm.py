"""Start and stop real QEMU processes with a QMP socket (for `virtopt demo` and the tests).

A QemuProcess is always killed and reaped: use it as a context manager, or
call ``stop()`` in a ``finally``.
"""

from __future__ import annotations

import os
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
    """Where virtopt keeps what it builds once (the debug QEMU): $VIRTOPT_CACHE or ~/.cache/virtopt."""
    return Path(os.environ.get("VIRTOPT_CACHE", Path.home() / ".cache" / "virtopt"))


def debug_qemu_dir() -> Optional[Path]:
    """The source tree of the debug QEMU built by tests/qemu/build-debug-qemu, when it is built."""
    root = cache_dir()
    if not root.is_dir():
        return None
    for cand in sorted(root.glob("qemu-debug-*"), reverse=True):
        if (cand / "READY").is_file() and (cand / "src" / "build" / "qemu-system-x86_64").is_file():
            return cand / "src"
    return None


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
    """
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
    if binary != DEBIAN_QEMU:
        for d in FIRMWARE_DIRS:
            argv += ["-L", d]
    for d in drives:
        argv += ["-drive", d]
    argv += list(extra_args)
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, cwd=wd)
    qp = QemuProcess(binary, argv, wd, qmp_path, proc, accel, stderr_path, own)
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
