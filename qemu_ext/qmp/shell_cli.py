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
  virtopt shell vm.qmp -c 'block_resize node-name=disk0 size=2G'        (sizes as qemu-img writes them)
  virtopt shell vm.qmp -c '/help blockdev-add'                           (arguments from QEMU's schema)
  virtopt shell vm.qmp -c '/trace capture qcow2_cache_* 5'
  virtopt shell vm.qmp -c '/stats vcpu --watch 1 --count 10'
  virtopt shell vm.qmp -c '/mtree lookup 0x70 io' --output=json
  virtopt shell vm.qmp -c '/hmp info block' --events=off
  virtopt shell vm.qmp --keep-going -c 'stop' -c 'no-such' -c 'cont'    (runs all three, exits 1)
  virtopt shell ga.sock -N -c guest-ping                                 (qemu-ga: no greeting)
  virtopt shell --domain web1 -c '/trace capture qcow2_cache_* 5'        (a libvirt domain: libvirt:web1)
  printf 'stop\\ncont\\n' | virtopt shell vm.qmp     lines on stdin run like -c

input as QEMU's qmp-shell: cmd key=value key.sub=value, JSON or Python literal values,
transaction( ... ), raw JSON lines; 'CMD ?' or '/help CMD' shows a command's arguments;
built-ins start with / (type help in the shell). Interactive: quit, system_reset and
system_powerdown ask first (--yes does not); pasted lines run one by one, stopping at the first error.
QEMU's QMP socket serves one client at a time: give QEMU a second -qmp for virtopt.
exit codes: 0 every line ran; 1 a QMP error, QEMU gone, a dead socket or bad input (the first
error's code with --keep-going); 2 a usage error or a built-in not available on this QEMU.
"""


def register(sub: argparse._SubParsersAction, name: str, summary: str) -> None:
    p = sub.add_parser(name, help=summary, description=summary, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from qemu_ext.output import add_output_option, number

    p.add_argument("address", nargs="?", metavar="SOCKET|HOST:PORT",
                   help="QMP unix socket path, HOST:PORT for TCP, or libvirt:DOMAIN")
    p.add_argument("--domain", metavar="NAME", help="a libvirt domain's monitor (the same as libvirt:NAME)")
    p.add_argument("-H", "--hmp", action="store_true", help="HMP mode: lines are HMP commands (built-ins still work)")
    p.add_argument("-N", "--skip-negotiation", dest="negotiate", action="store_false",
                   help="expect no greeting and skip qmp_capabilities (qemu-ga; or negotiate by hand)")
    p.add_argument("-p", "--pretty", action="store_true", help="pretty-print JSON (indented, keys sorted)")
    p.add_argument("-v", "--verbose", action="store_true", help="echo each command sent")
    p.add_argument("-l", "--logfile", metavar="LOGFILE", help="append commands, replies and events (JSON lines)")
    p.add_argument("-c", "--command", dest="commands", action="append", default=[], metavar="LINE",
                   help="run LINE and exit (repeatable; stops at the first error with a non-zero exit)")
    p.add_argument("--keep-going", action="store_true",
                   help="with -c or piped lines: run every line even after an error (exit with the first error's code)")
    p.add_argument("--events", choices=("stdout", "stderr", "off"), default="stdout",
                   help="where QEMU's events go (default stdout)")
    p.add_argument("-y", "--yes", action="store_true",
                   help="run quit, system_reset and system_powerdown without asking")
    p.add_argument("--no-pager", dest="pager", action="store_false",
                   help="never page long output ($PAGER, default less -FRX, when it would scroll away)")
    p.add_argument("--history", metavar="FILE", default=DEFAULT_HISTORY,
                   help=f"history file, created 0600 (default {DEFAULT_HISTORY}; '' for none)")
    p.add_argument("--timeout", type=number(float, 0, 3600, lo_open=True), default=5.0, metavar="SECONDS",
                   help="seconds to wait for the connection and QEMU's greeting (default 5)")
    p.add_argument("--no-reconnect", dest="reconnect", action="store_false",
                   help="exit (status 1) instead of waiting when QEMU goes away")
    add_output_option(p)


def options_from_args(args: argparse.Namespace):  # -> ShellOptions
    from qemu_ext.errors import UsageError
    from qemu_ext.qmp.shell import ShellOptions

    if (args.address is None) == (args.domain is None):
        raise UsageError("give a QMP address (SOCKET, HOST:PORT, libvirt:NAME) or --domain NAME, one of them")
    return ShellOptions(
        address=args.address if args.domain is None else f"libvirt:{args.domain}",
        hmp=args.hmp,
        pretty=args.pretty,
        verbose=args.verbose,
        logfile=args.logfile,
        history=args.history or None,
        output=args.output,
        timeout=args.timeout,
        reconnect=args.reconnect,
        commands=list(args.commands),
        negotiate=args.negotiate,
        keep_going=args.keep_going,
        events=args.events,
        yes=args.yes,
        pager=args.pager,
    )


def run(args: argparse.Namespace) -> int:
    from qemu_ext.qmp import shell

    return shell.run(options_from_args(args))
