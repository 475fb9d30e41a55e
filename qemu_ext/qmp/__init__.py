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

from qemu_ext.qmp.client import QmpSession, connect, run_sync
from qemu_ext.qmp.errors import (
    HmpError,
    QmpCommandError,
    QmpConnectError,
    QmpError,
    QmpGoneError,
    QmpGreetingError,
    QmpTimeoutError,
)

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
