"""The libvirt transport of qemu_ext.qmp.client: ``libvirt:NAME`` and
``qemu+libvirt:///system?domain=NAME`` addresses reach the domain's monitor through libvirt
(qemu_ext.libvirt.monitor), so every QMP front door (the shell and its built-ins, ``/trace
capture``, ``l2cache tune``) works on a libvirt domain as on a socket.

Differences a caller sees: the greeting is made from libvirt's QEMU version (libvirt negotiated
capabilities with QEMU long ago; out-of-band execution is not offered); ``log_path()`` is the
domain's log (/var/log/libvirt/qemu/NAME.log, where QEMU's stderr and so the log trace backend
go); the first command makes libvirt mark the domain tainted, and ``notices`` / ``on_notice`` say so.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from qemu_ext.libvirt.monitor import DomainMonitor
from qemu_ext.qmp.client import Transport


class LibvirtTransport(Transport):
    """``LibvirtTransport("NAME")`` (the part after ``libvirt:``), or the full address."""

    def __init__(self, address: str, timeout: float = 5.0, negotiate: bool = True,
                 on_notice: Optional[Callable[[str], None]] = None) -> None:
        if address.startswith("///") or address.startswith("//"):
            address = "qemu+libvirt:" + address  # transport_for() strips the scheme
        self.monitor = DomainMonitor(address, on_notice=on_notice)
        self.name = self.monitor.address
        self.timeout = timeout
        self.pid = None
        self.greeting = {}
        self._events: Optional[asyncio.Queue[dict[str, Any]]] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    @property
    def notices(self) -> list[str]:
        return self.monitor.notices

    @property
    def connected(self) -> bool:
        return self.monitor.connected

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def connect(self) -> None:
        await asyncio.wait_for(self._call(self.monitor.open), self.timeout)
        self.pid = self.monitor.pid
        self.greeting = {"QMP": {"version": self.monitor.version, "capabilities": []}}
        self._loop = asyncio.get_running_loop()
        self._events = asyncio.Queue()
        loop, queue = self._loop, self._events

        def deliver(ev: dict[str, Any]) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, ev)
            except RuntimeError:  # the loop closed: nobody is listening any more
                pass

        await self._call(self.monitor.subscribe, deliver)

    async def execute(self, command: str, arguments: Optional[Mapping[str, Any]] = None,
                      oob: bool = False) -> Any:
        return await self._call(self.monitor.execute, command, arguments)

    async def hmp(self, line: str) -> str:
        return await self._call(self.monitor.hmp, line)

    async def next_event(self) -> dict[str, Any]:
        while self._events is None:
            await asyncio.sleep(0.1)
        return await self._events.get()

    async def close(self) -> None:
        await self._call(self.monitor.close)

    async def wait_disconnected(self) -> None:
        while self.monitor.connected:
            await asyncio.sleep(0.5)

    def log_path(self) -> Optional[Path]:
        from qemu_ext.libvirt.domain import log_path

        return log_path(self.monitor.domain_name)
