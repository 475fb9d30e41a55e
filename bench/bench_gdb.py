"""Bench `virtopt gdb`: end to end against plain gdb, how long QEMU is paused, and the signal matrix.

1. End to end (issue 12, "Speed"): `virtopt gdb PID -c X` against its anchor, the plain
   `gdb -p PID -batch -ex 'source gdb/virtopt-gdb.py' -ex 'virtopt X'`, run alternately in the same
   run (median of RUNS each) on the stock and debug QEMU of each series. Targets: time ratio <= 1.3;
   QEMU paused no longer than under plain gdb. The pause of both is what a sampler thread sees in
   /proc/PID/stat (ptrace stop `t`, polled every millisecond) in separate runs (the sampler would
   slow what it times); virtopt's own `paused-seconds` is printed beside it.
2. Each command inside one gdb session (the pack's target: under 1 s), debug QEMUs only.
3. Signals (issue 12, section 1): SIGINT, SIGTERM, SIGHUP to virtopt's process group at three
   moments (symbols and pack loading, attach, a command) and SIGKILL, SIGNAL_RUNS times each; after
   each, QEMU must not be stopped (t/T) and QMP query-status must answer "running". Prints the tally.

Exit 1 when a target is missed. `python bench/bench_gdb.py [--signal-runs N] [--quick]`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from gdb_util import PauseSampler  # noqa: E402

from qemu_ext import vm  # noqa: E402
from qemu_ext.gdbmi import GdbSession, watchdog  # noqa: E402

RATIO_TARGET = 1.3
CMD_TARGET = 1.0
RUNS = 7
E2E_COMMANDS = ("info", "threads")
SESSION_COMMANDS = [
    "info", "threads", "vcpus", "mtree", "mtree --flat", "mtree lookup 0xfee00000", "timers",
    "trace list", "trace enable qcow2_cache_get", "trace disable qcow2_cache_get", "qcow2", "coroutines --pools",
]
PACK = REPO / "gdb" / "virtopt-gdb.py"


def run_once(argv: list[str], pid: int, sample: bool) -> tuple[float, float, str]:
    """Wall time, observed pause (when sampled), stdout of one run (which must succeed). Wall times come
    from runs without the sampler: its thread competes for the CPUs with what it measures."""
    sampler = PauseSampler(pid) if sample else None
    if sampler is not None:
        sampler.__enter__()
    try:
        t0 = time.perf_counter()
        cp = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - t0
    finally:
        if sampler is not None:
            sampler.__exit__()
    if cp.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({cp.returncode}): {cp.stderr.strip()[-300:]}")
    return wall, sampler.seconds if sampler is not None else 0.0, cp.stdout


def bench_e2e(label: str, qp: vm.QemuProcess) -> list[str]:
    missed = []
    print(f"\n{label}: pid {qp.pid}, {qp.accel} — end to end, median of {RUNS} timed and {RUNS} sampled runs "
          "(alternating)")
    print(f"  {'command':<10} {'plain gdb':>10} {'virtopt':>9} {'ratio':>6}   {'paused: plain':>13} "
          f"{'virtopt':>8} {'(reported)':>10}")
    for cmd in E2E_COMMANDS:
        plain = ["gdb", "-p", str(qp.pid), "-batch", "-ex", f"source {PACK}", "-ex", f"virtopt {cmd}"]
        ours = [sys.executable, "-m", "qemu_ext", "gdb", str(qp.pid), "-c", cmd, "--output=json"]
        pw, pp, ow, op, rep = [], [], [], [], []
        for i in range(2 * RUNS):
            sample = i % 2 == 1  # alternately timed and sampled, plain and ours side by side
            w, p, _ = run_once(plain, qp.pid, sample)
            (pp if sample else pw).append(p if sample else w)
            w, p, out = run_once(ours, qp.pid, sample)
            (op if sample else ow).append(p if sample else w)
            if sample:
                rep.append(json.loads(out)["paused-seconds"])
        mp, mo = statistics.median(pw), statistics.median(ow)
        ratio = mo / mp
        pause_p, pause_o = statistics.median(pp), statistics.median(op)
        flags = []
        if ratio > RATIO_TARGET:
            flags.append(f"MISSED ratio <= {RATIO_TARGET}")
            missed.append(f"{label}: {cmd} ratio {ratio:.2f}")
        if pause_o > pause_p:
            flags.append("MISSED pause <= plain gdb's")
            missed.append(f"{label}: {cmd} paused {pause_o:.3f} s > plain {pause_p:.3f} s")
        print(f"  {cmd:<10} {mp:>9.3f}s {mo:>8.3f}s {ratio:>6.2f}   {pause_p:>12.3f}s {pause_o:>7.3f}s "
              f"{statistics.median(rep):>9.3f}s  {'; '.join(flags)}", flush=True)
    assert qp.hmp("info status").strip().endswith("running")
    return missed


def bench_session(label: str, qp: vm.QemuProcess) -> list[str]:
    missed = []
    print(f"\n{label}: each command in one gdb session (median of 3; target < {CMD_TARGET:.0f} s)")
    with GdbSession(qp.pid) as s:
        for cmd in SESSION_COMMANDS:
            line = f"virtopt {cmd} --json"
            first = s.run(line)
            if not first.ok:
                print(f"  {cmd:<28} {'n/a':>8}   ({(first.error or '')[:70]})")
                continue
            ts = []
            for _ in range(3):
                t0 = time.perf_counter()
                s.run(line)
                ts.append(time.perf_counter() - t0)
            t = statistics.median(ts)
            flag = "" if t < CMD_TARGET else f"  MISSED (target < {CMD_TARGET:.0f} s)"
            print(f"  {cmd:<28} {t:>8.4f}s{flag}", flush=True)
            if t >= CMD_TARGET:
                missed.append(f"{label}: {cmd} {t:.2f} s")
    return missed


# ---------------------------------------------------------------- signals


def _gdb_child(pid: int) -> Optional[int]:
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            for k in (task / "children").read_text().split():
                if Path(f"/proc/{k}/comm").read_text().strip() == "gdb":
                    return int(k)
        except OSError:
            continue
    return None


def _wait(cond: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0005)
    return True


def _one_signal(qp: vm.QemuProcess, sig: int, moment: str, work: Path, n: int) -> tuple[bool, str]:
    marker = work / f"started-{n}"
    sleeper = f"python import time; open({str(marker)!r}, 'w').close(); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-m", "qemu_ext", "gdb", str(qp.pid), "-c", sleeper], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    if moment == "symbols":
        hit = _wait(lambda: _gdb_child(proc.pid) is not None or proc.poll() is not None)
    elif moment == "attach":
        hit = _wait(lambda: "t" in watchdog.states(qp.pid).values() or proc.poll() is not None)
    else:
        hit = _wait(lambda: marker.exists() or proc.poll() is not None)
    if not hit or proc.poll() is not None:
        proc.kill()
        proc.communicate()
        return False, f"missed the moment ({proc.returncode})"
    os.killpg(proc.pid, sig)
    _out, err = proc.communicate(timeout=60)
    settle = 15.0 if sig == signal.SIGKILL else 0.0
    deadline = time.monotonic() + settle
    while set(watchdog.states(qp.pid).values()) & {"t", "T"} and time.monotonic() < deadline:
        time.sleep(0.02)
    states = set(watchdog.states(qp.pid).values())
    status = qp.hmp("info status").strip()
    ok = bool(states) and not states & {"t", "T"} and status.endswith("running")
    if sig != signal.SIGKILL:
        ok = ok and proc.returncode == 128 + sig and err.count("\n") == 1
    marker.unlink(missing_ok=True)
    return ok, f"rc={proc.returncode} states={''.join(sorted(states))} {status!r} {err.strip()[-120:]!r}"


def bench_signals(qp: vm.QemuProcess, runs: int) -> list[str]:
    print(f"\nsignals to virtopt's process group ({qp.build.label if qp.build else qp.binary}, pid {qp.pid}), "
          f"{runs} runs each: QEMU running afterwards")
    missed = []
    with tempfile.TemporaryDirectory(prefix="virtopt-bench-sig-") as d:
        n = 0
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL):
            for moment in ("symbols", "attach", "command"):
                good = 0
                notes = []
                for _ in range(runs):
                    n += 1
                    ok, why = _one_signal(qp, sig, moment, Path(d), n)
                    good += ok
                    if not ok:
                        notes.append(why)
                flag = "" if good == runs else f"  FAILED: {notes[0]}"
                print(f"  {signal.Signals(sig).name:<8} during {moment:<8} {good:>3}/{runs}{flag}", flush=True)
                if good != runs:
                    missed.append(f"{signal.Signals(sig).name} during {moment}: {good}/{runs}")
    return missed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--signal-runs", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="debug 7.2 and stock 7.2 only, 2 signal runs")
    ap.add_argument("--builds", help="only these QEMUs, e.g. 7.2,10.0-debug (labels of qemu_ext.vm.QemuBuild)")
    args = ap.parse_args()
    missed: list[str] = []
    started: list[vm.QemuProcess] = []
    work = Path(tempfile.mkdtemp(prefix="virtopt-bench-gdb-"))
    try:
        builds = [b for b in vm.qemu_builds() if not args.quick or b.series == "7.2"]
        if args.builds:
            builds = [b for b in builds if b.label in args.builds.split(",")]
        for b in builds:
            img = work / f"{b.label}.qcow2"
            subprocess.run([b.img, "create", "-q", "-f", "qcow2", str(img), "1G"], check=True, env=b.env())
            qp = vm.start_qemu(build=b, name=f"bench-gdb-{b.label}", smp=2,
                               drives=[f"file={img},if=none,id=d0,format=qcow2"])
            started.append(qp)
            qp.hmp('qemu-io d0 "write 0 1M"')
            label = f"QEMU {b.label} ({'DWARF' if b.debug else 'symbols only'})"
            missed += bench_e2e(label, qp)
            if b.debug:
                missed += bench_session(label, qp)
        stock = next((qp for qp in started if qp.build is not None and not qp.build.debug), None)
        if stock is not None:
            missed += bench_signals(stock, 2 if args.quick else args.signal_runs)
    finally:
        for qp in started:
            qp.stop()
        for p in work.iterdir():
            p.unlink()
        work.rmdir()
    if missed:
        print("\nmissed targets: " + "; ".join(missed))
        return 1
    print(f"\nend to end within {RATIO_TARGET}x of plain gdb, QEMU paused no longer than under plain gdb, "
          "every signal left QEMU running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
