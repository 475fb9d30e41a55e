"""Bench: virtopt qcow2 check / map --output=json / info against qemu-img, speed and peak RSS.

Images made with `qemu-img create -f qcow2 -o preallocation=metadata` (64 KiB clusters) of 1 GiB,
1 TiB and 10 TiB (about 1.6 GB of file for 10 TiB: the free space is checked first, the images
are deleted after). qemu-img and the virtopt CLI run as subprocesses in the same run; each one's
peak RSS comes from wait4(). Printed: times, peak RSS, and the ratios virtopt/qemu-img.

Targets (exit 1 when missed): the outputs are identical; virtopt is not slower than qemu-img
(time ratio <= 1.0) for check and map from 1 TiB on; its peak RSS is at or below qemu-img's
wherever qemu-img's own goes past 100 MiB (memory that grows with the disk: check of 10 TiB).
Below that both are dominated by fixed costs: the Python interpreter with numpy and construct
takes about 35 MiB before any work, qemu-img 8 MiB; virtopt's share per cluster is 2 bits
against qemu-img's 16, so the ratio is printed there, not held.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

SIZES = (("1G", False), ("1T", True), ("10T", True))  # (size, held to the targets)


def run(argv: list[str]) -> tuple[float, int, bytes]:
    """Wall time, peak RSS (KiB) of this one child (wait4), stdout."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        p = subprocess.Popen(argv, stdout=out, stderr=err)
        _pid, status, ru = os.wait4(p.pid, 0)
        dt = time.perf_counter() - t
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if p.returncode not in (0, 2, 3):
            raise SystemExit(f"{' '.join(argv)} failed ({p.returncode}): {err.read().decode()[-500:]}")
        return dt, ru.ru_maxrss, out.read()


def best(argv: list[str], n: int) -> tuple[float, int, bytes]:
    runs = [run(argv) for _ in range(n)]
    return min(r[0] for r in runs), max(r[1] for r in runs), runs[-1][2]


def same_output(name: str, q: bytes, v: bytes) -> bool:
    if name == "check":  # the same JSON once virtopt's problem list is left out
        vj = json.loads(v)
        vj.pop("problems", None)
        vj.pop("problems-not-listed", None)
        return json.loads(q) == vj
    if name == "info":
        vj = json.loads(v)
        vj.pop("virtopt", None)
        return json.loads(q) == vj
    return q == v


def main() -> int:
    virtopt = [sys.executable, "-m", "qemu_ext", "qcow2"]
    qver = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    compat = qver.split("version ")[1].split(".")[0] + "." + qver.split("version ")[1].split(".")[1]
    ok = True
    d = tempfile.mkdtemp(prefix="virtopt-bench-qcow2-")
    try:
        free = shutil.disk_usage(d).free
        print(f"qemu-img: {qver}; free space in {d}: {free / 2**30:.1f} GiB")
        print(f"{'image':<6} {'command':<18} {'qemu-img':>9} {'virtopt':>9} {'time ratio':>10}   "
              f"{'qemu-img RSS':>12} {'virtopt RSS':>11} {'RSS ratio':>9}  output")
        for size, held in SIZES:
            if size == "10T" and free < 4 << 30:
                print(f"10 TiB skipped: {free / 2**30:.1f} GiB free, it needs about 2 GiB")
                continue
            img = os.path.join(d, f"{size}.qcow2")
            t = time.perf_counter()
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", img, size],
                           check=True)
            print(f"{size}: preallocation=metadata, {os.path.getsize(img) / 2**30:.0f} GiB apparent, "
                  f"{os.stat(img).st_blocks * 512 / 2**20:.0f} MiB allocated (made in {time.perf_counter() - t:.1f} s)")
            run(["qemu-img", "check", img])  # the page cache warm for both sides alike
            n = 1 if size == "10T" else 2
            for name, qargv, vargv in (
                ("check", ["qemu-img", "check", "--output=json", img], [*virtopt, "check", "--output=json", img]),
                ("map --output=json", ["qemu-img", "map", "--output=json", img],
                 [*virtopt, "map", "--output=json", "--qemu-compat", compat, img]),
                ("info", ["qemu-img", "info", "--output=json", img],
                 [*virtopt, "info", "--output=json", "--qemu-compat", compat, img]),
            ):
                qt, qrss, qout = best(qargv, n)
                vt, vrss, vout = best(vargv, n)
                identical = same_output(name.split()[0], qout, vout)
                tr, rr = vt / qt, vrss / qrss
                miss = []
                if not identical:
                    miss.append("output differs")
                if held and name != "info" and tr > 1.0:
                    miss.append("slower")
                if qrss > 100 * 1024 and rr > 1.0:
                    miss.append("more memory")
                ok &= not miss
                print(f"{size:<6} {name:<18} {qt:8.2f}s {vt:8.2f}s {tr:10.2f}   {qrss / 1024:10.0f}Mi {vrss / 1024:9.0f}Mi "
                      f"{rr:9.2f}  {'identical' if identical else 'DIFFERS'}{'  MISSED: ' + ', '.join(miss) if miss else ''}")
            os.unlink(img)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print("bench_qcow2:", "OK" if ok else "MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
