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


class UsageError(VirtoptError):
    """An option or argument out of its range, or options that do not go together (exit 2)."""

    exit_code = 2


class NotAvailableError(VirtoptError):
    """The capability asked for is not available (not built, not supported by this QEMU, ...)."""

    exit_code = 2


class QemuError(VirtoptError):
    """Talking to QEMU failed: dead or garbled socket, QMP error, process gone."""


# One wording per condition, for every front door (see CONTRIBUTING.md).


def open_error(path: object, exc: OSError) -> BadInputError:
    """``cannot open PATH: No such file or directory`` (the OS's own words)."""
    return BadInputError(f"cannot open {path}: {exc.strerror or exc}")


def not_a_file(path: object) -> BadInputError:
    """A FIFO, socket or character device given where a file is read."""
    return BadInputError(f"{path}: not a regular file or block device")


def empty_file(path: object) -> BadInputError:
    return BadInputError(f"{path}: empty file")


def binary_file(path: object, kind: str) -> BadInputError:
    """Binary data where text of ``kind`` (a trace-events file, a qemu-io command file) is expected."""
    return BadInputError(f"{path}: not a {kind} (binary data)")


def no_process(pid: int) -> VirtoptError:
    return VirtoptError(f"no process {pid}")


def not_qemu(pid: int, name: str, exe: str) -> VirtoptError:
    return VirtoptError(f"process {pid} is not QEMU ({name}, {exe})")


def qmp_unreachable(addr: object, reason: str) -> QemuError:
    return QemuError(f"cannot connect to QMP at {addr}: {reason}")
