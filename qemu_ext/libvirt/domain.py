"""A running libvirt domain's QEMU process: PID, vCPU TIDs, libvirt's pinning, its log file.

Nothing here talks to the QEMU monitor (a monitor command taints the domain): the PID comes from
libvirt's PID file (/run/libvirt/qemu/NAME.pid, else the QEMU whose command line says
``-name guest=NAME``), the vCPU TIDs from libvirt's status XML (/run/libvirt/qemu/NAME.xml, where
libvirt records what query-cpus-fast told it at start-up: ``<vcpus><vcpu id='0' pid='TID'/>``), the
pinning from virDomainGetVcpuPinInfo / GetEmulatorPinInfo / GetIOThreadInfo (what libvirt applied).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from qemu_ext.errors import QemuError
from qemu_ext.host import procfs
from qemu_ext.libvirt import conn as lvconn
from qemu_ext.libvirt import xml as lvxml

RUN_DIR = Path("/run/libvirt/qemu")  # qemu driver's stateDir (privileged), libvirt 9.0
LOG_DIR = Path("/var/log/libvirt/qemu")  # qemu driver's logDir: QEMU's stderr through virtlogd


def _cpuset(bits: Any) -> str:
    """libvirt's cpumap (a tuple of booleans per host CPU) as a cpu list ("0-1")."""
    return procfs.format_cpu_list([i for i, b in enumerate(bits) if b])


@dataclass
class Domain:
    """What libvirt says about one running domain's QEMU."""

    name: str
    uri: str
    id: int
    pid: int
    xml: lvxml.DomainXml
    vcpu_tids: dict[int, int]  # vCPU -> TID (status XML); {} when not readable
    vcpu_pinning: dict[int, str]  # vCPU -> cpu list libvirt applied
    emulator_pinning: Optional[str]
    iothread_pinning: dict[int, str]  # iothread id -> cpu list
    notes: list[str] = field(default_factory=list)

    @property
    def log_path(self) -> Path:
        return log_path(self.name)

    def query_cpus_fast(self) -> list[dict[str, Any]]:
        """The vCPU TIDs as query-cpus-fast gives them (for qemu_ext.host.threads.thread_map)."""
        return [{"cpu-index": i, "thread-id": t} for i, t in sorted(self.vcpu_tids.items())]

    def pinning_of(self, role: str, vcpu: Optional[int] = None, iothread: Optional[str] = None) -> Optional[str]:
        """libvirt's pinning of one thread: vCPUs by <vcpupin>, iothreads by <iothreadpin>, the other
        QEMU threads (main loop, workers, ...) by <emulatorpin>."""
        if role == "vcpu":
            return self.vcpu_pinning.get(vcpu) if vcpu is not None else None
        if role == "iothread" and iothread is not None:
            num = iothread[len("iothread"):] if iothread.startswith("iothread") else iothread
            return self.iothread_pinning.get(int(num)) if num.isdigit() else None
        if role == "kvm-kernel":
            return None  # the kernel's worker: not libvirt's to pin
        return self.emulator_pinning


def log_path(name: str) -> Path:
    """The domain's log: QEMU's stderr, where the log trace backend writes (through virtlogd)."""
    return LOG_DIR / f"{name}.log"


def read_log(path: os.PathLike | str, offset: int = 0, limit: int = 64 << 20) -> tuple[list[str], int]:
    """The complete lines added to a log after byte ``offset``, and the offset after them.

    For trace capture on a domain: take ``offset`` = the file size before enabling events
    (``read_log(p, size)`` or ``os.path.getsize``), read after. A line still being written (no newline
    yet) is left for the next call. A log that shrank (virtlogd rotated it) is read from its start.
    At most ``limit`` bytes are read per call.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if offset > size:
                offset = 0  # rotated or truncated
            f.seek(offset)
            data = f.read(limit)
    except OSError as exc:
        raise QemuError(f"cannot open {path}: {exc.strerror or exc}") from None
    end = data.rfind(b"\n") + 1
    lines = data[:end].decode("utf-8", errors="replace").splitlines()
    return lines, offset + end


def _status_vcpu_tids(name: str) -> dict[int, int]:
    try:
        root = ET.parse(RUN_DIR / f"{name}.xml").getroot()
    except (OSError, ET.ParseError):
        return {}
    out = {}
    for el in root.findall("vcpus/vcpu"):
        i, p = el.get("id"), el.get("pid")
        if i and p and i.isdigit() and p.isdigit():
            out[int(i)] = int(p)
    return out


def _pid(name: str) -> Optional[int]:
    try:
        text = (RUN_DIR / f"{name}.pid").read_text().strip()
        if text.isdigit():
            return int(text)
    except OSError:
        pass
    hits = [p for p in procfs.qemu_processes() if p.vm_name == name]
    return hits[0].pid if len(hits) == 1 else None


def open_domain_info(name: str, uri: str = lvconn.DEFAULT_URI) -> Domain:
    """The running domain ``name``: its QEMU PID (checked to be QEMU), XML, vCPU TIDs and pinning."""
    from qemu_ext.host.target import require_qemu

    libvirt, _ = lvconn.bindings()
    c, dom = lvconn.open_domain(name, uri)
    try:
        text = dom.XMLDesc(0)
        info = lvxml.parse(text)
        notes: list[str] = []
        pid = _pid(name)
        if pid is None:
            raise QemuError(f"libvirt domain {name!r} runs, but its QEMU process is not visible here "
                            f"({RUN_DIR / (name + '.pid')} not readable: run as root)")
        require_qemu(pid)
        tids = _status_vcpu_tids(name)
        if not tids:
            notes.append(f"vCPU threads by name: libvirt's status XML {RUN_DIR / (name + '.xml')} is not readable")
        try:
            vpin = {i: _cpuset(bits) for i, bits in enumerate(dom.vcpuPinInfo(libvirt.VIR_DOMAIN_AFFECT_LIVE))}
        except libvirt.libvirtError:
            vpin = {}
        try:
            epin: Optional[str] = _cpuset(dom.emulatorPinInfo(libvirt.VIR_DOMAIN_AFFECT_LIVE))
        except libvirt.libvirtError:
            epin = None
        try:
            iopin = {int(i): _cpuset(bits) for i, bits in dom.ioThreadInfo(libvirt.VIR_DOMAIN_AFFECT_LIVE)}
        except libvirt.libvirtError:
            iopin = {}
        return Domain(name, uri, dom.ID(), pid, info, tids, vpin, epin, iopin, notes)
    finally:
        c.close()


def parse_address(text: str) -> str:
    """The domain name of a ``libvirt:NAME`` / ``qemu+libvirt:///system?domain=NAME`` address."""
    return lvconn.parse_address(text)[1]


def target(name: str, timeout: float = 10.0, uri: Optional[str] = None) -> Any:
    """A qemu_ext.host.target.Target for the domain (vCPU TIDs from libvirt, libvirt's pinning beside each
    thread). No monitor command is sent: the domain is not tainted."""
    from qemu_ext.host.target import Target

    if uri is None and name.startswith(("libvirt:", "qemu+libvirt:")):
        uri, name = lvconn.parse_address(name)
    d = open_domain_info(name, uri or lvconn.DEFAULT_URI)
    vcpus = d.query_cpus_fast() or None

    def extra(th: Any) -> dict[str, Any]:
        return {"libvirt-pinning": d.pinning_of(th.role, th.vcpu_index, th.iothread_id)}

    return Target(d.pid, procfs.process(d.pid).exe_text, name, "domain", None, vcpus, None,
                  "libvirt" if vcpus else None, name, list(d.notes), d, extra)
