"""virtopt's gdb commands, one small module per QEMU subsystem (like Linux's scripts/gdb/linux).

Loaded by gdb/virtopt-gdb.py; ``load()`` registers every command under the ``virtopt`` prefix.
"""

from __future__ import annotations

_LOADED = False


def load() -> None:
    global _LOADED
    if _LOADED:
        return
    from . import core, coroutines, info, mtree, qcow2, threads, timers, trace, vcpus

    core.init()
    core.PREFIX.append(core.VirtoptPrefix())
    for mod in (info, threads, vcpus, mtree, timers, trace, qcow2, coroutines):
        mod.register()
    _LOADED = True
