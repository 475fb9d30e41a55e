"""Client layer: one QMP session to one QEMU, on qemu.qmp's asyncio QMPClient.

``QmpSession`` connects (unix socket path or HOST:PORT), negotiates
capabilities (``oob`` when the greeting offers it), executes commands and
HMP lines, hands out events, and turns every failure into one of the
meaningful errors of :mod:`qemu_ext.qmp.errors`.

    async with QmpSession("/run/vm.qmp") as s:
        print(s.version_text, await s.execute("query-status"))

``run_sync(address, fn, *args)`` runs ``await fn(session, *args)`` from
synchronous code (the CLI, tests, other areas).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any, Awaitable, Callable, Mapping, Optional, TypeVar, Union

from qemu_ext.qmp import protocol
from qemu_ext.qmp.errors import (
    QmpCommandError,
    QmpConnectError,
    QmpError,
    QmpGoneError,
    QmpGreetingError,
    QmpTimeoutError,
)

T = TypeVar("T")

# qemu.qmp logs every failure it raises at ERROR level: we raise them as our own errors instead.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


class QmpSession:
    """A QMP connection with meaningful errors. Re-connectable: ``connect()`` again after QEMU returns."""

    def __init__(self, address: Union[str, protocol.Address], name: str = "virtopt",
                 timeout: float = 5.0) -> None:
        from qemu.qmp import QMPClient

        self.address: protocol.Address = protocol.parse_address(address) if isinstance(address, str) else address
        self.where = protocol.describe(self.address)
        self.timeout = timeout
        self._client = QMPClient(name)
        self._sock: Optional[socket.socket] = None
        self.pid: Optional[int] = None
        self.greeting: dict[str, Any] = {}

    # -- connection ---------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        from qemu.qmp import Runstate

        return self._client.runstate == Runstate.RUNNING

    async def connect(self) -> None:
        """Connect and negotiate. Raises QmpConnectError (nobody there) or QmpGreetingError (not QMP)."""
        sock = await asyncio.get_running_loop().run_in_executor(
            None, protocol.open_socket, self.address, self.timeout
        )
        try:
            await asyncio.wait_for(self._client.connect(sock), self.timeout)
        except asyncio.TimeoutError as exc:
            await self._reset()
            sock.close()
            raise QmpGreetingError(
                f"{self.where} sent no QMP greeting within {self.timeout:g} s: not a QMP server, or another "
                "client holds this QEMU monitor (QEMU serves one client per -qmp socket)") from exc
        except QmpError:
            sock.close()
            raise
        except Exception as exc:
            await self._reset()
            sock.close()
            raise protocol.translate(exc, self.address, "connect") from exc
        self._sock = sock
        self.pid = protocol.peer_pid(sock)
        g = self._client.greeting
        self.greeting = g._asdict() if g is not None else {}

    async def _reset(self) -> None:
        from qemu.qmp import Runstate

        if self._client.runstate != Runstate.IDLE:
            try:
                await self._client.disconnect()
            except Exception:  # the reason was already reported
                pass

    async def close(self) -> None:
        """Disconnect; never raises (a QEMU that already went away is not an error here)."""
        await self._reset()
        self._sock = None

    async def wait_disconnected(self) -> None:
        """Return when the connection drops (QEMU exited, was killed, closed the socket)."""
        from qemu.qmp import Runstate

        while self._client.runstate == Runstate.RUNNING:
            await self._client.runstate_changed()

    async def __aenter__(self) -> QmpSession:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- greeting -----------------------------------------------------------------------------------

    @property
    def version(self) -> dict[str, Any]:
        return dict(self.greeting.get("QMP", {}).get("version", {}))

    @property
    def version_text(self) -> str:
        """``7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)`` from the greeting."""
        v = self.version
        q = v.get("qemu", {})
        text = f"{q.get('major', '?')}.{q.get('minor', '?')}.{q.get('micro', '?')}"
        pkg = str(v.get("package", "")).strip()
        return f"{text} ({pkg})" if pkg else text

    @property
    def capabilities(self) -> list[str]:
        return list(self.greeting.get("QMP", {}).get("capabilities", []))

    @property
    def oob(self) -> bool:
        """True when the server offered out-of-band execution (the client enabled it then)."""
        return "oob" in self.capabilities

    # -- commands -----------------------------------------------------------------------------------

    async def execute(self, command: str, arguments: Optional[Mapping[str, Any]] = None,
                      timeout: Optional[float] = None, oob: bool = False) -> Any:
        """Run a QMP command and return its ``return`` value; QmpCommandError carries class + desc."""
        msg: dict[str, Any] = {"exec-oob" if oob else "execute": command}
        if arguments:
            msg["arguments"] = dict(arguments)
        return await self.execute_msg(msg, timeout=timeout)

    async def execute_msg(self, msg: Mapping[str, Any], timeout: Optional[float] = None) -> Any:
        """Run a full QMP message (``{"execute": ..., "arguments": ...}``), return its ``return``."""
        from qemu.qmp import ExecuteError, Message

        command = str(msg.get("execute", msg.get("exec-oob", "?")))
        if not self.connected:
            raise QmpGoneError(f"not connected: QEMU at {self.where} went away")
        body = {k: v for k, v in msg.items() if k != "id"}
        try:
            coro = self._client.execute_msg(Message(body))
            return await (asyncio.wait_for(coro, timeout) if timeout else coro)
        except ExecuteError as exc:
            err = exc.error.error
            raise QmpCommandError(command, err.class_, err.desc, dict(exc.received)) from None
        except asyncio.TimeoutError as exc:
            raise QmpTimeoutError(f"{command}: QEMU at {self.where} did not answer within {timeout:g} s") from exc
        except (TypeError, ValueError) as exc:  # not JSON-serialisable, no execute key
            raise QmpError(f"{command}: cannot send: {exc}") from exc
        except Exception as exc:
            raise protocol.translate(exc, self.address, command) from exc

    async def hmp(self, line: str, timeout: Optional[float] = None) -> str:
        """Run an HMP command line through human-monitor-command; return its text (``\\r`` removed)."""
        text = await self.execute("human-monitor-command", {"command-line": line}, timeout=timeout)
        return str(text).replace("\r\n", "\n").replace("\r", "")

    # -- events -------------------------------------------------------------------------------------

    async def next_event(self, timeout: Optional[float] = None) -> Optional[dict[str, Any]]:
        """The next event QEMU sent (waits), or None after ``timeout`` seconds."""
        coro = self._client.events.get()
        try:
            msg = await (asyncio.wait_for(coro, timeout) if timeout is not None else coro)
        except asyncio.TimeoutError:
            return None
        return dict(msg)

    def pending_events(self) -> list[dict[str, Any]]:
        """Events received and not yet taken, oldest first (the queue is emptied)."""
        return [dict(m) for m in self._client.events.clear()]


async def connect(address: Union[str, protocol.Address], timeout: float = 5.0) -> QmpSession:
    s = QmpSession(address, timeout=timeout)
    await s.connect()
    return s


def run_sync(address: Union[str, protocol.Address], fn: Callable[..., Awaitable[T]], *args: Any,
             timeout: float = 5.0, **kw: Any) -> T:
    """Connect, ``await fn(session, *args, **kw)``, disconnect: for synchronous callers."""

    async def main() -> T:
        async with QmpSession(address, timeout=timeout) as s:
            return await fn(s, *args, **kw)

    return asyncio.run(main())


__all__ = ["QmpConnectError", "QmpGoneError", "QmpGreetingError", "QmpSession", "connect", "run_sync"]
