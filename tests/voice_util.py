"""Helpers of the one-voice tests (test_voice_*.py): the CLI in this process, and the placeholders
that README and --help examples use, made real."""

from __future__ import annotations

import contextlib
import io
from typing import Sequence


def in_process(argv: Sequence[str]) -> tuple[int, str, str]:
    """``virtopt ARGV`` through qemu_ext.cli.main in this process: (exit code, stdout, stderr).

    The same code path as the command (main renders errors as the one line and picks the exit
    code), without a Python start-up per run. Commands that start gdb, and inputs that could
    block (FIFOs), run as real subprocesses instead (helpers.virtopt)."""
    from qemu_ext.cli import main

    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="utf-8", write_through=True)  # .buffer for binary writers
    err = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(argv))
        except SystemExit as exc:  # argparse's usage errors
            rc = int(exc.code or 0)
        out.flush()
    return rc, raw.getvalue().decode(errors="replace"), err.getvalue()
