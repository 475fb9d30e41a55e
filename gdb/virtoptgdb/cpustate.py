"""`virtopt cpustate [CPU]`: each vCPU's guest state from CPUArchState (the view in
qemu_ext.introspect.cpustate): RIP, CS/mode, control registers, EFER, halted, exception."""

from __future__ import annotations

import argparse
from typing import Any

from qemu_ext.introspect import render_hang

from . import command


class CpustateCommand(command.VirtoptCommand):
    name = "cpustate"
    summary = ("Guest vCPU state as QEMU holds it (x86: RIP, CS and mode, CR0/CR2/CR3/CR4, EFER, CPL, halted, "
               "exception); under KVM, says whether QEMU's copy is current (vcpu_dirty).")
    epilog = ("examples:\n  virtopt cpustate\n  virtopt cpustate 1\n  virtopt cpustate --json\n\n"
              "Compare with HMP `info registers -a`. Under KVM the live registers are in the kernel;\n"
              "QEMU's copy is current after a synchronisation (HMP info registers does one) until the\n"
              "vCPU runs again.")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("cpu", nargs="?", type=int, metavar="CPU", help="only this vCPU (cpu index)")

    def view_args(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"cpu": args.cpu}

    def render(self, d: Any, args: argparse.Namespace) -> str:
        return render_hang.cpustate(d)


def register() -> None:
    CpustateCommand()
