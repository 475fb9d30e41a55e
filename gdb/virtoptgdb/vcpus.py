"""`virtopt vcpus`: each CPUState — index, thread, halted/stopped, last KVM exit reason."""

from __future__ import annotations

import argparse
from typing import Any

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


def _has(v: gdb.Value, name: str) -> bool:
    try:
        v[name]
        return True
    except gdb.error:
        return False


@core.needs_debug_info
class VcpusCommand(core.VirtoptCommand):
    name = "vcpus"
    summary = "Per vCPU (CPUState): index, thread id, halted/stopped, and the last KVM exit reason under KVM."
    epilog = "examples:\n  virtopt vcpus\n  virtopt vcpus --json"

    def collect(self, args: argparse.Namespace) -> Any:
        return {"accelerator": "kvm" if core.kvm_enabled() else "tcg", "vcpus": cpu_states()}

    def render(self, d: Any, args: argparse.Namespace) -> None:
        rows = [[v["cpu-index"], v["thread-id"], core.comm(v["thread-id"]), "yes" if v["halted"] else "no",
                 "yes" if v["stopped"] else "no", "yes" if v["running"] else "no",
                 v["kvm-exit-reason-name"] or "-", f"{v['address']:#x}"] for v in d["vcpus"]]
        gdb.write(core.table(rows, ["CPU", "TID", "THREAD", "HALTED", "STOPPED", "RUNNING", "KVM-EXIT", "CPUState"]))


def register() -> None:
    VcpusCommand()
