"""``python -m qemu_ext.trace decode|summary ...``: the `virtopt trace` group on its own.

Same sub-commands, options and exit codes as ``virtopt trace`` (it is that command:
``virtopt`` builds only the parser of the group it is asked for).
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    from qemu_ext import cli

    return cli.main(["trace", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
