"""`make bench`: run every bench/bench_*.py in turn; each prints its own figures and ratio.

A benchmark is a script that runs the virtopt side and its anchor (qemu-img,
simpletrace.py, a naive replay, ...) in the same run and prints both times and
the ratio; it exits non-zero when a required ratio is missed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    here = Path(__file__).resolve().parent
    wanted = set(argv)
    failed = []
    for script in sorted(here.glob("bench_*.py")):
        if wanted and script.stem not in wanted and script.stem.removeprefix("bench_") not in wanted:
            continue
        print(f"\n##### {script.name}", flush=True)
        rc = subprocess.call([sys.executable, str(script)])
        if rc != 0:
            failed.append(script.name)
    if failed:
        print(f"\nbenchmarks that missed their target or failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
