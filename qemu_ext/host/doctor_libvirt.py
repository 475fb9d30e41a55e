"""`virtopt doctor --domain NAME`: the domain XML's tuning against the host, each finding with the XML fix.

The field guide's advice for latency-sensitive VMs, in libvirt's terms (https://libvirt.org/formatdomain.html):
- <cputune><vcpupin>: every vCPU pinned alone to one isolated (isolcpus / nohz_full) CPU;
- <cputune><emulatorpin> and <iothreadpin>: QEMU's other threads (main loop, workers, call_rcu,
  monitor) and its iothreads kept off the vCPUs' CPUs and off the isolated CPUs;
- <numatune> and the pinned CPUs: one NUMA node (memory and CPUs together) and one last-level cache
  where the VM fits in one;
- <memoryBacking><hugepages/>: guest memory on huge pages, the host has enough of them and QEMU uses them;
- <cpu mode='host-passthrough'>: the host's CPU features, a topology that matches <vcpu>.

The checks read the host through the doctor's context (so they run on captured trees too) and the
XML as qemu_ext.libvirt.xml parses it.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from qemu_ext.host import procfs
from qemu_ext.host.doctor import Check, _Ctx, _unknown
from qemu_ext.libvirt.xml import DomainXml


def _cpus(c: list[int] | set[int]) -> str:
    return procfs.format_cpu_list(c) or "none"


def _parse(cpuset: str) -> list[int]:
    """libvirt's cpuset ("0-3,^2,5") as CPUs."""
    add: set[int] = set()
    sub: set[int] = set()
    for part in cpuset.split(","):
        part = part.strip()
        if not part:
            continue
        if part.startswith("^"):
            sub.update(procfs.parse_cpu_list(part[1:]))
        else:
            add.update(procfs.parse_cpu_list(part))
    return sorted(add - sub)


def _housekeeping(ctx: _Ctx) -> list[int]:
    online = ctx.online()
    iso = set(ctx.isolated())
    hk = [c for c in online if c not in iso]
    return hk or online


def _plan(ctx: _Ctx, dom: DomainXml) -> tuple[dict[int, int], list[int]]:
    """The pinning the field guide asks for: vCPU -> one CPU (isolated CPUs first, then the highest
    CPUs, leaving the low ones to the host), and the CPUs left for the emulator and iothreads."""
    online = ctx.online()
    iso = sorted(ctx.isolated())
    pool = (iso + [c for c in reversed(online) if c not in iso])[: max(dom.vcpus, 1)] or online
    vcpu_cpus = {v: pool[v % len(pool)] for v in range(dom.vcpus)}
    taken = set(iso) | set(vcpu_cpus.values())
    hk = [c for c in online if c not in taken] or _housekeeping(ctx)
    return vcpu_cpus, hk


def _cputune_xml(ctx: _Ctx, dom: DomainXml) -> str:
    vcpu_cpus, hk = _plan(ctx, dom)
    parts = [f"<vcpupin vcpu='{v}' cpuset='{c}'/>" for v, c in vcpu_cpus.items()]
    parts.append(f"<emulatorpin cpuset='{_cpus(hk)}'/>")
    parts += [f"<iothreadpin iothread='{i}' cpuset='{_cpus(hk)}'/>" for i in dom.iothread_ids]
    return "<cputune>" + "".join(parts) + "</cputune>"


def _edit(name: str, live: str = "") -> str:
    return f"virsh edit {name}, then restart the domain" + (f"; live: {live}" if live else "")


def _findings(problems: list[str]) -> tuple[str, list[str]]:
    """(summary, details): the one finding itself, or their count with each in the details."""
    return (problems[0], []) if len(problems) == 1 else (f"{len(problems)} findings", list(problems))


def check_vcpupin(ctx: _Ctx, dom: DomainXml) -> Check:
    title = "vCPUs pinned in <cputune> to isolated CPUs"
    iso = set(ctx.isolated())
    pins = {v: _parse(c) for v, c in dom.vcpupin.items()}
    found: dict[str, Any] = {"vcpus": dom.vcpus, "vcpupin": {str(v): _cpus(c) for v, c in pins.items()},
                             "isolated": procfs.format_cpu_list(iso)}
    problems = []
    for v in range(dom.vcpus):
        if v not in pins:
            problems.append(f"vCPU {v} has no <vcpupin>: it may run on any CPU")
        elif len(pins[v]) != 1:
            problems.append(f"vCPU {v} is pinned to CPUs {_cpus(pins[v])}, not to one CPU")
        elif iso and not set(pins[v]) <= iso:
            problems.append(f"vCPU {v} is pinned to CPU {_cpus(pins[v])}, which is not isolated ({_cpus(iso)})")
    seen: dict[int, int] = {}
    for v, cpus in sorted(pins.items()):
        if len(cpus) == 1:
            if cpus[0] in seen:
                problems.append(f"vCPUs {seen[cpus[0]]} and {v} share CPU {cpus[0]}")
            seen.setdefault(cpus[0], v)
    fix = f"{_cputune_xml(ctx, dom)} ({_edit(dom.name, 'virsh vcpupin / emulatorpin / iothreadpin')})"
    if not iso:
        fix += "; isolate those CPUs on the host first (see cpu-isolation)"
    if problems:
        summary, details = _findings(problems)
        return Check("libvirt-vcpupin", title, "warn", summary, found, fix, details)
    where = f"isolated CPU {_cpus(iso)}" if iso else "one CPU each (no CPU is isolated on this host)"
    verdict = "ok" if iso else "warn"
    return Check("libvirt-vcpupin", title, verdict, f"every vCPU ({dom.vcpus}) pinned alone to {where}", found,
                 None if iso else fix)


def check_emulatorpin(ctx: _Ctx, dom: DomainXml) -> Check:
    title = "emulator and iothreads kept off the vCPUs' CPUs (<emulatorpin>, <iothreadpin>)"
    iso = set(ctx.isolated())
    vcpu_cpus = {c for cs in dom.vcpupin.values() for c in _parse(cs)}
    avoid = iso | vcpu_cpus
    found: dict[str, Any] = {"emulatorpin": dom.emulatorpin, "iothreads": dom.iothread_ids,
                             "iothreadpin": {str(k): v for k, v in dom.iothreadpin.items()},
                             "vcpu-cpus": procfs.format_cpu_list(vcpu_cpus), "isolated": procfs.format_cpu_list(iso)}
    problems = []
    if dom.emulatorpin is None:
        problems.append("no <emulatorpin>: QEMU's main loop, workers and monitor may run on the vCPUs' CPUs")
    elif set(_parse(dom.emulatorpin)) & avoid:
        problems.append(f"<emulatorpin cpuset='{dom.emulatorpin}'> includes vCPU or isolated CPU "
                        f"{_cpus(set(_parse(dom.emulatorpin)) & avoid)}")
    for i in dom.iothread_ids:
        pin = dom.iothreadpin.get(i)
        if pin is None:
            problems.append(f"iothread {i} has no <iothreadpin>: it may run on any CPU")
        elif set(_parse(pin)) & avoid:
            problems.append(f"iothread {i} is pinned to {pin}, which includes vCPU or isolated CPU "
                            f"{_cpus(set(_parse(pin)) & avoid)}")
    _, hk = _plan(ctx, dom)
    fix_parts = [f"<emulatorpin cpuset='{_cpus(hk)}'/>"] + [f"<iothreadpin iothread='{i}' cpuset='{_cpus(hk)}'/>"
                                                           for i in dom.iothread_ids]
    fix = f"in <cputune>: {''.join(fix_parts)} ({_edit(dom.name, 'virsh emulatorpin / iothreadpin')})"
    if problems:
        summary, details = _findings(problems)
        return Check("libvirt-emulatorpin", title, "warn", summary, found, fix, details)
    return Check("libvirt-emulatorpin", title, "ok",
                 f"emulator on CPU {dom.emulatorpin}, {len(dom.iothread_ids)} iothread(s) pinned off the vCPUs", found)


def _llc_domains(ctx: _Ctx) -> list[list[int]]:
    out: dict[str, list[int]] = {}
    per = {c: procfs.cpu_caches(ctx.root, c) for c in ctx.online()}
    level = max((k.level for caches in per.values() for k in caches), default=0)
    for caches in per.values():
        for k in caches:
            if k.level == level and k.type in ("Unified", "Data"):
                out[procfs.format_cpu_list(k.shared_cpu_list)] = k.shared_cpu_list
    return list(out.values())


def check_numa(ctx: _Ctx, dom: DomainXml) -> Check:
    title = "one NUMA node and one L3 for the VM where it fits (<numatune>, vCPU placement)"
    nodes = ctx.get("numa", lambda: procfs.numa_nodes(ctx.root))
    vcpu_cpus = sorted({c for cs in dom.vcpupin.values() for c in _parse(cs)}) or ctx.online()
    spanned = sorted(n for n, cpus in nodes.items() if set(cpus) & set(vcpu_cpus))
    found: dict[str, Any] = {"host-nodes": {str(n): procfs.format_cpu_list(c) for n, c in nodes.items()},
                             "vcpu-cpus": procfs.format_cpu_list(vcpu_cpus), "vcpu-nodes": spanned,
                             "numatune": {"mode": dom.numatune_mode, "nodeset": dom.numatune_nodeset,
                                          "placement": dom.numatune_placement}}
    problems = []
    fixes = []
    fits_node = [n for n, cpus in nodes.items() if len(cpus) >= dom.vcpus]
    if len(spanned) > 1 and fits_node:
        n = fits_node[0]
        problems.append(f"the vCPUs may run on NUMA nodes {spanned}; {dom.vcpus} vCPUs fit in node {n} "
                        f"(CPUs {_cpus(nodes[n])})")
        fixes.append(f"<vcpupin> to CPUs of node {n} ({_cpus(nodes[n])}) and <numatune><memory mode='strict' "
                     f"nodeset='{n}'/></numatune>")
    if len(nodes) > 1:
        want = spanned[0] if len(spanned) == 1 else (fits_node[0] if fits_node else None)
        if dom.numatune_nodeset is None and dom.numatune_placement != "auto":
            problems.append("no <numatune>: guest memory may come from any node")
            if want is not None:
                fixes.append(f"<numatune><memory mode='strict' nodeset='{want}'/></numatune>")
        elif dom.numatune_nodeset is not None and want is not None and _parse(dom.numatune_nodeset) != [want]:
            problems.append(f"<numatune> nodeset {dom.numatune_nodeset} is not the vCPUs' node {want}")
            fixes.append(f"<numatune><memory mode='strict' nodeset='{want}'/></numatune>")
    try:
        llcs = _llc_domains(ctx)
        used = [d for d in llcs if set(d) & set(vcpu_cpus)]
        found["llc-domains"] = [procfs.format_cpu_list(d) for d in llcs]
        found["vcpu-llc-domains"] = [procfs.format_cpu_list(d) for d in used]
        fits_llc = [d for d in llcs if len(d) >= dom.vcpus]
        if len(used) > 1 and fits_llc:
            problems.append(f"the vCPUs span {len(used)} last-level caches; {dom.vcpus} vCPUs fit in the one of "
                            f"CPUs {_cpus(fits_llc[0])}")
            fixes.append(f"<vcpupin> the vCPUs to CPUs {_cpus(fits_llc[0])} (one L3)")
    except (OSError, ValueError) as exc:
        found["llc-error"] = str(exc)
    summary_where = (f"{len(nodes)} NUMA node(s); vCPUs on node(s) {', '.join(map(str, spanned)) or '?'}")
    if problems:
        summary, details = _findings(problems)
        return Check("libvirt-numa", title, "warn", f"{summary_where}: {summary}", found,
                     "; ".join(fixes) + f" ({_edit(dom.name, 'virsh numatune / vcpupin')})" if fixes else None, details)
    return Check("libvirt-numa", title, "ok", summary_where + ", one last-level cache", found)


def check_hugepages(ctx: _Ctx, dom: DomainXml, pid: Optional[int]) -> Check:
    title = "guest memory on huge pages (<memoryBacking><hugepages/>)"
    mi = ctx.get("meminfo", lambda: procfs.meminfo(ctx.root))
    size = mi.get("Hugepagesize", 2 << 20) or (2 << 20)
    total, free = mi.get("HugePages_Total", 0), mi.get("HugePages_Free", 0)
    mem = dom.memory or 0
    need = -(-mem // size) if mem else 0
    found: dict[str, Any] = {"xml-hugepages": dom.hugepages, "page-sizes": dom.hugepage_sizes,
                             "memory": mem, "host-hugepage-size": size, "host-hugepages-total": total,
                             "host-hugepages-free": free, "pages-needed": need}
    used = None
    if pid is not None:
        try:
            r = procfs.smaps_rollup(pid, ctx.root)
            used = r.get("Private_Hugetlb", 0) + r.get("Shared_Hugetlb", 0)
            found["qemu-hugetlb"] = used
        except (OSError, ValueError):
            pass
    kib = size // 1024
    xml_fix = (f"<memoryBacking><hugepages><page size='{kib}' unit='KiB'/></hugepages></memoryBacking>")
    host_fix = f"echo {need} > /proc/sys/vm/nr_hugepages (add vm.nr_hugepages={need} to /etc/sysctl.conf)"
    if not dom.hugepages:
        return Check("libvirt-hugepages", title, "warn",
                     f"guest memory ({ctx.size(mem)}) is on 4 KiB pages: no <hugepages/> in <memoryBacking>", found,
                     f"reserve {need} pages of {kib} KiB ({host_fix}) and add {xml_fix} ({_edit(dom.name)})")
    if total == 0:
        return Check("libvirt-hugepages", title, "bad",
                     f"<hugepages/> is set but the host reserves no huge pages of {kib} KiB", found, host_fix)
    if used == 0:
        return Check("libvirt-hugepages", title, "warn",
                     "<hugepages/> is set but QEMU's memory has no hugetlb pages", found,
                     f"restart the domain after {host_fix}")
    return Check("libvirt-hugepages", title, "ok",
                 f"<hugepages/> set; host has {total} pages of {kib} KiB ({free} free)"
                 + (f"; QEMU uses {ctx.size(used)} of them" if used else ""), found)


def check_cpu(ctx: _Ctx, dom: DomainXml) -> Check:
    title = "guest CPU model and topology (<cpu>)"
    found: dict[str, Any] = {"mode": dom.cpu_mode, "topology": dom.cpu_topology, "vcpus": dom.vcpus,
                             "numa-cells": dom.cpu_cells}
    problems = []
    fix = None
    if dom.cpu_mode not in ("host-passthrough", "host-model", "maximum"):
        problems.append(f"CPU mode {dom.cpu_mode or 'default (qemu64)'}: the guest misses the host's features "
                        "(x2apic, AVX, TSC deadline timer, ...)")
        fix = "<cpu mode='host-passthrough' check='none' migratable='on'/>"
    topo = dom.cpu_topology
    if topo:
        n = 1
        for k in ("sockets", "dies", "cores", "threads"):
            n *= topo.get(k, 1)
        if n != dom.vcpus:
            problems.append(f"<topology> gives {n} CPUs for {dom.vcpus} vCPUs")
            sockets = 1
            fix = (fix or "") + f" <cpu><topology sockets='{sockets}' dies='1' cores='{dom.vcpus}' threads='1'/></cpu>"
    if problems:
        summary, details = _findings(problems)
        return Check("libvirt-cpu", title, "warn", summary, found, f"{fix.strip()} ({_edit(dom.name)})" if fix
                     else None, details)
    return Check("libvirt-cpu", title, "ok", f"CPU mode {dom.cpu_mode}"
                 + (f", topology {topo}" if topo else ""), found)


DOMAIN_CHECKS: list[tuple[str, str, Callable[..., Check]]] = [
    ("libvirt-vcpupin", "vCPUs pinned in <cputune> to isolated CPUs", check_vcpupin),
    ("libvirt-emulatorpin", "emulator and iothreads kept off the vCPUs' CPUs", check_emulatorpin),
    ("libvirt-numa", "one NUMA node and one L3 for the VM", check_numa),
    ("libvirt-hugepages", "guest memory on huge pages", check_hugepages),
    ("libvirt-cpu", "guest CPU model and topology", check_cpu),
]
DOMAIN_CHECK_IDS = [c[0] for c in DOMAIN_CHECKS]


def run_domain_checks(ctx: _Ctx, dom: DomainXml, only: Optional[list[str]] = None) -> list[Check]:
    out = []
    for cid, title, fn in DOMAIN_CHECKS:
        if only and cid not in only:
            continue
        try:
            out.append(fn(ctx, dom, ctx.pid) if fn is check_hugepages else fn(ctx, dom))
        except (OSError, ValueError, KeyError, IndexError) as exc:
            out.append(_unknown(cid, title, exc))
    return out
