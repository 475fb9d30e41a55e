"""`virtopt timers`: QEMU's timer lists per clock; works on 7.2 (QEMU's `qemu timers` does not)."""

from __future__ import annotations

import argparse
from typing import Any

from qemu_ext.introspect import render

from . import command


class TimersCommand(command.VirtoptCommand):
    name = "timers"
    summary = "QEMU's armed timers per clock and timer list (main loop and AioContexts)."
    epilog = ("examples:\n  virtopt timers\n  virtopt timers --json\n\n"
              "Without debug info it walks the exported main_loop_tlg with the layouts of QEMU 7.2 or\n"
              "10.0 (confirmed by the binary's version and symbol sizes; other versions are refused);\n"
              "callbacks then show as addresses unless QEMU exports their names.")

    def render(self, d: Any, args: argparse.Namespace) -> str:
        return render.timers(d)


def register() -> None:
    TimersCommand()
