"""Errors of the QMP layer, each meaning one thing a user can act on.

All derive from :class:`qemu_ext.errors.QemuError` (exit code 1), so every front door prints them
as one line. Connection failures all read ``cannot connect to QMP at ADDR: REASON`` (CONTRIBUTING.md).
"""

from __future__ import annotations

from typing import Any, Optional

from qemu_ext.errors import BadInputError, QemuError


class QmpError(QemuError):
    """Base class of every error of the QMP client layer."""


class QmpConnectError(QmpError):
    """Nobody answers on the address: no such socket, connection refused, not a socket, busy monitor."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"cannot connect to QMP at {where}: {reason}")
        self.where = where
        self.reason = reason


class QmpGreetingError(QmpConnectError):
    """Something answered, but it did not speak QMP (garbled or missing greeting)."""


class QmpGoneError(QmpError):
    """QEMU went away: the connection closed (QEMU exited or was killed), possibly mid-command."""


class QmpTimeoutError(QmpError):
    """QEMU did not answer in time."""


class QmpCommandError(QmpError):
    """QEMU answered a command with an error: carries the QMP error class and description."""

    def __init__(self, command: str, error_class: str, desc: str, reply: Optional[dict[str, Any]] = None) -> None:
        super().__init__(f"{command}: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc
        self.reply = reply or {"error": {"class": error_class, "desc": desc}}


class HmpError(QmpError):
    """An HMP command (through human-monitor-command) reported an error in its text."""


class NoMatchError(BadInputError):
    """A name or pattern given to a built-in matches nothing (the one no-match rule: exit 1)."""

    def __init__(self, what: str, pattern: str, hint: str = "") -> None:
        super().__init__(f"no {what} matches {pattern!r}{'; ' + hint if hint else ''}")
        self.what = what
        self.pattern = pattern
