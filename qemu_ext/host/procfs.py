"""Readers of /proc and /sys that all take a root directory (default "/").

Every reader joins its path under ``root``, so the same code reads the live
machine (root="/") or a captured tree (tests/fixtures/host/<scenario>/).
Readers raise OSError (FileNotFoundError, PermissionError) when a file is not
there or not readable, and ValueError when its content does not parse; the
doctor turns both into an "unknown" verdict for the check that needed it.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass, field
from typing import Optional

MAX_READ = 16 << 20  # no /proc or /sys file we read is anywhere near this; refuse anything bigger


def path(root: str, rel: str) -> str:
    """``rel`` (e.g. "proc/cmdline") under ``root``."""
    return os.path.join(root, rel.lstrip("/"))


def read_text(root: str, rel: str, limit: int = MAX_READ) -> str:
    """The text of one file under root, at most ``limit`` bytes (ValueError beyond)."""
    with open(path(root, rel), "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path(root, rel)} is larger than {limit} bytes")
    return data.decode("utf-8", errors="replace")


def read_first_line(root: str, rel: str) -> str:
    return read_text(root, rel).split("\n", 1)[0].strip()


def exists(root: str, rel: str) -> bool:
    return os.path.exists(path(root, rel))


def listdir(root: str, rel: str) -> list[str]:
    return sorted(os.listdir(path(root, rel)))


# ---------------------------------------------------------------- CPU lists

_RANGE = re.compile(r"^(\d+)(?:-(\d+)(?::(\d+)/(\d+))?)?$")


def parse_cpu_list(text: str) -> list[int]:
    """The kernel's cpu-list format: "0-3,5,8-15:2/4" -> sorted CPU numbers ("" -> [])."""
    cpus: set[int] = set()
    text = text.strip()
    if not text:
        return []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        m = _RANGE.match(part)
        if not m:
            raise ValueError(f"not a CPU list: {text!r}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo or hi > 65535:
            raise ValueError(f"not a CPU list: {text!r}")
        if m.group(3) is not None:
            used, group = int(m.group(3)), int(m.group(4))
            if group <= 0 or used > group:
                raise ValueError(f"not a CPU list: {text!r}")
            for base in range(lo, hi + 1, group):
                cpus.update(c for c in range(base, min(base + used, hi + 1)))
        else:
            cpus.update(range(lo, hi + 1))
    return sorted(cpus)


def format_cpu_list(cpus: list[int] | set[int]) -> str:
    """[0,1,2,5] -> "0-2,5" (the inverse of parse_cpu_list)."""
    out: list[str] = []
    s = sorted(set(cpus))
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[j] + 1:
            j += 1
        out.append(str(s[i]) if i == j else f"{s[i]}-{s[j]}")
        i = j + 1
    return ",".join(out)


def parse_cpu_mask(text: str) -> list[int]:
    """A hex mask as in smp_affinity ("00000003" or "ff,ffffffff") -> CPU numbers."""
    digits = text.strip().replace(",", "")
    if len(digits) > 4096:  # 16384 CPUs; more is not a CPU mask
        raise ValueError("CPU mask too long")
    value = int(digits or "0", 16)
    return [i for i in range(value.bit_length()) if value >> i & 1]


# ---------------------------------------------------------------- kernel command line


@dataclass
class Cmdline:
    raw: str
    params: dict[str, Optional[str]]  # last value wins, as the kernel does; None for a bare flag

    def cpus(self, name: str) -> Optional[list[int]]:
        """CPUs named by isolcpus= / nohz_full= / rcu_nocbs= (flags like "domain,managed_irq," skipped)."""
        if name not in self.params or self.params[name] is None:
            return None
        value = self.params[name] or ""
        parts = value.split(",")
        # isolcpus=[flag,...,]cpu-list: flags are words, the CPU list is the rest
        flags = []
        while parts and re.fullmatch(r"[a-z_]+", parts[0] or ""):
            flags.append(parts.pop(0))
        return parse_cpu_list(",".join(parts))


def cmdline(root: str = "/") -> Cmdline:
    raw = read_text(root, "proc/cmdline").strip().replace("\0", " ")
    params: dict[str, Optional[str]] = {}
    for tok in raw.split():
        if tok == "--":  # the rest goes to init
            break
        k, sep, v = tok.partition("=")
        params[k] = v if sep else None
    return Cmdline(raw, params)


# ---------------------------------------------------------------- /proc/interrupts and /proc/stat


@dataclass
class InterruptRow:
    name: str  # "24", "LOC", "NMI", ...
    counts: list[int]
    description: str


@dataclass
class Interrupts:
    cpus: list[int]  # CPU numbers of the columns
    rows: dict[str, InterruptRow]


def interrupts(root: str = "/") -> Interrupts:
    lines = read_text(root, "proc/interrupts").splitlines()
    if not lines:
        raise ValueError("empty /proc/interrupts")
    cpus = [int(c[3:]) for c in lines[0].split() if c.startswith("CPU")]
    if not cpus:
        raise ValueError("/proc/interrupts has no CPU header")
    rows: dict[str, InterruptRow] = {}
    for line in lines[1:]:
        name, sep, rest = line.partition(":")
        if not sep:
            continue
        fields = rest.split()
        counts: list[int] = []
        for f in fields[: len(cpus)]:
            if not f.isdigit():
                break
            counts.append(int(f))
        desc = " ".join(fields[len(counts):])
        rows[name.strip()] = InterruptRow(name.strip(), counts, desc)
    return Interrupts(cpus, rows)


STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal", "guest", "guest_nice")


def proc_stat(root: str = "/") -> dict[str, dict[str, int]]:
    """/proc/stat cpu lines: {"cpu": {...}, "cpu0": {"user":..., "irq":..., "softirq":...}, ...} in USER_HZ ticks."""
    out: dict[str, dict[str, int]] = {}
    for line in read_text(root, "proc/stat").splitlines():
        if not line.startswith("cpu"):
            continue
        parts = line.split()
        out[parts[0]] = {k: int(v) for k, v in zip(STAT_FIELDS, parts[1:])}
    if not out:
        raise ValueError("/proc/stat has no cpu lines")
    return out


# ---------------------------------------------------------------- CPUs, caches, NUMA


def cpuinfo_flags(root: str = "/") -> set[str]:
    """The flags of the first processor in /proc/cpuinfo."""
    for line in read_text(root, "proc/cpuinfo").splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    raise ValueError("/proc/cpuinfo has no flags line")


def cpuinfo_model(root: str = "/") -> str:
    for line in read_text(root, "proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return ""


def online_cpus(root: str = "/") -> list[int]:
    return parse_cpu_list(read_first_line(root, "sys/devices/system/cpu/online"))


def sys_cpu_list(root: str, name: str) -> Optional[list[int]]:
    """/sys/devices/system/cpu/{isolated,nohz_full}; None when the file is not there."""
    try:
        text = read_first_line(root, f"sys/devices/system/cpu/{name}")
    except FileNotFoundError:
        return None
    if text == "(null)":
        return []
    return parse_cpu_list(text)


@dataclass
class Cache:
    level: int
    type: str
    size: str
    shared_cpu_list: list[int]
    id: Optional[int] = None

    def to_dict(self) -> dict:
        return {
            "level": self.level,
            "type": self.type,
            "size": self.size,
            "shared-cpu-list": format_cpu_list(self.shared_cpu_list),
            "id": self.id,
        }


def cpu_caches(root: str, cpu: int) -> list[Cache]:
    base = f"sys/devices/system/cpu/cpu{cpu}/cache"
    caches = []
    for idx in listdir(root, base):
        if not idx.startswith("index"):
            continue
        d = f"{base}/{idx}"
        cid: Optional[int] = None
        if exists(root, f"{d}/id"):
            cid = int(read_first_line(root, f"{d}/id"))
        caches.append(
            Cache(
                level=int(read_first_line(root, f"{d}/level")),
                type=read_first_line(root, f"{d}/type"),
                size=read_first_line(root, f"{d}/size"),
                shared_cpu_list=parse_cpu_list(read_first_line(root, f"{d}/shared_cpu_list")),
                id=cid,
            )
        )
    return caches


def cpu_topology(root: str, cpu: int) -> dict[str, int]:
    """physical_package_id and core_id of a CPU (/sys/devices/system/cpu/cpuN/topology)."""
    base = f"sys/devices/system/cpu/cpu{cpu}/topology"
    return {k: int(read_first_line(root, f"{base}/{k}")) for k in ("physical_package_id", "core_id")}


def numa_nodes(root: str = "/") -> dict[int, list[int]]:
    """{node: [cpus]} from /sys/devices/system/node/node*/cpulist."""
    out: dict[int, list[int]] = {}
    for name in listdir(root, "sys/devices/system/node"):
        m = re.fullmatch(r"node(\d+)", name)
        if m:
            out[int(m.group(1))] = parse_cpu_list(read_first_line(root, f"sys/devices/system/node/{name}/cpulist"))
    return out


# ---------------------------------------------------------------- IRQs, modules, tracing, kernel log


def irq_affinities(root: str = "/") -> dict[str, list[int]]:
    """{irq: [cpus]} from /proc/irq/N/smp_affinity_list (smp_affinity when the list is missing)."""
    out: dict[str, list[int]] = {}
    for name in listdir(root, "proc/irq"):
        if not name.isdigit():
            continue
        try:
            out[name] = parse_cpu_list(read_first_line(root, f"proc/irq/{name}/smp_affinity_list"))
        except FileNotFoundError:
            try:
                out[name] = parse_cpu_mask(read_first_line(root, f"proc/irq/{name}/smp_affinity"))
            except FileNotFoundError:
                continue
    return out


def module_params(root: str, module: str) -> Optional[dict[str, str]]:
    """{param: value} of a loaded module (/sys/module/M/parameters); None when the module is not loaded."""
    d = f"sys/module/{module}"
    if not exists(root, d):
        return None
    out: dict[str, str] = {}
    if not exists(root, f"{d}/parameters"):
        return out
    for name in listdir(root, f"{d}/parameters"):
        try:
            out[name] = read_first_line(root, f"{d}/parameters/{name}")
        except PermissionError:
            out[name] = "(unreadable)"
        except OSError as exc:
            out[name] = f"({os.strerror(exc.errno or errno.EIO)})"
    return out


TRACING_DIRS = ("sys/kernel/tracing", "sys/kernel/debug/tracing")


@dataclass
class Tracing:
    dir: str  # absolute path of the tracefs mount used
    tracing_on: bool
    current_tracer: str
    enabled_events: list[str] = field(default_factory=list)


def tracing(root: str = "/") -> Tracing:
    """tracing_on, current_tracer and set_event from tracefs (sys/kernel/tracing, else sys/kernel/debug/tracing).

    FileNotFoundError when tracefs is mounted at neither place.
    """
    for d in TRACING_DIRS:
        if exists(root, f"{d}/tracing_on"):
            events: list[str] = []
            if exists(root, f"{d}/set_event"):
                events = [e for e in read_text(root, f"{d}/set_event").split() if e]
            return Tracing(
                dir=path(root, d),
                tracing_on=read_first_line(root, f"{d}/tracing_on") == "1",
                current_tracer=read_first_line(root, f"{d}/current_tracer"),
                enabled_events=events,
            )
    raise FileNotFoundError(errno.ENOENT, "tracefs is not mounted", path(root, TRACING_DIRS[0]))


def kernel_log(root: str = "/", limit: int = 4 << 20) -> list[str]:
    """The kernel log's messages from /dev/kmsg (read without blocking; a captured copy under a fixture root)."""
    p = path(root, "dev/kmsg")
    fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
    lines: list[str] = []
    total = 0
    try:
        while total < limit:
            try:
                rec = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # a record was overwritten while reading: go on
                    continue
                raise
            if not rec:
                break
            total += len(rec)
            for raw in rec.decode("utf-8", errors="replace").splitlines():
                if raw.startswith(" "):  # continuation (KEY=value) lines
                    continue
                lines.append(raw.partition(";")[2] if ";" in raw else raw)
    finally:
        os.close(fd)
    return lines


def meminfo(root: str = "/") -> dict[str, int]:
    """/proc/meminfo in bytes (HugePages_* are counts, not bytes)."""
    out: dict[str, int] = {}
    for line in read_text(root, "proc/meminfo").splitlines():
        k, _, v = line.partition(":")
        parts = v.split()
        if not parts or not parts[0].isdigit():
            continue
        n = int(parts[0])
        out[k.strip()] = n * 1024 if len(parts) > 1 and parts[1] == "kB" else n
    return out


# ---------------------------------------------------------------- processes and threads


def pids(root: str = "/") -> list[int]:
    return sorted(int(n) for n in listdir(root, "proc") if n.isdigit())


def comm(root: str, pid: int, tid: Optional[int] = None) -> str:
    rel = f"proc/{pid}/comm" if tid is None else f"proc/{pid}/task/{tid}/comm"
    return read_text(root, rel).rstrip("\n")


def tids(root: str, pid: int) -> list[int]:
    return sorted(int(n) for n in listdir(root, f"proc/{pid}/task") if n.isdigit())


def parse_stat(text: str) -> list[str]:
    """/proc/PID/stat split into fields 1..52 (index 0 = field 1); the comm may contain spaces and ')'."""
    lp = text.find("(")
    rp = text.rfind(")")
    if lp < 0 or rp < lp:
        raise ValueError("not a /proc stat line")
    return [text[:lp].strip(), text[lp + 1 : rp], *text[rp + 1 :].split()]


def task_stat(root: str, pid: int, tid: int) -> list[str]:
    return parse_stat(read_text(root, f"proc/{pid}/task/{tid}/stat"))


def status(root: str, pid: int, tid: Optional[int] = None) -> dict[str, str]:
    rel = f"proc/{pid}/status" if tid is None else f"proc/{pid}/task/{tid}/status"
    out: dict[str, str] = {}
    for line in read_text(root, rel).splitlines():
        k, _, v = line.partition(":")
        out[k.strip()] = v.strip()
    return out


def kb_fields(text: str) -> dict[str, int]:
    """Sum the "Key:   123 kB" lines of a smaps/smaps_rollup/status text, in bytes."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        k, sep, v = line.partition(":")
        if not sep:
            continue
        parts = v.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            out[k.strip()] = out.get(k.strip(), 0) + int(parts[0]) * 1024
    return out


def smaps_rollup(root: str, pid: int) -> dict[str, int]:
    """smaps_rollup in bytes; falls back to summing smaps (kernels before 4.14)."""
    try:
        return kb_fields(read_text(root, f"proc/{pid}/smaps_rollup"))
    except FileNotFoundError:
        return kb_fields(read_text(root, f"proc/{pid}/smaps", limit=256 << 20))


def kernel_config(root: str = "/") -> dict[str, str]:
    """The kernel's build config ({"CONFIG_HZ": "250", ...}) from /proc/config.gz or /boot/config-RELEASE."""
    import gzip

    text: Optional[str] = None
    try:
        with gzip.open(path(root, "proc/config.gz"), "rb") as f:
            raw = f.read(MAX_READ + 1)  # bounded: a hostile tree's config.gz may be a gzip bomb
        if len(raw) > MAX_READ:
            raise ValueError(f"{path(root, 'proc/config.gz')} decompresses to more than {MAX_READ} bytes")
        text = raw.decode("utf-8", errors="replace")
    except FileNotFoundError:
        release = read_first_line(root, "proc/sys/kernel/osrelease")
        text = read_text(root, f"boot/config-{release}")
    except (OSError, EOFError) as exc:
        if isinstance(exc, PermissionError):
            raise
        raise ValueError(f"cannot decompress {path(root, 'proc/config.gz')}: {exc}") from exc
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("CONFIG_"):
            k, _, v = line.partition("=")
            out[k] = v.strip('"')
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            out[line[2:].split()[0]] = "n"
    return out


@dataclass
class Task:
    pid: int
    tid: int
    comm: str
    last_cpu: Optional[int]
    affinity: list[int]
    kthread: bool


PF_KTHREAD = 0x00200000


def all_tasks(root: str = "/") -> list[Task]:
    """Every thread of every process under root/proc (ones that vanish while read are skipped)."""
    out: list[Task] = []
    for pid in pids(root):
        try:
            tlist = tids(root, pid)
        except OSError:
            continue
        for tid in tlist:
            try:
                st = task_stat(root, pid, tid)
                status_text = read_text(root, f"proc/{pid}/task/{tid}/status")
            except (OSError, ValueError):
                continue
            aff = ""
            for line in status_text.splitlines():
                if line.startswith("Cpus_allowed_list:"):
                    aff = line.partition(":")[2].strip()
                    break
            try:
                flags = int(st[8])
                last = int(st[38]) if len(st) > 38 else None
                affinity = parse_cpu_list(aff)
            except (ValueError, IndexError):
                continue
            out.append(Task(pid, tid, st[1], last, affinity, bool(flags & PF_KTHREAD)))
    return out
