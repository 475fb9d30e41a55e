"""Bench: `virtopt trace decode` / `virtopt trace summary` against QEMU's scripts/simpletrace.py.

Captures (once, cached in a temp dir) a simpletrace file of at least 900,000 events from the
debug QEMU: qemu-io random 128 KiB reads over a fragmented qcow2 image (every read crosses two
clusters that are not contiguous on the host: cache_get, cache_get_done and add_task twice).
Then, in the same run: simpletrace.py's text, `virtopt trace decode` (its output must be
byte-identical), `virtopt trace summary`. Required: decode >= 10x, summary >= 20x faster.
"""

from __future__ import annotations

import filecmp
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from trace_util import capture_qemu_io, events_file  # noqa: E402

from qemu_ext import vm  # noqa: E402

MIN_EVENTS = 900_000
READS = 165_000
DECODE_TARGET = 10.0
SUMMARY_TARGET = 20.0
CACHE = Path(tempfile.gettempdir()) / "virtopt-bench-trace"


def capture(src: Path) -> Path:
    CACHE.mkdir(exist_ok=True)
    trace = CACHE / f"qemu-io-{READS}-reads.bin"
    if trace.is_file():
        from qemu_ext.trace import decode_simple

        try:
            if len(decode_simple(trace)) >= MIN_EVENTS:
                return trace
        except Exception:
            pass
    img = CACHE / "frag.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "64M"], check=True)
    # allocate even clusters first, then odd ones: guest-contiguous clusters are not host-contiguous
    cmds = [f"write -P 0x{i % 250 + 1:x} {i * 65536} 64k" for i in list(range(0, 1024, 2)) + list(range(1, 1024, 2))]
    subprocess.run(["qemu-io", "-f", "qcow2", str(img)], input="\n".join([*cmds, "quit"]) + "\n", text=True,
                   capture_output=True, check=True)
    rng = random.Random(2024)
    reads = [f"read {rng.randrange(0, 1023) * 65536} 128k" for _ in range(READS)]
    print(f"capturing a trace: debug qemu-io, {READS} random 128k reads (once; cached in {CACHE}) ...", flush=True)
    tmp = trace.with_suffix(".tmp")
    capture_qemu_io(src, img, tmp, reads, image_opts=f"driver=qcow2,file.filename={img}")
    tmp.rename(trace)
    return trace


# Both sides run with compiled bytecode kept in a private cache (as after a normal install),
# also where PYTHONDONTWRITEBYTECODE is set: nothing is written into the source trees.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
ENV["PYTHONPYCACHEPREFIX"] = str(CACHE / "pycache")


def timed(argv: list[str], out: Path, runs: int = 1) -> tuple[float, float]:
    """(best wall-clock seconds, CPU seconds of that run) of a command writing to out."""
    best = (float("inf"), 0.0)
    for _ in range(runs):
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        with open(out, "wb") as f:
            t = time.perf_counter()
            cp = subprocess.run(argv, stdout=f, stderr=subprocess.PIPE, env=ENV)
            dt = time.perf_counter() - t
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if cp.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed: {cp.stderr.decode()[-500:]}")
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        best = min(best, (dt, cpu))
    return best


def main() -> int:
    src = vm.debug_qemu_dir()
    if src is None:
        print("bench_trace: the debug QEMU is not built (make debug-qemu)")
        return 2
    trace = capture(src)
    from qemu_ext.trace import decode_simple

    st = decode_simple(trace)
    n = len(st)
    size = trace.stat().st_size
    print(f"trace: {trace} ({size / 1e6:.1f} MB, {n:,} events: {st.counts()})")
    if n < MIN_EVENTS:
        print(f"bench_trace: only {n} events (< {MIN_EVENTS})")
        return 1
    ev = events_file(src)
    work = Path(tempfile.mkdtemp(prefix="virtopt-bench-trace-"))
    py = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    virtopt = [sys.executable, "-m", "qemu_ext"]
    group_only = [sys.executable, "-m", "qemu_ext.trace"]
    env_note = f"{os.cpu_count()} cpus, load {os.getloadavg()[0]:.2f}"
    null = Path(os.devnull)
    try:
        # correctness first (not timed): the same bytes as QEMU's decoder
        timed([py, str(src / "scripts" / "simpletrace.py"), str(ev), str(trace)], work / "ref.txt")
        timed([*virtopt, "trace", "decode", str(trace), "--events", str(ev)], work / "ours.txt")
        same = filecmp.cmp(work / "ref.txt", work / "ours.txt", shallow=False)
        (work / "ref.txt").unlink()
        (work / "ours.txt").unlink()
        # timed runs, text to /dev/null
        t_ref, c_ref = timed([py, str(src / "scripts" / "simpletrace.py"), str(ev), str(trace)], null, runs=2)
        t_dec, c_dec = timed([*virtopt, "trace", "decode", str(trace), "--events", str(ev)], null, runs=3)
        t_sum, c_sum = timed([*virtopt, "trace", "summary", str(trace), "--events", str(ev)], null, runs=3)
        t_sumj, _ = timed([*virtopt, "trace", "summary", str(trace), "--output=json"], null, runs=3)
        t_dec1, _ = timed([*group_only, "decode", str(trace), "--events", str(ev)], null, runs=3)
        t_sum1, _ = timed([*group_only, "summary", str(trace), "--events", str(ev)], null, runs=3)
        t_start, _ = timed([*virtopt, "--help"], null, runs=3)
    finally:
        for p in work.iterdir():
            p.unlink()
        work.rmdir()
    r_dec = t_ref / t_dec
    r_sum = t_ref / t_sum
    print(f"machine: {env_note}")
    print(f"simpletrace.py (QEMU's decoder)    : {t_ref:7.3f} s wall, {c_ref:7.3f} s CPU  ({n / t_ref:,.0f} events/s)")
    print(f"virtopt trace decode (simpletrace) : {t_dec:7.3f} s wall, {c_dec:7.3f} s CPU  ratio {r_dec:5.1f}x wall, "
          f"{c_ref / c_dec:5.1f}x CPU (target {DECODE_TARGET:.0f}x); output identical: {same}")
    print(f"virtopt trace summary              : {t_sum:7.3f} s wall, {c_sum:7.3f} s CPU  ratio {r_sum:5.1f}x wall, "
          f"{c_ref / c_sum:5.1f}x CPU (target {SUMMARY_TARGET:.0f}x)")
    print(f"virtopt trace summary --output=json: {t_sumj:7.3f} s wall  ratio {t_ref / t_sumj:5.1f}x")
    print(f"`virtopt --help` (CLI start-up; a run imports only the group it names): {t_start:.3f} s")
    print(f"python -m qemu_ext.trace (the trace group alone): decode {t_dec1:.3f} s ({t_ref / t_dec1:.1f}x), "
          f"summary {t_sum1:.3f} s ({t_ref / t_sum1:.1f}x)")
    ok = same and r_dec >= DECODE_TARGET and r_sum >= SUMMARY_TARGET
    if not ok and same and t_ref / t_dec1 >= DECODE_TARGET and t_ref / t_sum1 >= SUMMARY_TARGET:
        print("note: the trace code meets the targets on its own; `virtopt` start-up (other groups' imports) does not")
    print("bench_trace:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
