"""The shell's built-ins, one module per capability, each registered once in
:mod:`qemu_ext.qmp.builtins.registry` (which drives dispatch, /help and completion):

- :mod:`.core`: /help [CMD], /json BUILTIN, /hmp LINE, /quit
- :mod:`.trace`: /trace list|on|off|capture, /trace-file (library: qemu_ext.qmp.capture)
- :mod:`.stats`: /stats (library: qemu_ext.qmp.stats)
- :mod:`.threads`: /threads (library: qemu_ext.host.threads, roles from qemu_ext.host.roles)
- :mod:`.mtree`: /mtree [lookup ADDR | tree] (library: qemu_ext.qmp.mtree)
- :mod:`.l2cache`: /l2cache [NODE]
"""

from __future__ import annotations

from qemu_ext.qmp.builtins import core, l2cache, mtree, stats, threads, trace  # noqa: F401  (they register)
from qemu_ext.qmp.builtins.registry import REGISTRY, Builtin, Result, UsageError, commands, complete, lookup

__all__ = ["REGISTRY", "Builtin", "Result", "UsageError", "commands", "complete", "lookup"]
