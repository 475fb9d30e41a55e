"""Bench: virtopt qcow2 check / map --output=json against qemu-img on a 1 TiB preallocated-metadata image.

Creates the image with `qemu-img create -f qcow2 -o preallocation=metadata` (64 KiB clusters)
in a temp dir, runs qemu-img and the virtopt CLI (as subprocesses) in the same run,
prints both times, the ratios and peak RSS of the children, and exits 1 when virtopt is
slower than qemu-img (ratio > 1.0) or uses more than 1 GiB.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def timed(argv: list[str]) -> tuple[float, int, bytes]:
    """Wall time, peak RSS (KiB) of this child, stdout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    cp = subprocess.run(argv, capture_output=True)
    dt = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if cp.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({cp.returncode}): {cp.stderr.decode()[-500:]}")
    return dt, max(after, before), cp.stdout


def best(argv: list[str], n: int = 2) -> tuple[float, int, bytes]:
    runs = [timed(argv) for _ in range(n)]
    return min(r[0] for r in runs), max(r[1] for r in runs), runs[-1][2]


def main() -> int:
    virtopt = [sys.executable, "-m", "qemu_ext"]
    ok = True
    with tempfile.TemporaryDirectory(prefix="virtopt-bench-qcow2-") as d:
        img = os.path.join(d, "big.qcow2")
        t = time.perf_counter()
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", img, "1T"], check=True)
        print(f"image: 1 TiB, preallocation=metadata, 64 KiB clusters, {os.path.getsize(img) / 2**20:.0f} MiB file "
              f"(created in {time.perf_counter() - t:.1f} s)")
        # warm the page cache for both sides alike
        timed(["qemu-img", "check", img])
        for name, qargv, vargv in (
            ("check", ["qemu-img", "check", "--output=json", img],
             [*virtopt, "qcow2", "check", "--output=json", img]),
            ("map --output=json", ["qemu-img", "map", "--output=json", img],
             [*virtopt, "qcow2", "map", "--output=json", img]),
        ):
            qt, _, qout = best(qargv)
            vt, vrss, vout = best(vargv)
            ratio = vt / qt
            if name == "check":  # same JSON once virtopt's extra problem list is left out
                vj = json.loads(vout)
                vj.pop("problems", None)
                identical = json.loads(qout) == vj
            else:
                identical = qout == vout
            same = " output identical" if identical else " OUTPUT DIFFERS"
            ok &= identical
            print(f"{name:<18} qemu-img {qt:6.2f} s   virtopt {vt:6.2f} s   ratio {ratio:.2f} (need <= 1.0)"
                  f"   virtopt peak RSS so far {vrss / 1024:.0f} MiB{same}")
            if ratio > 1.0:
                ok = False
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"peak RSS of all children: {peak:.0f} MiB (need < 1024 MiB)")
        if peak >= 1024:
            ok = False
    print("bench_qcow2:", "OK" if ok else "MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
