"""The structure-aware qcow2 fuzzer (fuzz/run.py, `make fuzz`) for a bounded minute: mutants of real
images (header, extensions, feature table, L1/L2, refcount table and blocks, snapshot table,
bitmap directory and tables, truncation) through info, check, map, read, convert and dump, and one
in 40 through the command line. Nothing may end in an internal error (anything but virtopt's
one-line refusal), take over 10 s, grow past 1 GiB of RSS, or modify the image.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from helpers import REPO


def test_fuzz_one_minute() -> None:
    seconds = float(os.environ.get("VIRTOPT_FUZZ_SECONDS", "60"))
    seed = int(time.time())
    cp = subprocess.run([sys.executable, str(REPO / "fuzz" / "run.py"), "--seconds", str(seconds), "--seed",
                         str(seed), "--json"], capture_output=True, text=True, timeout=seconds + 300)
    assert cp.stdout.strip(), cp.stderr
    report = json.loads(cp.stdout)
    assert report["mutants"] >= seconds, report  # dozens per second on an idle machine
    assert not report["findings"], json.dumps(report["findings"], indent=1)
    assert report["slowest"]["seconds"] < 10, report["slowest"]
    assert report["max-rss-kb"] < 1 << 20, report["max-rss-kb"]
    assert sum(report["refusals"].values()) > 0  # hostile mutants are refused, in one line each
