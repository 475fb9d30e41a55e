"""Bench the gdb pack: each command's answer time in one gdb session, and `virtopt gdb PID -c ...` end to end.

Targets: every command answers in under 1 s on the test QEMU; `virtopt gdb` end to end
(python start, gdb start, attach, pack load, command, detach) in under 3 s. The anchor
is QEMU answering the same question over QMP (query-cpus-fast, HMP info mtree,
trace-event-get-state), timed in the same run; the ratio is printed for information.
Exit 1 when a target is missed.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from qemu_ext import vm  # noqa: E402
from qemu_ext.gdbmi import GdbSession  # noqa: E402

CMD_TARGET = 1.0
E2E_TARGET = 3.0
RUNS = 3
COMMANDS = [
    "info", "threads", "vcpus", "mtree", "mtree --flat", "mtree lookup 0xfee00000", "timers",
    "trace list", "trace enable qcow2_cache_get", "trace disable qcow2_cache_get", "qcow2", "coroutines --pools",
]
ANCHORS = {  # command -> what QEMU answers over QMP for the same question
    "vcpus": ("query-cpus-fast", {}),
    "threads": ("query-cpus-fast", {}),
    "mtree": ("human-monitor-command", {"command-line": "info mtree"}),
    "mtree --flat": ("human-monitor-command", {"command-line": "info mtree -f"}),
    "trace list": ("trace-event-get-state", {"name": "*"}),
}


def timed(fn, runs: int = RUNS) -> float:
    """Median wall time of fn over runs."""
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench_qemu(label: str, qp: vm.QemuProcess) -> list[str]:
    missed = []
    client = qp._clients[0] if qp._clients else qp.qmp()  # one QMP client per socket: reuse it
    # QEMU is stopped while gdb is attached: time QMP's answers first
    anchors = {cmd: timed(lambda name=name, kw=kw: client.cmd(name, **kw)) for cmd, (name, kw) in ANCHORS.items()}
    print(f"\n{label}: pid {qp.pid}, {qp.accel}")
    print(f"  {'command':<32} {'gdb (s)':>8} {'QMP anchor (s)':>15} {'ratio':>7}")
    with GdbSession(qp.pid) as s:
        for cmd in COMMANDS:
            line = f"virtopt {cmd} --json"
            first = s.run(line)
            if not first.ok:
                print(f"  {cmd:<32} {'n/a':>8}   ({first.error[:70]})")
                continue
            t = timed(lambda line=line: s.run(line))
            anchor = ""
            if cmd in anchors:
                ta = anchors[cmd]
                anchor = f"{ta:>15.4f} {t / ta:>7.1f}"
            flag = "" if t < CMD_TARGET else "  MISSED (target < 1 s)"
            print(f"  {cmd:<32} {t:>8.4f} {anchor}{flag}", flush=True)
            if t >= CMD_TARGET:
                missed.append(f"{label}: {cmd} {t:.2f} s")
    for cmd in ("virtopt threads --json", "virtopt info --json"):
        argv = [sys.executable, "-m", "qemu_ext", "gdb", str(qp.pid), "-c", cmd]

        def e2e(argv=argv) -> None:
            cp = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
            if cp.returncode != 0:
                raise SystemExit(f"{' '.join(argv)} failed: {cp.stderr}")

        t = timed(e2e)
        flag = "" if t < E2E_TARGET else "  MISSED (target < 3 s)"
        print(f"  end to end: virtopt gdb PID -c '{cmd}': {t:.3f} s{flag}")
        if t >= E2E_TARGET:
            missed.append(f"{label}: end to end {cmd} {t:.2f} s")
    tv = timed(lambda: subprocess.run([sys.executable, "-m", "qemu_ext", "--version"], capture_output=True, cwd=REPO))
    print(f"  (of which python start + virtopt CLI import: {tv:.3f} s)")
    assert client.cmd("query-status")["status"] in ("running", "prelaunch")
    return missed


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="virtopt-bench-gdb-"))
    img = work / "d0.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1G"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write 0 1M", "-c", "write 600M 1M", str(img)],
                   check=True, capture_output=True)
    missed: list[str] = []
    started: list[vm.QemuProcess] = []
    try:
        src = vm.debug_qemu_dir()
        if src is None:
            print("debug QEMU not built (tests/qemu/build-debug-qemu): benching Debian's QEMU only")
        else:
            qp = vm.start_qemu(binary=str(src / "build" / "qemu-system-x86_64"), name="bench-gdb", smp=2,
                               drives=[f"file={img},if=none,id=d0,format=qcow2"])
            started.append(qp)
            qp.hmp('qemu-io d0 "read 0 64k"')
            qp.hmp('qemu-io d0 "read 600M 64k"')
            missed += bench_qemu("debug QEMU (DWARF)", qp)
        img2 = work / "e0.qcow2"  # its own image: the debug QEMU holds the write lock on d0
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img2), "64M"], check=True)
        qp2 = vm.start_qemu(name="bench-gdb", drives=[f"file={img2},if=none,id=d0,format=qcow2"])
        started.append(qp2)
        missed += bench_qemu("Debian QEMU (symbols only)", qp2)
    finally:
        for qp in started:
            qp.stop()
        for p in work.iterdir():
            p.unlink()
        work.rmdir()
    if missed:
        print("\nmissed targets: " + "; ".join(missed))
        return 1
    print(f"\nall gdb commands under {CMD_TARGET:.0f} s, end to end under {E2E_TARGET:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
