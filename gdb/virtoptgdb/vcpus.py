"""`virtopt vcpus`: each CPUState — index, thread, halted/stopped, last KVM exit reason."""

from __future__ import annotations

import argparse
from typing import Any

from qemu_ext.introspect import render, threads

from . import command, utils


class VcpusCommand(command.VirtoptCommand):
    name = "vcpus"
    summary = "Per vCPU (CPUState): index, thread id, halted/stopped, and the last KVM exit reason under KVM."
    epilog = ("examples:\n  virtopt vcpus\n  virtopt vcpus --json\n\n"
              "Without debug info (under KVM) the vCPUs come from KVM itself: the KVM vcpu id (the APIC id\n"
              "on x86, the cpu index in simple topologies), its thread and kvm_run's exit reason;\n"
              "halted/stopped need CPUState and show as unknown. On a core, the exit reason is\n"
              "unknown (kvm_run is a device mapping, not in the dump).")

    def render(self, d: Any, args: argparse.Namespace) -> str:
        return render.vcpus(d, threads.thread_names(utils.target()))


def register() -> None:
    VcpusCommand()
