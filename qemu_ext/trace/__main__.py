"""``python -m qemu_ext.trace decode|summary ...``: the `virtopt trace` group on its own.

Same sub-commands, options and exit codes as ``virtopt trace``; it only skips building the
other groups' parsers (useful in scripts that call it many times).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    from qemu_ext import cli as vcli
    from qemu_ext.trace import cli as tcli

    parser = argparse.ArgumentParser(prog="python -m qemu_ext.trace", description="virtopt trace, on its own")
    sub = parser.add_subparsers(dest="group", metavar="COMMAND")
    tcli.register(sub, "trace", vcli.GROUPS["trace"][1])
    args = parser.parse_args(["trace", *(sys.argv[1:] if argv is None else argv)])
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    import os
    import traceback

    from qemu_ext.errors import VirtoptError

    try:
        return int(args.func(args) or 0)
    except VirtoptError as exc:
        if os.environ.get("VIRTOPT_DEBUG"):
            traceback.print_exc()
        print(f"virtopt: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("virtopt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except Exception as exc:  # one line, never a traceback
        if os.environ.get("VIRTOPT_DEBUG"):
            traceback.print_exc()
        print(f"virtopt: internal error: {type(exc).__name__}: {exc} (set VIRTOPT_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
