"""Helpers the tests share: images made by qemu-img/qemu-io, gdb runs against a pid, file digests."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
QEMU_IMG = "qemu-img"
QEMU_IO = "qemu-io"


def run(argv: Sequence[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run a command, text mode, capture both streams; raise with its stderr when it fails."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    cp = subprocess.run(list(argv), **kw)
    if check and cp.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))} exited {cp.returncode}: {cp.stderr}")
    return cp


def virtopt(*args: str, check: bool = False, **kw) -> subprocess.CompletedProcess:
    """Run the real `virtopt` CLI (python -m qemu_ext) the way a user would."""
    env = dict(os.environ)
    env.pop("VIRTOPT_DEBUG", None)
    env.update(kw.pop("env", {}))
    return run([sys.executable, "-m", "qemu_ext", *args], check=check, env=env, cwd=kw.pop("cwd", REPO), **kw)


def sha256(path: os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_qcow2(
    path: os.PathLike,
    size: str = "64M",
    options: Optional[dict] = None,
    backing: Optional[str] = None,
    backing_fmt: str = "qcow2",
    io: Iterable[str] = (),
    qemu_img: str = QEMU_IMG,
    qemu_io: str = QEMU_IO,
    build=None,
) -> Path:
    """Create a qcow2 image with qemu-img and write to it with qemu-io.

    options: -o key=value pairs (cluster_size, refcount_bits, extended_l2, compression_type, ...).
    io: qemu-io commands, e.g. ``"write -P 0xab 0 64k"``, ``"write -c 1M 64k"`` (compressed).
    build: a qemu_ext.vm.QemuBuild whose qemu-img/qemu-io make the image (default: the system's).
    """
    path = Path(path)
    env = None
    if build is not None:
        qemu_img, qemu_io, env = build.img, build.io, build.env()
    argv = [qemu_img, "create", "-q", "-f", "qcow2"]
    opts = dict(options or {})
    if backing:
        argv += ["-b", backing, "-F", backing_fmt]
    if opts:
        argv += ["-o", ",".join(f"{k}={v}" for k, v in opts.items())]
    argv += [str(path)]
    if size is not None:
        argv.append(size)
    run(argv, env=env)
    cmds = list(io)
    if cmds:
        qemu_io_cmds(path, cmds, qemu_io=qemu_io, build=build)
    return path


def qemu_io_cmds(path: os.PathLike, cmds: Sequence[str], fmt: str = "qcow2", qemu_io: str = QEMU_IO,
                 build=None) -> str:
    argv = [build.io if build is not None else qemu_io, "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    argv.append(str(path))
    return run(argv, env=build.env() if build is not None else None).stdout


def qemu_tool(build, tool: str, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run one of a QemuBuild's tools (``"img"``, ``"io"``, ``"system"``) with its environment:
    ``qemu_tool(qemu_build, "img", "info", "--output=json", path)``."""
    return run([getattr(build, tool), *args], check=check, env=build.env(), **kw)


def gdb_batch(pid: int, commands: Sequence[str], timeout: float = 60, extra: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """Attach gdb in batch mode to pid, run commands (-ex each), detach. QEMU keeps running."""
    argv = ["gdb", "-q", "-nx", "-batch", *extra, "-p", str(pid)]
    for c in commands:
        argv += ["-ex", c]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
