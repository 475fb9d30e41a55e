"""virtopt's gdb commands (like Linux's scripts/gdb/linux): ``command`` (the command base,
parser, parameters, JSON output), ``utils`` (the Target the views read through), and one small
module per command that renders a view of qemu_ext.introspect.

Loaded by gdb/virtopt-gdb.py; ``load()`` registers every command under the ``virtopt`` prefix.
"""

from __future__ import annotations

_LOADED = False


def load() -> None:
    global _LOADED
    if _LOADED:
        return
    from . import (  # block, bt, cpustate, locks: the hang-analysis commands
        block,
        bt,
        command,
        coroutines,
        cpustate,
        info,
        locks,
        mtree,
        qcow2,
        threads,
        timers,
        trace,
        vcpus,
    )

    command.init()
    command.PREFIX.append(command.VirtoptPrefix())
    for mod in (info, threads, vcpus, mtree, timers, trace, qcow2, coroutines, block, locks, bt, cpustate):
        mod.register()
    _LOADED = True
