"""Helpers for the L2-cache tests: run real qemu-io with qcow2_cache_* tracing, and the simulator."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path
from typing import Optional, Sequence

from qemu_ext.l2cache import sim
from qemu_ext.l2cache import workloads as W

QEMU_IO = "qemu-io"


def qemu_io_trace(
    image: Path, cmds: Sequence[str], l2_cache_size: Optional[int] = None, entry: Optional[int] = None, extra: str = "",
    build=None,
) -> tuple[list[W.TraceLookup], str]:
    """Run qemu-io on image with the commands on stdin and qcow2_cache_* traced: L2 lookups + raw output.
    build: a qemu_ext.vm.QemuBuild whose qemu-io runs (default: the one on PATH)."""
    opts = f"driver=qcow2,file.filename={image}"
    if l2_cache_size is not None:
        opts += f",l2-cache-size={l2_cache_size}"
    if entry is not None:
        opts += f",l2-cache-entry-size={entry}"
    opts += extra
    cp = subprocess.run(
        [build.io if build is not None else QEMU_IO, "-T", "qcow2_cache_*", "--image-opts", opts],
        input="\n".join([*cmds, "quit"]) + "\n",
        capture_output=True,
        text=True,
        timeout=120,
        env=build.env() if build is not None else None,
    )
    out = cp.stdout + cp.stderr
    if cp.returncode != 0 or ("qemu-io: " in cp.stderr and "Could not" in cp.stderr):
        raise AssertionError(f"qemu-io failed ({cp.returncode}): {cp.stderr[-2000:]}")
    lookups = [t for t in W.parse_cache_trace(W.log_records(out.splitlines())) if t.is_l2]
    return lookups, out


def refcount_lookups(out: str) -> int:
    """qcow2_cache_get calls on the refcount block cache in qemu-io's output."""
    return sum(1 for t in W.parse_cache_trace(W.log_records(out.splitlines())) if not t.is_l2)


def simulate_then_run(
    image: Path, cmds: Sequence[str], l2_cache_size: int, entry: int, tmp: Path, build=None
) -> tuple[dict, list[W.TraceLookup]]:
    """Simulate on the image as it is (read-only), then let qemu-io run the same commands on a copy."""
    cmdfile = tmp / f"cmds-{len(cmds)}-{l2_cache_size}-{entry}.txt"
    cmdfile.write_text("\n".join(cmds) + "\n")
    res = sim.simulate(
        sim.Disk(image=str(image)),
        sim.Settings(l2_cache_size=l2_cache_size, l2_cache_entry_size=entry),
        sim.load_workload(qemu_io=str(cmdfile)),
        detailed=True,
    )
    work = tmp / f"run-{image.name}"
    shutil.copyfile(image, work)
    trace, out = qemu_io_trace(work, cmds, l2_cache_size, entry, build=build)
    res["_qemu_refcount_lookups"] = refcount_lookups(out)
    return res, trace


def sequence(res: dict) -> list[tuple[int, int, bool]]:
    return [(e["offset"], e["index"], e["hit"]) for e in res["events"]]


def trace_sequence(trace: list[W.TraceLookup]) -> list[tuple[int, int, bool]]:
    return [(t.offset, t.index, t.hit) for t in trace]


def trace_misses(trace: list[W.TraceLookup]) -> int:
    return sum(1 for t in trace if not t.hit)


def random_cmds(
    seed: int,
    n: int,
    disk: int,
    ops: Sequence[str] = ("read",),
    sizes: Sequence[int] = (4096, 65536, 131072),
    align: int = 512,
    regions: Optional[Sequence[tuple[int, int]]] = None,
) -> list[str]:
    """Reproducible qemu-io commands; regions limits offsets to (start, length) areas."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        size = r.choice(list(sizes))
        if regions:
            start, length = r.choice(list(regions))
            off = start + r.randrange(0, max(1, length - size))
        else:
            off = r.randrange(0, disk - size)
        off = off // align * align
        out.append(f"{r.choice(list(ops))} {off} {size}")
    return out


def refcount_trace(out: str) -> list[tuple[int, bool]]:
    """(refcount block offset, hit) of every qcow2_cache_get on the refcount cache (is_l2_cache 0)."""
    return [(t.offset, t.hit) for t in W.parse_cache_trace(W.log_records(out.splitlines())) if not t.is_l2]


def simulated_refcount_sequence(
    image: Path, cmds: Sequence[str], entry: Optional[int] = None, **options: int
) -> list[tuple[int, bool]]:
    """The simulator's refcount-cache lookups for qemu-io commands on image (L2 slices of entry
    bytes, default a whole table), replayed through QEMU's cache policy at the refcount-cache
    size QEMU 7.2 resolves from options."""
    from qemu_ext.l2cache import model as M
    from qemu_ext.l2cache import options as O
    from qemu_ext.l2cache import requests as R
    from qemu_ext.qcow2 import open_image

    ops = []
    for c in cmds:
        op, off, n = c.split()[-3:]
        ops.append((op[0], int(off), int(n)))
    with open_image(str(image)) as img:
        state = R.ImageState.from_image(img, entry or img.cluster_size)
        lk = R.lookups_for(state, ops)
        cfg = O.resolve(img.cluster_size, img.virtual_size, bool(img.extended_l2), qemu_version="7.2", **options)
    cache = M.Qcow2Cache(cfg.refcount_cache_entries, cfg.cluster_size, detailed=True)
    for which, off, rd in zip(lk.cache, lk.offset, lk.read):
        if which == R.REFCOUNT_CACHE:
            cache.put(cache.get(off, rd))
    assert cache.stats.events is not None
    return [(e.offset, e.hit) for e in cache.stats.events]
