"""QMP addresses and the process behind them.

- :func:`parse_address`: ``/path/qmp.sock``, ``unix:PATH``, ``HOST:PORT``, ``tcp:HOST:PORT``.
- :func:`open_socket`: a connected socket, or one clear :class:`QmpConnectError` per condition
  (``cannot connect to QMP at ADDR: REASON``: no such file, a directory, a regular file or a FIFO
  given as the socket, connection refused, permission denied).
- :func:`peer_pid`: the process at the other end (SO_PEERCRED for unix sockets; /proc/net/tcp and
  /proc/*/fd for TCP on this host), :func:`proc_exe` / :func:`proc_cmdline` / :func:`proc_cwd`.

Nothing here speaks QMP; :mod:`qemu_ext.qmp.client` does.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
from pathlib import Path
from typing import Optional, Union

from qemu_ext.errors import BadInputError
from qemu_ext.qmp.errors import QmpConnectError

Address = Union[str, tuple[str, int]]

# What a path that is not a socket is, for the message (stat.S_IFMT -> words).
_KINDS = {
    stat.S_IFREG: "a regular file",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFLNK: "a symbolic link",
}


def parse_address(text: str) -> Address:
    """``/path/to/qmp.sock`` (or ``unix:PATH``) -> path; ``HOST:PORT`` / ``tcp:HOST:PORT`` -> (host, port).

    A string that names an existing file, or contains a ``/``, is a unix socket path.
    """
    if not text:
        raise BadInputError("empty QMP address: give a unix socket path or HOST:PORT", exit_code=2)
    if text.startswith("unix:"):
        return text[5:]
    if text.startswith("tcp:"):
        text = text[4:]
    elif "/" in text or os.path.exists(text):
        return text
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return text  # a bare relative name: a socket path in the current directory
    host = host.strip("[]") or "localhost"
    p = int(port)
    if not 0 < p < 65536:
        raise BadInputError(f"bad TCP port in QMP address {text!r} (1 to 65535)", exit_code=2)
    return (host, p)


def describe(address: Address) -> str:
    return address if isinstance(address, str) else f"{address[0]}:{address[1]}"


def check_path(path: str) -> None:
    """Refuse, before connecting, what cannot be a QMP socket: one line per condition."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise QmpConnectError(path, f"{os.strerror(2)} (is QEMU running with -qmp unix:{path},server=on?)") from None
    except OSError as exc:
        raise QmpConnectError(path, exc.strerror or str(exc)) from None
    if stat.S_ISDIR(st.st_mode):
        raise QmpConnectError(path, os.strerror(21))  # Is a directory
    if not stat.S_ISSOCK(st.st_mode):
        raise QmpConnectError(path, f"not a socket ({_KINDS.get(stat.S_IFMT(st.st_mode), 'not a socket')})")


async def open_socket_async(address: Address, timeout: float = 5.0) -> socket.socket:
    """:func:`open_socket` on the running event loop (no thread: the shell's prompt comes up sooner)."""
    import asyncio

    if not isinstance(address, str):
        return await asyncio.get_running_loop().run_in_executor(None, open_socket, address, timeout)
    check_path(address)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(s, address), timeout)
    except asyncio.TimeoutError:
        s.close()
        raise QmpConnectError(address, f"no answer within {timeout:g} s") from None
    except ConnectionRefusedError:
        s.close()
        raise QmpConnectError(address, f"{os.strerror(111)} (a socket file nobody listens on: QEMU exited?)") from None
    except OSError as exc:
        s.close()
        raise QmpConnectError(address, exc.strerror or str(exc)) from None
    except BaseException:
        s.close()
        raise
    return s


def open_socket(address: Address, timeout: float = 5.0) -> socket.socket:
    """Connect a blocking socket to the address (the QMP client then takes it over, non-blocking)."""
    where = describe(address)
    try:
        if isinstance(address, str):
            check_path(address)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.settimeout(timeout)
                s.connect(address)
            except BaseException:
                s.close()
                raise
        else:
            s = socket.create_connection(address, timeout=timeout)
    except ConnectionRefusedError:
        why = " (a socket file nobody listens on: QEMU exited?)" if isinstance(address, str) else ""
        raise QmpConnectError(where, f"{os.strerror(111)}{why}") from None
    except socket.timeout:
        raise QmpConnectError(where, f"no answer within {timeout:g} s") from None
    except socket.gaierror as exc:
        raise QmpConnectError(where, f"unknown host ({exc.strerror})") from None
    except OSError as exc:
        raise QmpConnectError(where, exc.strerror or str(exc)) from None
    s.setblocking(False)
    return s


# -- the process behind the socket (read through qemu_ext.host.procfs, the one /proc reader) -----------


def peer_pid(sock: socket.socket) -> Optional[int]:
    """The pid of the process at the other end: SO_PEERCRED for unix sockets; for TCP to this host,
    the owner of the peer's socket (/proc/net/tcp{,6} and /proc/*/fd). None when unknown."""
    if sock.family == socket.AF_UNIX:
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return None
        pid, _uid, _gid = struct.unpack("3i", creds)
        return pid or None
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        from qemu_ext.host import procfs

        try:
            local, remote = sock.getsockname(), sock.getpeername()
            inode = procfs.tcp_socket_inode(sock.family, remote[:2], local[:2])
            return procfs.socket_owner(inode) if inode else None
        except (OSError, ValueError):
            return None
    return None


def proc_exe(pid: int) -> Optional[Path]:
    from qemu_ext.host import procfs

    try:
        return Path(procfs.exe(pid).removesuffix(" (deleted)"))
    except OSError:
        return None


def proc_cmdline(pid: int) -> list[str]:
    from qemu_ext.host import procfs

    try:
        return procfs.argv(pid)
    except OSError:
        return []


def proc_cwd(pid: int) -> Optional[Path]:
    from qemu_ext.host import procfs

    try:
        return Path(procfs.cwd(pid))
    except OSError:
        return None


def is_qemu(pid: Optional[int]) -> bool:
    """True when the process runs a QEMU system emulator (procfs.is_qemu_executable)."""
    from qemu_ext.host import procfs

    try:
        return bool(pid) and procfs.is_qemu_executable(procfs.exe(pid))  # type: ignore[arg-type]
    except OSError:
        return False
