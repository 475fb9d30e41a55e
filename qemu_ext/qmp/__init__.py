"""QMP for virtopt: protocol, client and shell layers on qemu.qmp's asyncio QMPClient.

- :mod:`qemu_ext.qmp.errors`: QmpConnectError (dead socket), QmpGreetingError (not QMP),
  QmpGoneError (QEMU went away), QmpCommandError (class + desc), QmpTimeoutError, HmpError.
- :mod:`qemu_ext.qmp.protocol`: addresses (unix path or HOST:PORT), peer pid, error translation.
- :mod:`qemu_ext.qmp.client`: ``QmpSession`` (async) and ``run_sync``.
- :mod:`qemu_ext.qmp.parse`: qmp-shell compatible input.
- :mod:`qemu_ext.qmp.completion`: completion from query-qmp-schema and live names.
- :mod:`qemu_ext.qmp.builtins`: the ``/`` commands as functions returning data.
- :mod:`qemu_ext.qmp.shell`: the prompt-toolkit REPL; :mod:`qemu_ext.qmp.shell_cli`: ``virtopt shell``.
"""

from __future__ import annotations

from typing import Any

# Exports load on first use, so that `virtopt --help` (which imports qemu_ext.qmp.shell_cli) stays fast.
_EXPORTS = {
    "QmpSession": "qemu_ext.qmp.client",
    "connect": "qemu_ext.qmp.client",
    "run_sync": "qemu_ext.qmp.client",
    "HmpError": "qemu_ext.qmp.errors",
    "QmpCommandError": "qemu_ext.qmp.errors",
    "QmpConnectError": "qemu_ext.qmp.errors",
    "QmpError": "qemu_ext.qmp.errors",
    "QmpGoneError": "qemu_ext.qmp.errors",
    "QmpGreetingError": "qemu_ext.qmp.errors",
    "QmpTimeoutError": "qemu_ext.qmp.errors",
}


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'qemu_ext.qmp' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(mod), name)


__all__ = [
    "HmpError",
    "QmpCommandError",
    "QmpConnectError",
    "QmpError",
    "QmpGoneError",
    "QmpGreetingError",
    "QmpSession",
    "QmpTimeoutError",
    "connect",
    "run_sync",
]
