"""QMP for virtopt: one client (over a pluggable transport), library functions that return data,
and the shell that renders them.

Library (returns data, never prints):

- :mod:`qemu_ext.qmp.errors`: QmpConnectError (``cannot connect to QMP at ADDR: REASON``),
  QmpGreetingError (not QMP), QmpGoneError (QEMU went away), QmpCommandError (class + desc),
  QmpTimeoutError, HmpError, NoMatchError.
- :mod:`qemu_ext.qmp.address`: addresses (unix path or HOST:PORT), socket checks, the peer process.
- :mod:`qemu_ext.qmp.client`: ``Transport`` (the interface a libvirt transport implements),
  ``SocketTransport``, ``QmpSession`` (async), ``SyncSession``/``connect_sync``/``run_sync`` (sync).
- :mod:`qemu_ext.qmp.capture`: trace events on/off, trace-file, the capture window.
- :mod:`qemu_ext.qmp.stats`, :mod:`qemu_ext.qmp.mtree`: query-stats rates, the memory tree.
- :mod:`qemu_ext.qmp.schema`: query-qmp-schema indexed; command help; checking a line.
- :mod:`qemu_ext.qmp.parse`: qmp-shell compatible input.

Front door: :mod:`qemu_ext.qmp.shell` (the REPL), :mod:`qemu_ext.qmp.shell_cli` (``virtopt shell``),
:mod:`qemu_ext.qmp.builtins` (the ``/`` commands, one registry), :mod:`qemu_ext.qmp.completion`.
"""

from __future__ import annotations

from typing import Any

# Exports load on first use, so that `virtopt --help` (which imports qemu_ext.qmp.shell_cli) stays fast.
_EXPORTS = {
    "QmpSession": "qemu_ext.qmp.client",
    "SyncSession": "qemu_ext.qmp.client",
    "Transport": "qemu_ext.qmp.client",
    "connect": "qemu_ext.qmp.client",
    "connect_sync": "qemu_ext.qmp.client",
    "run_sync": "qemu_ext.qmp.client",
    "HmpError": "qemu_ext.qmp.errors",
    "NoMatchError": "qemu_ext.qmp.errors",
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


__all__ = sorted(_EXPORTS)
