"""QEMU's threads and their roles, and pinning them like qemu-affinity.

Roles come from QMP when its answers are given (query-cpus-fast and
query-iothreads "thread-id" fields), otherwise from the thread names QEMU sets
with ``-name NAME,debug-threads=on`` ("CPU 0/KVM", "IO iothread0",
"IO mon_iothread", "worker", "trace-thread", ...). The main loop is the thread
whose TID is the PID.

One thread has no name even with debug-threads=on: call_rcu, created by a
constructor before QEMU parses -name (seen on QEMU 7.2 with gdb: the unnamed
second thread is in call_rcu_thread()). When the other threads carry
debug-thread names, the one unnamed non-main thread is reported as call_rcu
with source "inferred".
"""

from __future__ import annotations

import os
import re
import socket
import struct
from dataclasses import dataclass
from typing import Any, Optional

from qemu_ext.errors import BadInputError, NotAvailableError, QemuError, VirtoptError
from qemu_ext.host import procfs

_VCPU_NAME = re.compile(r"^CPU (\d+)/(KVM|TCG|HVF|WHPX|NVMM|HAX)$")

# comm name -> role (exact names QEMU gives its threads)
_NAMED_ROLES = {
    "IO mon_iothread": "monitor iothread",
    "call_rcu": "call_rcu",
    "worker": "worker",
    "trace-thread": "trace",
    "vnc_worker": "vnc worker",
    "SPICE Worker": "spice worker",
    "live_migration": "migration",
    "postcopy/listen": "migration",
    "kvm-nx-lpage-re": "kvm nx-lpage recovery",  # the kernel's per-VM worker, in QEMU's thread group
}


@dataclass
class ThreadInfo:
    """One thread of a QEMU process."""

    tid: int
    name: str  # comm (/proc/PID/task/TID/comm)
    role: str  # "main loop", "vcpu", "iothread", "monitor iothread", "worker", "call_rcu", "trace", ..., "other"
    vcpu: Optional[int]  # the vCPU index (QMP cpu-index) when role == "vcpu"
    iothread: Optional[str]  # the iothread id when role == "iothread"
    last_cpu: Optional[int]  # the CPU it last ran on (/proc/PID/task/TID/stat field 39)
    affinity: list[int]  # CPUs it may run on (Cpus_allowed_list)
    source: str  # where the role came from: "pid", "qmp", "comm", "inferred"

    @property
    def label(self) -> str:
        """"vCPU 0", "iothread io0", "main loop", ..."""
        if self.role == "vcpu":
            return f"vCPU {self.vcpu}"
        if self.role == "iothread":
            return f"iothread {self.iothread}"
        return self.role

    def to_dict(self) -> dict[str, Any]:
        return {
            "tid": self.tid,
            "name": self.name,
            "role": self.role,
            "label": self.label,
            "vcpu": self.vcpu,
            "iothread": self.iothread,
            "last-cpu": self.last_cpu,
            "affinity": procfs.format_cpu_list(self.affinity),
            "affinity-cpus": list(self.affinity),
            "source": self.source,
        }


def _role_from_comm(name: str) -> tuple[str, Optional[int], Optional[str]]:
    m = _VCPU_NAME.match(name)
    if m:
        return "vcpu", int(m.group(1)), None
    if name in _NAMED_ROLES:
        return _NAMED_ROLES[name], None, None
    if name.startswith("IO "):
        return "iothread", None, name[3:]
    if name.startswith("mig/") or name.startswith("multifdsend") or name.startswith("multifdrecv"):
        return "migration", None, None
    if name.startswith("vhost-"):
        return "vhost", None, None
    return "other", None, None


def _thread_ids(entries: Optional[list[dict]], what: str) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for e in entries or []:
        if not isinstance(e, dict) or not isinstance(e.get("thread-id"), int):
            raise BadInputError(f"{what} entry without an integer thread-id: {e!r}")
        out.setdefault(e["thread-id"], e)  # single-threaded TCG: every vCPU has the same thread; keep the first
    return out


def thread_map(
    pid: int,
    vcpus: Optional[list[dict]] = None,
    iothreads: Optional[list[dict]] = None,
    root: str = "/",
) -> list[ThreadInfo]:
    """Every thread of QEMU process ``pid`` with its role, last CPU and affinity, in TID order.

    vcpus: the return of QMP query-cpus-fast; iothreads: the return of query-iothreads.
    Raises QemuError when the process does not exist (or exits while being read).
    """
    try:
        tids = procfs.tids(root, pid)
    except FileNotFoundError as exc:
        raise QemuError(f"no process {pid} ({procfs.path(root, f'proc/{pid}')} not found)") from exc
    except PermissionError as exc:
        raise NotAvailableError(f"cannot read the threads of process {pid}: permission denied") from exc
    by_vcpu = _thread_ids(vcpus, "query-cpus-fast")
    by_io = _thread_ids(iothreads, "query-iothreads")
    out: list[ThreadInfo] = []
    for tid in tids:
        try:
            name = procfs.comm(root, pid, tid)
            stat = procfs.task_stat(root, pid, tid)
            st = procfs.status(root, pid, tid)
        except FileNotFoundError:
            continue  # the thread ended while we read (a worker going away)
        last_cpu = int(stat[38]) if len(stat) > 38 and stat[38].lstrip("-").isdigit() else None
        affinity = procfs.parse_cpu_list(st.get("Cpus_allowed_list", ""))
        vcpu: Optional[int] = None
        io: Optional[str] = None
        if tid == pid:
            role, source = "main loop", "pid"
        elif tid in by_vcpu:
            role, source, vcpu = "vcpu", "qmp", by_vcpu[tid].get("cpu-index")
        elif tid in by_io:
            role, source, io = "iothread", "qmp", str(by_io[tid].get("id"))
        else:
            role, vcpu, io = _role_from_comm(name)
            source = "comm"
            if role == "iothread" and by_io and io not in {str(e.get("id")) for e in by_io.values()}:
                role, io = "other", None  # a name like an iothread's that QMP does not know
        out.append(ThreadInfo(tid, name, role, vcpu, io, last_cpu, affinity, source))
    _infer_call_rcu(out, pid)
    return out


def _infer_call_rcu(threads: list[ThreadInfo], pid: int) -> None:
    main = next((t for t in threads if t.tid == pid), None)
    if main is None or any(t.role == "call_rcu" for t in threads):
        return
    named = any(t.source == "comm" and t.role not in ("other", "kvm nx-lpage recovery") for t in threads)
    if not named:
        return  # no debug-thread names at all: nothing tells the unnamed threads apart
    unnamed = [t for t in threads if t.tid != pid and t.role == "other" and t.name == main.name]
    if len(unnamed) == 1:
        unnamed[0].role = "call_rcu"
        unnamed[0].source = "inferred"


# ---------------------------------------------------------------- QMP


def qmp_peer_pid(sock: socket.socket) -> int:
    """The PID of the process listening on a connected unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[0]


@dataclass
class QmpThreads:
    pid: int
    vcpus: list[dict]
    iothreads: list[dict]


def query_qmp(socket_path: str, timeout: float = 10.0) -> QmpThreads:
    """Connect to a QMP unix socket and return QEMU's PID (SO_PEERCRED), query-cpus-fast and query-iothreads.

    QEMU's QMP monitor serves one client at a time: while another client (libvirt, a shell) holds the
    socket, QEMU does not greet and this fails after ``timeout`` seconds with a QemuError saying so.
    """
    import asyncio

    from qemu.qmp import QMPClient

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.settimeout(None)
    except OSError as exc:
        sock.close()
        raise QemuError(f"cannot connect to QMP socket {socket_path}: {exc.strerror or exc}") from exc
    pid = qmp_peer_pid(sock)

    async def talk() -> tuple[Any, Any]:
        client = QMPClient("virtopt-threads")
        try:
            await asyncio.wait_for(client.connect(sock), timeout)
            vcpus = await asyncio.wait_for(client.execute("query-cpus-fast"), timeout)
            iothreads = await asyncio.wait_for(client.execute("query-iothreads"), timeout)
            return vcpus, iothreads
        finally:
            try:
                await client.disconnect()
            except Exception:
                pass

    try:
        vcpus, iothreads = asyncio.run(talk())
    except asyncio.TimeoutError as exc:
        raise QemuError(
            f"QMP socket {socket_path}: no answer within {timeout:g} s (QEMU's QMP serves one client at a "
            "time: is another client connected? give QEMU a second -qmp socket)"
        ) from exc
    except Exception as exc:  # qemu.qmp raises many kinds (ConnectError, ExecuteError, EOF)
        raise QemuError(f"QMP on {socket_path} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        sock.close()
    if not isinstance(vcpus, list) or not isinstance(iothreads, list):
        raise QemuError(f"QMP on {socket_path}: unexpected answers to query-cpus-fast / query-iothreads")
    return QmpThreads(pid, vcpus, iothreads)


# ---------------------------------------------------------------- pinning


@dataclass
class PinResult:
    tid: int
    name: str
    role: str  # the ThreadInfo label: "vCPU 0", "iothread io0", ...
    key: str  # the plan key that selected it
    requested: list[int]
    before: list[int]
    after: list[int]  # read back from /proc after sched_setaffinity

    def to_dict(self) -> dict[str, Any]:
        return {
            "tid": self.tid,
            "name": self.name,
            "role": self.role,
            "key": self.key,
            "requested": procfs.format_cpu_list(self.requested),
            "before": procfs.format_cpu_list(self.before),
            "after": procfs.format_cpu_list(self.after),
        }


PIN_KEYS_HELP = (
    "vcpuN (one vCPU), vcpus (every vCPU), io (every iothread), io:ID (one iothread), "
    "main, monitor, worker, call_rcu, trace"
)


def select_threads(threads: list[ThreadInfo], key: str) -> list[ThreadInfo]:
    """The threads a plan key names (see PIN_KEYS_HELP); [] when none is there."""
    k = key.strip().lower()
    m = re.fullmatch(r"vcpu(\d+)", k)
    if m:
        return [t for t in threads if t.role == "vcpu" and t.vcpu == int(m.group(1))]
    if k in ("vcpu", "vcpus"):
        return [t for t in threads if t.role == "vcpu"]
    if k in ("io", "iothread", "iothreads"):
        return [t for t in threads if t.role == "iothread"]
    if k.startswith("io:") or k.startswith("iothread:"):
        want = key.split(":", 1)[1]
        return [t for t in threads if t.role == "iothread" and t.iothread == want]
    if k in ("main", "main loop", "main-loop"):
        return [t for t in threads if t.role == "main loop"]
    if k in ("monitor", "mon", "monitor iothread"):
        return [t for t in threads if t.role == "monitor iothread"]
    if k in ("worker", "workers"):
        return [t for t in threads if t.role == "worker"]
    if k in ("call_rcu", "rcu"):
        return [t for t in threads if t.role == "call_rcu"]
    if k in ("trace",):
        return [t for t in threads if t.role == "trace"]
    raise BadInputError(f"unknown thread role {key!r}; use {PIN_KEYS_HELP}")


def parse_pin_plan(text: str) -> dict[str, list[int]]:
    """"vcpu0=2,vcpu1=3,io=4-5" -> {"vcpu0": [2], "vcpu1": [3], "io": [4, 5]}.

    A comma-separated item without "=" extends the previous key's CPUs ("vcpu0=2,3,vcpu1=4").
    """
    plan: dict[str, list[int]] = {}
    last: Optional[str] = None
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" in item:
            key, _, cpus = item.partition("=")
            key = key.strip()
            if not key:
                raise BadInputError(f"bad pin plan {text!r}: empty role before '='")
            last = key
            plan.setdefault(key, [])
        elif last is None:
            raise BadInputError(f"bad pin plan {text!r}: expected ROLE=CPUS (e.g. vcpu0=2,vcpu1=3,io=4)")
        else:
            cpus = item
        try:
            plan[last] = sorted(set(plan[last]) | set(procfs.parse_cpu_list(cpus)))
        except ValueError as exc:
            raise BadInputError(f"bad pin plan {text!r}: {exc}") from exc
    if not plan:
        raise BadInputError("empty pin plan: expected ROLE=CPUS (e.g. vcpu0=2,vcpu1=3,io=4)")
    return plan


def pin_threads(
    pid: int,
    plan: dict[str, list[int]],
    vcpus: Optional[list[dict]] = None,
    iothreads: Optional[list[dict]] = None,
    root: str = "/",
) -> list[PinResult]:
    """Set the CPU affinity of QEMU's threads by role, like qemu-affinity.

    plan: {"vcpu0": [2], "vcpu1": [3], "io": [4]} (keys: PIN_KEYS_HELP). Every key must name at
    least one thread and every CPU must be online and allowed, or VirtoptError is raised before any
    affinity changes. Returns each pinned thread with its affinity before and after (read back).
    """
    if not plan:
        raise BadInputError("empty pin plan")
    threads = thread_map(pid, vcpus, iothreads, root=root)
    try:
        online = set(procfs.online_cpus(root))
    except (OSError, ValueError):
        online = set(os.sched_getaffinity(0))
    # resolve and check everything first: nothing changes unless the whole plan is valid
    work: list[tuple[str, ThreadInfo, list[int]]] = []
    missing: list[str] = []
    for key, cpus in plan.items():
        if not cpus:
            raise BadInputError(f"no CPUs given for {key!r}")
        bad = sorted(set(cpus) - online)
        if bad:
            raise BadInputError(
                f"CPU {procfs.format_cpu_list(bad)} for {key!r} is not online (online: {procfs.format_cpu_list(online)})"
            )
        sel = select_threads(threads, key)
        if not sel:
            missing.append(key)
        work += [(key, t, sorted(cpus)) for t in sel]
    if missing:
        have = sorted({t.label for t in threads if t.role not in ("other",)})
        raise VirtoptError(
            f"QEMU pid {pid} has no thread for {', '.join(repr(m) for m in missing)} "
            f"(it has: {', '.join(have)}); nothing was pinned"
        )
    seen: dict[int, str] = {}
    for key, t, _ in work:
        if t.tid in seen and seen[t.tid] != key:
            raise BadInputError(f"thread {t.tid} ({t.label}) is named by both {seen[t.tid]!r} and {key!r}")
        seen[t.tid] = key
    results: list[PinResult] = []
    for key, t, cpus in work:
        try:
            os.sched_setaffinity(t.tid, cpus)
        except ProcessLookupError:
            continue  # a worker that ended meanwhile
        except PermissionError as exc:
            raise NotAvailableError(f"not allowed to set the affinity of thread {t.tid} ({t.label})") from exc
        except OSError as exc:
            raise VirtoptError(f"sched_setaffinity({t.tid}, {cpus}) failed: {exc.strerror}") from exc
        try:
            after = procfs.parse_cpu_list(procfs.status(root, pid, t.tid).get("Cpus_allowed_list", ""))
        except FileNotFoundError:
            continue
        results.append(PinResult(t.tid, t.name, t.label, key, cpus, t.affinity, after))
    return results
