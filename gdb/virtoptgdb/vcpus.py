"""`virtopt vcpus`: each CPUState — index, thread, halted/stopped, last KVM exit reason."""

from __future__ import annotations

import argparse
import os
import re
from typing import Any, ClassVar, Optional

import gdb
from qemu_ext.gdbmi import kvm

from . import core


def cpu_states() -> list[dict[str, Any]]:
    """The vCPUs on QEMU's `cpus` list, with what kvm_run says about their last exit."""
    out = []
    for cpu in core.qtailq(core.value_of("cpus"), "node"):
        c = cpu.dereference()
        kvm_run = core.ptr(c["kvm_run"]) if _has(c, "kvm_run") else 0
        exit_code = core.read_u32(kvm_run + kvm.KVM_RUN_EXIT_REASON_OFFSET) if kvm_run else None
        try:
            qom_type = core.cstr(c["parent_obj"]["parent_obj"]["class"]["type"]["name"])
        except gdb.error:
            qom_type = None
        out.append({
            "cpu-index": int(c["cpu_index"]),
            "thread-id": int(c["thread_id"]),
            "qom-type": qom_type,
            "created": bool(c["created"]),
            "running": bool(c["running"]),
            "halted": bool(int(c["halted"])),
            "stop": bool(c["stop"]),
            "stopped": bool(c["stopped"]),
            "exit-request": bool(c["exit_request"]),
            "kvm-fd": int(c["kvm_fd"]) if kvm_run else None,
            "kvm-exit-reason": exit_code,
            "kvm-exit-reason-name": kvm.exit_reason_name(exit_code),
            "address": core.ptr(cpu),
        })
    return out


def kvm_vcpus() -> list[dict[str, Any]]:
    """vCPUs without debug info, from what KVM shows: each kvm-vcpu:N fd's kvm_run mapping
    (/proc/PID/maps, exit_reason at offset 8) and the thread running it (its name "CPU N/KVM",
    or the thread sitting in ioctl(KVM_RUN) on that fd). Halted/stopped need CPUState: None."""
    from . import threads

    pid = core.pid()
    runs: dict[int, int] = {}
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split()
                mo = re.match(r"^anon_inode:kvm-vcpu:(\d+)$", parts[-1]) if len(parts) >= 6 else None
                if mo and int(parts[2], 16) == 0:
                    runs.setdefault(int(mo.group(1)), int(parts[0].split("-")[0], 16))
    except OSError as exc:
        raise core.NotAvailable(f"cannot read /proc/{pid}/maps: {exc.strerror}") from exc
    fds: dict[int, int] = {}
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                mo = re.match(r"^anon_inode:kvm-vcpu:(\d+)$", os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue
            if mo:
                fds[int(mo.group(1))] = int(fd)
    except OSError:
        pass
    tids: dict[int, int] = {}
    unnamed = []
    for th in sorted(core.inferior().threads(), key=lambda t: t.num):
        tid = th.ptid[1]
        mo = re.match(r"^CPU (\d+)/KVM$", core.comm(tid))
        if mo:
            tids.setdefault(int(mo.group(1)), tid)
        else:
            unnamed.append(tid)
    for tid in unnamed:  # names first; the KVM_RUN ioctl only for threads without one
        vid = threads.kvm_vcpu_of_thread(pid, tid)
        if vid is not None:
            tids.setdefault(vid, tid)
    out = []
    for vid in sorted(set(runs) | set(fds)):
        run = runs.get(vid)
        code = core.read_u32(run + kvm.KVM_RUN_EXIT_REASON_OFFSET) if run else None
        out.append({
            "cpu-index": vid,
            "thread-id": tids.get(vid),
            "qom-type": None, "created": True, "running": None, "halted": None, "stop": None,
            "stopped": None, "exit-request": None,
            "kvm-fd": fds.get(vid),
            "kvm-exit-reason": code,
            "kvm-exit-reason-name": kvm.exit_reason_name(code),
            "address": None,
        })
    return out


def _has(v: gdb.Value, name: str) -> bool:
    try:
        v[name]
        return True
    except gdb.error:
        return False


def _debug_info_or_kvm(cmd: str) -> Optional[str]:
    if core.has_debug_info() or core.kvm_enabled():
        return None
    return (f"virtopt {cmd} needs QEMU's debug info (DWARF), or KVM (then kvm_run tells the exit reasons), "
            "and this QEMU has neither")


class VcpusCommand(core.VirtoptCommand):
    name = "vcpus"
    summary = "Per vCPU (CPUState): index, thread id, halted/stopped, and the last KVM exit reason under KVM."
    epilog = ("examples:\n  virtopt vcpus\n  virtopt vcpus --json\n\n"
              "Without debug info (under KVM) the vCPUs come from KVM itself: the KVM vcpu id (the APIC id\n"
              "on x86, the cpu index in simple topologies), its thread and kvm_run's exit reason;\n"
              "halted/stopped need CPUState and show as unknown.")
    requires: ClassVar[list] = [("debug-or-kvm", _debug_info_or_kvm)]

    def collect(self, args: argparse.Namespace) -> Any:
        accel = "kvm" if core.kvm_enabled() else "tcg"
        if core.has_debug_info():
            return {"accelerator": accel, "source": "CPUState", "vcpus": cpu_states()}
        return {"accelerator": accel, "source": "kvm", "vcpus": kvm_vcpus()}

    def render(self, d: Any, args: argparse.Namespace) -> None:
        def yn(v: Optional[bool]) -> str:
            return "?" if v is None else "yes" if v else "no"

        rows = [[v["cpu-index"], v["thread-id"], core.comm(v["thread-id"]) if v["thread-id"] else "?",
                 yn(v["halted"]), yn(v["stopped"]), yn(v["running"]), v["kvm-exit-reason-name"] or "-",
                 f"{v['address']:#x}" if v["address"] else "-"] for v in d["vcpus"]]
        gdb.write(core.table(rows, ["CPU", "TID", "THREAD", "HALTED", "STOPPED", "RUNNING", "KVM-EXIT", "CPUState"]))
        if d["source"] == "kvm":
            gdb.write("(no debug info: vCPUs read from KVM's kvm_run mappings; halted/stopped unknown)\n")


def register() -> None:
    VcpusCommand()
