"""The parts of a libvirt domain XML that tuning and the block layer need, as data.

Element names and meanings are libvirt's (https://libvirt.org/formatdomain.html, libvirt 9.0):
<vcpu>, <iothreads>, <cputune> (vcpupin, emulatorpin, iothreadpin), <numatune> (memory, memnode),
<memoryBacking> (hugepages/page, locked, nosharepages), <cpu> (mode, topology, numa cells), and each
<disk>'s <target dev>, <alias>, <source file>, <driver type> and <driver><metadata_cache><max_size>.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any, Optional

from qemu_ext.errors import BadInputError

# libvirt's scaled-integer units (virScaledIntegerParse / virDomainParseScaledValue)
_UNITS = {
    "b": 1, "bytes": 1,
    "kb": 1000, "k": 1024, "kib": 1024,
    "mb": 1000**2, "m": 1024**2, "mib": 1024**2,
    "gb": 1000**3, "g": 1024**3, "gib": 1024**3,
    "tb": 1000**4, "t": 1024**4, "tib": 1024**4,
}


def scaled(el: Optional[ET.Element], default_unit: str = "KiB") -> Optional[int]:
    """A libvirt scaled integer (<max_size unit='KiB'>512</max_size>) in bytes; None when absent."""
    if el is None or el.text is None or not el.text.strip():
        return None
    unit = (el.get("unit") or default_unit).lower()
    if unit not in _UNITS or not el.text.strip().isdigit():
        raise BadInputError(f"<{el.tag}> {el.text.strip()!r} unit {unit!r}: not a libvirt size")
    return int(el.text.strip()) * _UNITS[unit]


@dataclass
class Disk:
    target: str  # "vda"
    bus: Optional[str]
    alias: Optional[str]  # "virtio-disk0" (live XML only): QEMU's qdev id
    source: Optional[str]  # the image file (or block device)
    format: Optional[str]  # <driver type>: "qcow2", "raw"
    metadata_cache_max_size: Optional[int]  # bytes: QEMU's qcow2 cache-size

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "bus": self.bus, "alias": self.alias, "source": self.source,
                "format": self.format, "metadata-cache-max-size": self.metadata_cache_max_size}


@dataclass
class DomainXml:
    name: str
    vcpus: int
    iothread_ids: list[int]
    vcpupin: dict[int, str]  # vCPU -> cpuset ("1", "2-3")
    emulatorpin: Optional[str]
    iothreadpin: dict[int, str]
    numatune_mode: Optional[str]  # strict, preferred, interleave, restrictive
    numatune_nodeset: Optional[str]
    numatune_placement: Optional[str]
    memnodes: dict[int, str]  # guest cell -> host nodeset
    hugepages: bool  # <memoryBacking><hugepages/>
    hugepage_sizes: list[int]  # bytes of each <page size=...>; [] = the default huge page size
    locked: bool
    cpu_mode: Optional[str]  # host-passthrough, host-model, custom
    cpu_topology: dict[str, int]  # sockets, dies, cores, threads
    cpu_cells: int  # guest NUMA cells (<cpu><numa><cell>)
    memory: Optional[int]  # bytes
    emulator: Optional[str]
    disks: list[Disk] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "vcpus": self.vcpus,
            "iothread-ids": self.iothread_ids,
            "vcpupin": {str(k): v for k, v in self.vcpupin.items()},
            "emulatorpin": self.emulatorpin,
            "iothreadpin": {str(k): v for k, v in self.iothreadpin.items()},
            "numatune": {"mode": self.numatune_mode, "nodeset": self.numatune_nodeset,
                         "placement": self.numatune_placement,
                         "memnodes": {str(k): v for k, v in self.memnodes.items()}},
            "memory-backing": {"hugepages": self.hugepages, "page-sizes": self.hugepage_sizes,
                               "locked": self.locked},
            "cpu": {"mode": self.cpu_mode, "topology": self.cpu_topology, "numa-cells": self.cpu_cells},
            "memory": self.memory,
            "emulator": self.emulator,
            "disks": [d.to_dict() for d in self.disks],
        }


def _int(text: Optional[str], what: str) -> int:
    if text is None or not text.strip().isdigit():
        raise BadInputError(f"domain XML: {what} {text!r} is not a number")
    return int(text.strip())


def parse(text: str) -> DomainXml:
    """The domain XML (virDomainGetXMLDesc / virsh dumpxml) as data; BadInputError when it is not one."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise BadInputError(f"not a libvirt domain XML: {exc}") from None
    if root.tag != "domain":
        raise BadInputError(f"not a libvirt domain XML: the root element is <{root.tag}>")
    vcpu_el = root.find("vcpu")
    vcpus = _int(vcpu_el.text, "<vcpu>") if vcpu_el is not None else 1
    io_ids: list[int] = []
    ios = root.find("iothreads")
    if ios is not None and ios.text and ios.text.strip():
        io_ids = list(range(1, _int(ios.text, "<iothreads>") + 1))
    for el in root.findall("iothreadids/iothread"):
        i = _int(el.get("id"), "<iothread id>")
        if i not in io_ids:
            io_ids.append(i)
    ct = root.find("cputune")
    vcpupin: dict[int, str] = {}
    iothreadpin: dict[int, str] = {}
    emulatorpin = None
    if ct is not None:
        for el in ct.findall("vcpupin"):
            vcpupin[_int(el.get("vcpu"), "<vcpupin vcpu>")] = el.get("cpuset", "")
        for el in ct.findall("iothreadpin"):
            iothreadpin[_int(el.get("iothread"), "<iothreadpin iothread>")] = el.get("cpuset", "")
        ep = ct.find("emulatorpin")
        emulatorpin = ep.get("cpuset") if ep is not None else None
    nt = root.find("numatune")
    mem = nt.find("memory") if nt is not None else None
    memnodes = {}
    if nt is not None:
        for el in nt.findall("memnode"):
            memnodes[_int(el.get("cellid"), "<memnode cellid>")] = el.get("nodeset", "")
    mb = root.find("memoryBacking")
    hp = mb.find("hugepages") if mb is not None else None
    sizes = [s for s in (scaled_attr(p) for p in hp.findall("page")) if s] if hp is not None else []
    cpu = root.find("cpu")
    topo: dict[str, int] = {}
    cells = 0
    if cpu is not None:
        t = cpu.find("topology")
        if t is not None:
            topo = {k: _int(t.get(k), f"<topology {k}>") for k in ("sockets", "dies", "cores", "threads") if t.get(k)}
        cells = len(cpu.findall("numa/cell"))
    em = root.find("devices/emulator")
    disks = []
    for d in root.findall("devices/disk"):
        if d.get("device", "disk") not in ("disk", "lun"):
            continue
        tgt = d.find("target")
        src = d.find("source")
        drv = d.find("driver")
        alias = d.find("alias")
        disks.append(Disk(
            target=tgt.get("dev", "") if tgt is not None else "",
            bus=tgt.get("bus") if tgt is not None else None,
            alias=alias.get("name") if alias is not None else None,
            source=(src.get("file") or src.get("dev") or src.get("name")) if src is not None else None,
            format=drv.get("type") if drv is not None else None,
            metadata_cache_max_size=scaled(drv.find("metadata_cache/max_size"), "bytes") if drv is not None else None,
        ))
    return DomainXml(
        name=(root.findtext("name") or "").strip(),
        vcpus=vcpus,
        iothread_ids=io_ids,
        vcpupin=vcpupin,
        emulatorpin=emulatorpin,
        iothreadpin=iothreadpin,
        numatune_mode=mem.get("mode", "strict") if mem is not None else None,
        numatune_nodeset=mem.get("nodeset") if mem is not None else None,
        numatune_placement=mem.get("placement") if mem is not None else None,
        memnodes=memnodes,
        hugepages=hp is not None,
        hugepage_sizes=sizes,
        locked=mb is not None and mb.find("locked") is not None,
        cpu_mode=cpu.get("mode") if cpu is not None else None,
        cpu_topology=topo,
        cpu_cells=cells,
        memory=scaled(root.find("memory")),
        emulator=em.text.strip() if em is not None and em.text else None,
        disks=disks,
    )


def scaled_attr(page: ET.Element) -> Optional[int]:
    """<page size='2048' unit='KiB'/> in bytes (unit default KiB, as libvirt)."""
    size = page.get("size")
    if size is None or not size.isdigit():
        return None
    unit = (page.get("unit") or "KiB").lower()
    return int(size) * _UNITS.get(unit, 1024)


def set_metadata_cache(text: str, target: str, max_size: int) -> str:
    """The domain XML with ``<driver><metadata_cache><max_size unit='bytes'>`` of disk ``target`` set
    (for virDomainDefineXML; libvirt keeps the value in bytes). BadInputError when no such disk."""
    root = ET.fromstring(text)
    for d in root.findall("devices/disk"):
        tgt = d.find("target")
        if tgt is None or tgt.get("dev") != target:
            continue
        drv = d.find("driver")
        if drv is None:
            drv = ET.SubElement(d, "driver", {"name": "qemu", "type": "qcow2"})
        mc = drv.find("metadata_cache")
        if mc is None:
            mc = ET.SubElement(drv, "metadata_cache")
        ms = mc.find("max_size")
        if ms is None:
            ms = ET.SubElement(mc, "max_size")
        ms.set("unit", "bytes")
        ms.text = str(max_size)
        return ET.tostring(root, encoding="unicode")
    raise BadInputError(f"the domain has no disk with target {target!r}")
