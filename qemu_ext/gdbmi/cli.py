"""`virtopt gdb PID -c CMD ...`: run virtopt's gdb commands against a live QEMU, print what they return."""

from __future__ import annotations

import argparse
import sys

from qemu_ext.output import add_output_option, print_json

EPILOG = """\
examples:
  virtopt gdb $(pidof qemu-system-x86_64)                        (virtopt info)
  virtopt gdb 12345 -c 'virtopt threads --json'
  virtopt gdb 12345 -c threads -c vcpus -c 'mtree lookup 0xfee00000'
  virtopt gdb 12345 -c "trace enable 'qcow2_cache_*'"
  virtopt gdb 12345 -c 'qcow2 --json' --output=json

A command whose first word is a virtopt gdb command (info, threads, vcpus, mtree, timers,
trace, qcow2, coroutines) gets the `virtopt ` prefix; any other gdb command runs as is.
gdb attaches once, runs every command, and detaches: QEMU keeps running.
exit codes: 0 all commands worked, 1 a command failed, 2 gdb/pygdbmi missing or a
command not available in this QEMU (e.g. it needs debug info)."""


def register(sub: argparse._SubParsersAction, name: str, summary: str) -> None:
    p = sub.add_parser(name, help=summary, description=summary, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pid", type=int, metavar="PID", help="the QEMU process to attach to")
    p.add_argument("-c", "--command", dest="commands", action="append", metavar="CMD",
                   help="command to run (repeatable; default: virtopt info)")
    p.add_argument("--gdb", default="gdb", help="gdb binary (default gdb)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each command (default 30)")
    add_output_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qemu_ext.gdbmi.driver import error_for, run_commands

    commands = args.commands or ["virtopt info"]
    results = run_commands(args.pid, commands, gdb=args.gdb, timeout=args.timeout)
    codes = [0 if r.ok else error_for(r.error or "").exit_code for r in results]
    if args.output == "json":
        print_json([r.to_dict() for r in results])
    else:
        for r in results:
            if r.output:
                sys.stdout.write(r.output if r.output.endswith("\n") else r.output + "\n")
            if not r.ok:
                print(f"virtopt: {r.error}", file=sys.stderr)
    failed = [c for c in codes if c]
    if not failed:
        return 0
    return 1 if 1 in failed else max(failed)
