"""The one QMP client of virtopt: a session over a transport, async and sync.

Layers (like qemu.qmp's: protocol, client, shell):

- :class:`Transport` is how a session reaches one QEMU monitor. Its whole interface: ``name`` (for
  messages), ``connect()``, ``execute(command, arguments)``, ``next_event()`` (the event stream),
  ``close()``, ``connected`` / ``wait_disconnected()``, plus ``pid``, ``greeting``,
  ``log_path()`` (where QEMU's log trace backend writes, when the transport knows better than the
  process's /proc entry) and ``notices`` (what the user must hear, e.g. a libvirt taint). :class:`SocketTransport` speaks QMP on a unix socket or TCP through
  qemu.qmp. Another transport plugs in by its address scheme: add ``"scheme":
  "module:Class"`` to :data:`SCHEMES` (e.g. ``libvirt:NAME`` -> a transport over
  virDomainQemuMonitorCommand); ``Class(rest_of_address, timeout=..., negotiate=...)``.
- :class:`QmpSession` (async) is what every caller uses: ``execute`` with a timeout, ``hmp``,
  events, the greeting's version. Every failure is one of :mod:`qemu_ext.qmp.errors`.
- :class:`SyncSession` / :func:`connect_sync` / :func:`run_sync` are the same for synchronous callers
  (``virtopt threads``, ``doctor``, ``l2cache tune``)::

      with connect_sync("/run/vm.qmp") as s:          # or "localhost:4444"
          print(s.pid, s.execute("query-cpus-fast"))
          text = s.hmp("info mtree -f")
          res = s.call(capture.capture, "qcow2_cache_*", 5)   # any async function of a session

  Ctrl-C during ``execute``/``call`` cancels the coroutine (its ``finally`` runs: a capture
  turns its events off) and then raises KeyboardInterrupt.
"""

from __future__ import annotations

import abc
import asyncio
import importlib
import logging
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping, Optional, TypeVar, Union

from qemu_ext.qmp import address as addr
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

#: address scheme -> "module:Class" of a Transport (the socket transport needs no scheme)
SCHEMES: dict[str, str] = {
    "libvirt": "qemu_ext.libvirt.transport:LibvirtTransport",  # libvirt:NAME
    "qemu+libvirt": "qemu_ext.libvirt.transport:LibvirtTransport",  # qemu+libvirt:///system?domain=NAME
}

#: after this many seconds without a greeting, an interactive caller is told the monitor may be busy
SLOW_GREETING = 1.0


class Transport(abc.ABC):
    """How a :class:`QmpSession` reaches one QEMU monitor (see the module docstring)."""

    #: the address as the user gave it, for messages ("/run/vm.qmp", "localhost:4444", "libvirt:vm1")
    name: str = "?"
    #: the QEMU process, when this host can tell it (None over TCP to another host)
    pid: Optional[int] = None
    #: the QMP greeting ({"QMP": {"version": ..., "capabilities": [...]}}); {} when none was awaited
    greeting: dict[str, Any]

    @abc.abstractmethod
    async def connect(self) -> None:
        """Connect and negotiate; QmpConnectError / QmpGreetingError with the reason."""

    @abc.abstractmethod
    async def execute(self, command: str, arguments: Optional[Mapping[str, Any]] = None,
                      oob: bool = False) -> Any:
        """Run one command, return its ``return``; QmpCommandError (QEMU's class + desc), QmpGoneError."""

    @abc.abstractmethod
    async def next_event(self) -> dict[str, Any]:
        """Wait for the next event QEMU sends (``{"event", "data", "timestamp"}``)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Disconnect; never raises."""

    @property
    @abc.abstractmethod
    def connected(self) -> bool: ...

    @abc.abstractmethod
    async def wait_disconnected(self) -> None:
        """Return when the connection drops (QEMU exited, was killed, closed the monitor)."""

    def log_path(self) -> Optional[Path]:
        """Where QEMU's log trace backend writes, when the transport knows (None: ask the process)."""
        return None

    @property
    def notices(self) -> list[str]:
        """Things the user must hear about that no command returned, oldest first (the libvirt transport:
        "libvirt marked the domain tainted (custom-monitor)"). The shell prints each new one once."""
        return []


class SocketTransport(Transport):
    """QMP on a unix socket or TCP, through qemu.qmp's QMPClient (oob enabled when offered)."""

    def __init__(self, address: Union[str, addr.Address], timeout: float = 5.0, negotiate: bool = True) -> None:
        self.address: addr.Address = addr.parse_address(address) if isinstance(address, str) else address
        self.name = addr.describe(self.address)
        self.timeout = timeout
        self.negotiate = negotiate
        self.pid = None
        self.greeting = {}
        self._client: Any = None

    def _new_client(self) -> Any:
        from qemu.qmp import QMPClient

        c = QMPClient("virtopt")
        if not self.negotiate:  # qemu-ga and -N: no greeting, no qmp_capabilities
            c.await_greeting = False
            c.negotiate = False
        return c

    @property
    def connected(self) -> bool:
        from qemu.qmp import Runstate

        return self._client is not None and self._client.runstate == Runstate.RUNNING

    async def connect(self) -> None:
        sock = await addr.open_socket_async(self.address, self.timeout)
        self._client = self._new_client()
        # unix: SO_PEERCRED names the listener at once; TCP: the peer's socket belongs to a process only
        # once QEMU accepted it (it has when it greets), so it is looked up after the greeting
        pid = addr.peer_pid(sock) if isinstance(self.address, str) else None
        try:
            await asyncio.wait_for(self._client.connect(sock), self.timeout)
        except asyncio.TimeoutError:
            await self.close()
            sock.close()
            if addr.is_qemu(pid):
                raise QmpConnectError(
                    self.name, f"QEMU sent no QMP greeting within {self.timeout:g} s: another client holds this "
                    "monitor (QEMU serves one client per -qmp socket: give QEMU a second -qmp for virtopt)") from None
            raise QmpGreetingError(self.name, f"sent no QMP greeting within {self.timeout:g} s "
                                              "(not a QMP server?)") from None
        except BaseException as exc:
            await self.close()
            sock.close()
            if isinstance(exc, Exception):
                raise self._translate(exc, "connect") from None
            raise
        self.pid = pid if isinstance(self.address, str) else addr.peer_pid(sock)
        g = self._client.greeting
        self.greeting = dict(g._asdict()) if g is not None else {}

    async def close(self) -> None:
        from qemu.qmp import Runstate

        c = self._client
        if c is not None and c.runstate != Runstate.IDLE:
            try:
                await c.disconnect()
            except Exception:  # the reason was already reported
                pass

    async def wait_disconnected(self) -> None:
        from qemu.qmp import Runstate

        while self._client is not None and self._client.runstate == Runstate.RUNNING:
            await self._client.runstate_changed()

    async def execute(self, command: str, arguments: Optional[Mapping[str, Any]] = None,
                      oob: bool = False) -> Any:
        from qemu.qmp import ExecuteError, Message

        if not self.connected:
            raise QmpGoneError(f"not connected: QEMU at {self.name} went away")
        msg: dict[str, Any] = {"exec-oob" if oob else "execute": command}
        if arguments:
            msg["arguments"] = dict(arguments)
        try:
            return await self._client.execute_msg(Message(msg))
        except ExecuteError as exc:
            err = exc.error.error
            raise QmpCommandError(command, err.class_, err.desc, dict(exc.received)) from None
        except (TypeError, ValueError) as exc:  # not JSON-serialisable
            raise QmpError(f"{command}: cannot send: {exc}") from None
        except QmpError:
            raise
        except Exception as exc:
            raise self._translate(exc, command) from None

    async def next_event(self) -> dict[str, Any]:
        while self._client is None:
            await asyncio.sleep(0.1)
        return dict(await self._client.events.get())

    def _translate(self, exc: BaseException, during: str) -> QmpError:
        """qemu.qmp's / asyncio's / the OS's exception -> one of ours."""
        from qemu.qmp import ConnectError
        from qemu.qmp.error import ProtocolError
        from qemu.qmp.qmp_client import ExecInterruptedError, GreetingError, NegotiationError

        inner: BaseException = exc
        if isinstance(exc, ConnectError):
            inner = exc.exc
        if isinstance(inner, QmpError):
            return inner
        if isinstance(inner, (GreetingError, NegotiationError)):
            detail = getattr(inner, "exc", None)
            what = "greeting" if isinstance(inner, GreetingError) else "capabilities negotiation"
            if isinstance(detail, (EOFError, ConnectionError)):
                return QmpGreetingError(self.name, f"closed the connection before a QMP {what} (not a QMP server?)")
            text = _short(detail) if detail is not None else ""
            return QmpGreetingError(self.name, f"does not speak QMP (garbled {what}{': ' + text if text else ''})")
        if isinstance(inner, ProtocolError) or (during == "connect" and isinstance(inner, (ValueError, TypeError,
                                                                                           KeyError))):
            return QmpGreetingError(self.name, f"does not speak QMP (garbled greeting: {_short(inner)})")
        if during == "connect" and isinstance(inner, (EOFError, ConnectionResetError, BrokenPipeError)):
            return QmpGreetingError(self.name, "closed the connection before a QMP greeting (not a QMP server?)")
        if isinstance(inner, (EOFError, ExecInterruptedError, ConnectionResetError, BrokenPipeError)):
            return QmpGoneError(f"QEMU at {self.name} went away during {during} (connection closed)")
        if isinstance(inner, OSError):
            return QmpConnectError(self.name, inner.strerror or str(inner))
        return QmpError(f"{self.name}: {type(inner).__name__}: {inner}")


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:160]


def transport_for(address: Union[str, addr.Address], timeout: float = 5.0, negotiate: bool = True) -> Transport:
    """The transport for an address: a registered scheme (``libvirt:NAME``), else a QMP socket."""
    if isinstance(address, str):
        scheme, sep, rest = address.partition(":")
        if sep and scheme in SCHEMES:
            mod, _, cls = SCHEMES[scheme].partition(":")
            return getattr(importlib.import_module(mod), cls)(rest, timeout=timeout, negotiate=negotiate)
    return SocketTransport(address, timeout=timeout, negotiate=negotiate)


class QmpSession:
    """A QMP connection with meaningful errors. Re-connectable: ``connect()`` again after QEMU returns."""

    def __init__(self, address: Union[str, addr.Address, Transport], name: str = "virtopt",
                 timeout: float = 5.0, negotiate: bool = True) -> None:
        self.transport = address if isinstance(address, Transport) else transport_for(address, timeout, negotiate)
        self.where = self.transport.name
        self.timeout = timeout

    # -- connection ---------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.transport.connected

    @property
    def pid(self) -> Optional[int]:
        return self.transport.pid

    @property
    def greeting(self) -> dict[str, Any]:
        return self.transport.greeting

    async def connect(self, slow: Optional[Callable[[str], None]] = None) -> None:
        """Connect and negotiate. Raises QmpConnectError (nobody there, busy) or QmpGreetingError (not QMP).

        ``slow(message)`` is called once when no greeting came within SLOW_GREETING seconds (interactive
        callers say why they wait)."""
        task = asyncio.ensure_future(self.transport.connect())
        if slow is not None:
            done, _ = await asyncio.wait({task}, timeout=SLOW_GREETING)
            if not done and self.timeout > SLOW_GREETING:
                slow(f"no greeting from {self.where} after {SLOW_GREETING:g} s: another client may hold this "
                     f"monitor (QEMU serves one client per -qmp socket); waiting up to {self.timeout:g} s")
        await task

    async def close(self) -> None:
        """Disconnect; never raises (a QEMU that already went away is not an error here)."""
        await self.transport.close()

    async def wait_disconnected(self) -> None:
        await self.transport.wait_disconnected()

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
        """``7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)`` from the greeting ("unknown" without one)."""
        v = self.version
        if not v:
            return "(version unknown: no greeting)"
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
        coro = self.transport.execute(command, arguments, oob=oob)
        if not timeout:
            return await coro
        try:
            return await asyncio.wait_for(coro, timeout)
        except asyncio.TimeoutError:
            raise QmpTimeoutError(f"{command}: QEMU at {self.where} did not answer within {timeout:g} s") from None

    async def execute_msg(self, msg: Mapping[str, Any], timeout: Optional[float] = None) -> Any:
        """Run a full QMP message (``{"execute": ..., "arguments": ...}``; an ``id`` is not sent)."""
        oob = "exec-oob" in msg
        command = str(msg.get("exec-oob") if oob else msg.get("execute", "?"))
        args = msg.get("arguments")
        if args is not None and not isinstance(args, Mapping):
            raise QmpError(f"{command}: cannot send: arguments must be an object")
        return await self.execute(command, args, timeout=timeout, oob=oob)

    async def hmp(self, line: str, timeout: Optional[float] = None) -> str:
        """Run an HMP command line through human-monitor-command; return its text (``\\r`` removed)."""
        text = await self.execute("human-monitor-command", {"command-line": line}, timeout=timeout)
        return str(text).replace("\r\n", "\n").replace("\r", "")

    # -- events -------------------------------------------------------------------------------------

    async def next_event(self, timeout: Optional[float] = None) -> Optional[dict[str, Any]]:
        """The next event QEMU sent (waits), or None after ``timeout`` seconds."""
        coro = self.transport.next_event()
        if timeout is None:
            return await coro
        try:
            return await asyncio.wait_for(coro, timeout)
        except asyncio.TimeoutError:
            return None


async def connect(address: Union[str, addr.Address, Transport], timeout: float = 5.0,
                  negotiate: bool = True) -> QmpSession:
    """A connected :class:`QmpSession` (async callers)."""
    s = QmpSession(address, timeout=timeout, negotiate=negotiate)
    await s.connect()
    return s


class SyncSession:
    """A :class:`QmpSession` for synchronous code: each call runs on a private event loop."""

    def __init__(self, address: Union[str, addr.Address, Transport], timeout: float = 5.0,
                 negotiate: bool = True) -> None:
        self.session = QmpSession(address, timeout=timeout, negotiate=negotiate)
        self._runner = asyncio.Runner()

    def _run(self, coro: Awaitable[T]) -> T:
        return self._runner.run(coro)  # type: ignore[arg-type]

    def connect(self) -> SyncSession:
        try:
            self._run(self.session.connect())
        except BaseException:
            self._runner.close()
            raise
        return self

    @property
    def where(self) -> str:
        return self.session.where

    @property
    def pid(self) -> Optional[int]:
        return self.session.pid

    @property
    def version_text(self) -> str:
        return self.session.version_text

    def execute(self, command: str, arguments: Optional[Mapping[str, Any]] = None,
                timeout: Optional[float] = None) -> Any:
        return self._run(self.session.execute(command, arguments, timeout=timeout))

    def hmp(self, line: str, timeout: Optional[float] = None) -> str:
        return self._run(self.session.hmp(line, timeout=timeout))

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kw: Any) -> T:
        """``await fn(session, *args, **kw)`` (any async library function taking a QmpSession)."""
        return self._run(fn(self.session, *args, **kw))

    def close(self) -> None:
        try:
            self._run(self.session.close())
        finally:
            self._runner.close()

    def __enter__(self) -> SyncSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect_sync(address: Union[str, addr.Address, Transport], timeout: float = 5.0,
                 negotiate: bool = True) -> SyncSession:
    """A connected :class:`SyncSession`; use it as a context manager (it closes on exit)."""
    return SyncSession(address, timeout=timeout, negotiate=negotiate).connect()


def run_sync(address: Union[str, addr.Address, Transport], fn: Callable[..., Awaitable[T]], *args: Any,
             timeout: float = 5.0, **kw: Any) -> T:
    """Connect, ``await fn(session, *args, **kw)``, disconnect: one call for synchronous callers."""
    with connect_sync(address, timeout=timeout) as s:
        return s.call(fn, *args, **kw)


__all__ = [
    "SCHEMES",
    "QmpConnectError",
    "QmpGoneError",
    "QmpGreetingError",
    "QmpSession",
    "SocketTransport",
    "SyncSession",
    "Transport",
    "connect",
    "connect_sync",
    "run_sync",
]
