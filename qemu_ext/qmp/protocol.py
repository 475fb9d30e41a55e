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
    """The pid of the process on the other end of a unix socket (SO_PEERCRED), else None."""
    if sock.family != socket.AF_UNIX or not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, _uid, _gid = struct.unpack("3i", creds)
    return pid or None


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
