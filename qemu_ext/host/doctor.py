"""`virtopt doctor`: host and VM tuning checks read from /proc and /sys.

Each check returns a Check: what was found (``found``, data), a one-line
``summary``, a verdict (ok / warn / bad / unknown) and the ``fix`` text. A file
that is missing or unreadable makes that one check "unknown" with the reason;
it never stops the others.

The checks follow the field guide of virtualisation tuning (RHEL 7 Performance
Tuning Guide based): CPU isolation (isolcpus, nohz_full, rcu_nocbs; local timer
ticks per CPU per second), x2apic, KVM, kernel tracing left on, IRQ affinity
and irq+softirq load per CPU (computed from /proc/stat deltas as irqbalance
does), cache topology and NUMA against vCPU placement, and for a QEMU process
its thread map, vCPU pinning and memory (RSS, PSS, USS, swap, huge pages).

Every reader takes ``root`` so the same checks run on a captured tree.
The sampled checks read /proc/interrupts and /proc/stat twice, ``interval``
seconds apart (or, for a captured tree, from ``second_root``).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from qemu_ext.errors import VirtoptError
from qemu_ext.host import procfs, roles
from qemu_ext.host.target import require_qemu
from qemu_ext.host.threads import ThreadInfo, thread_map

VERDICTS = ("ok", "warn", "bad", "unknown")

# isolated tickless CPUs: "in theory 1 tick per second, measured on average under 10" (field guide)
TICKLESS_MAX_PER_S = 10.0


@dataclass
class Check:
    id: str
    title: str
    verdict: str  # ok | warn | bad | unknown
    summary: str  # one line: what was found
    found: dict[str, Any] = field(default_factory=dict)
    fix: Optional[str] = None
    details: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "verdict": self.verdict,
            "summary": self.summary,
            "found": self.found,
            "fix": self.fix,
            "details": list(self.details),
        }


@dataclass
class Samples:
    """/proc/interrupts and /proc/stat at two moments ``interval`` seconds apart.

    A file that could not be read (or parsed) leaves its pair None and says why in irq_error / stat_error.
    """

    interval: float
    irq0: Optional[procfs.Interrupts] = None
    irq1: Optional[procfs.Interrupts] = None
    stat0: Optional[dict[str, dict[str, int]]] = None
    stat1: Optional[dict[str, dict[str, int]]] = None
    irq_error: Optional[str] = None
    stat_error: Optional[str] = None


@dataclass
class DoctorReport:
    root: str
    pid: Optional[int]
    interval: Optional[float]
    checks: list[Check]
    domain: Optional[str] = None  # the libvirt domain whose XML was checked

    def counts(self) -> dict[str, int]:
        return {v: sum(1 for c in self.checks if c.verdict == v) for v in VERDICTS}

    def check(self, check_id: str) -> Check:
        for c in self.checks:
            if c.id == check_id:
                return c
        raise KeyError(check_id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "pid": self.pid,
            "domain": self.domain,
            "interval-seconds": self.interval,
            "verdicts": self.counts(),
            "checks": [c.to_dict() for c in self.checks],
        }


class _Ctx:
    """What the checks share: the root, the QEMU pid and its thread map, the samples; each read once."""

    def __init__(
        self,
        root: str,
        pid: Optional[int],
        vcpus: Optional[list[dict]],
        iothreads: Optional[list[dict]],
        samples: Optional[Samples],
        sample_error: Optional[str],
        source: str = "qmp",
        size: Callable[[int], str] = lambda n: f"{n} B",
    ) -> None:
        self.root = root
        self.source = source
        self.size = size  # how summaries write a byte count (the front door passes output.human_size)
        self.pid = pid
        self.vcpus = vcpus
        self.iothreads = iothreads
        self.samples = samples
        self.sample_error = sample_error
        self._cache: dict[str, Any] = {}

    def get(self, key: str, fn: Callable[[], Any]) -> Any:
        """fn() once; an exception is cached and raised again to every check that needs it."""
        if key not in self._cache:
            try:
                self._cache[key] = ("ok", fn())
            except (OSError, ValueError, VirtoptError) as exc:
                self._cache[key] = ("err", exc)
        kind, val = self._cache[key]
        if kind == "err":
            raise val
        return val

    def cmdline(self) -> procfs.Cmdline:
        return self.get("cmdline", lambda: procfs.cmdline(self.root))

    def isolated(self) -> list[int]:
        """Isolated CPUs: /sys/devices/system/cpu/isolated, else isolcpus= from the command line."""

        def read() -> list[int]:
            iso = procfs.sys_cpu_list(self.root, "isolated")
            if iso is None:
                iso = self.cmdline().cpus("isolcpus") or []
            return iso

        return self.get("isolated", read)

    def nohz_full(self) -> list[int]:
        def read() -> list[int]:
            nz = procfs.sys_cpu_list(self.root, "nohz_full")
            if nz is None:
                nz = self.cmdline().cpus("nohz_full") or []
            return nz

        return self.get("nohz_full", read)

    def online(self) -> list[int]:
        return self.get("online", lambda: procfs.online_cpus(self.root))

    def kconfig(self) -> dict[str, str]:
        return self.get("kconfig", lambda: procfs.kernel_config(self.root))

    def hz(self) -> Optional[int]:
        try:
            v = self.kconfig().get("CONFIG_HZ")
        except (OSError, ValueError):
            return None
        return int(v) if v and v.isdigit() else None

    def threads(self) -> list[ThreadInfo]:
        assert self.pid is not None
        return self.get("threads", lambda: thread_map(self.pid, self.vcpus, self.iothreads, root=self.root,
                                                     source=self.source))


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        what = exc.strerror or type(exc).__name__
        return f"{exc.filename}: {what}" if exc.filename else what
    return str(exc)


def _unknown(check_id: str, title: str, exc: BaseException, fix: Optional[str] = None) -> Check:
    return Check(check_id, title, "unknown", f"could not read: {_why(exc)}", {"error": _why(exc)}, fix)


def _cpus(cpus: list[int] | set[int]) -> str:
    return procfs.format_cpu_list(cpus) or "none"


# ---------------------------------------------------------------- CPU isolation


def check_cpu_isolation(ctx: _Ctx) -> Check:
    title = "CPU isolation (isolcpus, nohz_full, rcu_nocbs)"
    cl = ctx.cmdline()
    found: dict[str, Any] = {}
    found["kernel-parameters"] = {_kebab(name): cl.params.get(name) if name in cl.params else None
                                  for name in ("isolcpus", "nohz_full", "rcu_nocbs", "irqaffinity")}
    iso = ctx.isolated()
    nz = ctx.nohz_full()
    found["isolated"] = procfs.format_cpu_list(iso)
    found["nohz-full"] = procfs.format_cpu_list(nz)
    try:
        kc = ctx.kconfig()
        found["config-no-hz-full"] = kc.get("CONFIG_NO_HZ_FULL", "n")
    except (OSError, ValueError):
        kc = None
        found["config-no-hz-full"] = None
    online = ctx.online()
    found["online"] = procfs.format_cpu_list(online)
    grub = (
        'set GRUB_CMDLINE_LINUX_DEFAULT="isolcpus=C nohz_full=C rcu_nocbs=C" in /etc/default/grub '
        "(C = the CPUs for vCPUs, e.g. 1,3), run grub-mkconfig -o /boot/grub/grub.cfg (or update-grub), "
        "reboot and check /proc/cmdline"
    )
    if not iso and not nz:
        return Check("cpu-isolation", title, "warn",
                     f"no CPU is isolated (online {_cpus(online)}); vCPUs share CPUs with the host",
                     found, "for latency-sensitive VMs: " + grub)
    details = []
    verdict = "ok"
    fix: Optional[str] = None
    if "nohz_full" in cl.params and kc is not None and kc.get("CONFIG_NO_HZ_FULL", "n") != "y":
        verdict = "bad"
        details.append("nohz_full= is set but the kernel is built without CONFIG_NO_HZ_FULL: it has no effect")
        fix = "use a kernel built with CONFIG_NO_HZ_FULL=y"
    missing = []
    if not nz:
        missing.append("nohz_full")
    if "rcu_nocbs" not in cl.params and not nz:
        missing.append("rcu_nocbs")
    if not iso:
        missing.append("isolcpus")
    if iso and nz and set(iso) != set(nz):
        details.append(f"isolcpus ({_cpus(iso)}) and nohz_full ({_cpus(nz)}) name different CPUs")
        verdict = "warn" if verdict == "ok" else verdict
    if set(iso) >= set(online) and online:
        verdict = "bad"
        details.append("every online CPU is isolated: nothing is left for the host")
    if missing and verdict == "ok":
        verdict = "warn"
        fix = f"add {' '.join(m + '=' + _cpus(iso or nz) for m in missing)} to the kernel command line; " + grub
    summary = (f"isolated {_cpus(iso)}, nohz_full {_cpus(nz)}, "
               f"rcu_nocbs {found['kernel-parameters']['rcu-nocbs'] or 'none'}")
    return Check("cpu-isolation", title, verdict, summary, found, fix, details)


def _deltas(ctx: _Ctx, kind: str) -> Samples:
    s = ctx.samples
    if s is None:
        raise ValueError(ctx.sample_error or "not sampled (--interval 0)")
    if kind == "irq" and (s.irq0 is None or s.irq1 is None):
        raise ValueError(s.irq_error or "/proc/interrupts not sampled")
    if kind == "stat" and (s.stat0 is None or s.stat1 is None):
        raise ValueError(s.stat_error or "/proc/stat not sampled")
    return s


def check_timer_ticks(ctx: _Ctx) -> Check:
    title = "local timer interrupts per CPU per second"
    s = _deltas(ctx, "irq")
    assert s.irq0 is not None and s.irq1 is not None
    r0, r1 = s.irq0.rows.get("LOC"), s.irq1.rows.get("LOC")
    if r0 is None or r1 is None:
        raise ValueError("no 'LOC: Local timer interrupts' line in /proc/interrupts")
    rates = {}
    for i, cpu in enumerate(s.irq1.cpus):
        if i < len(r0.counts) and i < len(r1.counts) and i < len(s.irq0.cpus) and s.irq0.cpus[i] == cpu:
            rates[cpu] = max(0, r1.counts[i] - r0.counts[i]) / s.interval
    nz = set(ctx.nohz_full())
    hz = ctx.hz()
    found = {
        "interval-seconds": s.interval,
        "hz": hz,
        "nohz-full": procfs.format_cpu_list(nz),
        "ticks-per-second": {str(c): round(v, 1) for c, v in rates.items()},
    }
    text = ", ".join(f"CPU{c} {v:.0f}/s" for c, v in rates.items())
    if not nz:
        return Check("timer-ticks", title, "ok",
                     f"{text} (no nohz_full CPUs; {'HZ=' + str(hz) if hz else 'HZ unknown'})", found,
                     None, ["without nohz_full every busy CPU takes up to HZ ticks per second"])
    ticking = {c: v for c, v in rates.items() if c in nz and v > TICKLESS_MAX_PER_S}
    if ticking:
        return Check(
            "timer-ticks", title, "bad",
            f"{text}: nohz_full CPU {_cpus(ticking)} still tick (> {TICKLESS_MAX_PER_S:.0f}/s)", found,
            "a tickless CPU stops ticking only with one runnable task: pin only the vCPU there "
            "(virtopt threads --pin), move other tasks and IRQs away, and check CONFIG_NO_HZ_FULL",
        )
    return Check("timer-ticks", title, "ok",
                 f"{text}: nohz_full CPU {_cpus(nz)} tick near zero (<= {TICKLESS_MAX_PER_S:.0f}/s)", found)


def check_isolated_use(ctx: _Ctx) -> Check:
    """Anything but the vCPUs (and per-CPU kernel threads) on the isolated CPUs."""
    title = "what runs on the isolated CPUs"
    iso = set(ctx.isolated())
    if not iso:
        return Check("isolated-use", title, "ok", "no isolated CPUs", {"isolated": ""})
    vcpu_tids: set[int] = set()
    if ctx.pid is not None:
        try:
            vcpu_tids = {t.tid for t in ctx.threads() if t.role == "vcpu"}
        except (OSError, ValueError, VirtoptError):
            pass
    intruders = []
    for t in procfs.all_tasks(ctx.root):
        if t.last_cpu not in iso or t.tid in vcpu_tids:
            continue
        if t.kthread and len(t.affinity) == 1:
            continue  # per-CPU kernel threads (ksoftirqd/N, kworker/N:M, migration/N) belong there
        if t.comm == "swapper" or t.pid == 0:
            continue
        intruders.append({"pid": t.pid, "tid": t.tid, "comm": t.comm, "last-cpu": t.last_cpu,
                          "affinity": procfs.format_cpu_list(t.affinity)})
    found = {"isolated": procfs.format_cpu_list(iso), "others": intruders}
    if intruders:
        names = ", ".join(f"{i['comm']}[{i['tid']}]@CPU{i['last-cpu']}" for i in intruders[:8])
        more = f" and {len(intruders) - 8} more" if len(intruders) > 8 else ""
        return Check("isolated-use", title, "warn",
                     f"{len(intruders)} other thread(s) last ran on isolated CPUs: {names}{more}", found,
                     "move them away: taskset -p -c HOUSEKEEPING_CPUS TID (for QEMU's own threads: "
                     "virtopt threads --pin main=...,io=...)")
    return Check("isolated-use", title, "ok",
                 f"only vCPU and per-CPU kernel threads last ran on isolated CPU {_cpus(iso)}", found)


def _pin_key(t: ThreadInfo) -> str:
    """The --pin key of a vCPU thread: vcpuN, or vcpu for single-threaded TCG's one thread."""
    return f"vcpu{t.vcpu_index}" if t.vcpu_index is not None else "vcpu"


def _kebab(name: str) -> str:
    """A kernel or module parameter name in JSON's kebab-case: the kernel treats "-" and "_" in
    parameter names alike (Documentation/admin-guide/kernel-parameters.rst), so nohz-full = nohz_full."""
    return name.replace("_", "-")


def check_vcpu_pinning(ctx: _Ctx) -> Check:
    title = "vCPU threads pinned to isolated CPUs"
    threads = ctx.threads()
    vcpus = [t for t in threads if t.role == "vcpu"]
    iso = set(ctx.isolated())
    found: dict[str, Any] = {
        "isolated": procfs.format_cpu_list(iso),
        "vcpus": [{"vcpu-index": t.vcpu_index, "tid": t.tid, "affinity": procfs.format_cpu_list(t.affinity),
                   "last-cpu": t.last_cpu} for t in vcpus],
    }
    if not vcpus:
        return Check("vcpu-pinning", title, "unknown",
                     "no vCPU thread found (start QEMU with -name NAME,debug-threads=on or pass --qmp)", found)
    details = []
    unpinned = [t for t in vcpus if len(t.affinity) != 1]
    outside = [t for t in vcpus if iso and not set(t.affinity) <= iso]
    shared: dict[int, list[int]] = {}
    for t in vcpus:
        if len(t.affinity) == 1:
            shared.setdefault(t.affinity[0], []).append(t.vcpu_index if t.vcpu_index is not None else -1)
    doubled = {c: v for c, v in shared.items() if len(v) > 1}
    others_on = [t for t in threads if t.role != "vcpu" and iso and t.affinity and set(t.affinity) <= iso]
    for t in unpinned:
        details.append(f"{t.label} (TID {t.tid}) may run on CPUs {_cpus(t.affinity)}")
    for c, v in doubled.items():
        details.append(f"vCPUs {', '.join(map(str, v))} share CPU {c}")
    for t in others_on:
        details.append(f"{t.label} (TID {t.tid}) is confined to isolated CPUs {_cpus(t.affinity)}")
    isol = sorted(iso)
    if isol and len(isol) >= len(vcpus):
        plan = ",".join(f"{_pin_key(t)}={c}" for t, c in zip(sorted(vcpus, key=lambda t: t.vcpu_index or 0), isol))
        fix = f"virtopt threads {ctx.pid} --pin {plan}"
    else:
        plan = ",".join(f"{_pin_key(t)}=CPU{t.vcpu_index or 0}" for t in vcpus)
        fix = (f"virtopt threads {ctx.pid} --pin {plan} (one CPU per vCPU, isolated ones: "
               f"only {len(isol)} CPU(s) are isolated for {len(vcpus)} vCPUs)")
    if not iso:
        verdict = "warn" if unpinned else "ok"
        summary = (f"{len(vcpus) - len(unpinned)}/{len(vcpus)} vCPUs pinned to one CPU each; "
                   "no isolated CPUs to pin them to")
        return Check("vcpu-pinning", title, verdict, summary, found, fix if unpinned else None, details)
    if unpinned or outside or doubled or others_on:
        good = [t for t in vcpus if len(t.affinity) == 1 and t.affinity[0] in iso and t.affinity[0] not in doubled]
        summary = f"{len(good)}/{len(vcpus)} vCPUs pinned alone to an isolated CPU (isolated {_cpus(iso)})"
        return Check("vcpu-pinning", title, "warn", summary, found, fix, details)
    return Check("vcpu-pinning", title, "ok",
                 f"every vCPU ({len(vcpus)}) pinned alone to an isolated CPU ({_cpus(iso)})", found, None, details)


# ---------------------------------------------------------------- x2apic, KVM


def check_x2apic(ctx: _Ctx) -> Check:
    title = "x2APIC"
    flags = ctx.get("cpuinfo_flags", lambda: procfs.cpuinfo_flags(ctx.root))
    found: dict[str, Any] = {"cpuinfo-flag": "x2apic" in flags}
    try:
        cl = ctx.cmdline()
        found["nox2apic"] = "nox2apic" in cl.params
    except (OSError, ValueError):
        found["nox2apic"] = None
    log_lines: Optional[list[str]] = None
    try:
        log_lines = [ln for ln in procfs.kernel_log(ctx.root) if "x2apic" in ln.lower()]
        found["kernel-log"] = log_lines[:10]
    except (OSError, ValueError) as exc:
        found["kernel-log"] = None
        found["kernel-log-error"] = _why(exc)
    fix = ("remove nox2apic from GRUB_CMDLINE_LINUX_DEFAULT in /etc/default/grub, run grub-mkconfig and reboot; "
           "give guests x2apic (QEMU -cpu host or +x2apic): APIC access then goes through MSRs instead of MMIO")
    if found["nox2apic"]:
        return Check("x2apic", title, "bad", "x2apic disabled by nox2apic on the kernel command line", found, fix)
    if not found["cpuinfo-flag"]:
        return Check("x2apic", title, "bad", "the CPU flags in /proc/cpuinfo have no x2apic", found,
                     "enable x2APIC in the firmware (BIOS) if the CPU has it; " + fix)
    enabled = [ln for ln in (log_lines or []) if "enabled" in ln.lower() or "switched apic routing" in ln.lower()]
    if log_lines is None:
        summary = "x2apic in the CPU flags (kernel log not readable)"
    elif enabled:
        summary = f"x2apic in the CPU flags; kernel log: {enabled[0].strip()}"
    else:
        summary = "x2apic in the CPU flags (no x2apic line in the kernel log)"
    return Check("x2apic", title, "ok", summary, found)


_KVM_PARAMS = {
    "kvm": ("halt_poll_ns", "nx_huge_pages", "tdp_mmu", "ignore_msrs", "enable_pmu", "lapic_timer_advance"),
    "kvm_intel": ("nested", "ept", "enable_apicv", "enable_shadow_vmcs", "pml", "preemption_timer", "vpid"),
    "kvm_amd": ("nested", "npt", "avic", "sev", "vls", "vgif"),
}


def check_kvm(ctx: _Ctx) -> Check:
    title = "KVM module, nested virtualisation and parameters"
    found: dict[str, Any] = {}
    kvm = procfs.module_params(ctx.root, "kvm")
    found["kvm-loaded"] = kvm is not None
    found["dev-kvm"] = procfs.exists(ctx.root, "sys/class/misc/kvm") or (
        ctx.root == "/" and os.path.exists("/dev/kvm"))
    vendors = {}
    for m in ("kvm_intel", "kvm_amd"):
        p = procfs.module_params(ctx.root, m)
        if p is not None:
            vendors[m] = p
    # other KVM back ends (e.g. kvm_pvm on machines that are VMs themselves)
    for name in procfs.listdir(ctx.root, "sys/module") if procfs.exists(ctx.root, "sys/module") else []:
        if name.startswith("kvm_") and name not in vendors and name not in _KVM_PARAMS:
            vendors[name] = procfs.module_params(ctx.root, name) or {}
    params: dict[str, dict[str, str]] = {}
    if kvm is not None:
        params["kvm"] = {_kebab(k): kvm[k] for k in _KVM_PARAMS["kvm"] if k in kvm}
    for m, p in vendors.items():
        keys = _KVM_PARAMS.get(m)
        params[_kebab(m)] = {_kebab(k): p[k] for k in (keys or sorted(p)) if k in p}
    found["modules"] = sorted(["kvm"] if kvm is not None else []) + sorted(vendors)
    found["parameters"] = params
    nested = None
    for m in ("kvm_intel", "kvm_amd"):
        if m in vendors and "nested" in vendors[m]:
            nested = vendors[m]["nested"] in ("Y", "1")
    found["nested"] = nested
    if kvm is None:
        return Check("kvm", title, "bad", "the kvm module is not loaded", found,
                     "modprobe kvm_intel (Intel) or kvm_amd (AMD); enable VT-x/AMD-V in the firmware")
    if not vendors:
        return Check("kvm", title, "bad", "kvm is loaded but no vendor module (kvm_intel / kvm_amd)", found,
                     "modprobe kvm_intel or kvm_amd; check that the CPU has vmx/svm in /proc/cpuinfo")
    details = [f"{m}: " + " ".join(f"{k}={v}" for k, v in p.items()) for m, p in params.items() if p]
    nest = "unknown" if nested is None else ("on" if nested else "off")
    summary = f"modules {', '.join(found['modules'])}; nested {nest}; /dev/kvm {'present' if found['dev-kvm'] else 'missing'}"
    verdict = "ok" if found["dev-kvm"] else "warn"
    fix = None if found["dev-kvm"] else "the kvm module is loaded but /dev/kvm is missing: check udev / mknod /dev/kvm c 10 232"
    return Check("kvm", title, verdict, summary, found, fix, details)


# ---------------------------------------------------------------- tracing


def check_tracing(ctx: _Ctx) -> Check:
    title = "kernel tracing left on"
    found: dict[str, Any] = {}
    boot = {}
    try:
        cl = ctx.cmdline()
        boot = {k: v for k, v in cl.params.items() if k in ("ftrace", "trace_event", "tp_printk", "traceoff_on_warning")}
    except (OSError, ValueError):
        pass
    found["boot-parameters"] = boot
    try:
        tr = procfs.tracing(ctx.root)
    except FileNotFoundError as exc:
        found["error"] = _why(exc)
        return Check("tracing", title, "unknown",
                     "tracefs is not mounted, tracing_on and current_tracer cannot be read"
                     + (f" (boot parameters: {boot})" if boot else ""), found,
                     "mount -t tracefs nodev /sys/kernel/tracing, then run the doctor again")
    rel = os.path.relpath(tr.dir, ctx.root) if ctx.root != "/" else tr.dir
    d = "/" + rel.lstrip("/")
    found.update({"dir": d, "tracing-on": tr.tracing_on, "current-tracer": tr.current_tracer,
                  "enabled-events": tr.enabled_events[:50], "enabled-event-count": len(tr.enabled_events)})
    off = f"echo 0 > {d}/tracing_on; echo nop > {d}/current_tracer; echo > {d}/set_event"
    if tr.tracing_on and tr.current_tracer != "nop":
        return Check("tracing", title, "bad",
                     f"tracer {tr.current_tracer} is running (tracing_on=1): every traced kernel function costs "
                     "QEMU CPU time (trace_graph_entry/ring_buffer_* in perf)", found, off)
    if tr.tracing_on and tr.enabled_events:
        return Check("tracing", title, "warn",
                     f"{len(tr.enabled_events)} trace event(s) enabled and tracing_on=1 "
                     f"({', '.join(tr.enabled_events[:3])}{'...' if len(tr.enabled_events) > 3 else ''})",
                     found, off)
    if tr.current_tracer != "nop":
        return Check("tracing", title, "warn",
                     f"tracer {tr.current_tracer} is set (tracing_on=0: paused, not recording)", found,
                     f"echo nop > {d}/current_tracer")
    return Check("tracing", title, "ok",
                 f"current_tracer nop, {len(tr.enabled_events)} events enabled, tracing_on={int(tr.tracing_on)}",
                 found)


# ---------------------------------------------------------------- IRQs


def _irqbalance_running(root: str) -> Optional[bool]:
    try:
        for pid in procfs.pids(root):
            try:
                if procfs.comm(pid, root=root) == "irqbalance":
                    return True
            except OSError:
                continue
    except OSError:
        return None
    return False


def check_irq_affinity(ctx: _Ctx) -> Check:
    title = "IRQ affinity and irqbalance"
    aff = ctx.get("irq_aff", lambda: procfs.irq_affinities(ctx.root))
    try:
        names = {k: r.description for k, r in procfs.interrupts(ctx.root).rows.items() if k.isdigit()}
    except (OSError, ValueError):
        names = {}
    iso = set(ctx.isolated())
    balance = _irqbalance_running(ctx.root)
    found: dict[str, Any] = {
        "irqbalance": balance,
        "isolated": procfs.format_cpu_list(iso),
        "irqs": {k: {"affinity": procfs.format_cpu_list(v), "name": names.get(k, "")}
                 for k, v in sorted(aff.items(), key=lambda kv: int(kv[0]))},
    }
    bal = {True: "irqbalance runs", False: "irqbalance does not run", None: "irqbalance unknown"}[balance]
    if not iso:
        return Check("irq-affinity", title, "ok", f"{len(aff)} IRQs; {bal}; no isolated CPUs to keep free", found)
    on_iso = {k: v for k, v in aff.items() if set(v) & iso}
    found["irqs-on-isolated"] = sorted(on_iso, key=int)
    housekeeping = sorted(set(ctx.online()) - iso)
    if on_iso:
        first = sorted(on_iso, key=int)[:8]
        fix = (f"for i in {' '.join(first)}{' ...' if len(on_iso) > 8 else ''}; do echo {_cpus(housekeeping)} > "
               f"/proc/irq/$i/smp_affinity_list; done; add irqaffinity={_cpus(housekeeping)} to the kernel command "
               f"line; with irqbalance set IRQBALANCE_BANNED_CPULIST={_cpus(iso)} in /etc/default/irqbalance")
        return Check("irq-affinity", title, "warn",
                     f"{len(on_iso)} of {len(aff)} IRQs may be delivered to isolated CPUs {_cpus(iso)}; {bal}",
                     found, fix)
    return Check("irq-affinity", title, "ok", f"no IRQ targets an isolated CPU ({len(aff)} IRQs); {bal}", found)


def _irq_load_tree(ctx: _Ctx, per: dict[str, dict[str, float]]) -> dict[str, Any]:
    """irqbalance's tree: a core's load is the sum of its CPUs', a cache domain's the sum of its cores',
    a package's the sum of its domains'. Levels whose sysfs files are unreadable are left out."""
    out: dict[str, Any] = {}
    cpus = [int(c) for c in per if c.isdigit()]
    load = {int(c): v["load-ticks"] for c, v in per.items() if c.isdigit()}
    try:
        topo = {c: procfs.cpu_topology(ctx.root, c) for c in cpus}
        cores: dict[str, float] = {}
        packages: dict[str, float] = {}
        for c in cpus:
            key = f"{topo[c]['physical_package_id']}/{topo[c]['core_id']}"
            cores[key] = cores.get(key, 0) + load[c]
            pk = str(topo[c]["physical_package_id"])
            packages[pk] = packages.get(pk, 0) + load[c]
        out["cores"] = cores  # "package/core" -> ticks
        out["packages"] = packages
    except (OSError, ValueError, KeyError):
        pass
    try:
        domains: dict[str, float] = {}
        for c in cpus:
            caches = procfs.cpu_caches(ctx.root, c)
            top = max((k for k in caches if k.type != "Instruction"), key=lambda k: k.level, default=None)
            if top is not None:
                key = procfs.format_cpu_list(top.shared_cpu_list)
                domains[key] = domains.get(key, 0) + load[c]
        out["cache-domains"] = domains  # CPUs sharing the last-level cache -> ticks
    except (OSError, ValueError):
        pass
    return out


def check_irq_load(ctx: _Ctx) -> Check:
    """irq+softirq time per CPU between the two /proc/stat samples (irqbalance's cpu->last_load)."""
    title = "irq+softirq load per CPU (as irqbalance computes it)"
    s = _deltas(ctx, "stat")
    assert s.stat0 is not None and s.stat1 is not None
    clk = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    per: dict[str, dict[str, float]] = {}
    for name, f1 in s.stat1.items():
        if name == "cpu" or name not in s.stat0:
            continue
        f0 = s.stat0[name]
        d = {k: max(0, f1.get(k, 0) - f0.get(k, 0)) for k in procfs.STAT_FIELDS}
        total = sum(d.values()) or 1
        load = d["irq"] + d["softirq"]
        per[name[3:]] = {
            "irq-ticks": d["irq"],
            "softirq-ticks": d["softirq"],
            "load-ticks": load,
            "load": round(load / total, 4),  # fraction of the CPU's time
        }
    total_load = sum(v["load-ticks"] for v in per.values())
    for v in per.values():
        v["share"] = round(v["load-ticks"] / total_load, 3) if total_load else 0.0  # fraction of all irq time
    found: dict[str, Any] = {"interval-seconds": s.interval, "user-hz": clk, "cpus": per}
    found.update(_irq_load_tree(ctx, per))
    text = ", ".join(f"CPU{c} {v['load'] * 100:.1f}%" for c, v in per.items())
    busiest = max(per.items(), key=lambda kv: kv[1]["load"], default=None)
    iso = set(ctx.isolated())
    on_iso = [c for c, v in per.items() if int(c) in iso and v["load-ticks"] > 0]
    if on_iso:
        return Check("irq-load", title, "warn", f"{text}: isolated CPU {','.join(on_iso)} handle interrupts",
                     found, "move IRQs off the isolated CPUs (see irq-affinity)")
    if busiest and busiest[1]["load"] >= 0.25 and len(per) > 1 and busiest[1]["share"] > 0.75:
        return Check("irq-load", title, "warn",
                     f"{text}: CPU{busiest[0]} takes {busiest[1]['share'] * 100:.0f}% of all irq+softirq time",
                     found, "spread IRQs (irqbalance, or /proc/irq/N/smp_affinity_list; multi-queue NICs: RSS/RPS)")
    return Check("irq-load", title, "ok", f"irq+softirq time over {s.interval:.2f} s: {text}", found)


# ---------------------------------------------------------------- caches and NUMA


def _vcpu_affinities(ctx: _Ctx) -> Optional[list[ThreadInfo]]:
    if ctx.pid is None:
        return None
    try:
        return [t for t in ctx.threads() if t.role == "vcpu"]
    except (OSError, ValueError, VirtoptError):
        return None


def check_cache_topology(ctx: _Ctx) -> Check:
    title = "CPU cache topology"
    online = ctx.online()
    per_cpu = {c: procfs.cpu_caches(ctx.root, c) for c in online}
    llc_level = max((k.level for caches in per_cpu.values() for k in caches), default=0)
    domains: dict[str, list[int]] = {}
    for caches in per_cpu.values():
        for k in caches:
            if k.level == llc_level and k.type in ("Unified", "Data"):
                domains[procfs.format_cpu_list(k.shared_cpu_list)] = k.shared_cpu_list
    found: dict[str, Any] = {
        "cpus": {str(c): [k.to_dict() for k in caches] for c, caches in per_cpu.items()},
        "last-level": llc_level,
        "last-level-domains": sorted(domains),
    }
    first = per_cpu[online[0]] if online else []
    sizes = ", ".join(f"L{k.level}{k.type[0].lower() if k.type != 'Unified' else ''} "
                      f"{ctx.size(k.size_bytes) if k.size_bytes is not None else k.size}" for k in first)
    summary = f"CPU{online[0] if online else -1}: {sizes}; L{llc_level} shared by {' | '.join(sorted(domains)) or '?'}"
    vcpus = _vcpu_affinities(ctx)
    if vcpus:
        used: set[str] = set()
        for t in vcpus:
            for name, cpus in domains.items():
                if set(t.affinity) & set(cpus):
                    used.add(name)
        found["vcpu-last-level-domains"] = sorted(used)
        if len(used) > 1:
            return Check("cache-topology", title, "warn",
                         summary + f"; the vCPUs span {len(used)} L{llc_level} domains", found,
                         f"pin the vCPUs of one VM inside one L{llc_level} domain ({' or '.join(sorted(domains))})")
        summary += f"; the vCPUs stay in one L{llc_level} domain"
    return Check("cache-topology", title, "ok", summary, found)


def check_numa(ctx: _Ctx) -> Check:
    title = "NUMA nodes against vCPU placement"
    nodes = ctx.get("numa", lambda: procfs.numa_nodes(ctx.root))
    found: dict[str, Any] = {"nodes": {str(n): procfs.format_cpu_list(c) for n, c in nodes.items()}}
    summary = f"{len(nodes)} node(s): " + ", ".join(f"node{n} CPUs {_cpus(c)}" for n, c in nodes.items())
    vcpus = _vcpu_affinities(ctx)
    if vcpus and len(nodes) > 1:
        spans = {}
        for t in vcpus:
            spans[t.vcpu_index] = sorted(n for n, c in nodes.items() if set(t.affinity) & set(c))
        found["vcpu-nodes"] = {str(k): v for k, v in spans.items()}
        all_nodes = {n for v in spans.values() for n in v}
        if len(all_nodes) > 1:
            return Check("numa", title, "warn", summary + f"; the vCPUs may run on nodes {sorted(all_nodes)}",
                         found, "pin all vCPUs (and the guest memory: numactl --membind / memory-backend "
                         "host-nodes=) to one node")
    return Check("numa", title, "ok", summary, found)


# ---------------------------------------------------------------- QEMU process


def check_qemu_memory(ctx: _Ctx) -> Check:
    title = "QEMU memory (RSS, PSS, USS, swap)"
    assert ctx.pid is not None
    r = procfs.smaps_rollup(ctx.pid, ctx.root)
    uss = r.get("Private_Clean", 0) + r.get("Private_Dirty", 0) + r.get("Private_Hugetlb", 0)
    found = {
        "rss": r.get("Rss", 0),
        "pss": r.get("Pss", 0),
        "uss": uss,
        "swap": r.get("Swap", 0),
        "swap-pss": r.get("SwapPss", 0),
        "anon-huge-pages": r.get("AnonHugePages", 0),
        "hugetlb": r.get("Private_Hugetlb", 0) + r.get("Shared_Hugetlb", 0),
    }
    size = ctx.size
    summary = f"RSS {size(found['rss'])}, PSS {size(found['pss'])}, USS {size(uss)}, swap {size(found['swap'])}"
    if found["swap"]:
        return Check("qemu-memory", title, "warn", summary + ": part of the VM is swapped out", found,
                     "give the host more memory, lock guest memory (-overcommit mem-lock=on) or back it with huge pages")
    return Check("qemu-memory", title, "ok", summary, found)


def check_huge_pages(ctx: _Ctx) -> Check:
    title = "huge pages (hugetlbfs, transparent huge pages)"
    mi = ctx.get("meminfo", lambda: procfs.meminfo(ctx.root))
    found: dict[str, Any] = {
        "hugepages-total": mi.get("HugePages_Total"),  # counts
        "hugepages-free": mi.get("HugePages_Free"),
        "hugepage-size": mi.get("Hugepagesize"),  # bytes
        "anon-huge-pages": mi.get("AnonHugePages"),  # bytes
    }
    try:
        thp = procfs.read_first_line(ctx.root, "sys/kernel/mm/transparent_hugepage/enabled")
        m = re.search(r"\[(\w+)\]", thp)
        found["thp"] = m.group(1) if m else thp
    except OSError:
        found["thp"] = None
    summary = (f"hugetlb pages {mi.get('HugePages_Total', 0)} ({mi.get('HugePages_Free', 0)} free, "
               f"{ctx.size(mi.get('Hugepagesize', 0))} each); THP {found['thp'] or 'unknown'}")
    if ctx.pid is not None:
        r = procfs.smaps_rollup(ctx.pid, ctx.root)
        hugetlb = r.get("Private_Hugetlb", 0) + r.get("Shared_Hugetlb", 0)
        anon = r.get("Anonymous", 0)
        thp_used = r.get("AnonHugePages", 0)
        found["qemu"] = {"hugetlb": hugetlb, "anon-huge-pages": thp_used, "anonymous": anon}
        summary += (f"; QEMU: hugetlb {ctx.size(hugetlb)}, THP {ctx.size(thp_used)} of "
                    f"{ctx.size(anon)} anonymous")
        if not hugetlb and not thp_used:
            return Check("huge-pages", title, "warn", summary + ": guest memory is on 4 KiB pages", found,
                         "back guest memory with huge pages: echo N > /proc/sys/vm/nr_hugepages and "
                         "-object memory-backend-file,mem-path=/dev/hugepages,... (or THP: echo always > "
                         "/sys/kernel/mm/transparent_hugepage/enabled)")
        return Check("huge-pages", title, "ok", summary, found)
    if not mi.get("HugePages_Total") and found["thp"] == "never":
        return Check("huge-pages", title, "warn", summary + ": no huge pages at all", found,
                     "echo madvise > /sys/kernel/mm/transparent_hugepage/enabled (QEMU madvises guest RAM), "
                     "or reserve hugetlb pages: echo N > /proc/sys/vm/nr_hugepages")
    return Check("huge-pages", title, "ok", summary, found)


def check_threads(ctx: _Ctx) -> Check:
    title = "QEMU thread map"
    threads = ctx.threads()
    found = {"pid": ctx.pid, "threads": [t.to_dict() for t in threads]}
    counts: dict[str, int] = {}
    for t in threads:
        counts[t.role] = counts.get(t.role, 0) + 1
    summary = f"{len(threads)} threads: " + ", ".join(f"{n} {roles.ROLES.get(r, r)}" for r, n in counts.items())
    if not any(t.role == "vcpu" for t in threads):
        return Check("threads", title, "warn", summary + " (no vCPU threads recognised)", found,
                     "start QEMU with -name NAME,debug-threads=on, or give --qmp SOCKET")
    return Check("threads", title, "ok", summary, found,
                 details=[f"{t.tid} {t.label} ({t.name}) last CPU {t.last_cpu} affinity {_cpus(t.affinity)}"
                          for t in threads])


HOST_CHECKS: list[tuple[str, str, Callable[[_Ctx], Check]]] = [
    ("cpu-isolation", "CPU isolation (isolcpus, nohz_full, rcu_nocbs)", check_cpu_isolation),
    ("timer-ticks", "local timer interrupts per CPU per second", check_timer_ticks),
    ("isolated-use", "what runs on the isolated CPUs", check_isolated_use),
    ("x2apic", "x2APIC", check_x2apic),
    ("kvm", "KVM module, nested virtualisation and parameters", check_kvm),
    ("tracing", "kernel tracing left on", check_tracing),
    ("irq-affinity", "IRQ affinity and irqbalance", check_irq_affinity),
    ("irq-load", "irq+softirq load per CPU (as irqbalance computes it)", check_irq_load),
    ("cache-topology", "CPU cache topology", check_cache_topology),
    ("numa", "NUMA nodes against vCPU placement", check_numa),
    ("huge-pages", "huge pages (hugetlbfs, transparent huge pages)", check_huge_pages),
]
QEMU_CHECKS: list[tuple[str, str, Callable[[_Ctx], Check]]] = [
    ("threads", "QEMU thread map", check_threads),
    ("vcpu-pinning", "vCPU threads pinned to isolated CPUs", check_vcpu_pinning),
    ("qemu-memory", "QEMU memory (RSS, PSS, USS, swap)", check_qemu_memory),
]
CHECK_IDS = [c[0] for c in HOST_CHECKS + QEMU_CHECKS]


def _try_read(root: str, reader: Callable[[str], Any]) -> Any:
    try:
        return reader(root), None
    except (OSError, ValueError) as exc:
        return None, _why(exc)


def take_samples(root: str, interval: float, second_root: Optional[str] = None) -> Samples:
    """Read /proc/interrupts and /proc/stat, wait ``interval`` s (or read ``second_root``), read them again."""
    irq0, irq_err = _try_read(root, procfs.interrupts)
    stat0, stat_err = _try_read(root, procfs.proc_stat)
    if second_root is not None:
        src, took = second_root, interval
    else:
        t0 = time.monotonic()
        time.sleep(interval)
        src = root
        took = max(time.monotonic() - t0, 1e-3)
    irq1 = stat1 = None
    if irq0 is not None:
        irq1, irq_err = _try_read(src, procfs.interrupts)
    if stat0 is not None:
        stat1, stat_err = _try_read(src, procfs.proc_stat)
    return Samples(took, irq0, irq1, stat0, stat1, irq_err, stat_err)


def run_doctor(
    root: str = "/",
    pid: Optional[int] = None,
    vcpus: Optional[list[dict]] = None,
    iothreads: Optional[list[dict]] = None,
    interval: float = 1.0,
    second_root: Optional[str] = None,
    only: Optional[list[str]] = None,
    source: str = "qmp",
    domain: Optional[Any] = None,
    size: Callable[[int], str] = lambda n: f"{n} B",
) -> DoctorReport:
    """Run every check (host ones, plus the QEMU ones when ``pid`` is given) and return their results.

    interval: seconds between the two samples of /proc/interrupts and /proc/stat (0: skip the sampled
    checks: they say "unknown"). second_root: a captured second sample instead of waiting (its
    proc/interrupts and proc/stat). only: check ids to run (CHECK_IDS, and with ``domain`` the
    libvirt ones). domain: a libvirt domain's XML (qemu_ext.libvirt.xml.DomainXml): its <cputune>,
    <numatune>, <memoryBacking> and <cpu> are checked against the host (qemu_ext.host.doctor_libvirt).
    size: how summaries write byte counts (front doors pass qemu_ext.output.human_size: this library
    does not import the front-door helpers).
    """
    from qemu_ext.host.doctor_libvirt import DOMAIN_CHECK_IDS, run_domain_checks

    if interval < 0:
        raise VirtoptError("--interval must be >= 0", exit_code=2)
    if only:
        bad = [c for c in only if c not in CHECK_IDS + DOMAIN_CHECK_IDS]
        if bad:
            raise VirtoptError(f"unknown check {', '.join(bad)} (checks: {', '.join(CHECK_IDS + DOMAIN_CHECK_IDS)})",
                               exit_code=2)
    if pid is not None:
        require_qemu(pid, root)  # before anything of the process is read
    checks = HOST_CHECKS + (QEMU_CHECKS if pid is not None else [])
    if only:
        checks = [c for c in checks if c[0] in only]
    samples: Optional[Samples] = None
    sample_error: Optional[str] = None
    if any(c[0] in ("timer-ticks", "irq-load") for c in checks):
        if interval > 0:
            samples = take_samples(root, interval, second_root)
        else:
            sample_error = "not sampled (--interval 0)"
    ctx = _Ctx(root, pid, vcpus, iothreads, samples, sample_error, source, size)
    results: list[Check] = []
    for cid, title, fn in checks:
        try:
            results.append(fn(ctx))
        except (OSError, ValueError, KeyError, IndexError, VirtoptError) as exc:
            results.append(_unknown(cid, title, exc))
    if domain is not None:
        results += run_domain_checks(ctx, domain, only)
    return DoctorReport(root, pid, interval if samples is not None else None, results,
                        domain.name if domain is not None else None)
