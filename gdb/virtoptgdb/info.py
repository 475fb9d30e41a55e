"""`virtopt info`: what this QEMU is and which virtopt commands work in it."""

from __future__ import annotations

import argparse
from typing import Any

from qemu_ext.introspect import render, views

from . import command, utils


class InfoCommand(command.VirtoptCommand):
    name = "info"
    summary = "QEMU version, accelerator, debug info, trace backends, and which virtopt commands work here."
    epilog = "examples:\n  virtopt info\n  virtopt info --json"

    def collect(self, args: argparse.Namespace) -> Any:
        # gdb-only commands (coroutines --bt needs gdb's unwinder) are views here too
        return views.run(utils.target(), "info")

    def render(self, d: Any, args: argparse.Namespace) -> str:
        return render.info(d)


def register() -> None:
    InfoCommand()
