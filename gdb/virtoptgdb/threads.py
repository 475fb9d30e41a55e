"""`virtopt threads`: QEMU's threads with their roles (qemu_ext.host.roles) and the BQL holder."""

from __future__ import annotations

import argparse
from typing import Any

from qemu_ext.introspect import render

from . import command


class ThreadsCommand(command.VirtoptCommand):
    name = "threads"
    summary = "QEMU's threads mapped to roles (vCPU n, iothread, main loop, workers, call_rcu) and the BQL holder."
    epilog = ("examples:\n  virtopt threads\n  virtopt threads --json\n\n"
              "Roles come from CPUState, thread names, the main thread, the KVM_RUN ioctl, or the QEMU\n"
              "start routine found on the thread's stack (memory reads only: works on cores too).")

    def render(self, d: Any, args: argparse.Namespace) -> str:
        return render.threads(d)


def register() -> None:
    ThreadsCommand()
