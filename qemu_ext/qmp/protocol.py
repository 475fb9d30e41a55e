"""Protocol layer: addresses, sockets, the peer process, and the translation of
qemu.qmp's exceptions into :mod:`qemu_ext.qmp.errors`.

Nothing here knows about commands; :mod:`qemu_ext.qmp.client` builds on it.
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path
from typing import Optional, Union

from qemu_ext.errors import BadInputError
from qemu_ext.qmp.errors import (
    QmpConnectError,
    QmpError,
    QmpGoneError,
    QmpGreetingError,
)

Address = Union[str, tuple[str, int]]


def parse_address(text: str) -> Address:
    """``/path/to/qmp.sock`` (or ``unix:PATH``) -> path; ``HOST:PORT`` / ``tcp:HOST:PORT`` -> (host, port).

    A string that names an existing file, or contains a ``/``, is a unix socket path.
    """
    if not text:
        raise BadInputError("empty QMP address: give a unix socket path or HOST:PORT")
    if text.startswith("unix:"):
        return text[5:]
    if text.startswith("tcp:"):
        text = text[4:]
    elif "/" in text or os.path.exists(text):
        return text
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        # a bare relative name: a socket path in the current directory
        return text
    host = host.strip("[]") or "localhost"
    p = int(port)
    if not 0 < p < 65536:
        raise BadInputError(f"bad TCP port in QMP address {text!r}")
    return (host, p)


def describe(address: Address) -> str:
    return address if isinstance(address, str) else f"{address[0]}:{address[1]}"


def open_socket(address: Address, timeout: float = 5.0) -> socket.socket:
    """Connect a blocking socket to the address (the QMP client then takes it over)."""
    where = describe(address)
    try:
        if isinstance(address, str):
            st = os.stat(address)
            import stat as _stat

            if not _stat.S_ISSOCK(st.st_mode):
                raise QmpConnectError(f"{where} is not a socket")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.settimeout(timeout)
                s.connect(address)
            except BaseException:
                s.close()
                raise
        else:
            s = socket.create_connection(address, timeout=timeout)
    except FileNotFoundError as exc:
        raise QmpConnectError(f"no QMP socket at {where} (is QEMU running with -qmp unix:{where},server=on?)") from exc
    except ConnectionRefusedError as exc:
        raise QmpConnectError(f"connection refused on {where}: QEMU is not listening (dead socket)") from exc
    except PermissionError as exc:
        raise QmpConnectError(f"permission denied on {where}") from exc
    except socket.timeout as exc:
        raise QmpConnectError(f"timed out connecting to {where}") from exc
    except OSError as exc:
        raise QmpConnectError(f"cannot connect to {where}: {exc.strerror or exc}") from exc
    s.setblocking(False)
    return s


def peer_pid(sock: socket.socket) -> Optional[int]:
    """The pid of the process at the other end: SO_PEERCRED for unix sockets; for TCP to this host,
    the owner of the peer's socket found through /proc/net/tcp{,6} and /proc/*/fd. None when unknown."""
    if sock.family == socket.AF_UNIX:
        if not hasattr(socket, "SO_PEERCRED"):
            return None
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return None
        pid, _uid, _gid = struct.unpack("3i", creds)
        return pid or None
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            local = sock.getsockname()
            remote = sock.getpeername()
        except OSError:
            return None
        inode = _tcp_inode(sock.family, remote[:2], local[:2])
        return _socket_owner(inode) if inode else None
    return None


def _proc_net_addr(family: int, addr: tuple[str, int]) -> str:
    raw = socket.inet_pton(family, addr[0])
    if family == socket.AF_INET:
        text = raw[::-1].hex().upper()
    else:  # four 32-bit words, each in host (little-endian) order
        text = "".join(raw[i:i + 4][::-1].hex().upper() for i in range(0, 16, 4))
    return f"{text}:{addr[1]:04X}"


def _tcp_inode(family: int, local: tuple[str, int], remote: tuple[str, int]) -> Optional[str]:
    """Inode of the TCP socket whose local end is ``local`` and remote end ``remote`` (the peer's socket)."""
    table = "/proc/net/tcp" if family == socket.AF_INET else "/proc/net/tcp6"
    want_l, want_r = _proc_net_addr(family, local), _proc_net_addr(family, remote)
    try:
        lines = Path(table).read_text().splitlines()[1:]
    except OSError:
        return None
    for ln in lines:
        f = ln.split()
        if len(f) > 9 and f[1] == want_l and f[2] == want_r:
            return f[9]
    return None


def _socket_owner(inode: str) -> Optional[int]:
    target = f"socket:[{inode}]"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                try:
                    if os.readlink(fd) == target:
                        return int(proc.name)
                except OSError:
                    continue
        except OSError:
            continue
    return None


def translate(exc: BaseException, address: Address, during: str = "") -> QmpError:
    """Map an exception of qemu.qmp / asyncio / the OS onto one of our meaningful errors."""
    from qemu.qmp import ConnectError
    from qemu.qmp.error import ProtocolError
    from qemu.qmp.qmp_client import ExecInterruptedError, GreetingError, NegotiationError

    where = describe(address)
    inner: BaseException = exc
    if isinstance(exc, ConnectError):
        inner = exc.exc
    if isinstance(inner, QmpError):
        return inner
    if isinstance(inner, (GreetingError, NegotiationError)):
        detail = getattr(inner, "exc", None)
        what = "greeting" if isinstance(inner, GreetingError) else "capabilities negotiation"
        if isinstance(detail, EOFError) or (detail is not None and isinstance(detail, (ConnectionError,))):
            return QmpGreetingError(f"{where} closed the connection before a QMP {what}: not a QMP server?")
        text = _short(detail) if detail is not None else ""
        return QmpGreetingError(f"{where} does not speak QMP (garbled {what}{': ' + text if text else ''})")
    if isinstance(inner, ProtocolError) or (during == "connect" and isinstance(inner, (ValueError, TypeError, KeyError))):
        # e.g. bytes that are not UTF-8 JSON make qemu.qmp raise UnicodeDecodeError while reading the greeting
        return QmpGreetingError(f"{where} does not speak QMP (garbled greeting: {_short(inner)})")
    if during == "connect" and isinstance(inner, (EOFError, ConnectionResetError, BrokenPipeError)):
        return QmpGreetingError(f"{where} closed the connection before a QMP greeting: not a QMP server?")
    if isinstance(inner, (EOFError, ExecInterruptedError, ConnectionResetError, BrokenPipeError)):
        tail = f" during {during}" if during else ""
        return QmpGoneError(f"QEMU at {where} went away{tail} (connection closed)")
    if isinstance(inner, OSError):
        return QmpConnectError(f"{where}: {inner.strerror or inner}")
    return QmpError(f"{where}: {type(inner).__name__}: {inner}")


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:160]


def proc_exe(pid: int) -> Optional[Path]:
    try:
        return Path(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return None


def proc_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]
