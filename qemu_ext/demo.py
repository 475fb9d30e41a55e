"""`virtopt demo`: a guided tour on a throw-away VM. Each step is one headline that says what was
found and why it matters, then the evidence, then the command that shows it on your own VM.

Everything is real: qemu-img creates a qcow2 image, QEMU (Debian's, KVM when /dev/kvm opens, else
TCG) runs with the image as a -blockdev qcow2 node whose L2 cache is too small on purpose, and HMP
``qemu-io`` drives reads and writes through QEMU's block layer (no guest OS is needed for that).
The steps call the library functions of each area (they return data; this module renders them):

1. the VM and its cache (qemu_ext.l2cache.node: what the node's l2-cache-size maps),
2. the image (qemu_ext.qcow2.check / info: qemu-img check's counts and what qemu-img hides),
3. the threads (qemu_ext.host.threads.thread_map with QMP's vCPU TIDs),
4-6. the L2 cache measured live, the recommendation, and the recommendation set live with
   blockdev-reopen and measured again (qemu_ext.l2cache.tune.tune, one capture per window through
   qemu_ext.qmp.capture, which turns the trace events off again on every exit path),
7. host and VM checks (qemu_ext.host.doctor.run_doctor),
8. QEMU's memory read without stopping it (qemu_ext.introspect, drgn).

QEMU is stopped and every file it made is removed before the demo returns; with ``--keep DIR`` the
image and QEMU's log (with the trace events captured) stay in DIR, nothing else (no socket).
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from qemu_ext.errors import NotAvailableError, UsageError, VirtoptError

EPILOG = """\
examples:
  virtopt demo
  virtopt demo --size 1G --l2-cache-size 1M          (a cache that covers the disk: nothing to gain)
  virtopt demo --keep /tmp/demo                      (keep the image and QEMU's log with the trace)

Each step prints one headline (what was found and why it matters), the evidence, and the virtopt
command that shows the same on your own VM. It takes about 10 s: QEMU starting, the image check,
two captures of --reads reads (before and after the change) and the host checks. QEMU is stopped
and its files removed at the end, also on Ctrl-C or an error.
exit codes: 0 the tour ran, 1 a step failed, 2 usage error or QEMU/qemu-img missing.
"""

NODE = "disk0"
VM_NAME = "virtopt-demo"
CLUSTER = 65536
INDENT = "      "


# -- options ---------------------------------------------------------------------------------------


def _size(what: str, lo: int, hi: int) -> Callable[[str], int]:
    def conv(text: str) -> int:
        from qemu_ext.l2cache.options import parse_size
        from qemu_ext.output import human_size

        try:
            n = parse_size(text)
        except VirtoptError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if not lo <= n <= hi:
            raise argparse.ArgumentTypeError(f"{text} is out of range ({what} from {human_size(lo)} to "
                                             f"{human_size(hi)})")
        return n

    return conv


def _keep_dir(text: str) -> Path:
    p = Path(text)
    if p.exists() and not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: not a directory")
    return p


def register(sub: argparse._SubParsersAction, name: str, summary: str) -> None:
    from qemu_ext.output import number

    p = sub.add_parser(name, help=summary, description=summary, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=_size("a disk", 1 << 20, 1 << 50), default=16 << 30, metavar="SIZE",
                   help="virtual size of the demo image, 1M to 1P (default 16G)")
    p.add_argument("--l2-cache-size", type=_size("a cache", 0, 1 << 32), default=256 << 10, metavar="SIZE",
                   help="l2-cache-size given to QEMU for the image, 0 to 4G (default 256K: too small on purpose; "
                        "QEMU raises it to 2 clusters and caps it at what covers the disk)")
    p.add_argument("--writes", type=number(int, 0, 100000), default=192, metavar="N",
                   help="scattered 64 KiB writes that allocate clusters, 0 to 100000 (default 192)")
    p.add_argument("--reads", type=number(int, 1, 1000000), default=1500, metavar="N",
                   help="4 KiB random reads in each live capture (the same ones before and after the change), "
                        "1 to 1000000 (default 1500)")
    p.add_argument("--target", type=number(float, 0.01, 1), default=0.99, metavar="R",
                   help="warm hit ratio the recommendation aims at, 0.01 to 1 (default 0.99)")
    p.add_argument("--skip-inspect", "--skip-gdb", dest="skip_inspect", action="store_true",
                   help="leave out the last step (reading QEMU's memory with drgn)")
    p.add_argument("--keep", metavar="DIR", type=_keep_dir,
                   help="work in DIR and keep the image and QEMU's log (with the captured trace events) there")
    p.set_defaults(func=run)


# -- rendering ---------------------------------------------------------------------------------------


class Tour:
    """Numbered steps: a headline, then indented evidence."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.n = 0

    def step(self, headline: str) -> None:
        self.n += 1
        print(f"\n[{self.n}/{self.total}] {headline}", flush=True)

    def say(self, *lines: str) -> None:
        for text in lines:
            for ln in text.splitlines():
                print(f"{INDENT}{ln}" if ln else "", flush=True)

    def cmd(self, text: str) -> None:
        """The virtopt command that shows this on the user's own VM or image."""
        print(f"{INDENT}try: {text}", flush=True)


def _status(text: str) -> None:
    """What is running now, on a terminal only (stderr): steps that wait say what they wait for."""
    if sys.stderr.isatty():
        print(f"{INDENT}... {text}", file=sys.stderr, flush=True)


# -- the workload ------------------------------------------------------------------------------------


def _reads(vsize: int, written: list[int], count: int) -> Callable[[Any], Any]:
    """``count`` guest-like 4 KiB random reads, 80% in the written clusters: the same sequence in every
    capture window, so that before and after see exactly the same workload."""

    async def during(s: Any) -> None:
        from qemu_ext.output import progress

        rng = random.Random(11)
        with progress(count, "random reads", unit="read") as bar:  # on a terminal, after a second
            for _ in range(count):
                if written and rng.random() < 0.8:
                    off = rng.choice(written) + rng.randrange(CLUSTER // 4096) * 4096
                else:
                    off = rng.randrange(max(1, vsize // 4096)) * 4096
                await s.hmp(f'qemu-io {NODE} "read {off} 4k"')
                bar.update(1)

    return during


# -- the steps ---------------------------------------------------------------------------------------


def _step_vm(tour: Tour, s: Any, qp: Any, shown: str, args: argparse.Namespace, writes: list[int]) -> None:
    from qemu_ext.l2cache import node as N
    from qemu_ext.l2cache import options as O
    from qemu_ext.output import count, human_size

    info = s.call(N.node_caches, NODE)[0]
    q = s.session.version.get("qemu", {})
    v = f"{q.get('major')}.{q.get('minor')}.{q.get('micro')}"
    cache = human_size(info.config.l2_memory)
    if info.full_coverage:
        maps = "enough to map the whole disk"
    else:
        share = info.virtual_size / max(1, info.coverage)
        maps = f"enough to map {human_size(info.coverage)} of it (1/{share:.0f})" if share >= 1.5 else \
            f"enough to map {human_size(info.coverage)} of it"
    tour.step(f"QEMU {v} runs a throw-away VM whose {human_size(info.virtual_size)} qcow2 disk has a "
              f"{cache} L2 cache: {maps}")
    asked = args.l2_cache_size
    if asked != info.config.l2_memory:
        why = "caps it at what covers the disk" if asked > info.config.l2_memory else "raises it to its minimum"
        tour.say(f"l2-cache-size={asked} was asked; QEMU {why}: {cache}")
    default = O.resolve(info.cluster_size, info.virtual_size, info.extended_l2, qemu_version=info.qemu_version)
    tour.say(f"pid {qp.pid}, accelerator {qp.accel}; the image {shown} is node {NODE}: -blockdev "
             f"driver=qcow2,node-name={NODE},l2-cache-size={asked},file.filename={shown}",
             f"QEMU's default for this disk would be {human_size(default.l2_memory)}; every L2 lookup that "
             f"misses the cache reads a table slice from the disk",
             f"{count(len(writes))} scattered 64 KiB writes went through QEMU's block layer (HMP qemu-io), "
             f"then a flush")


def _step_image(tour: Tour, image: Path, shown: str) -> None:
    from qemu_ext.output import human_size, percent
    from qemu_ext.qcow2.check import check_image
    from qemu_ext.qcow2.info import image_info

    res = check_image(image)
    extra = image_info(image)[0]["virtopt"]
    if res.exit_code == 0:
        verdict = "consistent (no leak, no corruption), as qemu-img check would say"
    else:
        verdict = f"NOT consistent: {res.corruptions} corruptions, {res.leaks} leaks"
    tour.step(f"The image is {verdict}: {extra['data-clusters']} data clusters, "
              f"{extra['l2-tables-allocated']} L2 tables")
    data = extra["data-clusters"] * CLUSTER
    tour.say(f"{human_size(extra['metadata-bytes'])} of metadata for {human_size(data)} of data; "
             f"{res.allocated_clusters}/{res.total_clusters} clusters allocated, fragmentation "
             f"{percent(extra['fragmentation'])}",
             "virtopt reads it read-only and recomputes every refcount, listing each problem with the table "
             "that points at it")
    img = shown if "/" in shown else "disk.qcow2"
    tour.cmd(f"virtopt qcow2 check {img}; virtopt qcow2 info {img}")


def _step_threads(tour: Tour, s: Any, pid: int) -> tuple[list[dict], list[dict]]:
    from qemu_ext.host import procfs, roles
    from qemu_ext.host.threads import thread_map
    from qemu_ext.output import table

    vcpus = s.execute("query-cpus-fast")
    iothreads = s.execute("query-iothreads")
    threads = thread_map(pid, vcpus, iothreads)
    cpus = [t for t in threads if t.role == "vcpu"]
    host = procfs.format_cpu_list(sorted({c for t in threads for c in t.affinity}))
    free = [t for t in cpus if len(t.affinity) > 1]
    names = ", ".join(t.name for t in cpus)
    if free:
        why = (f"{'they' if len(free) > 1 else 'it'} may run on any CPU ({host}), beside QEMU's other threads: "
               f"pin them to keep a vCPU on its own CPU")
    else:
        why = "each is pinned to one CPU"
    tour.step(f"QEMU runs {len(threads)} threads; {len(cpus)} are vCPUs ({names}): {why}")
    # QEMU's thread pool grows with I/O: its workers as one line, every other thread as a row
    workers = [t for t in threads if t.role == "worker"]
    rows = [t.row() for t in threads if t.role != "worker" or len(workers) <= 3]
    tour.say(table(roles.COLUMNS, rows, right=(0, 3)))
    if len(workers) > 3:
        tour.say(f"and {len(workers)} worker threads (QEMU's thread pool for blocking I/O), not shown")
    online = sorted({c for t in threads for c in t.affinity})
    plan = ",".join(f"vcpu{t.vcpu_index}={online[(i + 1) % len(online)]}" for i, t in enumerate(cpus)
                    if t.vcpu_index is not None)
    tour.cmd("virtopt threads web1" + (f"; virtopt threads web1 --pin {plan}" if free and plan else "")
             + "    (web1: your VM's -name, a PID or a QMP socket)")
    return vcpus, iothreads


def _measure(s: Any, args: argparse.Namespace, writes: list[int], what: str,
             known: Optional[dict[str, dict[str, Any]]] = None) -> dict[str, Any]:
    """One capture of the demo's reads through the library's closed loop (measured, predicted at the
    current setting, recommendation); nothing is applied here."""
    from qemu_ext.l2cache import tune as T

    _status(f"{what}: capturing QEMU's L2 lookups during {args.reads:,} random reads")
    return s.call(T.tune, NODE, seconds=0.1, target=args.target, apply=False, known_options=known,
                  during=_reads(args.size, writes, args.reads), baseline=0, probe=False)


def _reopen(s: Any, rec: dict[str, Any]) -> tuple[Optional[str], dict[str, Any]]:
    """Set the recommendation live with blockdev-reopen, the node's other options passed again
    (NodeCache.reopen_options); (why not, or None; the options given)."""
    from qemu_ext.l2cache import node as N
    from qemu_ext.qmp.errors import QmpCommandError

    info = s.call(N.node_caches, NODE)[0]
    why = info.reopen_refusal()
    if why:
        return why, {}
    opts = info.reopen_options(rec["l2-cache-size"], rec["l2-cache-entry-size"])
    try:
        s.execute("blockdev-reopen", {"options": [opts]})
    except QmpCommandError as exc:
        return f"QEMU refused blockdev-reopen: {exc.desc}", opts
    return None, opts


def _tune(tour: Tour, s: Any, args: argparse.Namespace, writes: list[int], image: Path, shown: str) -> None:
    """Steps 4 to 6 (always three headlines): the cache measured, the recommendation, set live."""
    from qemu_ext.output import count, human_size, percent

    r = _measure(s, args, writes, "before")
    b = r["before"]
    cur = r["current"]
    cache = human_size(cur["l2-cache-size"])
    full = r["full-coverage"]["l2-cache-size"]
    vs = human_size(r["node"]["virtual-size"])
    reads = f"{args.reads:,} random 4 KiB reads"
    if not b["lookups"]:
        tour.step(f"No L2 lookup during {reads}: they fell where the disk has no L2 table, so the {cache} cache "
                  "does not matter to this workload")
        tour.say("a part of the disk never written has no L2 table: QEMU answers its reads without the cache")
        tour.step(f"Nothing to recommend from these lookups; {human_size(full)} would cover the whole {vs} disk")
        tour.step("Nothing set live: the cache was left as it was")
        return
    warm = b["warm-hit-ratio"]
    if b["misses"]:
        found = (f"{count(b['misses'])} of {count(b['lookups'])} L2 lookups read a table slice from the disk "
                 f"({percent(warm)} hit once warm)")
    else:
        found = f"none of {count(b['lookups'])} L2 lookups read from the disk: the cache holds every slice they touch"
    tour.step(f"The {cache} cache gives a {percent(b['hit-ratio'])} hit ratio on this workload: {found}")
    tour.say(f"QEMU's own qcow2_cache_get* trace events during {reads} (80% in the written clusters), "
             f"captured through QMP in {b['seconds']:.1f} s and turned off again")
    p = r["predicted"]
    if p is not None:
        same = "the same, so its answers for other sizes hold" if r["prediction-exact"] else "NOT the same"
        tour.say(f"the simulator replays those lookups at {cache}: {count(p['warm-misses'])} misses after the "
                 f"cold start, QEMU had {count(p['measured-warm-misses'])}: {same}")
    tour.cmd(f"virtopt l2cache tune /run/vm.qmp --node {NODE}")

    rec = r["recommended"]
    if rec is None:
        tour.step(f"{human_size(full)} covers the whole {vs} disk; no cache size reaches a "
                  f"{percent(args.target)} hit ratio once warm on these lookups")
        tour.step("Nothing set live: there is no recommendation to set")
        return
    size = rec["l2-cache-size"]
    same_now = size == cur["l2-cache-size"] and rec["l2-cache-entry-size"] == cur["l2-cache-entry-size"]
    if same_now:
        head = f"the current {cache} is already the smallest that does"
    elif size < cur["l2-cache-size"]:
        head = f"{human_size(size)} is enough, {human_size(cur['l2-cache-size'] - size)} less than now"
    else:
        head = f"set l2-cache-size={size} ({human_size(size)})"
    tour.step(f"{human_size(full)} covers the whole {vs} disk; for a {percent(args.target)} hit ratio once warm, "
              f"{head}")
    # the option text names the image: as shown (the work directory may be about to go)
    opts = {k: v.replace(str(image), shown) if isinstance(v, str) else v for k, v in rec["options"].items()}
    tour.say(f"predicted: {percent(rec['warm-hit-ratio'])} once warm with {human_size(size)} in entries of "
             f"{human_size(rec['l2-cache-entry-size'])}" + ("" if same_now else "; the option to set:"))
    if not same_now:
        tour.say(f"  {opts['blockdev']}", f"  {opts['drive']}")
        if "libvirt" in opts:
            tour.say(f"  libvirt: {opts['libvirt']}")

    if same_now:
        tour.step("Nothing set live: the cache already has the recommended size")
        return
    why, given = _reopen(s, rec)
    if why:
        tour.step(f"Not set live: {why}")
        return
    af = _measure(s, args, writes, "after", {NODE: given})["before"]
    if not af["lookups"]:
        tour.step("Set live with blockdev-reopen, but no L2 lookup came after it to measure")
        return
    tour.step(f"Set live with blockdev-reopen, no restart: hit ratio once warm {percent(warm)} -> "
              f"{percent(af['warm-hit-ratio'])} (predicted {percent(rec['warm-hit-ratio'])})")
    tour.say(f"the same {reads} again: {count(af['misses'])} of {count(af['lookups'])} lookups missed "
             f"({percent(af['hit-ratio'])} overall: the cache starts empty after the reopen)")
    tour.cmd(f"virtopt l2cache tune /run/vm.qmp --node {NODE} --apply")


def _step_doctor(tour: Tour, pid: int, vcpus: list[dict], iothreads: list[dict]) -> None:
    from qemu_ext.host.doctor import run_doctor
    from qemu_ext.output import human_size

    rep = run_doctor(pid=pid, vcpus=vcpus, iothreads=iothreads, interval=0.5, size=human_size)
    c = rep.counts()
    summary = ", ".join(f"{n} {v}" for v, n in c.items() if n)
    worst = [ch for ch in rep.checks if ch.verdict in ("bad", "warn")]
    lead = f"; look first at {worst[0].id}: {worst[0].summary}" if worst else ""
    tour.step(f"Host and VM checks: {summary}{lead}")
    mark = {"ok": "[ OK ]", "warn": "[WARN]", "bad": "[BAD ]", "unknown": "[ ?? ]"}
    width = max(len(ch.id) for ch in rep.checks)
    for ch in rep.checks:
        if ch.verdict != "ok" and ch is not (worst[0] if worst else None):
            tour.say(f"{mark[ch.verdict]} {ch.id.ljust(width)}  {ch.summary}")
    tour.say(f"{c['ok']} checks found nothing to change (kvm, threads, memory, ...)")
    tour.cmd("virtopt doctor --vm web1    (each finding with its fix)")


def _step_inspect(tour: Tour, pid: int) -> None:
    from qemu_ext.introspect import views
    from qemu_ext.introspect.drgn_backend import DrgnTarget

    try:
        t = DrgnTarget.attach(pid)
        info = views.run(t, "info")
        tl = views.run(t, "trace list", patterns=["qcow2_cache_get*"], enabled_only=False)
    except VirtoptError as exc:
        tour.step(f"QEMU's memory could not be read: {exc}")
        return
    on = [e["name"] for e in tl["events"] if e.get("state") == "enabled"]
    evs = f"{len(tl['events'])} qcow2_cache_get* trace events"
    state = f"{evs} are off again" if not on else f"{evs}: still enabled: {', '.join(on)}"
    tour.step(f"Read from QEMU's memory without stopping it: the {state}, QEMU pays nothing for them now")
    works, debug, gdb = [], [], []
    for name, c in info["commands"].items():
        if c["available"]:
            works.append(name)
        elif "debug info" in (c["reason"] or ""):
            debug.append(name)
        else:
            gdb.append(name)
    dbg = "with" if info["debug-info"] else "without"
    tour.say(f"QEMU {info['version']} {dbg} debug info, {info['threads']} threads, "
             f"{info['trace-events']:,} trace events ({', '.join(info['trace-backends']) or 'no'} backend)",
             f"views that work here: {', '.join(works)}")
    if debug:
        tour.say(f"need a QEMU with debug info (tests/qemu/build-debug-qemu): {', '.join(debug)}")
    if gdb:
        tour.say(f"need gdb, which pauses QEMU while it reads (virtopt gdb PID): {', '.join(gdb)}")
    tour.cmd("virtopt inspect PID info; virtopt gdb web1 -c threads")


# -- the tour ---------------------------------------------------------------------------------------


def _tools() -> None:
    for tool in ("qemu-img", "qemu-system-x86_64"):
        if not shutil.which(tool):
            raise NotAvailableError(f"{tool} not found: apt-get install qemu-system-x86 qemu-utils")


def _writes(vsize: int, n: int) -> list[int]:
    rng = random.Random(7)
    clusters = vsize // CLUSTER
    return [c * CLUSTER for c in sorted(rng.sample(range(clusters), min(n, clusters)))]


def run(args: argparse.Namespace) -> int:
    _tools()
    from qemu_ext import vm
    from qemu_ext.output import human_size, progress
    from qemu_ext.qmp.client import connect_sync

    keep: Optional[Path] = args.keep
    if keep is not None:
        try:
            keep.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--keep {keep}: {exc.strerror}") from None
        work = keep.resolve()
    else:
        work = Path(tempfile.mkdtemp(prefix="virtopt-demo-"))
    image = work / "demo.qcow2"
    log = work / "qemu.log"
    shown = str(image) if keep else image.name  # never a path in a directory that is about to go
    total = 7 if args.skip_inspect else 8
    tour = Tour(total)
    t0 = time.monotonic()
    print(f"virtopt demo: a throw-away VM with a {human_size(args.size)} qcow2 disk, real I/O through QEMU, and "
          f"what virtopt finds, in {total} steps")
    try:
        for stale in (image, log):
            stale.unlink(missing_ok=True)
        cp = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(args.size)],
                            capture_output=True, text=True)
        if cp.returncode != 0:
            raise VirtoptError(f"qemu-img create failed: {cp.stderr.strip().splitlines()[-1] if cp.stderr else cp.returncode}")
        blockdev = (f"driver=qcow2,node-name={NODE},l2-cache-size={args.l2_cache_size},"
                    f"file.driver=file,file.filename={image}")
        with vm.start_qemu(name=VM_NAME, extra_args=["-blockdev", blockdev, "-D", str(log),
                                                                    "-msg", "timestamp=on"], smp=2) as qp, \
                connect_sync(str(qp.qmp_path), timeout=10) as s:
            writes = _writes(args.size, args.writes)
            with progress(len(writes), "scattered writes", unit="write") as bar:
                for off in writes:
                    s.hmp(f'qemu-io {NODE} "write -P 0x5a {off} 64k"')
                    bar.update(1)
            s.hmp(f'qemu-io {NODE} "flush"')
            _step_vm(tour, s, qp, shown, args, writes)
            _step_image(tour, image, shown)
            vcpus, iothreads = _step_threads(tour, s, qp.pid)
            _tune(tour, s, args, writes, image, shown)
            _step_doctor(tour, qp.pid, vcpus, iothreads)
            if not args.skip_inspect:
                _step_inspect(tour, qp.pid)
        took = time.monotonic() - t0
        if keep:
            print(f"\nDone in {took:.0f} s; QEMU stopped. Kept in {work}: demo.qcow2 (the image) and qemu.log (QEMU's "
                  f"log with the captured trace events). Try:")
            print(f"  virtopt qcow2 info {image}\n  virtopt trace summary {log}\n"
                  f"  virtopt l2cache curve {image} --trace {log}")
        else:
            print(f"\nDone in {took:.0f} s; QEMU stopped and its files removed. Run virtopt demo --keep DIR to keep "
                  "the image and QEMU's log with the trace events and try the commands on them.")
        return 0
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
