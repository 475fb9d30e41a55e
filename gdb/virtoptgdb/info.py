"""`virtopt info`: what this QEMU is and which virtopt commands work in it."""

from __future__ import annotations

import argparse
import os
from typing import Any

import gdb
from qemu_ext.gdbmi import elfsyms

from . import core, trace

VERSION_PREFIX = b"QEMU emulator version "


def collect_info() -> dict[str, Any]:
    exe = core.exe_path()
    ver = elfsyms.find_string(exe, VERSION_PREFIX)
    kvm, tcg = core.kvm_enabled(), core.tcg_enabled()
    accel = "kvm" if kvm else "tcg" if tcg else "unknown"
    try:
        backends = trace.backends()
        nevents = len(trace.events())
    except core.VirtoptGdbError:
        backends, nevents = [], 0
    commands = {}
    for cmd in core.COMMANDS:
        if cmd.prefix and not cmd.json_option:
            continue
        why = cmd.availability()
        commands[cmd.name] = {"available": why is None, "reason": why}
    return {
        "pid": core.pid(),
        "binary": os.path.realpath(exe),
        "version": ver[len(VERSION_PREFIX):].strip() if ver else None,
        "accelerator": accel,
        "debug-info": core.has_debug_info(),
        "symbols": len(core.elf_symbols()),
        "trace-backends": backends,
        "trace-events": nevents,
        "threads": len(core.inferior().threads()),
        "commands": commands,
    }


class InfoCommand(core.VirtoptCommand):
    name = "info"
    summary = "QEMU version, accelerator, debug info, trace backends, and which virtopt commands work here."
    epilog = "examples:\n  virtopt info\n  virtopt info --json"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        pass

    def collect(self, args: argparse.Namespace) -> Any:
        return collect_info()

    def render(self, d: Any, args: argparse.Namespace) -> None:
        gdb.write(f"QEMU {d['version'] or '(version string not found)'}  pid {d['pid']}  {d['binary']}\n")
        gdb.write(f"accelerator: {d['accelerator']}   debug info: {'yes' if d['debug-info'] else 'no'}   "
                  f"symbols: {d['symbols']}   threads: {d['threads']}\n")
        gdb.write(f"trace backends: {', '.join(d['trace-backends']) or 'none found'} "
                  f"({d['trace-events']} events)\n")
        gdb.write("commands:\n")
        for name, st in d["commands"].items():
            gdb.write(f"  {name:<14} {'ok' if st['available'] else 'no: ' + (st['reason'] or '')}\n")


def register() -> None:
    InfoCommand()
