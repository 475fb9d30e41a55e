"""Which QEMU a host command acts on: a PID, a VM name, a QMP address or a libvirt domain.

Everything that reads or changes a QEMU process (``virtopt threads``, ``doctor --vm``) resolves
its target here first, and the target is checked to be QEMU (by its executable, or its command
line when the executable link is not readable) before anything else is read or changed:

- ``12345``: a PID; refused with "process PID is not QEMU (NAME, EXE)" when it is something else
  (PID 1 included);
- ``web1``: a VM name, QEMU's ``-name web1`` / ``-name guest=web1`` (libvirt), else the answer of
  QMP ``query-name`` on the QMP sockets of the unnamed QEMUs' command lines; several QEMUs with
  that name are named in one line with their PIDs;
- ``/run/vm.qmp``, ``unix:PATH``, ``HOST:PORT``: a QMP address; the PID is the socket's peer
  (SO_PEERCRED, /proc/net/tcp for TCP), vCPU and iothread TIDs come from query-cpus-fast /
  query-iothreads (through the one QMP client, qemu_ext.qmp.client);
- ``libvirt:NAME``, ``qemu+libvirt:///system?domain=NAME``: a libvirt domain (qemu_ext.libvirt).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from qemu_ext import errors
from qemu_ext.errors import BadInputError, QemuError
from qemu_ext.host import procfs

VM_FORMS = "a PID, a VM name (-name), a QMP socket or HOST:PORT, or libvirt:DOMAIN"


@dataclass
class Target:
    """A QEMU process, checked to be QEMU, and what told us about its threads."""

    pid: int
    exe: str
    vm_name: Optional[str]
    found_by: str  # "pid", "name", "qmp", "domain"
    qmp_address: Optional[str] = None
    vcpus: Optional[list[dict]] = None  # query-cpus-fast's answer (or libvirt's record of it)
    iothreads: Optional[list[dict]] = None  # query-iothreads'
    thread_source: Optional[str] = None  # "qmp" or "libvirt": where vcpus/iothreads came from
    domain: Optional[str] = None  # the libvirt domain name
    notes: list[str] = field(default_factory=list)
    libvirt: Optional[Any] = None  # qemu_ext.libvirt.domain.Domain for a domain
    thread_extra: Optional[Callable[[Any], dict[str, Any]]] = None  # keys a view adds to each thread's JSON

    def describe(self) -> str:
        """"QEMU pid 123 (vm web1)" for headlines."""
        extra = []
        if self.domain:
            extra.append(f"domain {self.domain}")
        elif self.vm_name:
            extra.append(f"vm {self.vm_name}")
        return f"QEMU pid {self.pid}" + (f" ({', '.join(extra)})" if extra else "")


def require_qemu(pid: int, root: str = "/") -> procfs.Process:
    """The process ``pid`` if it is QEMU's system emulator; else one clear error (nothing else is read)."""
    if pid <= 0:
        raise errors.no_process(pid)
    try:
        proc = procfs.process(pid, root)
    except FileNotFoundError:
        raise errors.no_process(pid) from None
    except (OSError, ValueError) as exc:
        raise QemuError(f"cannot read process {pid}: {getattr(exc, 'strerror', None) or exc}") from exc
    if not proc.is_qemu:
        raise errors.not_qemu(pid, proc.comm, proc.exe_text)
    return proc


# ---------------------------------------------------------------- telling the forms apart

_HOSTPORT = re.compile(r"^(tcp:)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):\d+$")
LIBVIRT_PREFIXES = ("libvirt:", "qemu+libvirt:")


def kind_of(spec: str) -> str:
    """"pid", "domain", "qmp" or "name" for a VM given on the command line."""
    if spec.isdigit() or (spec.startswith("-") and spec[1:].isdigit()):
        return "pid"
    if spec.startswith(LIBVIRT_PREFIXES):
        return "domain"
    if spec.startswith("unix:") or "/" in spec or _HOSTPORT.match(spec) or os.path.exists(spec):
        return "qmp"
    return "name"


# ---------------------------------------------------------------- QMP


def qmp_threads(address: str, timeout: float = 10.0, name: bool = False) -> tuple[Optional[int], dict[str, Any]]:
    """QEMU's PID (the socket's peer) and its answers to query-cpus-fast, query-iothreads (and query-name
    with ``name``), through the one QMP client. Raises its errors (one clear line each)."""
    from qemu_ext.qmp.client import run_sync

    async def ask(s: Any) -> tuple[Optional[int], dict[str, Any]]:
        out = {"query-cpus-fast": await s.execute("query-cpus-fast", timeout=timeout),
               "query-iothreads": await s.execute("query-iothreads", timeout=timeout)}
        if name:
            out["query-name"] = await s.execute("query-name", timeout=timeout)
        return s.pid, out

    return run_sync(address, ask, timeout=timeout)


def _query_name(address: str, timeout: float) -> Optional[str]:
    from qemu_ext.qmp.client import run_sync

    async def ask(s: Any) -> Any:
        return await s.execute("query-name", timeout=timeout)

    try:
        ans = run_sync(address, ask, timeout=timeout)
    except errors.VirtoptError:
        return None  # busy, dead or not QMP: this QEMU's name is not known
    return ans.get("name") if isinstance(ans, dict) else None


def from_qmp(address: str, timeout: float = 10.0, root: str = "/") -> Target:
    pid, ans = qmp_threads(address, timeout)
    if pid is None:
        raise QemuError(f"cannot tell which process answers on {address} (a QEMU on another host?): its "
                        "threads cannot be read here")
    proc = require_qemu(pid, root)
    vcpus, ios = ans["query-cpus-fast"], ans["query-iothreads"]
    if not isinstance(vcpus, list) or not isinstance(ios, list):
        raise QemuError(f"QMP at {address}: unexpected answers to query-cpus-fast / query-iothreads")
    return Target(pid, proc.exe_text, proc.vm_name, "qmp", address, vcpus, ios, "qmp")


# ---------------------------------------------------------------- names


def find_by_name(name: str, root: str = "/", timeout: float = 2.0) -> list[procfs.Process]:
    """The QEMUs called ``name``: by -name on their command lines; when none is, by query-name on the QMP
    sockets of the QEMUs that have no -name (a monitor held by another client does not answer: skipped)."""
    qemus = procfs.qemu_processes(root)
    hits = [p for p in qemus if p.vm_name == name]
    if hits or root != "/":
        return hits
    for p in qemus:
        if p.vm_name is not None:
            continue
        try:
            cwd = procfs.cwd(p.pid, root)
        except OSError:
            cwd = "/"
        for addr in procfs.qemu_qmp_addresses(p.argv, cwd):
            if _query_name(addr, timeout) == name:
                hits.append(p)
                break
    return hits


def _names_text(qemus: list[procfs.Process]) -> str:
    if not qemus:
        return "no QEMU is running"
    shown = [f"{p.vm_name or '(unnamed)'} (pid {p.pid})" for p in qemus[:8]]
    return "running: " + ", ".join(shown) + (f" and {len(qemus) - 8} more" if len(qemus) > 8 else "")


def from_name(name: str, root: str = "/") -> Target:
    hits = find_by_name(name, root)
    if not hits:
        raise QemuError(f"no QEMU named {name!r} and no QMP socket at that path "
                        f"({_names_text(procfs.qemu_processes(root))})")
    if len(hits) > 1:
        raise QemuError(f"{len(hits)} QEMUs are named {name!r}: PIDs {', '.join(str(p.pid) for p in hits)}; "
                        "give one PID")
    p = hits[0]
    return Target(p.pid, p.exe_text, p.vm_name or name, "name")


# ---------------------------------------------------------------- one entry point


def resolve(vm: Optional[str] = None, qmp: Optional[str] = None, domain: Optional[str] = None,
            timeout: float = 10.0, root: str = "/") -> Target:
    """The QEMU named by ``vm`` (VM_FORMS) and/or ``qmp`` (a QMP address) or ``domain`` (libvirt), checked
    to be QEMU. With QMP the vCPU and iothread TIDs come along. Raises one clear VirtoptError."""
    if vm is not None and not vm.strip():
        raise BadInputError(f"empty VM: give {VM_FORMS}", exit_code=2)
    kind = kind_of(vm) if vm is not None else None
    if kind == "domain" or domain is not None:
        from qemu_ext.libvirt import domain as libvirt_domain

        t = libvirt_domain.target(domain if domain is not None else vm or "", timeout=timeout)
        if vm is not None and kind == "pid" and int(vm) != t.pid:
            raise QemuError(f"libvirt domain {t.domain} is QEMU pid {t.pid}, not {vm}")
        return t
    if kind == "qmp" or qmp is not None:
        t = from_qmp(qmp if qmp is not None else vm or "", timeout, root)
        if kind == "pid" and int(vm or 0) != t.pid:
            raise QemuError(f"QMP at {t.qmp_address} belongs to pid {t.pid}, not {vm}")
        if kind == "name" and t.vm_name != vm:
            raise QemuError(f"QMP at {t.qmp_address} is QEMU pid {t.pid} named {t.vm_name!r}, not {vm!r}")
        return t
    if kind == "pid":
        pid = int(vm or 0)
        proc = require_qemu(pid, root)
        return Target(pid, proc.exe_text, proc.vm_name, "pid")
    if kind == "name":
        return from_name(vm or "", root)
    raise BadInputError(f"give the QEMU: {VM_FORMS}", exit_code=2)


def resolve_pid(vm: str, root: str = "/") -> int:
    """The PID of the QEMU named by ``vm`` (PID, VM name, QMP address, libvirt:DOMAIN), checked to be QEMU:
    for front doors that take a PID (``virtopt gdb``)."""
    return resolve(vm, root=root).pid
