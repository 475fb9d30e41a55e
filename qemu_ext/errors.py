"""Errors with meaning: each carries the exit code the CLI gives for it.

Exit codes used across virtopt:
  0  success
  1  the job could not be done (bad input, unreadable file, dead socket, ...)
  2  usage error, or a capability that is not available here
  3  (qcow2 check only) leaks but no corruption, as qemu-img check
"""

from __future__ import annotations


class VirtoptError(Exception):
    """A user-facing error: one line of text, an exit code, no traceback."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class BadInputError(VirtoptError):
    """An input file (image, trace, events file) is corrupt, truncated or hostile."""


class NotAvailableError(VirtoptError):
    """The capability asked for is not available (not built, not supported by this QEMU, ...)."""

    exit_code = 2


class QemuError(VirtoptError):
    """Talking to QEMU failed: dead or garbled socket, QMP error, process gone."""
