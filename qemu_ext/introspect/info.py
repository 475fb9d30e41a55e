"""`info`: what this QEMU is, what reads it, and which views work here (and why not)."""

from __future__ import annotations

import os
from typing import Any

from . import common, layouts, trace
from .target import IntrospectError, NotAvailable, Target

common.register("info", "QEMU version, accelerator, debug info, trace backends, and which views work here", [])


def collect(t: Target, extra: Any = None) -> dict[str, Any]:
    """``extra``: (name, reason-or-None) pairs of front-door commands that are not views."""
    try:
        backends = trace.backends(t)
        nevents = trace.event_count(t)
    except (IntrospectError, NotAvailable):
        backends, nevents = [], 0
    commands = {}
    from .views import NAMES

    for name in NAMES:
        if name == "info":
            continue
        why = common.availability(t, name)
        commands[name] = {"available": why is None, "reason": why}
    for name, why in extra or ():
        commands[name] = {"available": why is None, "reason": why}
    return {
        "pid": t.pid,
        "target": t.kind,
        "binary": os.path.realpath(t.exe()),
        "version": layouts.version(t),
        "accelerator": common.accelerator(t),
        "debug-info": t.has_debug_info(),
        "symbols": t.symbol_count(),
        "trace-backends": backends,
        "trace-events": nevents,
        "threads": len(t.threads()),
        "commands": commands,
    }
