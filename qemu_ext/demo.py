"""`virtopt demo`: a throw-away VM on a fresh qcow2 image, some real I/O, and what virtopt sees.

Everything runs on real QEMU (Debian's package): qemu-img creates the image,
qemu-system-x86_64 runs with a QMP socket and the image attached as a qcow2
block node, HMP `qemu-io` drives reads and writes through QEMU's block layer,
and then each virtopt capability reports on the image and the process. Every
process it starts is stopped before it returns.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from qemu_ext import vm
from qemu_ext.errors import NotAvailableError


def register(sub: argparse._SubParsersAction, name: str, summary: str) -> None:
    p = sub.add_parser(
        name,
        help=summary,
        description=summary,
        epilog="example:\n  virtopt demo --size 4G --reads 2000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--size", default="4G", help="virtual size of the demo image (default 4G)")
    p.add_argument("--reads", type=int, default=400, help="random 4 KiB reads to drive (default 400)")
    p.add_argument("--keep", metavar="DIR", help="create the image in DIR and keep it")
    p.set_defaults(func=run)


def _section(title: str) -> None:
    print(f"\n=== {title} ===")


def _drive_io(qp: vm.QemuProcess, node: str, size_bytes: int, reads: int) -> None:
    import random

    rng = random.Random(7)
    # Allocate a scattered set of clusters, then read them back at random.
    step = max(size_bytes // 64, 1 << 20)
    for off in range(0, size_bytes, step):
        qp.hmp(f'qemu-io {node} "write -P 0x5a {off} 64k"')
    for _ in range(reads):
        off = rng.randrange(0, size_bytes // 4096) * 4096
        qp.hmp(f'qemu-io {node} "read {off} 4k"')


def run(args: argparse.Namespace) -> int:
    if not shutil.which("qemu-img"):
        raise NotAvailableError("qemu-img not found: apt-get install qemu-utils")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="virtopt-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    image = work / "demo.qcow2"
    try:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), args.size], check=True)
        size_bytes = _virtual_size(image)
        with vm.start_qemu(name="virtopt-demo", extra_args=["-D", str(work / "qemu.log")]) as qp:
            client = qp.qmp()
            ver = client.cmd("query-version")["qemu"]
            print(f"QEMU {ver['major']}.{ver['minor']}.{ver['micro']} pid {qp.pid}, accel {qp.accel}")
            client.cmd(
                "blockdev-add",
                **{"driver": "qcow2", "node-name": "disk0", "file": {"driver": "file", "filename": str(image)}},
            )
            print(f"image {image} ({args.size}) attached as qcow2 node disk0")
            for title, show in _reports():
                _section(title)
                try:
                    show(qp, client, image, size_bytes, args)
                except NotAvailableError as exc:
                    print(f"(not available: {exc})")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _virtual_size(image: Path) -> int:
    import json

    out = subprocess.run(["qemu-img", "info", "--output=json", str(image)], check=True, capture_output=True, text=True)
    return int(json.loads(out.stdout)["virtual-size"])


def _show_io(qp: vm.QemuProcess, client, image: Path, size_bytes: int, args: argparse.Namespace) -> None:
    _drive_io(qp, "disk0", size_bytes, args.reads)
    print(f"wrote 64 scattered clusters and read {args.reads} random 4 KiB blocks through QEMU's block layer")


def _show_threads(qp: vm.QemuProcess, client, image: Path, size_bytes: int, args: argparse.Namespace) -> None:
    tasks = Path(f"/proc/{qp.pid}/task")
    for t in sorted(tasks.iterdir(), key=lambda p: int(p.name)):
        try:
            comm = (t / "comm").read_text().strip()
        except OSError:
            continue
        print(f"  {t.name:>8}  {comm}")


def _reports() -> list[tuple[str, Callable]]:
    return [
        ("guest I/O", _show_io),
        ("threads", _show_threads),
    ]


if __name__ == "__main__":
    sys.exit(run(argparse.Namespace(size="4G", reads=100, keep=None)))
