"""A libvirt domain's QEMU monitor through libvirt's own API (what ``virsh qemu-monitor-command`` and
``virsh qemu-monitor-event`` use): QMP and HMP through virDomainQemuMonitorCommand, events through
virConnectDomainQemuMonitorEventRegister.

libvirt marks a domain tainted ("custom-monitor") at the first command sent this way (it then says
"tainted: custom monitor control commands issued" in virDomainGetMessages and "Domain id=N is
tainted: custom-monitor" in the domain log). :class:`DomainMonitor` notices when a command of ours
caused it and records one notice saying so (``notices``; ``on_notice`` is called with it).

Synchronous: every call blocks in libvirt (the asyncio transport runs them in an executor).
"""

from __future__ import annotations

import json
import threading
from typing import Any, Callable, Mapping, Optional

from qemu_ext import errors
from qemu_ext.errors import QemuError
from qemu_ext.libvirt import conn as lvconn

TAINT_TEXT = "custom monitor"  # virDomainTaintMessage VIR_DOMAIN_TAINT_CUSTOM_MONITOR (libvirt 9.0)


class DomainMonitor:
    """One domain's monitor. ``address``: ``libvirt:NAME`` / ``qemu+libvirt:///system?domain=NAME`` (or a
    bare NAME)."""

    def __init__(self, address: str, on_notice: Optional[Callable[[str], None]] = None) -> None:
        self.address = address if address.startswith(("libvirt:", "qemu+libvirt:")) else f"libvirt:{address}"
        self.uri, self.domain_name = lvconn.parse_address(self.address)
        self.on_notice = on_notice
        self.notices: list[str] = []
        self.pid: Optional[int] = None
        self.version: dict[str, Any] = {}
        self._conn: Any = None
        self._dom: Any = None
        self._tainted: Optional[bool] = None
        self._callback_ids: list[int] = []
        self._events_lock = threading.Lock()

    # -- connection ------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        if self._dom is None:
            return False
        try:
            return bool(self._dom.isActive())
        except Exception:  # libvirtd went away: not connected
            return False

    def open(self) -> None:
        """Open the domain (running), learn QEMU's version from libvirt (no monitor command: no taint)."""
        from qemu_ext.libvirt import domain as lvdomain

        self.close()  # a reconnect (the shell after the domain restarted) starts afresh
        try:
            self._conn, self._dom = lvconn.open_domain(self.domain_name, self.uri)
        except QemuError as exc:
            raise errors.qmp_unreachable(self.address, str(exc)) from None
        libvirt, _ = lvconn.bindings()
        try:
            v = self._conn.getVersion()  # QEMU's version as major * 1,000,000 + minor * 1,000 + micro
            self.version = {"qemu": {"major": v // 1000000, "minor": v // 1000 % 1000, "micro": v % 1000},
                            "package": f"libvirt domain {self.domain_name}"}
        except libvirt.libvirtError:
            self.version = {}
        self.pid = lvdomain._pid(self.domain_name)
        self._tainted = self._is_tainted()

    def close(self) -> None:
        """Deregister events and close the connection; never raises."""
        _, libvirt_qemu = lvconn.bindings()
        for cid in self._callback_ids:
            try:
                libvirt_qemu.qemuMonitorEventDeregister(self._conn, cid)
            except Exception:  # the connection may be gone already
                pass
        self._callback_ids.clear()
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
        self._conn = self._dom = None

    # -- taint -----------------------------------------------------------------------------------

    def _is_tainted(self) -> Optional[bool]:
        libvirt, _ = lvconn.bindings()
        try:
            msgs = self._dom.messages(libvirt.VIR_DOMAIN_MESSAGE_TAINTING)
        except (AttributeError, libvirt.libvirtError):  # libvirt before 7.1: no virDomainGetMessages
            return None
        return any(TAINT_TEXT in m for m in msgs)

    def _check_taint(self, command: str) -> None:
        if self._tainted:
            return
        now = self._is_tainted()
        if now and self._tainted is not None:
            note = (f"libvirt marked domain {self.domain_name} tainted (custom-monitor) because of {command} sent "
                    "through its monitor; it stays marked until the domain restarts (virsh dominfo, the domain log)")
            self.notices.append(note)
            if self.on_notice is not None:
                self.on_notice(note)
        self._tainted = now

    # -- commands --------------------------------------------------------------------------------

    def _send(self, text: str, hmp: bool, what: str) -> str:
        libvirt, libvirt_qemu = lvconn.bindings()
        if self._dom is None:
            raise errors.qmp_unreachable(self.address, "not connected")
        flags = libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP if hmp else 0
        try:
            out = libvirt_qemu.qemuMonitorCommand(self._dom, text, flags)
        except libvirt.libvirtError as exc:
            from qemu_ext.qmp.errors import QmpGoneError

            code = exc.get_error_code()
            if code in (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_NO_DOMAIN) or not self.connected:
                raise QmpGoneError(f"QEMU of libvirt domain {self.domain_name} went away during {what} "
                                   f"({lvconn.libvirt_error(exc)})") from None
            raise QemuError(f"{what} on libvirt domain {self.domain_name}: {lvconn.libvirt_error(exc)}") from None
        self._check_taint(what)
        return str(out)

    def execute(self, command: str, arguments: Optional[Mapping[str, Any]] = None) -> Any:
        """Run one QMP command, return its ``return``; QmpCommandError with QEMU's class and desc."""
        from qemu_ext.qmp.errors import QmpCommandError

        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = dict(arguments)
        try:
            text = json.dumps(msg)
        except (TypeError, ValueError) as exc:
            raise QemuError(f"{command}: cannot send: {exc}") from None
        reply = json.loads(self._send(text, False, command))
        if "error" in reply:
            err = reply["error"]
            raise QmpCommandError(command, str(err.get("class", "GenericError")), str(err.get("desc", "")), reply)
        return reply.get("return")

    def hmp(self, line: str) -> str:
        """Run one HMP command line (libvirt wraps it in human-monitor-command); its text, ``\\r`` removed."""
        return self._send(line, True, line.split(" ", 1)[0] or "hmp").replace("\r\n", "\n").replace("\r", "")

    # -- events ----------------------------------------------------------------------------------

    def subscribe(self, deliver: Callable[[dict[str, Any]], None], event: Optional[str] = None) -> None:
        """Call ``deliver({"event", "data", "timestamp"})`` for every QEMU event of the domain (or only
        ``event``), from libvirt's event thread."""
        libvirt, libvirt_qemu = lvconn.bindings()

        def cb(_conn: Any, _dom: Any, name: str, seconds: int, micros: int, details: Optional[str],
               _opaque: Any) -> None:
            try:
                data = json.loads(details) if details else {}
            except ValueError:
                data = {"details": details}
            deliver({"event": name, "data": data, "timestamp": {"seconds": seconds, "microseconds": micros}})

        try:
            cid = libvirt_qemu.qemuMonitorEventRegister(self._conn, self._dom, event, cb, None, 0)
        except libvirt.libvirtError as exc:
            raise QemuError(f"cannot receive events of libvirt domain {self.domain_name}: "
                            f"{lvconn.libvirt_error(exc)}") from None
        self._callback_ids.append(cid)
