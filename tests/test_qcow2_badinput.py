"""Bad input: truncated, hostile images give one clear line and a non-zero exit, never a traceback
(mutated images at large: tests/test_qcow2_fuzz.py)."""

from __future__ import annotations

import json
import resource
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from helpers import make_qcow2, run, sha256, virtopt


@pytest.fixture(scope="module")
def seed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("qcow2bad")
    p = make_qcow2(d / "seed.qcow2", size="4M", options={"cluster_size": 4096},
                   io=["write -P 0x11 0 16k", "write -c 64k 4k", "write -z 128k 4k"])
    run(["qemu-img", "snapshot", "-c", "s1", str(p)])
    run(["qemu-img", "bitmap", "--add", str(p), "b0"])
    return p


def _patched(seed: Path, tmp: Path, name: str, offset: int, fmt: str, value: int) -> Path:
    p = tmp / name
    shutil.copyfile(seed, p)
    with open(p, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))
    return p


MEMORY_LIMIT = 1 << 30  # address space allowed to the CLI on hostile input


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def _bounded(*args: str) -> subprocess.CompletedProcess:
    """The real CLI with its address space capped: a size taken from the file without a check would fail."""
    return virtopt(*args, preexec_fn=_limit_memory)


def _one_line_error(cp: subprocess.CompletedProcess) -> None:
    assert cp.returncode != 0
    assert "Traceback" not in cp.stderr and "internal error" not in cp.stderr
    assert cp.stderr.strip().count("\n") == 0, cp.stderr


@pytest.mark.parametrize(
    "name,offset,fmt,value",
    [
        ("bad-magic", 0, ">I", 0x12345678),
        ("version-9", 4, ">I", 9),
        ("l1-size-huge", 36, ">I", 0x7FFFFFF0),
        ("reftable-clusters-huge", 56, ">I", 0x7FFFFFFF),
        ("header-length-past-end", 100, ">I", 0x7FFFFFF8),
        ("cluster-bits-40", 20, ">I", 40),
        ("snapshots-huge", 60, ">I", 0x7FFFFFFF),
    ],
)
def test_hostile_header_fields(seed: Path, tmp_path: Path, name: str, offset: int, fmt: str, value: int) -> None:
    """qemu-img refuses these images too; we say why in one line and exit non-zero."""
    p = _patched(seed, tmp_path, f"{name}.qcow2", offset, fmt, value)
    q = run(["qemu-img", "info", "-f", "qcow2", str(p)], check=False)
    assert q.returncode != 0
    for cmd in ("info", "map", "check"):
        _one_line_error(_bounded("qcow2", cmd, str(p)))


def test_truncated_and_not_qcow2(seed: Path, tmp_path: Path) -> None:
    for n in (0, 3, 50, 100):
        p = tmp_path / f"trunc{n}.qcow2"
        p.write_bytes(seed.read_bytes()[:n])
        _one_line_error(virtopt("qcow2", "info", str(p)))
    p = tmp_path / "text.txt"
    p.write_text("hello, not an image\n" * 10)
    _one_line_error(virtopt("qcow2", "check", str(p)))
    _one_line_error(virtopt("qcow2", "info", str(tmp_path / "missing.qcow2")))
    # a directory or a character device named by mistake: one line, not an internal error
    for cmd in ("info", "check", "map"):
        _one_line_error(virtopt("qcow2", cmd, str(tmp_path)))
    _one_line_error(virtopt("qcow2", "info", "/dev/null"))


def test_read_refuses_more_than_it_can_hold(tmp_path: Path) -> None:
    """read returns bytes: beyond 1 GiB it points to convert instead of filling memory."""
    img = make_qcow2(tmp_path / "big.qcow2", size="3G")
    cp = _bounded("qcow2", "read", str(img), "0", "2G")
    _one_line_error(cp)
    assert "convert" in cp.stderr
    # a request past the end of the disk fails, as qemu-io's read does ("Input/output error")
    for off, n in (((3 << 30) - 512, 4096), (4 << 30, 512), (0, 100 << 30)):
        cp = virtopt("qcow2", "read", str(img), str(off), str(n), "--output=hex")
        _one_line_error(cp)
        assert cp.returncode == 1 and "past the end of the disk" in cp.stderr and cp.stdout == ""
    cp = virtopt("qcow2", "read", str(img), str((3 << 30) - 512), "512", "--output=json")
    assert cp.returncode == 0 and json.loads(cp.stdout)["length"] == 512


def test_backing_chain_loop(tmp_path: Path) -> None:
    a = make_qcow2(tmp_path / "a.qcow2", size="1M")
    make_qcow2(tmp_path / "b.qcow2", size="1M", backing="a.qcow2")
    # rewrite a's header to name b as its backing file: a -> b -> a
    run(["qemu-img", "rebase", "-u", "-F", "qcow2", "-b", "b.qcow2", str(a)])
    for cmd in ("map", "convert"):
        args = [str(a)] + ([str(tmp_path / "o.raw")] if cmd == "convert" else [])
        cp = virtopt("qcow2", cmd, *args)
        _one_line_error(cp)
        assert "loop" in cp.stderr
    cp = virtopt("qcow2", "info", "--backing-chain", str(a))
    _one_line_error(cp)


def test_unknown_incompatible_feature(seed: Path, tmp_path: Path) -> None:
    """qemu-img refuses an unknown incompatible bit at open; so does every virtopt command, with
    qemu-img's words, exit 1 (the input is unsupported, not the capability)."""
    with open(seed, "rb") as f:
        f.seek(72)
        incompat = struct.unpack(">Q", f.read(8))[0]
    p = _patched(seed, tmp_path, "unknown-feature.qcow2", 72, ">Q", incompat | 1 << 9)
    q = run(["qemu-img", "info", str(p)], check=False)
    assert q.returncode != 0 and "Unsupported qcow2 feature(s): Unknown incompatible feature: 200" in q.stderr
    for args in (("info", str(p)), ("check", str(p)), ("map", str(p)), ("convert", str(p), str(tmp_path / "o.raw"))):
        cp = virtopt("qcow2", *args)
        _one_line_error(cp)
        assert cp.returncode == 1 and "Unsupported qcow2 feature(s): Unknown incompatible feature: 200" in cp.stderr


def test_convert_never_overwrites_its_inputs(tmp_path: Path) -> None:
    base = make_qcow2(tmp_path / "base.qcow2", size="1M", io=["write -P 1 0 64k"])
    top = make_qcow2(tmp_path / "top.qcow2", size="1M", backing="base.qcow2", io=["write -P 2 64k 64k"])
    digests = {p: sha256(p) for p in (base, top)}
    for out in (top, base):
        cp = virtopt("qcow2", "convert", str(top), str(out))
        _one_line_error(cp)
        assert "refusing to overwrite" in cp.stderr
    assert {p: sha256(p) for p in (base, top)} == digests
