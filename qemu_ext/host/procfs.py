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
    return read_file(path(root, rel), limit)


def read_file(file: str, limit: int = MAX_READ) -> str:
    """The text of one file (a path already under its root), at most ``limit`` bytes (ValueError beyond)."""
    with open(file, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{file} is larger than {limit} bytes")
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

    @property
    def size_bytes(self) -> Optional[int]:
        """sysfs's size ("32K", "1024K", "32M": binary multiples) in bytes."""
        m = re.fullmatch(r"(\d+)([KMG]?)", self.size.strip())
        return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)] if m else None

    def to_dict(self) -> dict:
        return {
            "level": self.level,
            "type": self.type,
            "size": self.size,
            "size-bytes": self.size_bytes,
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
#
# Every reader of /proc/PID in virtopt is here (the gdb pack, the QMP layer and the host tools call
# these): standard library only, since gdb's own Python imports this module. Process readers take
# ``pid`` (and ``tid``) first and ``root`` last; like the rest they raise OSError when the file is not
# there or not readable (FileNotFoundError: the process is gone).


def pids(root: str = "/") -> list[int]:
    return sorted(int(n) for n in listdir(root, "proc") if n.isdigit())


def proc_path(pid: int, rel: str = "", tid: Optional[int] = None, root: str = "/") -> str:
    """The path of /proc/PID[/task/TID]/REL under root (e.g. to open /proc/PID/exe or /proc/PID/fd/2)."""
    base = f"proc/{pid}" if tid is None else f"proc/{pid}/task/{tid}"
    return path(root, f"{base}/{rel}" if rel else base)


def exists_process(pid: int, root: str = "/") -> bool:
    return os.path.isdir(proc_path(pid, root=root))


def comm(pid: int, tid: Optional[int] = None, root: str = "/") -> str:
    """The thread (or process) name, as QEMU sets it with -name NAME,debug-threads=on ("CPU 0/KVM")."""
    return read_file(proc_path(pid, "comm", tid, root)).rstrip("\n")


def tids(pid: int, root: str = "/") -> list[int]:
    return sorted(int(n) for n in os.listdir(proc_path(pid, "task", root=root)) if n.isdigit())


def parse_stat(text: str) -> list[str]:
    """/proc/PID/stat split into fields 1..52 (index 0 = field 1); the comm may contain spaces and ')'."""
    lp = text.find("(")
    rp = text.rfind(")")
    if lp < 0 or rp < lp:
        raise ValueError("not a /proc stat line")
    return [text[:lp].strip(), text[lp + 1 : rp], *text[rp + 1 :].split()]


def task_stat(pid: int, tid: int, root: str = "/") -> list[str]:
    return parse_stat(read_file(proc_path(pid, "stat", tid, root)))


def last_cpu(stat: list[str]) -> Optional[int]:
    """The CPU a task last ran on: stat field 39 ("processor")."""
    return int(stat[38]) if len(stat) > 38 and stat[38].lstrip("-").isdigit() else None


def status(pid: int, tid: Optional[int] = None, root: str = "/") -> dict[str, str]:
    out: dict[str, str] = {}
    for line in read_file(proc_path(pid, "status", tid, root)).splitlines():
        k, _, v = line.partition(":")
        out[k.strip()] = v.strip()
    return out


def affinity(pid: int, tid: Optional[int] = None, root: str = "/") -> list[int]:
    """The CPUs a task may run on (Cpus_allowed_list of its status)."""
    return parse_cpu_list(status(pid, tid, root).get("Cpus_allowed_list", ""))


def argv(pid: int, root: str = "/") -> list[str]:
    """The command line of a process, one argument per item ([] for a kernel thread or a zombie)."""
    with open(proc_path(pid, "cmdline", root=root), "rb") as f:
        raw = f.read(MAX_READ)
    return [a.decode("utf-8", errors="replace") for a in raw.split(b"\0")[:-1]] if raw else []


def exe(pid: int, root: str = "/") -> str:
    """The executable of a process (the /proc/PID/exe link; " (deleted)" when the file was replaced since)."""
    return os.readlink(proc_path(pid, "exe", root=root))


def cwd(pid: int, root: str = "/") -> str:
    """The working directory of a process (relative paths on QEMU's command line are relative to it)."""
    return os.readlink(proc_path(pid, "cwd", root=root))


def fd_target(pid: int, fd: int, root: str = "/") -> str:
    """What an open file descriptor of a process is: a path, "socket:[INODE]", "anon_inode:kvm-vcpu:0"."""
    return os.readlink(proc_path(pid, f"fd/{fd}", root=root))


def fds(pid: int, root: str = "/") -> dict[int, str]:
    """Every open file descriptor of a process and what it is (descriptors closed while read are left out)."""
    out: dict[int, str] = {}
    for name in os.listdir(proc_path(pid, "fd", root=root)):
        if name.isdigit():
            try:
                out[int(name)] = fd_target(pid, int(name), root)
            except OSError:
                continue
    return out


_KVM_VCPU = re.compile(r"^anon_inode:kvm-vcpu:(\d+)$")


def kvm_vcpu_fds(pid: int, root: str = "/") -> dict[int, int]:
    """{vCPU id: fd} of the process's KVM vCPU file descriptors (anon_inode:kvm-vcpu:N)."""
    out: dict[int, int] = {}
    for fd, target in sorted(fds(pid, root).items()):
        m = _KVM_VCPU.match(target)
        if m:
            out.setdefault(int(m.group(1)), fd)
    return out


@dataclass
class Mapping:
    """One line of /proc/PID/maps."""

    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str  # "" for anonymous memory; "[heap]", "anon_inode:kvm-vcpu:0", a file path


def maps(pid: int, root: str = "/") -> list[Mapping]:
    out: list[Mapping] = []
    for line in read_file(proc_path(pid, "maps", root=root), limit=256 << 20).splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5 or "-" not in parts[0]:
            continue
        lo, _, hi = parts[0].partition("-")
        try:
            out.append(Mapping(int(lo, 16), int(hi, 16), parts[1], int(parts[2], 16), int(parts[4]),
                               parts[5].strip() if len(parts) > 5 else ""))
        except ValueError:
            continue
    return out


def kvm_run_maps(pid: int, root: str = "/") -> dict[int, int]:
    """{vCPU id: address of its struct kvm_run} (the kvm-vcpu:N mapping at file offset 0)."""
    out: dict[int, int] = {}
    for m in maps(pid, root):
        mo = _KVM_VCPU.match(m.path)
        if mo and m.offset == 0:
            out.setdefault(int(mo.group(1)), m.start)
    return out


@dataclass
class Syscall:
    """/proc/PID/task/TID/syscall: the system call a blocked thread sits in (nr -1: in user space)."""

    nr: int
    args: list[int]  # up to six arguments
    sp: Optional[int] = None  # the thread's user stack pointer and program counter (the line's last two)
    pc: Optional[int] = None


def task_syscall(pid: int, tid: int, root: str = "/") -> Optional[Syscall]:
    """None when the thread is running (the kernel says "running") or the line does not parse."""
    fields = read_file(proc_path(pid, "syscall", tid, root)).split()
    if not fields or not fields[0].lstrip("-").isdigit():
        return None
    try:
        sp, pc = (int(fields[-2], 16), int(fields[-1], 16)) if len(fields) in (3, 9) else (None, None)
        return Syscall(int(fields[0]), [int(a, 16) for a in fields[1:7]], sp, pc)
    except ValueError:
        return None


def smaps_rollup(pid: int, root: str = "/") -> dict[str, int]:
    """smaps_rollup in bytes; falls back to summing smaps (kernels before 4.14)."""
    try:
        return kb_fields(read_file(proc_path(pid, "smaps_rollup", root=root)))
    except FileNotFoundError:
        return kb_fields(read_file(proc_path(pid, "smaps", root=root), limit=256 << 20))


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


# ---------------------------------------------------------------- sockets


def _proc_net_addr(family: int, addr: tuple[str, int]) -> str:
    import socket

    raw = socket.inet_pton(family, addr[0])
    if family == socket.AF_INET:
        text = raw[::-1].hex().upper()
    else:  # four 32-bit words, each in host (little-endian) order
        text = "".join(raw[i:i + 4][::-1].hex().upper() for i in range(0, 16, 4))
    return f"{text}:{addr[1]:04X}"


def tcp_socket_inode(family: int, local: tuple[str, int], remote: tuple[str, int], root: str = "/") -> Optional[int]:
    """The inode of the TCP socket of this host whose local end is ``local`` and remote end ``remote``
    (/proc/net/tcp or tcp6 by ``family``); None when there is none."""
    import socket

    table = "proc/net/tcp" if family == socket.AF_INET else "proc/net/tcp6"
    want_l, want_r = _proc_net_addr(family, local), _proc_net_addr(family, remote)
    for ln in read_text(root, table, limit=256 << 20).splitlines()[1:]:
        f = ln.split()
        if len(f) > 9 and f[1] == want_l and f[2] == want_r and f[9].isdigit():
            return int(f[9])
    return None


def socket_owner(inode: int, root: str = "/") -> Optional[int]:
    """The PID of a process holding the socket with this inode open (/proc/*/fd), None when none is seen."""
    target = f"socket:[{inode}]"
    for pid in pids(root):
        try:
            names = os.listdir(proc_path(pid, "fd", root=root))
        except OSError:
            continue
        for name in names:
            try:
                if os.readlink(proc_path(pid, f"fd/{name}", root=root)) == target:
                    return pid
            except OSError:
                continue
    return None


# ---------------------------------------------------------------- QEMU processes

# An executable is QEMU's system emulator when its file name is one of these (Debian/upstream
# qemu-system-ARCH, RHEL's /usr/libexec/qemu-kvm, Debian's old kvm). qemu-img, qemu-io, qemu-nbd and
# the user-mode qemu-ARCH run no VM.
QEMU_EXE = re.compile(r"^(qemu-system-[A-Za-z0-9_]+|qemu-kvm|kvm)$")


def is_qemu_executable(file: str) -> bool:
    name = file[: -len(" (deleted)")] if file.endswith(" (deleted)") else file
    return bool(QEMU_EXE.match(os.path.basename(name)))


def split_opts(value: str) -> list[str]:
    """The comma-separated items of a QEMU option string, ",," being a comma inside an item
    (QemuOpts: get_opt_value() in util/qemu-option.c; -blockdev key=value: keyval_parse_one() in
    util/keyval.c; the same in 7.2 and 10.0)."""
    items: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(value):
        c = value[i]
        if c == ",":
            if value[i + 1:i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    items.append("".join(cur))
    return items


def _qemu_opts(value: str, implied: str) -> dict[str, str]:
    """A QemuOpts string ("NAME,debug-threads=on", "guest=NAME,...") as a dict; ",," is a comma.

    QEMU's opts_do_parse() (util/qemu-option.c, 7.2 and 10.0): the first item without "=" is the
    implied key's value; a later bare "key" means key=on.
    """
    out: dict[str, str] = {}
    for n, item in enumerate(split_opts(value)):
        k, sep, v = item.partition("=")
        if not sep:
            if n == 0 and implied:
                out[implied] = item
            elif item:
                out[item[2:] if item.startswith("no") else item] = "off" if item.startswith("no") else "on"
        else:
            out[k] = v
    return out


def _opt_values(args: list[str], *names: str) -> list[str]:
    """Values of -OPT VALUE / --OPT VALUE / --OPT=VALUE on a QEMU command line."""
    out: list[str] = []
    i = 1
    while i < len(args):
        a = args[i]
        key, eq, val = a.partition("=") if a.startswith("--") else (a, "", "")
        if key.startswith("--"):
            key = key[1:]
        if key in names:
            if eq:
                out.append(val)
            elif i + 1 < len(args):
                out.append(args[i + 1])
                i += 1
        i += 1
    return out


def qemu_vm_name(args: list[str]) -> Optional[str]:
    """The guest name of QEMU's -name option (-name NAME,... or libvirt's -name guest=NAME,...); the last
    -name wins, as in QEMU."""
    names = _opt_values(args, "-name")
    if not names:
        return None
    return _qemu_opts(names[-1], "guest").get("guest") or None


def qemu_qmp_addresses(args: list[str], cwd: str = "/") -> list[str]:
    """The QMP monitors QEMU listens on, from its command line: -qmp/-qmp-pretty unix:PATH or tcp:HOST:PORT,
    and -chardev socket (path= or host=,port=, server) used by a -mon mode=control. Unix paths are made
    absolute with QEMU's working directory; monitors passed as fd= (libvirt) have no address."""
    out: list[str] = []

    def add(spec: str) -> None:
        kind, _, rest = spec.partition(":")
        if kind == "unix":
            p = rest.split(",", 1)[0]
            out.append(p if os.path.isabs(p) else os.path.join(cwd, p))
        elif kind == "tcp":
            out.append(rest.split(",", 1)[0])

    for v in _opt_values(args, "-qmp", "-qmp-pretty"):
        add(v)
    chardevs: dict[str, dict[str, str]] = {}
    for v in _opt_values(args, "-chardev"):
        o = _qemu_opts(v, "backend")
        if o.get("backend") in ("socket", "unix", "tcp") and o.get("id"):
            chardevs[o["id"]] = o
    for v in _opt_values(args, "-mon"):
        o = _qemu_opts(v, "chardev")
        cd = chardevs.get(o.get("chardev", ""))
        if o.get("mode") != "control" or cd is None or cd.get("server", "off") not in ("on", "yes", "y"):
            continue
        if "path" in cd:
            add("unix:" + cd["path"])
        elif "port" in cd:
            add(f"tcp:{cd.get('host') or 'localhost'}:{cd['port']}")
    return out


@dataclass
class Process:
    """Who a process is: enough to decide whether it is QEMU, before anything reads or changes it."""

    pid: int
    comm: str
    exe: Optional[str]  # /proc/PID/exe, None when not readable (another user's process; a kernel thread)
    argv: list[str]

    @property
    def is_qemu(self) -> bool:
        """QEMU's system emulator: by its executable, or by argv[0] when the executable is not readable."""
        if self.exe is not None:
            return is_qemu_executable(self.exe)
        return bool(self.argv) and is_qemu_executable(self.argv[0])

    @property
    def vm_name(self) -> Optional[str]:
        return qemu_vm_name(self.argv) if self.is_qemu else None

    @property
    def exe_text(self) -> str:
        """The executable for messages: the link, else argv[0], else "?"."""
        return self.exe or (self.argv[0] if self.argv else "?")


def process(pid: int, root: str = "/") -> Process:
    """Name, executable and command line of a process; FileNotFoundError when there is no such process."""
    name = comm(pid, root=root)
    try:
        ex: Optional[str] = exe(pid, root)
    except OSError:
        ex = None
    try:
        args = argv(pid, root)
    except OSError:
        args = []
    return Process(pid, name, ex, args)


def qemu_processes(root: str = "/") -> list[Process]:
    """Every QEMU system emulator running (under root), in PID order."""
    out: list[Process] = []
    for pid in pids(root):
        try:
            p = process(pid, root)
        except (OSError, ValueError):
            continue
        if p.is_qemu:
            out.append(p)
    return out


# ---------------------------------------------------------------- kernel build config


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
            tlist = tids(pid, root)
        except OSError:
            continue
        for tid in tlist:
            try:
                st = task_stat(pid, tid, root)
                aff = status(pid, tid, root).get("Cpus_allowed_list", "")
                flags = int(st[8])
                affinity = parse_cpu_list(aff)
            except (OSError, ValueError, IndexError):
                continue
            out.append(Task(pid, tid, st[1], last_cpu(st), affinity, bool(flags & PF_KTHREAD)))
    return out
