"""`threads`: every thread of QEMU with its role (qemu_ext.host.roles: the one role table) and who
holds the BQL.

A thread's role comes from, in order: QEMU's CPUState (thread_id, with debug info), its name
(``-name ...,debug-threads=on``), being the main thread, the KVM_RUN ioctl it sits in (live), or
the start routine found on its stack (the return addresses above its stack pointer that fall in
one of roles.FUNCTION_ROLES' functions: QEMU's qemu_thread_start calls the routine, so its frame
is on the stack for the thread's life). The stack scan reads memory only: it works the same for
gdb, drgn and on cores.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from qemu_ext.errors import BadInputError
from qemu_ext.host import procfs, roles

from . import common, vcpus
from .target import IntrospectError, Target

SYS_IOCTL = 16  # x86-64
KVM_RUN = 0xAE80
STACK_SCAN = 128 << 10  # bytes above the stack pointer searched for the start routine

common.register("threads", "QEMU's threads mapped to roles (vCPU n, iothread, main loop, workers) and the BQL holder",
                [])


def bql_owner(t: Target) -> tuple[bool, Optional[int]]:
    """(known, tid holding the BQL or None): pthread_mutex_t.__data.__owner of qemu_global_mutex
    (7.2, softmmu/cpus.c) or bql (renamed in 9.1; 10.0 system/cpus.c)."""
    if t.has_debug_info():
        for name in ("bql", "qemu_global_mutex"):
            m = t.find_var(name)
            if m is not None:
                owner = int(m["lock"]["__data"]["__owner"])
                return True, owner or None
    for name in ("bql", "qemu_global_mutex"):
        addr = t.symbol_address(name)
        if addr is not None:  # glibc x86-64 pthread_mutex_t: int __lock; unsigned __count; int __owner
            owner = t.read_s32(addr + 8)
            return True, owner or None
    return False, None


def kvm_vcpu_of_thread(pid: int, tid: int, name: str) -> Optional[int]:
    """The vCPU id a thread runs when it sits in ioctl(fd, KVM_RUN) on a kvm-vcpu:N fd (live only)."""
    if name.startswith("kvm-"):
        return None  # KVM's kernel workers (kvm-nx-lpage-recovery) start from a vCPU thread's registers
    try:
        sc = procfs.task_syscall(pid, tid)
        if sc is None or sc.nr != SYS_IOCTL or len(sc.args) < 2 or sc.args[1] != KVM_RUN:
            return None
        link = procfs.fd_target(pid, sc.args[0])
    except (OSError, ValueError):
        return None
    mo = re.match(r"^anon_inode:kvm-vcpu:(\d+)$", link)
    return int(mo.group(1)) if mo else None


def stack_pointer(t: Target, tid: int) -> Optional[int]:
    """The thread's stack pointer: its register where the reader sees registers, else the one
    the kernel shows for a thread blocked in a system call (procfs.task_syscall)."""
    if t.can_read_registers:
        return t.register(tid, "rsp")
    if t.kind != "live" or t.pid is None:
        return None
    try:
        sc = procfs.task_syscall(t.pid, tid)
    except (OSError, ValueError):
        return None
    return sc.sp if sc is not None and sc.nr >= 0 else None


def start_routine_role(t: Target, tid: int) -> Optional[str]:
    """The role of the outermost QEMU start routine whose return address is on the thread's stack."""
    sp = stack_pointer(t, tid)
    if not sp:
        return None
    funcs = t.memo.get("role-funcs")
    if funcs is None:
        bias = t.load_bias()
        funcs = []
        for f, role in roles.FUNCTION_ROLES.items():
            sym = t.elf_symbol(f)
            if sym is not None:
                funcs.append((sym.value + bias, sym.value + bias + max(sym.size, 1), role))
        t.memo["role-funcs"] = funcs
    if not funcs:
        return None
    first, last = min(f[0] for f in funcs), max(f[1] for f in funcs)
    found = None
    pos = sp & ~7
    end = pos + STACK_SCAN
    while pos < end:
        chunk = min(4096 - pos % 4096, end - pos)
        try:
            data = t.read(pos, chunk)
        except IntrospectError:
            break  # the top of the stack mapping
        for w in memoryview(data[:chunk - chunk % 8]).cast("Q"):
            if first < w < last:  # most words are no code address of these functions at all
                for lo, hi, role in funcs:
                    if lo < w < hi:
                        found = role  # keep going: the outermost (oldest) frame wins
        pos += chunk
    return found


def _proc_fields(pid: int, tid: int) -> tuple[Optional[int], Optional[str]]:
    """(last CPU, affinity list) of a live thread, from the kernel's stat and status of the task."""
    last = aff = None
    try:
        last = procfs.last_cpu(procfs.task_stat(pid, tid))
    except (OSError, ValueError):
        pass
    try:
        aff = procfs.status(pid, tid).get("Cpus_allowed_list")
    except (OSError, ValueError):
        pass
    return last, aff


def collect(t: Target) -> dict[str, Any]:
    """Every thread with its role (roles.COLUMNS' fields) and who holds the BQL."""
    pid = t.pid
    cpu_by_tid: dict[int, Optional[int]] = {}
    if t.has_debug_info():
        try:
            for c in vcpus.cpu_states(t):
                # single-threaded TCG runs every vCPU in one thread: no one index (roles.label)
                tid = c["thread-id"]
                cpu_by_tid[tid] = None if tid in cpu_by_tid else c["cpu-index"]
        except IntrospectError:
            cpu_by_tid = {}
    names = core_thread_names(t, cpu_by_tid) if t.kind == "core" else {}
    known, owner = bql_owner(t)
    rows = []
    for th in t.threads():
        tid = th.tid
        name = th.name if th.name is not None else names.get(tid)
        role, vcpu, iothread = roles.role_from_name(name or "")
        via: Optional[str] = "name" if role != "other" else None
        if tid in cpu_by_tid:
            role, via, vcpu = "vcpu", "cpu-state", cpu_by_tid[tid]
        elif tid == pid:
            role, via = "main-loop", "pid"
        if role == "other" and t.kind == "live" and pid is not None:
            kv = kvm_vcpu_of_thread(pid, tid, name or "")
            if kv is not None:
                role, via, vcpu = "vcpu", "kvm-vcpu-fd", kv
        if role == "other":
            r = start_routine_role(t, tid)
            if r:
                role, via = r, "stack"
        last, aff = _proc_fields(pid, tid) if t.kind == "live" and pid else (None, None)
        rows.append({
            "tid": tid, "name": name, "role": role, "vcpu-index": vcpu, "iothread-id": iothread,
            "label": roles.label(role, vcpu, iothread), "last-cpu": last, "affinity": aff,
            "identified-by": via, "holds-bql": known and owner == tid,
        })
    return {"pid": pid, "bql": {"known": known, "holder": owner}, "threads": rows}


def core_thread_names(t: Target, cpu_by_tid: dict[int, Optional[int]]) -> dict[int, str]:
    """Thread names of a dead QEMU rebuilt from QEMU's own structures, as qemu_thread_create()
    named them: "CPU N/ACCEL" (cpus_accel: kvm_vcpu_thread_fn names "CPU %d/KVM"), "IO ID"
    (iothread_complete), "IO mon_iothread" (monitor_init_globals)."""
    out: dict[int, str] = {}
    accel = common.accelerator(t).upper()
    for tid, idx in cpu_by_tid.items():
        if idx is None:  # rr_cpu_thread_fn names its one thread "ALL CPUs/TCG"
            out[tid] = "ALL CPUs/TCG"
        else:
            out[tid] = f"CPU {idx}/{accel}" if accel in ("KVM", "TCG") else f"CPU {idx}"
    for tid, ident in iothreads(t).items():
        out[tid] = f"IO {ident}"
    core = t.core_path()
    if core and t.pid is not None and t.pid not in out:
        from . import corefile

        try:
            _pid, fname = corefile.process_info(core)  # NT_PRPSINFO: the main thread's name
        except (OSError, BadInputError, IntrospectError):  # a core removed or changed since it was opened
            fname = None
        if fname:  # the kernel's comm holds 15 characters; gdb's gcore fills 16 from argv[0]
            out[t.pid] = fname[:15]
    return out


def thread_names(t: Target) -> dict[int, str]:
    """tid -> thread name: the OS's on a live QEMU, rebuilt from QEMU's structures on a core."""
    names = {th.tid: th.name for th in t.threads() if th.name is not None}
    if t.kind == "core" and t.has_debug_info():
        cpu_by_tid: dict[int, Optional[int]] = {}
        try:
            for c in vcpus.cpu_states(t):
                cpu_by_tid[c["thread-id"]] = None if c["thread-id"] in cpu_by_tid else c["cpu-index"]
        except IntrospectError:
            pass
        names.update(core_thread_names(t, cpu_by_tid))
    return names


def iothreads(t: Target) -> dict[int, str]:
    """tid -> id of every IOThread object (-object iothread,id=ID) and the monitor's, from QEMU's
    structures (qom.iothreads walks /objects)."""
    if not t.has_debug_info():
        return {}
    from . import qom

    try:
        return {io["thread-id"]: io["id"] for io in qom.iothreads(t) if io["thread-id"]}
    except IntrospectError:
        return {}
