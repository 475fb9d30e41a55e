"""Fuzz `virtopt qcow2` with the structure-aware mutator for a while and print what went wrong.

    .venv/bin/python fuzz/run.py --minutes 25          # what `make fuzz FUZZ_MINUTES=25` runs
    .venv/bin/python fuzz/run.py --seconds 60 --json   # the bounded run of the test suite

Seeds are real images made by qemu-img/qemu-io (snapshots, bitmaps, compressed and zero clusters,
extended L2 over a backing file, 512-byte and 2 MiB clusters, v2, an external data file, 64-bit
refcounts, zstd). Every mutant goes through info (with the backing chain), check, map, read,
convert and dump in this process, and one in 40 through the command line as well. A finding is:
any exception that is not virtopt's one-line error (an internal error), a case over 10 s, a peak
RSS over 1 GiB, a modified image, or a command line that prints a traceback or more than one
error line. Findings are grouped by signature (kind, exception, where in qemu_ext).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from mutator import Mutator  # noqa: E402

from qemu_ext.errors import VirtoptError  # noqa: E402

CASE_LIMIT = 10.0  # seconds for one mutant, all commands
RSS_LIMIT_KB = 1 << 20  # 1 GiB
AS_LIMIT = 3 << 30  # address space: a runaway allocation becomes a MemoryError finding

SEEDS = {
    "c64k": (["-o", "cluster_size=64k"], "64M", ["write -P 1 0 128k", "write -c -P 2 1M 64k", "write -z 2M 64k",
                                                 "write -P 3 5M 4k", "discard 64k 64k"]),
    "c512": (["-o", "cluster_size=512"], "2M", ["write -P 4 0 8k", "write -c -P 5 64k 512", "write -z 96k 1k"]),
    "c2m": (["-o", "cluster_size=2M"], "64M", ["write -P 6 0 2M", "write -c -P 7 4M 2M"]),
    "extl2": (["-o", "extended_l2=on,cluster_size=16k", "-b", "base.qcow2", "-F", "qcow2"], "8M",
              ["write -P 8 4k 2k", "write -z 20k 2k", "write -c 64k 16k", "write -P 9 1M 40k"]),
    "v2": (["-o", "compat=0.10"], "16M", ["write -P 10 0 64k", "write -P 11 1M 64k"]),
    "datafile": (["-o", "data_file=datafile.raw"], "16M", ["write -P 12 0 64k", "write -P 13 1M 128k"]),
    "rc64": (["-o", "refcount_bits=64,cluster_size=4k"], "8M", ["write -P 14 0 16k", "write -c -P 15 64k 4k"]),
    "zstd": (["-o", "compression_type=zstd"], "16M", ["write -c -P 16 0 64k", "write -P 17 128k 64k"]),
}


def build_seeds(root: Path) -> dict[str, Path]:
    """One directory per seed (with its backing or data file), made by the qemu-img/qemu-io on PATH."""
    out = {}
    for name, (opts, size, io) in SEEDS.items():
        d = root / name
        d.mkdir(parents=True)
        if name == "extl2":
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / "base.qcow2"), "8M"], check=True)
            subprocess.run(["qemu-io", "-c", "write -P 18 0 1M", str(d / "base.qcow2")], check=True,
                           capture_output=True)
        img = d / "seed.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *opts, str(img), size], check=True, cwd=d)
        args = [a for c in io for a in ("-c", c)]
        subprocess.run(["qemu-io", *args, str(img)], check=True, capture_output=True, cwd=d)
        if name in ("c64k", "v2", "c512"):
            subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(img)], check=True)
            subprocess.run(["qemu-io", "-c", "write -P 19 0 4k", str(img)], check=True, capture_output=True)
        if name in ("c64k", "rc64"):
            subprocess.run(["qemu-img", "bitmap", "--add", str(img), "b0"], check=True)
        out[name] = img
    return out


def _where(exc: BaseException) -> str:
    """The innermost frame of qemu_ext in the traceback: file:line function."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "qemu_ext" in f.filename]
    if not frames:
        return "?"
    f = frames[-1]
    return f"{f.filename.split('qemu_ext/', 1)[-1]}:{f.lineno} {f.name}"


class _CaseTimeout(Exception):
    pass


def _alarm(_signum: int, _frame: object) -> None:
    raise _CaseTimeout()


def run_case(img: Path, scratch: Path) -> list[tuple[str, BaseException | None, str]]:
    """Every command on one mutant in this process: (command, exception or None, error text)."""
    from qemu_ext.qcow2.check import check_image
    from qemu_ext.qcow2.data import convert_to_raw, read_guest
    from qemu_ext.qcow2.dump import dump
    from qemu_ext.qcow2.info import image_info
    from qemu_ext.qcow2.map import image_map

    out_raw = scratch / "out.raw"
    ops = [
        ("info", lambda: image_info(img, backing_chain=True)),
        ("info-7.2", lambda: image_info(img, with_extras=False, compat=(7, 2))),
        ("check", lambda: check_image(img)),
        ("map", lambda: image_map(img)),
        ("read", lambda: read_guest(img, 0, 1 << 20)),
        ("convert", lambda: convert_to_raw(img, out_raw)),
        ("dump-header", lambda: dump(img, "header")),
        ("dump-l1", lambda: dump(img, "l1")),
        ("dump-l2", lambda: dump(img, "l2", l1_index=0)),
        ("dump-refcounts", lambda: dump(img, "refcounts")),
        ("dump-snapshots", lambda: dump(img, "snapshots")),
        ("dump-bitmaps", lambda: dump(img, "bitmaps")),
    ]
    results: list[tuple[str, BaseException | None, str]] = []
    for name, op in ops:
        try:
            op()
            results.append((name, None, ""))
        except VirtoptError as exc:
            results.append((name, None, str(exc)))
        except _CaseTimeout:
            raise
        except BaseException as exc:  # the finding
            results.append((name, exc, f"{type(exc).__name__}: {exc}"))
        finally:
            if out_raw.exists():
                out_raw.unlink()
    return results


def cli_case(img: Path) -> list[str]:
    """The command line on one mutant: no traceback, no internal error, at most one error line."""
    bad = []
    for args in (["info", str(img)], ["check", str(img)], ["map", "--output=json", str(img)], ["dump", str(img), "header"]):
        cp = subprocess.run([sys.executable, "-m", "qemu_ext", "qcow2", *args], capture_output=True, text=True,
                            timeout=60, cwd=img.parent)
        err = [ln for ln in cp.stderr.splitlines() if ln.startswith("virtopt: ") or "Traceback" in ln]
        if "Traceback" in cp.stderr or "internal error" in cp.stderr or len(err) > 1 or (cp.returncode == 1 and not err):
            bad.append(f"cli {args[0]}: exit {cp.returncode}: {cp.stderr.strip()[-300:]}")
    return bad


def fuzz(seconds: float, seed: int, work: Path, cli_every: int = 40) -> dict:
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))
    signal.signal(signal.SIGALRM, _alarm)
    seeds = build_seeds(work / "seeds")
    rnd = random.Random(seed)
    mutators = {name: Mutator(p.read_bytes(), random.Random(rnd.random())) for name, p in seeds.items()}
    report: dict = {"mutants": 0, "seconds": 0.0, "seed": seed, "slowest": None, "findings": {}, "refusals": {},
                    "max-rss-kb": 0}
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        name = rnd.choice(list(seeds))
        try:
            data, how = mutators[name].mutant()
        except Exception as exc:  # a bug of the mutator itself: counted, and the run goes on
            key = f"mutator: {type(exc).__name__}: {exc}"
            report["findings"].setdefault(key, {"count": 0, "example": {"seed": name}})["count"] += 1
            continue
        img = seeds[name].with_name("mutant.qcow2")
        img.write_bytes(data)
        st = img.stat()
        t0 = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, CASE_LIMIT)
        try:
            results = run_case(img, work)
        except _CaseTimeout:
            results = [("case", TimeoutError(f"over {CASE_LIMIT:.0f} s"), "timeout")]
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        took = time.monotonic() - t0
        report["mutants"] += 1
        case = {"seconds": round(took, 3), "seed": name, "mutations": how}
        if report["slowest"] is None or took > report["slowest"]["seconds"]:
            report["slowest"] = case
        problems = [(cmd, f"{type(exc).__name__} at {_where(exc)}", text) for cmd, exc, text in results
                    if exc is not None]
        if took > CASE_LIMIT:
            problems.append(("case", "slow", f"{took:.1f} s"))
        st2 = img.stat()
        if (st2.st_size, st2.st_mtime_ns) != (st.st_size, st.st_mtime_ns) or img.read_bytes() != data:
            problems.append(("case", "image modified", ""))
        if cli_every and report["mutants"] % cli_every == 0:
            problems += [("cli", "command line", text) for text in cli_case(img)]
        for cmd, sig, text in problems:
            key = f"{cmd}: {sig}"
            f = report["findings"].setdefault(key, {"count": 0, "example": {**case, "error": text}})
            f["count"] += 1
        for _cmd, exc, text in results:
            if exc is None and text:
                reason = text.split(": ", 1)[-1].split(" (")[0][:80]
                report["refusals"][reason] = report["refusals"].get(reason, 0) + 1
    report["seconds"] = round(time.monotonic() - start, 1)
    report["max-rss-kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if report["max-rss-kb"] > RSS_LIMIT_KB:
        report["findings"]["process: rss over 1 GiB"] = {"count": 1, "example": {"max-rss-kb": report["max-rss-kb"]}}
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, help="how long to run")
    ap.add_argument("--seconds", type=float, help="how long to run (instead of --minutes)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock, printed)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--cli-every", type=int, default=40, help="run one mutant in N through the command line too")
    args = ap.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else 60 * (args.minutes if args.minutes is not None else 5)
    seed = args.seed if args.seed is not None else int(time.time())
    work = Path(tempfile.mkdtemp(prefix="virtopt-fuzz-"))
    try:
        report = fuzz(seconds, seed, work, args.cli_every)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['mutants']} mutants in {report['seconds']} s (seed {seed}), peak RSS "
              f"{report['max-rss-kb'] // 1024} MiB")
        s = report["slowest"]
        if s:
            print(f"slowest case: {s['seconds']} s ({s['seed']}: {'; '.join(s['mutations'])})")
        print(f"refusals (one line each): {sum(report['refusals'].values())} in {len(report['refusals'])} kinds")
        if not report["findings"]:
            print("no findings: no internal error, no case over 10 s, no RSS over 1 GiB, no image modified")
        for key, f in sorted(report["findings"].items(), key=lambda kv: -kv[1]["count"]):
            ex = f["example"]
            print(f"FINDING {f['count']:>6}  {key}\n          e.g. {ex.get('seed')}: {'; '.join(ex.get('mutations', []))}"
                  f" -> {ex.get('error', '')[:200]}")
    return 1 if report["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
