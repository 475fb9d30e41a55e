"""`virtopt demo`: a throw-away VM on a fresh qcow2 image, real I/O, and what virtopt says about it.

Everything runs on real QEMU (Debian's package): qemu-img creates the image,
qemu-system-x86_64 runs with two QMP sockets and the image attached as a qcow2
block node with a deliberately small L2 cache, and HMP `qemu-io` drives reads
and writes through QEMU's block layer (no guest OS is needed for that). Each
step prints the virtopt command a user would type and its output; the last one
captures a trace live through QMP and turns it into the L2-cache advice.
Every process it starts is stopped before it returns.
"""

from __future__ import annotations

import argparse
import random
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from qemu_ext import vm
from qemu_ext.errors import NotAvailableError, VirtoptError


def register(sub: argparse._SubParsersAction, name: str, summary: str) -> None:
    p = sub.add_parser(
        name,
        help=summary,
        description=summary,
        epilog=(
            "examples:\n"
            "  virtopt demo\n"
            "  virtopt demo --size 64G --l2-cache-size 128K --seconds 5\n"
            "  virtopt demo --keep /tmp/demo      (keep the image and the captured trace)"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--size", default="16G", help="virtual size of the demo image (default 16G)")
    p.add_argument("--l2-cache-size", default="256K",
                   help="l2-cache-size given to QEMU for the image (default 256K: too small on purpose)")
    p.add_argument("--writes", type=int, default=192, help="scattered 64 KiB writes that allocate clusters (default 192)")
    p.add_argument("--seconds", type=float, default=3.0, help="how long the live trace capture runs (default 3)")
    p.add_argument("--skip-gdb", action="store_true", help="leave out the gdb step")
    p.add_argument("--keep", metavar="DIR", help="work in DIR and keep the image and the captured trace")
    p.set_defaults(func=run)


def _virtopt(*argv: str) -> int:
    """Run a virtopt command in-process, the way a user would type it, and show it."""
    from qemu_ext.cli import main

    print(f"\n$ virtopt {' '.join(shlex.quote(a) for a in argv)}", flush=True)
    rc = main(list(argv))
    if rc not in (0,):
        print(f"(exit code {rc})")
    return rc


def _hmp(client, command: str) -> str:
    return client.cmd("human-monitor-command", **{"command-line": command})


def _reads(client, stop: threading.Event, size: int, offsets: list[int], errors: list[str]) -> None:
    """Guest-like random 4 KiB reads, 80% of them in the allocated areas, until told to stop."""
    rng = random.Random(11)
    try:
        while not stop.is_set():
            if rng.random() < 0.8:
                off = rng.choice(offsets) + rng.randrange(16) * 4096
            else:
                off = rng.randrange(size // 4096) * 4096
            _hmp(client, f'qemu-io disk0 "read {off} 4k"')
    except Exception as exc:  # reported by the main thread; the demo must not hang on it
        errors.append(f"{type(exc).__name__}: {exc}")


def run(args: argparse.Namespace) -> int:
    for tool in ("qemu-img", "qemu-system-x86_64"):
        if not shutil.which(tool):
            raise NotAvailableError(f"{tool} not found: apt-get install qemu-system-x86 qemu-utils")
    from qemu_ext.l2cache.options import parse_size

    l2_size = parse_size(args.l2_cache_size)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="virtopt-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    image = work / "demo.qcow2"
    capture = work / "capture.log"
    for stale in (image, capture):
        stale.unlink(missing_ok=True)
    try:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), args.size], check=True)
        vsize = parse_size(args.size)
        shell_sock = work / "shell.sock"
        blockdev = (f"driver=qcow2,node-name=disk0,l2-cache-size={l2_size},"
                    f"file.driver=file,file.filename={image}")
        extra = ["-blockdev", blockdev, "-D", str(work / "qemu.log"),
                 "-qmp", f"unix:{shell_sock},server=on,wait=off"]
        with vm.start_qemu(name="virtopt-demo", extra_args=extra, smp=2) as qp:
            io = qp.qmp()
            ver = io.cmd("query-version")["qemu"]
            print(f"QEMU {ver['major']}.{ver['minor']}.{ver['micro']} (pid {qp.pid}, accel {qp.accel}); "
                  f"image {image} ({args.size}) attached as qcow2 node disk0 with l2-cache-size={args.l2_cache_size}")
            print(f"QMP sockets: {qp.qmp_path} (drives the I/O), {shell_sock} (virtopt)")

            rng = random.Random(7)
            clusters = vsize // 65536
            offsets = sorted(rng.sample(range(clusters), min(args.writes, clusters)))
            offsets = [c * 65536 for c in offsets]
            for off in offsets:
                _hmp(io, f'qemu-io disk0 "write -P 0x5a {off} 64k"')
            _hmp(io, 'qemu-io disk0 "flush"')
            print(f"wrote {len(offsets)} scattered 64 KiB clusters through QEMU's block layer and flushed")

            _virtopt("qcow2", "info", str(image))
            _virtopt("qcow2", "check", str(image))
            _virtopt("threads", "--qmp", str(shell_sock))
            _virtopt("shell", str(shell_sock), "-c", "/mtree lookup 0x70 io")

            # Live capture: random reads run on the other socket while virtopt's shell traces them.
            stop, errors = threading.Event(), []
            reader = threading.Thread(target=_reads, args=(io, stop, vsize, offsets, errors), daemon=True)
            reader.start()
            try:
                time.sleep(0.2)
                _virtopt("shell", str(shell_sock), "-c",
                         f"/trace capture qcow2_cache_get* {args.seconds:g} {capture} --node disk0")
            finally:
                stop.set()
                reader.join(timeout=30)
            if errors:
                raise VirtoptError(f"the demo's reads failed: {errors[0]}")

            _virtopt("l2cache", "recommend", str(image), "--trace", str(capture),
                     "--l2-cache-size", args.l2_cache_size)
            _virtopt("doctor", "--pid", str(qp.pid), "--interval", "0.5",
                     "--check", "kvm", "--check", "tracing", "--check", "threads", "--check", "qemu-memory")
            if not args.skip_gdb and shutil.which("gdb"):
                _virtopt("gdb", str(qp.pid), "-c", "info", "-c", "trace list qcow2_cache_get*")
        print("\nQEMU stopped; " + (f"kept {work}" if args.keep else "work directory removed"))
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
