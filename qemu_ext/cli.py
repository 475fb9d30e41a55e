"""The `virtopt` command: one argparse tree, one group per capability.

Each group lives in its own module with a ``register(subparsers, name)``
function that adds a sub-parser and sets ``func`` (``func(args) -> int``).
Groups only render what the library returns; they keep heavy imports inside
their handlers so that ``virtopt --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence

from qemu_ext import __version__
from qemu_ext.errors import VirtoptError

# group name -> (module implementing it, one-line summary)
GROUPS: dict[str, tuple[str, str]] = {
    "qcow2": ("qemu_ext.qcow2.cli", "inspect qcow2 images read-only (info, map, check, dump, read, convert)"),
    "l2cache": ("qemu_ext.l2cache.cli", "simulate QEMU's qcow2 L2 cache and recommend l2-cache-size"),
    "trace": ("qemu_ext.trace.cli", "decode and summarise QEMU traces (simpletrace files, log backend)"),
    "shell": ("qemu_ext.qmp.shell_cli", "QMP shell with trace, stats, thread and mtree helpers"),
    "threads": ("qemu_ext.host.threads_cli", "QEMU threads and their roles (vCPU n, iothread, ...); pinning"),
    "gdb": ("qemu_ext.gdbmi.cli", "run virtopt gdb commands against a QEMU pid and return their data"),
    "inspect": ("qemu_ext.introspect.cli", "read a running QEMU's state without stopping it (drgn), or a core"),
    "doctor": ("qemu_ext.host.doctor_cli", "host and VM tuning checks from /proc and /sys"),
    "demo": ("qemu_ext.demo", "a guided tour on a throw-away VM: what virtopt finds, what to change"),
}

EPILOG = """\
examples:
  virtopt qcow2 info disk.qcow2 --output=json
  virtopt qcow2 check disk.qcow2
  virtopt l2cache recommend disk.qcow2
  virtopt trace summary trace-12345 --plot events.png
  virtopt shell /run/vm.qmp
  virtopt threads --qmp /run/vm.qmp
  virtopt doctor --vm web1
  virtopt demo

exit codes: 0 ok, 1 the job failed (bad input, dead socket, ...), 2 usage error or
capability not available; `qcow2 check` follows qemu-img check (2 corruptions, 3 leaks).
Set VIRTOPT_DEBUG=1 to see Python tracebacks.
"""


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """The argparse tree. With ``only``, just that group's module is imported (fast start-up);
    the other groups appear in the top-level help by their summaries."""
    parser = argparse.ArgumentParser(
        prog="virtopt",
        description="Tune and debug QEMU/KVM virtual machines.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"virtopt {__version__}")
    sub = parser.add_subparsers(dest="group", metavar="COMMAND")
    for name, (modname, summary) in GROUPS.items():
        if only is not None and name != only:
            p = sub.add_parser(name, help=summary, description=summary, add_help=False)
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
            continue
        importlib.import_module(modname).register(sub, name, summary)
    return parser


def _group_of(argv: Sequence[str]) -> Optional[str]:
    """The group named on the command line (the first word that is not an option), if any."""
    for word in argv:
        if word.startswith("-"):
            continue
        return word if word in GROUPS else None
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    debug = bool(os.environ.get("VIRTOPT_DEBUG"))
    argv = list(sys.argv[1:] if argv is None else argv)
    group = _group_of(argv)
    # Import only the group asked for; with no group (top-level --help) import none.
    try:
        parser = build_parser(only=group or "")
    except KeyboardInterrupt:  # Ctrl-C while the group's modules load: one line, as below
        print("virtopt: interrupted", file=sys.stderr)
        return 130
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        # no command, or a group without its sub-command: show the help that applies, exit 2
        helper = parser
        if args.group is not None:
            sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            helper = sub.choices[args.group]
        helper.print_help(sys.stderr)
        return 2
    try:
        return int(func(args) or 0)
    except VirtoptError as exc:
        if debug:
            import traceback

            traceback.print_exc()
        print(f"virtopt: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("virtopt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (virtopt ... | head); not an error of ours
        try:
            sys.stdout = open(os.devnull, "w")  # silence the flush at exit
        except OSError:
            pass
        return 0
    except Exception as exc:  # last line of defence: one line, never a traceback
        if debug:
            import traceback

            traceback.print_exc()
        print(
            f"virtopt: internal error: {type(exc).__name__}: {exc} (set VIRTOPT_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
