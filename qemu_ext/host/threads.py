"""QEMU's threads and their roles, and pinning them like qemu-affinity.

Roles (qemu_ext.host.roles, the one table every thread view uses) come from QMP when its answers
are given (query-cpus-fast and query-iothreads "thread-id" fields; for a libvirt domain libvirt's
own record of them), otherwise from the thread names QEMU sets with ``-name NAME,debug-threads=on``
("CPU 0/KVM", "IO iothread0", "IO mon_iothread", "worker", "trace-thread", ...). The main loop is
the thread whose TID is the PID.

One thread has no name even with debug-threads=on: call_rcu, created by a constructor before QEMU
parses -name (seen on QEMU 7.2 with gdb: the unnamed second thread is in call_rcu_thread()). When
the other threads carry debug-thread names, the one unnamed non-main thread is reported as call_rcu,
identified by "inferred".

Single-threaded TCG (``-accel tcg,thread=single``) runs every vCPU on one thread ("ALL CPUs/TCG";
query-cpus-fast gives every vCPU the same thread-id): that thread is the vCPU role with no index.

Nothing here reads a process before checking that it is QEMU (qemu_ext.host.target.require_qemu).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from qemu_ext.errors import BadInputError, NotAvailableError, VirtoptError
from qemu_ext.host import procfs, roles
from qemu_ext.host.target import require_qemu


@dataclass
class ThreadInfo:
    """One thread of a QEMU process."""

    tid: int
    name: str  # comm (/proc/PID/task/TID/comm)
    role: str  # a key of roles.ROLES
    vcpu_index: Optional[int]  # the vCPU index (QMP cpu-index) when role == "vcpu" (None: every vCPU, ST-TCG)
    iothread_id: Optional[str]  # the iothread id when role == "iothread"
    last_cpu: Optional[int]  # the CPU it last ran on (/proc/PID/task/TID/stat field 39)
    affinity: list[int]  # CPUs it may run on (Cpus_allowed_list)
    identified_by: Optional[str]  # a key of roles.IDENTIFIED_BY (None: nothing told the role, "other")
    extra: dict[str, Any] = field(default_factory=dict)  # view-specific keys, after the common ones in JSON

    @property
    def label(self) -> str:
        """"vCPU 0", "iothread io0", "main loop", ... (roles.label)"""
        return roles.label(self.role, self.vcpu_index, self.iothread_id)

    def to_dict(self) -> dict[str, Any]:
        """The JSON of CONTRIBUTING.md "Threads" (roles.JSON_KEYS), then any view-specific keys."""
        d = roles.thread_json(self.tid, self.name, self.role, self.vcpu_index, self.iothread_id,
                              self.last_cpu, procfs.format_cpu_list(self.affinity), self.identified_by)
        d.update(self.extra)
        return d

    def row(self) -> list[str]:
        """The cells of roles.COLUMNS."""
        return roles.row(self.to_dict())


def _by_thread_id(entries: Optional[list[dict]], what: str, key: str) -> dict[int, list[Any]]:
    out: dict[int, list[Any]] = {}
    for e in entries or []:
        if not isinstance(e, dict) or not isinstance(e.get("thread-id"), int):
            raise BadInputError(f"{what} entry without an integer thread-id: {e!r}")
        out.setdefault(e["thread-id"], []).append(e.get(key))
    return out


def thread_map(
    pid: int,
    vcpus: Optional[list[dict]] = None,
    iothreads: Optional[list[dict]] = None,
    root: str = "/",
    source: str = "qmp",
) -> list[ThreadInfo]:
    """Every thread of QEMU process ``pid`` with its role, last CPU and affinity, in TID order.

    vcpus: the return of QMP query-cpus-fast; iothreads: the return of query-iothreads (``source``:
    "qmp", or "libvirt" when they are libvirt's record). Raises VirtoptError when the process does
    not exist or is not QEMU (checked before anything else is read).
    """
    require_qemu(pid, root)
    try:
        tids = procfs.tids(pid, root)
    except FileNotFoundError as exc:
        raise VirtoptError(f"no process {pid}") from exc
    except PermissionError as exc:
        raise NotAvailableError(f"cannot read the threads of process {pid}: permission denied") from exc
    by_vcpu = _by_thread_id(vcpus, "query-cpus-fast", "cpu-index")
    by_io = _by_thread_id(iothreads, "query-iothreads", "id")
    known_io = {str(i) for ids in by_io.values() for i in ids}
    out: list[ThreadInfo] = []
    for tid in tids:
        try:
            name = procfs.comm(pid, tid, root)
            stat = procfs.task_stat(pid, tid, root)
            affinity = procfs.affinity(pid, tid, root)
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended while we read (a worker going away)
        vcpu: Optional[int] = None
        io: Optional[str] = None
        if tid == pid:
            role, how = "main-loop", "pid"
        elif tid in by_vcpu:
            idx = by_vcpu[tid]
            role, how = "vcpu", source
            vcpu = idx[0] if len(idx) == 1 else None  # single-threaded TCG: one thread, every vCPU
        elif tid in by_io:
            role, how, io = "iothread", source, str(by_io[tid][0])
        else:
            role, vcpu, io = roles.role_from_name(name)
            how = "name" if role != "other" else None
            if role == "iothread" and by_io and io not in known_io:
                role, io = "other", None  # a name like an iothread's that QMP does not know
            if role == "vcpu" and by_vcpu and vcpu is not None:
                role, vcpu = "other", None  # QMP knows every vCPU thread: this name is not one
        out.append(ThreadInfo(tid, name, role, vcpu, io, procfs.last_cpu(stat), affinity, how))
    _infer_call_rcu(out, pid)
    return out


def _infer_call_rcu(threads: list[ThreadInfo], pid: int) -> None:
    main = next((t for t in threads if t.tid == pid), None)
    if main is None or any(t.role == "call-rcu" for t in threads):
        return
    named = any(t.identified_by == "name" and t.role not in ("other", "kvm-kernel") for t in threads)
    if not named:
        return  # no debug-thread names at all: nothing tells the unnamed threads apart
    unnamed = [t for t in threads if t.tid != pid and t.role == "other" and t.name == main.name]
    if len(unnamed) == 1:
        unnamed[0].role = "call-rcu"
        unnamed[0].identified_by = "inferred"


# ---------------------------------------------------------------- pinning


@dataclass
class PinResult:
    tid: int
    name: str
    role: str  # a key of roles.ROLES
    label: str  # "vCPU 0", "iothread io0", ...
    key: str  # the plan key that selected it
    requested: list[int]
    before: list[int]
    after: list[int]  # read back from /proc after sched_setaffinity

    def to_dict(self) -> dict[str, Any]:
        return {
            "tid": self.tid,
            "name": self.name,
            "role": self.role,
            "label": self.label,
            "key": self.key,
            "requested": procfs.format_cpu_list(self.requested),
            "before": procfs.format_cpu_list(self.before),
            "after": procfs.format_cpu_list(self.after),
        }


PIN_KEYS_HELP = (
    "vcpuN (one vCPU), vcpu (every vCPU), io (every iothread), io:ID (one iothread), "
    "main, mon (monitor iothread), worker, rcu (call_rcu), trace"
)

# the pin keys of roles.PIN_KEYS plus the spellings users type (role values and labels)
_PIN_ALIASES: dict[str, str] = {
    **roles.PIN_KEYS,
    "vcpus": "vcpu",
    "iothread": "iothread",
    "iothreads": "iothread",
    "main-loop": "main-loop",
    "monitor": "monitor-iothread",
    "monitor-iothread": "monitor-iothread",
    "workers": "worker",
    "call_rcu": "call-rcu",
    "call-rcu": "call-rcu",
    "trace-writer": "trace-writer",
}


def select_threads(threads: list[ThreadInfo], key: str) -> list[ThreadInfo]:
    """The threads a plan key names (see PIN_KEYS_HELP); [] when none is there."""
    k = key.strip().lower()
    m = re.fullmatch(r"vcpu(\d+)", k)
    if m:
        return [t for t in threads if t.role == "vcpu" and t.vcpu_index == int(m.group(1))]
    if k.startswith(("io:", "iothread:")):
        want = key.split(":", 1)[1]
        return [t for t in threads if t.role == "iothread" and t.iothread_id == want]
    role = _PIN_ALIASES.get(k)
    if role is None:
        raise BadInputError(f"unknown thread role {key!r}; use {PIN_KEYS_HELP}")
    return [t for t in threads if t.role == role]


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
    source: str = "qmp",
) -> list[PinResult]:
    """Set the CPU affinity of QEMU's threads by role, like qemu-affinity.

    plan: {"vcpu0": [2], "vcpu1": [3], "io": [4]} (keys: PIN_KEYS_HELP). The process must be QEMU,
    every key must name at least one thread and every CPU must be online, or VirtoptError is raised
    before any affinity changes. Returns each pinned thread with its affinity before and after
    (read back).
    """
    if not plan:
        raise BadInputError("empty pin plan")
    threads = thread_map(pid, vcpus, iothreads, root=root, source=source)  # refuses a process that is not QEMU
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
            after = procfs.affinity(pid, t.tid, root)
        except FileNotFoundError:
            continue
        results.append(PinResult(t.tid, t.name, t.role, t.label, key, cpus, t.affinity, after))
    return results
