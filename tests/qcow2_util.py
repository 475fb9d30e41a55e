"""Helpers for the qcow2 tests: the image matrix (made by qemu-img/qemu-io) and metadata editing."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Callable

from helpers import make_qcow2, qemu_io_cmds, run

from qemu_ext.qcow2 import open_image

# Guest writes used by most images: data, a second pattern, zeros, a discard.
IO_BASIC = ["write -P 0x11 0 128k", "write -P 0x22 1M 64k", "write -P 0x33 3M 4k", "write -z 1152k 64k"]


def qemu_json(*argv: str, cwd: Path | None = None, check: bool = True) -> tuple[int, object]:
    cp = run(["qemu-img", *argv], check=False, cwd=cwd)
    if check and cp.returncode not in (0, 2, 3):
        raise AssertionError(f"qemu-img {' '.join(argv)} exited {cp.returncode}: {cp.stderr}")
    try:
        return cp.returncode, json.loads(cp.stdout) if cp.stdout.strip() else None
    except json.JSONDecodeError:
        return cp.returncode, cp.stdout


def build_matrix(d: Path) -> dict[str, Path]:
    """Every image of the agreement matrix, by name."""
    imgs: dict[str, Path] = {}

    def mk(name: str, **kw) -> None:
        imgs[name] = make_qcow2(d / f"{name}.qcow2", **kw)

    mk("c512", size="8M", options={"cluster_size": 512}, io=IO_BASIC)
    mk("c4k-rc1", size="16M", options={"cluster_size": 4096, "refcount_bits": 1}, io=IO_BASIC)
    mk("c64k-rc16", size="64M", options={"refcount_bits": 16}, io=IO_BASIC)
    mk("c64k-rc64", size="64M", options={"refcount_bits": 64}, io=IO_BASIC)
    mk("c2M", size="64M", options={"cluster_size": "2M"}, io=[*IO_BASIC, "write -P 0x44 40M 4k"])
    mk("extl2", size="64M", options={"extended_l2": "on", "cluster_size": "64k"},
       io=["write -P 0x11 0 4k", "write -P 0x22 8k 2k", "write -z 64k 4k", "write -P 0x33 128k 64k",
           "write -z 130k 2k", "write -P 0x44 1M 100k"])
    mk("zlib", size="64M", options={"compression_type": "zlib"},
       io=["write -c -P 0x51 0 64k", "write -c -P 0x52 64k 64k", "write -P 0x53 256k 64k", "write -c 1M 64k"])
    mk("zstd", size="64M", options={"compression_type": "zstd"},
       io=["write -c -P 0x61 0 64k", "write -c -P 0x62 128k 64k", "write -P 0x63 512k 4k"])
    mk("zstd-c4k", size="8M", options={"compression_type": "zstd", "cluster_size": 4096},
       io=["write -c -P 0x71 0 4k", "write -c 8k 4k", "write -P 0x72 64k 4k"])
    # backing chain of three with relative names (in a sub directory)
    sub = d / "chain"
    sub.mkdir(exist_ok=True)
    make_qcow2(sub / "base.qcow2", size="32M", io=["write -P 0xa1 0 1M", "write -P 0xa2 8M 64k"])
    make_qcow2(sub / "mid.qcow2", size="48M", backing="base.qcow2", io=["write -P 0xb1 512k 128k", "write -z 8M 4k"])
    imgs["chain3"] = make_qcow2(sub / "top.qcow2", size="64M", backing="mid.qcow2",
                                io=["write -P 0xc1 64k 64k", "write -P 0xc2 40M 64k"])
    # extended L2 over a backing file: unallocated subclusters of allocated clusters read from below
    make_qcow2(sub / "xbase.qcow2", size="8M", io=["write -P 0x31 0 1M"])
    imgs["extl2-backing"] = make_qcow2(sub / "xtop.qcow2", size="8M", backing="xbase.qcow2",
                                       options={"extended_l2": "on", "cluster_size": "128k"},
                                       io=["write -P 0x32 8k 4k", "write -z 160k 8k", "write -c -P 0x33 512k 128k",
                                           "write -P 0x34 2M 4k"])
    mk("rc8", size="16M", options={"refcount_bits": 8, "cluster_size": 8192}, io=IO_BASIC)
    mk("rc32", size="16M", options={"refcount_bits": 32}, io=IO_BASIC)
    mk("rc2", size="16M", options={"refcount_bits": 2, "cluster_size": 16384}, io=IO_BASIC)
    mk("rc4", size="16M", options={"refcount_bits": 4, "cluster_size": 1024}, io=IO_BASIC)
    # raw backing file
    raw = d / "rawbase.img"
    run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "16M"])
    qemu_io_cmds(raw, ["write -P 0xd1 0 256k", "write -P 0xd2 4M 64k"], fmt="raw")
    imgs["rawbacking"] = make_qcow2(d / "rawbacking.qcow2", size="32M", backing="rawbase.img", backing_fmt="raw",
                                    io=["write -P 0xd3 128k 64k"])
    # internal snapshots
    p = make_qcow2(d / "snap.qcow2", size="64M", io=["write -P 0x81 0 256k"])
    run(["qemu-img", "snapshot", "-c", "first", str(p)])
    qemu_io_cmds(p, ["write -P 0x82 64k 64k", "write -P 0x83 2M 64k"])
    run(["qemu-img", "snapshot", "-c", "second", str(p)])
    qemu_io_cmds(p, ["write -P 0x84 0 64k"])
    imgs["snapshots"] = p
    # persistent dirty bitmaps
    p = make_qcow2(d / "bitmaps.qcow2", size="64M", io=["write -P 0x91 0 64k"])
    run(["qemu-img", "bitmap", "--add", str(p), "b0"])
    run(["qemu-img", "bitmap", "--add", "-g", "128k", str(p), "b1"])
    run(["qemu-img", "bitmap", "--disable", str(p), "b1"])
    imgs["bitmaps"] = p
    # external data file
    imgs["datafile"] = make_qcow2(d / "datafile.qcow2", size="16M", options={"data_file": str(d / "datafile.raw")},
                                  io=["write -P 0xe1 0 64k", "write -P 0xe2 1M 128k"])
    # lazy refcounts, left dirty by a simulated crash
    p = make_qcow2(d / "lazy.qcow2", size="64M", options={"lazy_refcounts": "on"})
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xf1 0 128k", "-c", "write -P 0xf2 2M 64k", "-c", "abort", str(p)],
        check=False)
    imgs["lazy-dirty"] = p
    # LUKS encrypted (qemu-img info shows the LUKS header without the key)
    p = d / "luks.qcow2"
    sec = "secret,id=sec0,data=virtopt-test"
    create = ["qemu-img", "create", "-q", "-f", "qcow2", "--object", sec, "-o",
              "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", str(p), "8M"]
    # QEMU 7.2 times PBKDF2 with the thread's CPU clock and gives up ("Unable to get accurate CPU
    # usage") when a busy machine lets it measure 0 ms: its own flake, so try again a few times.
    for _ in range(5):
        cp = run(create, check=False)
        if cp.returncode == 0 or "Unable to get accurate CPU usage" not in cp.stderr:
            break
    assert cp.returncode == 0, cp.stderr
    run(["qemu-io", "--object", sec, "--image-opts", f"driver=qcow2,file.filename={p},encrypt.key-secret=sec0",
         "-c", "write -P 0x66 0 128k"])
    imgs["luks"] = p
    mk("v2", size="32M", options={"compat": "0.10"}, io=["write -P 0x12 0 64k", "write -z 64k 64k"])
    mk("prealloc-meta", size="32M", options={"preallocation": "metadata"}, io=["write -P 0x13 1M 64k"])
    mk("discard", size="32M", io=["write -P 0x14 0 1M", "discard 256k 256k", "write -z -u 512k 64k"])
    return imgs


# ------------------------------------------------------------------ metadata editing on copies
def _rw(path: Path, offset: int, fmt: str, value: int | None = None) -> int:
    with open(path, "r+b") as f:
        f.seek(offset)
        size = struct.calcsize(fmt)
        old = struct.unpack(fmt, f.read(size))[0]
        if value is not None:
            f.seek(offset)
            f.write(struct.pack(fmt, value))
    return old


def _first_l2_entry(path: Path) -> tuple[int, int]:
    """(file offset of the first allocated L2 entry, its value)."""
    with open_image(path) as img:
        l2 = img.l2_table_offset(0)
        tab = img.read_l2_tables(__import__("numpy").array([l2], dtype="uint64"))[0]
        for j, e in enumerate(tab.tolist()):
            if e:
                return l2 + 8 * j, e
    raise AssertionError("no allocated L2 entry")


def _refcount_entry_offset(path: Path, cluster: int) -> int:
    with open_image(path) as img:
        assert img.refcount_bits == 16
        per = img.refcount_block_entries
        block = int(img.refcount_table()[cluster // per]) & ~0x1FF
        return block + 2 * (cluster % per)


def corrupt_leak(path: Path) -> None:
    """A cluster appended to the file gets refcount 1 but nothing points to it: a leaked cluster
    (what a crash between allocation and the L2 update leaves behind)."""
    with open_image(path) as img:
        cs = img.cluster_size
        target = (img.file_size + cs - 1) // cs
    with open(path, "r+b") as f:
        f.truncate((target + 1) * cs)
    _rw(path, _refcount_entry_offset(path, target), ">H", 1)


def corrupt_refcount_low(path: Path) -> None:
    """The first data cluster's refcount drops to 0 while an L2 entry still points there."""
    _, e = _first_l2_entry(path)
    with open_image(path) as img:
        cluster = (e & 0x00FFFFFFFFFFFE00) // img.cluster_size
    _rw(path, _refcount_entry_offset(path, cluster), ">H", 0)


def corrupt_l2_past_eof(path: Path) -> None:
    off, e = _first_l2_entry(path)
    with open_image(path) as img:
        far = (img.file_size // img.cluster_size + 1000) * img.cluster_size
    _rw(path, off, ">Q", (e & ~0x00FFFFFFFFFFFE00) | far)


def corrupt_overlap(path: Path) -> None:
    """The first L2 entry points at the L1 table's cluster (data overlapping metadata)."""
    off, e = _first_l2_entry(path)
    with open_image(path) as img:
        l1 = img.header.l1_table_offset
    _rw(path, off, ">Q", (e & ~0x00FFFFFFFFFFFE00) | l1)


def corrupt_unaligned(path: Path) -> None:
    off, e = _first_l2_entry(path)
    _rw(path, off, ">Q", e + 0x200)


CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "leak": corrupt_leak,
    "refcount-low": corrupt_refcount_low,
    "l2-past-eof": corrupt_l2_past_eof,
    "overlap": corrupt_overlap,
    "unaligned": corrupt_unaligned,
}


def build_corrupted(d: Path) -> dict[str, Path]:
    base = make_qcow2(d / "clean.qcow2", size="16M", io=["write -P 0x5a 0 192k", "write -P 0x5b 4M 64k"])
    out = {}
    for name, fn in CORRUPTIONS.items():
        p = d / f"corrupt-{name}.qcow2"
        shutil.copyfile(base, p)
        fn(p)
        out[f"corrupt-{name}"] = p
    # a snapshot table entry whose L1 size exceeds QEMU's limit (qemu-img check: corruption + leaks)
    p = make_qcow2(d / "corrupt-snapshot-l1.qcow2", size="16M", io=["write -P 0x5c 0 128k"])
    run(["qemu-img", "snapshot", "-c", "s1", str(p)])
    qemu_io_cmds(p, ["write -P 0x5d 0 64k"])
    with open_image(p) as img:
        entry = img.snapshots()[0].entry_offset
    _rw(p, entry + 8, ">I", 0x800000)
    out["corrupt-snapshot-l1"] = p
    return out


def build_metadata_edits(d: Path) -> dict[str, Path]:
    """More single-field edits on copies of one image: reserved bits, unaligned tables, flags."""
    base = make_qcow2(d / "edit-base.qcow2", size="16M", io=["write -P 1 0 128k", "write -c 1M 64k"])
    with open_image(base) as img:
        l1 = img.header.l1_table_offset
        l2 = img.l2_table_offset(0)
        rt = img.header.refcount_table_offset
    edits: dict[str, tuple[int, Callable[[int], int]]] = {
        "l1-unaligned": (l1, lambda v: v + 0x200),
        "l1-reserved": (l1, lambda v: v | 1 << 60),
        "l2-reserved": (l2, lambda v: v | 1 << 58),
        "compressed-copied": (l2 + 16 * 8, lambda v: v | 1 << 63),
        "reftable-unaligned": (rt, lambda v: v + 0x200),
        "refblock-outside": (rt + 8, lambda v: 0x10000000),
        "reftable-reserved": (rt, lambda v: v | 1),
        "l2-zero-plain": (l2 + 5 * 8, lambda v: 1),
        "l2-zero-alloc": (l2 + 8, lambda v: v | 1),
    }
    out = {}
    for name, (off, fn) in edits.items():
        p = d / f"edit-{name}.qcow2"
        shutil.copyfile(base, p)
        _rw(p, off, ">Q", fn(_rw(p, off, ">Q")))
        out[name] = p
    return out


# ------------------------------------------------------------------ QEMU's hostile-image iotests
IOTESTS_DATA = Path(__file__).resolve().parent / "iotests-data"


def build_iotest_images(out: Path, qemu_img: str = "qemu-img", qemu_io: str = "qemu-io",
                        env: dict | None = None, only: str = "*") -> dict[str, Path]:
    """Run tests/iotests-data/NNN.sh (QEMU 7.2's iotests' own image-building lines, with common.sh's
    poke_file/_make_test_img/qcow2.py) and return every image they leave, by case name."""
    import os

    out.mkdir(parents=True, exist_ok=True)
    base_env = dict(env if env is not None else os.environ)
    for script in sorted(IOTESTS_DATA.glob(f"{only}.sh")):
        if script.name == "common.sh":
            continue
        e = dict(base_env, OUT=str(out), QEMU_IMG=qemu_img, QEMU_IO=qemu_io, TEST_NUMBER=script.stem)
        cp = run(["bash", "-c", f'source "{IOTESTS_DATA / "common.sh"}" && source "{script}"'], env=e, cwd=out,
                 check=False, text=False)
        assert cp.returncode == 0, f"{script.name}: {cp.stderr[-2000:]!r}"
    return iotest_images_in(out)


def iotest_images_in(out: Path) -> dict[str, Path]:
    return {d.name: d / "t.qcow2" for d in sorted(out.iterdir()) if (d / "t.qcow2").is_file()}


def without_unwritten_extents(path: Path) -> None:
    """Rewrite a file so that each of its blocks is written data or a hole, nothing in between.

    ext4 answers SEEK_HOLE for an fallocated (unwritten) extent by the page cache: a hole while no
    page of it is cached, data once something has read it (iomap's page_cache_seek_hole_data). Both
    qemu-img map (file-posix's raw_co_block_status) and virtopt map ask, so whichever reads the
    image first changes what the other sees: 112-max-rc64 then differed by 4 KiB once in a while.
    With the pages dropped first, unwritten extents are holes, the same on every run."""
    import os

    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        ranges, pos = [], 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole from here on
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            ranges.append((start, end))
            pos = end
        tmp = path.with_name(path.name + ".rewrite")
        with open(tmp, "wb") as out:
            for start, end in ranges:
                out.seek(start)
                while start < end:
                    chunk = os.pread(fd, min(end - start, 1 << 20), start)
                    if not chunk:
                        break
                    out.write(chunk)
                    start += len(chunk)
            out.truncate(size)
    finally:
        os.close(fd)
    os.chmod(tmp, path.stat().st_mode)
    os.replace(tmp, path)


def cached_iotest_images() -> dict[str, Path]:
    """The iotest images, built once with Debian's QEMU 7.2 (whose tests they are) and kept in the
    virtopt cache like the QEMU builds (some of the tests' own steps take a minute: qemu-img amend
    walking refcounts). Keyed by the building scripts and the qemu-img version: a change rebuilds."""
    import hashlib
    import shutil
    import tempfile

    from qemu_ext import vm

    build = vm.find_build("7.2")
    assert build is not None, "Debian's QEMU 7.2 is needed to build QEMU 7.2's iotest images"
    h = hashlib.sha256(build.version.encode() + b"|no unwritten extents")
    for p in sorted(IOTESTS_DATA.iterdir()):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    root = vm.cache_dir() / "qcow2-iotests"
    final = root / h.hexdigest()[:16]
    if not (final / "READY").is_file():
        root.mkdir(parents=True, exist_ok=True)
        for old in root.iterdir():  # images of older scripts
            shutil.rmtree(old, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix="build-"))
        build_iotest_images(tmp, build.img, build.io, env=build.env())
        for f in sorted(tmp.rglob("*")):
            if f.is_file() and not f.is_symlink():
                without_unwritten_extents(f)
        (tmp / "READY").write_text(build.version + "\n")
        tmp.rename(final)
    return iotest_images_in(final)


def tree_state(d: Path) -> dict[str, tuple[int, int, int]]:
    """(size, mtime_ns, ctime_ns) of every file in a directory: any write to an image changes it."""
    out = {}
    for p in sorted(d.iterdir()):
        if p.is_file():
            st = p.stat()
            out[p.name] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return out


# ------------------------------------------------------------------ virtopt in-process, qemu-img as the oracle
def vo(*args: str, cwd: Path | None = None) -> tuple[int, str, str]:
    """`virtopt ARGS` run in this process (the real argument parser and error handling): (exit, stdout, stderr)."""
    import contextlib
    import io
    import os

    from qemu_ext.cli import main

    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(list(args))
    finally:
        os.chdir(old)
    return rc, out.getvalue(), err.getvalue()


def qemu_reason(stderr: str) -> str:
    """What qemu-img says went wrong, without its prefixes: the qcow2 corruption message, or the
    reason after "Could not open 'FILE': ", or its last error line."""
    import re

    m = re.search(r"qcow2: (?:Image is corrupt|Marking image as corrupt): (.*?); further", stderr)
    if m:
        return m.group(1)
    lines = [ln for ln in stderr.splitlines() if ln.startswith("qemu-img: ")]
    if not lines:
        return stderr.strip()
    last = lines[-1][len("qemu-img: "):]
    m = re.match(r"Could not open '[^']*': (.*)", last)
    return m.group(1) if m else last


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    import os

    out, pos = [], 0
    while pos < size:
        try:
            d = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        h = os.lseek(fd, d, os.SEEK_HOLE)
        out.append((d, h))
        pos = h
    return out


def files_equal(a: Path, b: Path) -> bool:
    """Two (sparse) files hold the same bytes: holes read as zeros, ranges that are holes in both
    are not read at all."""
    import bisect
    import os

    sa, sb = a.stat().st_size, b.stat().st_size
    if sa != sb:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        ext = [_data_extents(f.fileno(), sa) for f in (fa, fb)]
        marks = sorted({0, sa, *(x for e in ext for d, h in e for x in (d, h) if x <= sa)})

        def in_data(e: list[tuple[int, int]], pos: int) -> bool:
            i = bisect.bisect_right([d for d, _ in e], pos) - 1
            return i >= 0 and e[i][0] <= pos < e[i][1]

        for lo, hi in zip(marks, marks[1:]):
            if not (in_data(ext[0], lo) or in_data(ext[1], lo)):
                continue
            pos = lo
            while pos < hi:
                n = min(hi - pos, 8 << 20)
                if os.pread(fa.fileno(), n, pos) != os.pread(fb.fileno(), n, pos):
                    return False
                pos += n
    return True
