"""Bench `virtopt shell` start-up against its anchor, qemu.qmp's qmp-shell (the venv's), in the same run.

Each shell starts in a pseudo-terminal, as a person starts it, on the same QEMU (one per series,
stock build), alternately, RUNS times each. Measured: wall time from exec to the prompt on the
terminal and the resident memory then (VmRSS); for virtopt also when its line editor took over
(prompt-toolkit's cursor-position request: before that, keys typed and pastes wait in the terminal
and reach the editor as typeahead, tested in tests/test_shell_repl.py) and when completion is ready (the
schema loads in the background; Tab waits for it). Target (issue 14): the prompt up in at most 1.5x
qmp-shell's time (median ratio). Exit 1 when missed.

    python bench/bench_shell.py [--runs N] [--series 7.2]
"""

from __future__ import annotations

import argparse
import os
import pty
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from qemu_ext import vm  # noqa: E402

RATIO_TARGET = 1.5
VENV_BIN = Path(sys.executable).parent


def rss_kib(pid: int) -> int:
    try:
        for ln in Path(f"/proc/{pid}/status").read_text().splitlines():
            if ln.startswith("VmRSS:"):
                return int(ln.split()[1])
    except OSError:
        pass
    return 0


def start_in_pty(argv: list[str], prompt: bytes, editor: bytes = b"", then: bytes = b"", ready: bytes = b"",
                 timeout: float = 30.0) -> dict[str, float]:
    """Run argv on a new pty. Returns seconds to ``prompt`` on the terminal ("prompt") with VmRSS KiB then
    ("rss"), to ``editor`` ("editor", "editor-rss"), and to ``ready`` after typing ``then`` ("ready");
    0 for what was not asked. Answers cursor-position queries as a terminal does; ends the program
    with Ctrl-U Ctrl-D (SIGKILL if it lingers)."""
    master, slave = pty.openpty()
    env = dict(os.environ, TERM="xterm", COLUMNS="120", LINES="40")
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True,
                            start_new_session=True, cwd="/")
    os.close(slave)
    seen = b""
    got: dict[str, float] = {"prompt": 0.0, "rss": 0, "editor": 0.0, "editor-rss": 0, "ready": 0.0}
    typed = False
    try:
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            r, _, _ = select.select([master], [], [], 0.002)
            if not r:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            seen += chunk
            now = time.monotonic() - t0
            if b"\x1b[6n" in chunk:
                os.write(master, b"\x1b[1;1R")
            if not got["prompt"] and prompt in seen:
                got["prompt"], got["rss"] = now, rss_kib(proc.pid)
            if editor and not got["editor"] and editor in seen:
                got["editor"], got["editor-rss"] = now, rss_kib(proc.pid)
            if got["prompt"] and (got["editor"] or not editor):
                if not then:
                    break
                if not typed:
                    os.write(master, then)
                    typed, seen = True, b""
                elif ready in seen:
                    got["ready"] = now
                    break
        if not got["prompt"]:
            raise RuntimeError(f"{argv[0]}: no prompt within {timeout:g} s; it printed {seen[-400:]!r}")
    finally:
        try:
            os.write(master, b"\x15\x04")
        except OSError:
            pass
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.close(master)
    return got


def bench_series(series: str, runs: int) -> bool:
    build = vm.find_build(series)
    if build is None:
        print(f"QEMU {series}: not installed, skipped")
        return True
    qp = vm.start_qemu(build=build, name="benchvm", workdir=Path(tempfile.mkdtemp(prefix="virtopt-bench-shell-")))
    try:
        sock = str(qp.qmp_path)
        anchor = [str(VENV_BIN / "qmp-shell"), sock]
        ours = [str(VENV_BIN / "virtopt"), "shell", sock, "--history", ""]
        anchor_runs, our_runs = [], []
        for _ in range(runs):
            anchor_runs.append(start_in_pty(anchor, b"(QEMU) "))
            # after the prompt, Tab on "query-stats-sc": completion is ready when the rest comes back
            # (prompt-toolkit asks the terminal for the cursor position as it takes over)
            our_runs.append(start_in_pty(ours, b"(QEMU benchvm)", editor=b"\x1b[6n",
                                         then=b"query-stats-sc\t", ready=b"hemas"))
    finally:
        qp.stop()

    def med(rs: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in rs)

    at, ot = med(anchor_runs, "prompt"), med(our_runs, "prompt")
    ratio = ot / at
    print(f"QEMU {build.label}, {runs} runs each, median:")
    print(f"  qmp-shell (anchor)   prompt {at * 1000:5.0f} ms  RSS {med(anchor_runs, 'rss') / 1024:5.1f} MiB")
    print(f"  virtopt shell        prompt {ot * 1000:5.0f} ms  RSS {med(our_runs, 'rss') / 1024:5.1f} MiB;"
          f"  line editor {med(our_runs, 'editor') * 1000:.0f} ms ({med(our_runs, 'editor-rss') / 1024:.1f} MiB);"
          f"  completion ready {med(our_runs, 'ready') * 1000:.0f} ms")
    ok = ratio <= RATIO_TARGET
    print(f"  ratio {ratio:.2f} (target <= {RATIO_TARGET}) {'ok' if ok else 'MISSED'};"
          f" line editor / qmp-shell prompt {med(our_runs, 'editor') / at:.2f}")
    return ok


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--series", action="append", choices=vm.SERIES)
    args = ap.parse_args(argv)
    ok = True
    for series in args.series or vm.SERIES:
        ok &= bench_series(series, args.runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
