"""`virtopt shell SOCKET|HOST:PORT`: the QMP shell (interactive, or -c lines for scripts)."""

from __future__ import annotations

import argparse
import os

DEFAULT_HISTORY = os.path.join(os.path.expanduser("~"), ".virtopt-shell_history")

EPILOG = """\
examples:
  virtopt shell /run/vm.qmp                      interactive, with completion and events
  virtopt shell localhost:4444 -p                 QMP over TCP, pretty-printed
  virtopt shell /run/vm.qmp -H                    HMP mode (info mtree, qemu-io, ...)
  virtopt shell vm.qmp -c query-status -c 'stop' -c 'cont'
  virtopt shell vm.qmp -c '/trace capture qcow2_cache_* 5'
  virtopt shell vm.qmp -c '/stats vcpu --watch 1 --count 10'
  virtopt shell vm.qmp -c '/mtree lookup 0x70 io' --output=json
  virtopt shell vm.qmp -c 'blockdev-add driver=qcow2 node-name=d0 file.driver=file file.filename=/tmp/d.qcow2'
  printf 'stop\\ncont\\n' | virtopt shell vm.qmp     lines on stdin run like -c

input as QEMU's qmp-shell: cmd key=value key.sub=value, JSON or Python literal values,
transaction( ... ), raw JSON lines; built-ins start with / (type /help in the shell).
exit codes with -c (or lines piped on stdin): 0 every line ran, 1 the first QMP error (or QEMU gone, bad input),
2 a built-in not available on this QEMU. Without -c: 1 when the first connection fails.
"""


def register(sub: argparse._SubParsersAction, name: str, summary: str) -> None:
    p = sub.add_parser(name, help=summary, description=summary, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from qemu_ext.output import add_output_option

    default_history = DEFAULT_HISTORY

    p.add_argument("address", metavar="SOCKET|HOST:PORT", help="QMP unix socket path, or HOST:PORT for TCP")
    p.add_argument("-H", "--hmp", action="store_true", help="HMP mode: lines are HMP commands (built-ins still work)")
    p.add_argument("-p", "--pretty", action="store_true", help="pretty-print JSON (indented, keys sorted)")
    p.add_argument("-v", "--verbose", action="store_true", help="echo each command sent")
    p.add_argument("-l", "--logfile", metavar="LOGFILE", help="append commands, replies and events (JSON lines)")
    p.add_argument("-c", "--command", dest="commands", action="append", default=[], metavar="LINE",
                   help="run LINE and exit (repeatable; stops at the first error with a non-zero exit)")
    p.add_argument("--history", metavar="FILE", default=default_history,
                   help=f"history file (default {default_history}; '' for none)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                   help="seconds to wait for the connection and greeting (default 5)")
    p.add_argument("--no-reconnect", dest="reconnect", action="store_false",
                   help="exit instead of waiting when QEMU goes away")
    add_output_option(p)


def options_from_args(args: argparse.Namespace):  # -> ShellOptions
    from qemu_ext.qmp.shell import ShellOptions

    return ShellOptions(
        address=args.address,
        hmp=args.hmp,
        pretty=args.pretty,
        verbose=args.verbose,
        logfile=args.logfile,
        history=args.history or None,
        output=args.output,
        timeout=args.timeout,
        reconnect=args.reconnect,
        commands=list(args.commands),
    )


def run(args: argparse.Namespace) -> int:
    from qemu_ext.errors import NotAvailableError

    try:
        import prompt_toolkit  # noqa: F401
        import qemu.qmp  # noqa: F401
    except ImportError as exc:
        raise NotAvailableError(f"virtopt shell needs the Python packages qemu.qmp and prompt_toolkit ({exc}): "
                                "pip install qemu.qmp prompt_toolkit") from exc
    from qemu_ext.qmp import shell

    return shell.run(options_from_args(args))
