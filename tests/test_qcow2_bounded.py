"""Work bounded by the file, not by header fields; anything that is not an image or not a place to
write refused at once, in one line; convert writes to files, streams, devices.

The mutants are the ones the issue found (built from real images, one field poked): each command
runs as the real CLI under a resource limit (address space 1 GiB, CPU seconds) so that a table
size taken from the header without a check, or a scan of the header's idea of the disk instead
of the file, fails the test instead of only being slow. Their verdicts are qemu-img's.
"""

from __future__ import annotations

import os
import resource
import shutil
import stat
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import REPO, make_qcow2, qemu_tool, run, sha256
from qcow2_util import files_equal, qemu_reason

AS_LIMIT = 1 << 30  # bytes of address space for one command
CPU_LIMIT = 8  # CPU seconds for one command (they need well under 2 on an idle machine)


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_LIMIT, CPU_LIMIT))


def bounded(*args: str, cwd: Path = REPO, extra_limits=None) -> tuple[subprocess.CompletedProcess, int]:
    """The real CLI under the limits: (result, peak RSS in KiB, from wait4). SIGXCPU or an
    allocation failure past the limits fails the command (and the test)."""
    import tempfile

    env = dict(os.environ)
    env.pop("VIRTOPT_DEBUG", None)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen([sys.executable, "-m", "qemu_ext", *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                             stdout=out, stderr=err, preexec_fn=extra_limits or _limits)
        _pid, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(p.args, p.returncode, out.read().decode(errors="replace"),
                                           err.read().decode(errors="replace")), ru.ru_maxrss


def poke(src: Path, dst: Path, offset: int, fmt: str, value: int) -> Path:
    shutil.copyfile(src, dst)
    with open(dst, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))
    return dst


def one_line(cp: subprocess.CompletedProcess) -> None:
    assert cp.returncode not in (0, 2) and "Traceback" not in cp.stderr and "internal error" not in cp.stderr, cp.stderr
    assert cp.stderr.strip().count("\n") == 0, cp.stderr


@pytest.fixture(scope="module")
def mutants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bounded")
    out: dict[str, Path] = {}
    # 2 MiB clusters, one L1 entry: the L1 table's cluster is followed by data, so a bigger l1_size
    # reads data as L1 entries pointing far past the end of the file
    m2 = make_qcow2(d / "c2m.qcow2", size="1G", options={"cluster_size": "2M"},
                    io=["write -P 1 0 4M", "write -c -P 2 8M 2M"])
    out["l1-size-0x100000"] = poke(m2, d / "l1big.qcow2", 36, ">I", 0x100000)
    # a bitmap with its directory entry edited (bitmap directory at the cluster after the table)
    bm = make_qcow2(d / "bm.qcow2", size="64M", io=["write -P 3 0 64k"])
    run(["qemu-img", "bitmap", "--add", str(bm), "b0"])
    with open(bm, "rb") as f:
        data = f.read()
    ext = data.index(struct.pack(">I", 0x23852875))
    dir_off = struct.unpack(">Q", data[ext + 8 + 16 : ext + 8 + 24])[0]
    out["bitmap-table-size-0xff000001"] = poke(bm, d / "bts1.qcow2", dir_off + 8, ">I", 0xFF000001)
    out["bitmap-table-size-0x00ffffff"] = poke(bm, d / "bts2.qcow2", dir_off + 8, ">I", 0x00FFFFFF)
    out["bitmap-table-offset-huge"] = poke(bm, d / "bto.qcow2", dir_off, ">Q", 0x8000000000006000)
    out["bitmap-table-offset-past-max"] = poke(bm, d / "btm.qcow2", dir_off, ">Q", 0x7FFFFFFFFFFF0000)
    # an external data file named "..": QEMU opens it by that name
    df = make_qcow2(d / "df.qcow2", size="16M", options={"data_file": str(d / "df.raw")}, io=["write -P 4 0 64k"])
    run(["qemu-img", "amend", "-o", "data_file=..", str(df)])
    out["data-file-dotdot"] = df
    return out


@pytest.mark.parametrize("name,verdict", [
    ("l1-size-0x100000", None),  # qemu-img opens it: the answers are compared
    ("bitmap-table-size-0xff000001", "doesn't satisfy the constraints"),
    ("bitmap-table-size-0x00ffffff", "doesn't satisfy the constraints"),
    ("bitmap-table-offset-huge", "doesn't satisfy the constraints"),
    ("bitmap-table-offset-past-max", "Could not read bitmap_table table from image for bitmap 'b0'"),
    ("data-file-dotdot", "'file' driver requires '..' to be a regular file"),
])
def test_mutants_bounded_with_qemu_img_verdict(mutants: dict[str, Path], tmp_path: Path, name: str,
                                               verdict: str | None) -> None:
    """info/check/map/convert under 1 GiB of address space and a CPU-time limit give qemu-img's
    verdict (its answer, or its refusal with its reason in one line); the image is unchanged."""
    p = mutants[name]
    before = sha256(p)
    commands = {
        "info": (["info", "--qemu-only", "--qemu-compat", "7.2", str(p)], ["info", str(p)]),
        "check": (["check", "--qemu-only", "--output=json", str(p)], ["check", "--output=json", str(p)]),
        "map": (["map", "--qemu-compat", "7.2", "--output=json", str(p)], ["map", "--output=json", str(p)]),
        "convert": (["convert", str(p), str(tmp_path / "v.raw")], ["convert", "-O", "raw", str(p), str(tmp_path / "q.raw")]),
    }
    for what, (ours, theirs) in commands.items():
        cp, rss = bounded("qcow2", *ours, cwd=p.parent)
        assert 0 < rss < AS_LIMIT // 1024, (what, rss)
        if name == "l1-size-0x100000" and what == "check":
            # qemu-img check walks 262,144 L2 references one by one here (minutes): the counts are
            # not compared, the verdict is: corruptions, found within the limits
            assert cp.returncode == 2 and '"corruptions"' in cp.stdout, cp.stderr
            continue
        q = run(["qemu-img", *theirs], check=False, cwd=p.parent, timeout=120)
        if q.returncode == 0:
            assert cp.returncode == 0, (what, cp.stderr)
            if what == "convert":
                assert files_equal(tmp_path / "v.raw", tmp_path / "q.raw")
            else:
                assert cp.stdout == q.stdout, what
        else:
            one_line(cp)
            assert qemu_reason(q.stderr) in cp.stderr, (what, cp.stderr, q.stderr)
            if verdict is not None:
                assert verdict in cp.stderr
    assert sha256(p) == before


def test_fifo_and_devices_refused_at_once(tmp_path: Path) -> None:
    """A FIFO (no writer: opening it would block), a socket or a character device given as the image:
    one line at once, for every command that takes an image."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    import socket

    sock_path = tmp_path / "sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock_path))
    try:
        for target in (fifo, sock_path, Path("/dev/zero")):
            for cmd in (["info"], ["check"], ["map"], ["dump", "header"], ["dump", "l1"], ["read", "0", "512"],
                        ["convert", str(tmp_path / "o.raw")]):
                args = [cmd[0], str(target), *cmd[1:]]
                cp, _ = bounded("qcow2", *args)
                one_line(cp)
                if target == sock_path:  # a socket cannot even be opened: the OS's words
                    assert "No such device or address" in cp.stderr, cp.stderr
                else:
                    assert f"{target}: not a regular file or block device" in cp.stderr, cp.stderr
    finally:
        s.close()


def test_read_past_the_end_refused(tmp_path: Path, qemu_build) -> None:
    """read past the end of the disk fails as qemu-io's read does (Input/output error); a read that
    ends at the end of the disk works."""
    img = make_qcow2(tmp_path / "d.qcow2", size="1G", io=["write -P 9 1073741312 512"])
    q = qemu_tool(qemu_build, "io", "-f", "qcow2", "-r", "-c", "read 1073741000 4096", str(img), check=False)
    assert "read failed: Input/output error" in q.stdout + q.stderr
    for off, n in (("1073741000", "4096"), ("2G", "512"), ("0", "100G")):
        cp, _ = bounded("qcow2", "read", str(img), off, n, "--output=hex")
        one_line(cp)
        assert "past the end of the disk" in cp.stderr and "Input/output error" in cp.stderr
    cp, _ = bounded("qcow2", "read", str(img), "1073741312", "512", "--output=json")
    assert cp.returncode == 0 and '"length": 512' in cp.stdout


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("convert")
    img = make_qcow2(d / "d.qcow2", size="8M", io=["write -P 5 0 64k", "write -c -P 6 1M 64k", "write -P 7 6M 4k"])
    raw = d / "q.raw"
    run(["qemu-img", "convert", "-O", "raw", str(img), str(raw)])
    return img, raw


def test_convert_to_stdout_pipe_and_dev_null(disk: tuple[Path, Path], tmp_path: Path) -> None:
    """convert IMG - writes the raw disk on stdout; to a pipe (a FIFO with a reader) and /dev/null
    every byte is written in order; nothing named '-' is created."""
    img, raw = disk
    want = raw.read_bytes()
    p = subprocess.run([sys.executable, "-m", "qemu_ext", "qcow2", "convert", str(img), "-"], cwd=tmp_path,
                       capture_output=True, timeout=60)
    assert p.returncode == 0 and p.stdout == want and p.stderr == b"" and not (tmp_path / "-").exists()
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    cp, _ = bounded("qcow2", "convert", str(img), str(fifo))
    reader.join(timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert got == [want]
    cp, _ = bounded("qcow2", "convert", str(img), "/dev/null")
    assert cp.returncode == 0 and "wrote /dev/null" in cp.stdout, cp.stderr


def test_convert_output_errors_one_line(disk: tuple[Path, Path], tmp_path: Path) -> None:
    """OS errors on the output: one line naming the output, exit 1 (a missing directory, a directory,
    /dev/full, a file size limit); the image is untouched."""
    img, _ = disk
    before = sha256(img)
    cases = [
        (str(tmp_path / "missing" / "o.raw"), f"cannot open {tmp_path / 'missing' / 'o.raw'}: No such file or directory"),
        (str(tmp_path), f"cannot open {tmp_path}: Is a directory"),
        ("/dev/full", "/dev/full: error while writing at byte 0: No space left on device"),
    ]
    for out, text in cases:
        cp, _ = bounded("qcow2", "convert", str(img), out)
        one_line(cp)
        assert cp.returncode == 1 and text in cp.stderr, cp.stderr

    def small_files() -> None:
        _limits()
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    out = tmp_path / "big.raw"
    cp, _ = bounded("qcow2", "convert", str(img), str(out), extra_limits=small_files)
    one_line(cp)
    assert f"{out}: " in cp.stderr and "File too large" in cp.stderr, cp.stderr
    assert sha256(img) == before


def test_convert_to_block_device(disk: tuple[Path, Path], tmp_path: Path) -> None:
    """convert onto a block device (a loop device over a file): every byte written, no truncation;
    a device smaller than the disk is refused before anything is written."""
    img, raw = disk
    if not os.path.exists("/dev/loop-control") or shutil.which("losetup") is None:
        pytest.skip("no loop devices on this machine (losetup, /dev/loop-control)")
    back = tmp_path / "dev.img"
    with open(back, "wb") as f:
        f.write(b"\xee" * (8 << 20))
    cp = subprocess.run(["losetup", "--find", "--show", str(back)], capture_output=True, text=True)
    if cp.returncode != 0:
        pytest.skip(f"cannot attach a loop device here: {cp.stderr.strip()}")
    dev = cp.stdout.strip()
    try:
        assert stat.S_ISBLK(os.stat(dev).st_mode)
        out, _ = bounded("qcow2", "convert", str(img), dev)
        assert out.returncode == 0, out.stderr
        with open(dev, "rb") as f:
            assert f.read(8 << 20) == raw.read_bytes()
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)
    small = make_qcow2(tmp_path / "big.qcow2", size="16M")
    cp = subprocess.run(["losetup", "--find", "--show", str(back)], capture_output=True, text=True)
    dev = cp.stdout.strip()
    try:
        out, _ = bounded("qcow2", "convert", str(small), dev)
        one_line(out)
        assert dev in out.stderr
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)
    assert files_equal(raw, raw)
