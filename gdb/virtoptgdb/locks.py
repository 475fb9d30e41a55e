"""`virtopt locks`: who holds the BQL and who waits for it, AioContext locks (7.2), what each thread
is blocked on, and the CoMutexes held (the view in qemu_ext.introspect.locks)."""

from __future__ import annotations

import argparse
from typing import Any

from qemu_ext.introspect import render_hang

from . import command


class LocksCommand(command.VirtoptCommand):
    name = "locks"
    summary = ("Who holds the BQL and who waits for it, AioContext locks (QEMU < 9.0), what each thread is blocked "
               "on (futex, poll, KVM_RUN), and the CoMutexes held.")
    epilog = ("examples:\n  virtopt locks\n  virtopt locks --json\n\n"
              "A thread blocked on a mutex sits in futex(2) on the mutex's word: its system call and\n"
              "arguments (registers) name the lock, glibc's __owner field its holder.")

    def render(self, d: Any, args: argparse.Namespace) -> str:
        return render_hang.locks(d)


def register() -> None:
    LocksCommand()
