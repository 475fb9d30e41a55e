"""The ``virtopt`` console script and ``python -m qemu_ext``.

Ctrl-C while Python is still importing the CLI (the first 10-30 ms: argparse, the command's
modules) would print Python's own KeyboardInterrupt traceback; from here on it is one line and
exit 130, as everywhere else in virtopt (qemu_ext.cli.main handles it once the CLI is loaded).
A SIGINT that the parent set to be ignored (a background job) stays ignored. Only built-in
modules are imported before the handler is in place (``_signal``, not ``signal``, which loads
enum), so what is left is Python's own start-up.
"""

from __future__ import annotations

import _signal
import sys


def _interrupted(signum: int, frame: object) -> None:
    sys.stderr.write("virtopt: interrupted\n")
    raise SystemExit(130)


def main() -> int:
    default = _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler
    if default:
        _signal.signal(_signal.SIGINT, _interrupted)
    try:
        from qemu_ext.cli import main as cli_main
    finally:
        if default:
            _signal.signal(_signal.SIGINT, _signal.default_int_handler)
    return cli_main()
