"""`vcpus`: each CPUState (index, thread, halted/stopped, the last KVM exit) — or, without debug
info under KVM, what KVM itself shows (the kvm-vcpu:N fds and their kvm_run mappings)."""

from __future__ import annotations

import re
from typing import Any, Optional

from qemu_ext.gdbmi import kvm
from qemu_ext.host import procfs

from . import common
from .target import IntrospectError, MemoryReadError, Target


def _debug_or_kvm(t: Target, view: str) -> Optional[str]:
    if t.has_debug_info():
        return None
    if t.kind == "live" and common.kvm_enabled(t):
        return None
    if t.kind == "core":
        return (f"virtopt {view} needs QEMU's debug info (DWARF) on a core file "
                "(KVM's own view of the vCPUs died with the process)")
    return (f"virtopt {view} needs QEMU's debug info (DWARF), or KVM (then kvm_run tells the exit reasons), "
            "and this QEMU has neither")


common.register("vcpus", "Per vCPU (CPUState): index, thread id, halted/stopped, and the last KVM exit reason",
                [_debug_or_kvm])


def cpu_list(t: Target) -> list[Any]:
    """CPUState pointers on QEMU's vCPU list: `cpus` (7.2, hw/core/cpu.h) renamed `cpus_queue` (8.2+; 10.0)."""
    head = t.first_var("cpus_queue", "cpus")
    return list(_walk(head))


def _walk(head: Any) -> Any:
    from .target import walk

    return walk(head, "node")


def cpu_states(t: Target) -> list[dict[str, Any]]:
    out = []
    for cpu in cpu_list(t):
        c = cpu.deref()
        kvm_run = c["kvm_run"].ptr() if c.has("kvm_run") else 0
        exit_code: Optional[int] = None
        exit_known = True
        if kvm_run:
            try:
                exit_code = t.read_u32(kvm_run + kvm.KVM_RUN_EXIT_REASON_OFFSET)
            except MemoryReadError:
                exit_known = False  # a core: the kvm_run page (a device mapping) is not in the dump
        try:
            qom_type = c["parent_obj"]["parent_obj"]["class"].deref()["type"].deref()["name"].cstring()
        except IntrospectError:
            qom_type = None
        out.append({
            "cpu-index": int(c["cpu_index"]),
            "thread-id": int(c["thread_id"]),
            "qom-type": qom_type,
            "created": c["created"].bool(),
            "running": c["running"].bool(),
            "halted": c["halted"].bool(),
            "stop": c["stop"].bool(),
            "stopped": c["stopped"].bool(),
            "exit-request": c["exit_request"].bool(),
            "kvm-fd": int(c["kvm_fd"]) if kvm_run else None,
            "kvm-exit-reason": exit_code,
            "kvm-exit-reason-name": kvm.exit_reason_name(exit_code) if exit_known else "unknown",
            "address": cpu.ptr(),
        })
    return out


def kvm_vcpus(t: Target) -> list[dict[str, Any]]:
    """vCPUs without debug info, from what KVM shows: each kvm-vcpu:N fd's kvm_run mapping
    (procfs.kvm_run_maps; exit_reason at offset 8) and the thread running it (its name "CPU N/KVM",
    or the thread sitting in ioctl(KVM_RUN) on that fd). Halted/stopped need CPUState: None."""
    from . import threads

    pid = t.pid
    if pid is None:
        raise IntrospectError("KVM's view of the vCPUs needs a running QEMU")
    try:
        runs = procfs.kvm_run_maps(pid)
    except (OSError, ValueError) as exc:
        raise IntrospectError(f"cannot read the mappings of process {pid}: "
                              f"{getattr(exc, 'strerror', None) or exc}") from exc
    try:
        fds = procfs.kvm_vcpu_fds(pid)
    except OSError:
        fds = {}
    tids: dict[int, int] = {}
    unnamed = []
    for th in t.threads():
        mo = re.match(r"^CPU (\d+)/KVM$", th.name or "")
        if mo:
            tids.setdefault(int(mo.group(1)), th.tid)
        else:
            unnamed.append(th)
    for th in unnamed:  # names first; the KVM_RUN ioctl only for threads without one
        vid = threads.kvm_vcpu_of_thread(pid, th.tid, th.name or "")
        if vid is not None:
            tids.setdefault(vid, th.tid)
    out = []
    for vid in sorted(set(runs) | set(fds)):
        run = runs.get(vid)
        code = t.read_u32(run + kvm.KVM_RUN_EXIT_REASON_OFFSET) if run else None
        out.append({
            "cpu-index": vid, "thread-id": tids.get(vid), "qom-type": None, "created": True, "running": None,
            "halted": None, "stop": None, "stopped": None, "exit-request": None, "kvm-fd": fds.get(vid),
            "kvm-exit-reason": code, "kvm-exit-reason-name": kvm.exit_reason_name(code), "address": None,
        })
    return out


def collect(t: Target) -> dict[str, Any]:
    accel = "kvm" if common.kvm_enabled(t) else "tcg"
    if t.has_debug_info():
        return {"accelerator": accel, "source": "CPUState", "vcpus": cpu_states(t)}
    return {"accelerator": accel, "source": "kvm", "vcpus": kvm_vcpus(t)}
