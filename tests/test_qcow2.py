"""virtopt qcow2 info/map/check/convert against qemu-img on a matrix of real images (made by qemu-img/qemu-io).

Every comparison runs the real CLI as a subprocess and qemu-img on the same file;
images are proven unchanged by sha256 before/after.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import make_qcow2, run, sha256, virtopt
from qcow2_util import build_corrupted, build_matrix, build_metadata_edits, qemu_json


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("qcow2")
    imgs = build_matrix(d)
    imgs.update(build_corrupted(d))
    return imgs


MATRIX = [
    "c512", "c4k-rc1", "c64k-rc16", "c64k-rc64", "c2M", "extl2", "zlib", "zstd", "zstd-c4k", "chain3",
    "extl2-backing", "rc2", "rc4", "rc8", "rc32", "rawbacking", "snapshots", "bitmaps", "datafile", "lazy-dirty", "v2", "prealloc-meta", "discard",
]
CORRUPT = ["corrupt-leak", "corrupt-refcount-low", "corrupt-l2-past-eof", "corrupt-overlap", "corrupt-unaligned",
           "corrupt-snapshot-l1"]


@contextlib.contextmanager
def _unchanged(path: Path) -> Iterator[None]:
    """The image (and so its metadata) is byte-identical after the block: proven by sha256."""
    before = sha256(path)
    yield
    assert sha256(path) == before, f"{path} was modified"


@pytest.mark.parametrize("name", MATRIX + CORRUPT)
def test_info_matches_qemu_img(images: dict[str, Path], name: str) -> None:
    """--qemu-only prints qemu-img info's JSON byte for byte (QDict key order, QEMU's JSON writer)."""
    p = images[name]
    with _unchanged(p):
        q = run(["qemu-img", "info", "--output=json", str(p)])
        cp = virtopt("qcow2", "info", "--qemu-only", "--output=json", str(p))
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == q.stdout


def test_luks_image(images: dict[str, Path]) -> None:
    """LUKS: info (with the LUKS header) byte-identical; check equal to qemu-img's run with the key;
    reading guest data needs the key, which virtopt does not take: one line, exit 2."""
    p = images["luks"]
    with _unchanged(p):
        q = run(["qemu-img", "info", "--output=json", str(p)])
        cp = virtopt("qcow2", "info", "--qemu-only", "--output=json", str(p))
        assert cp.returncode == 0 and cp.stdout == q.stdout
        assert '"format": "luks"' in cp.stdout
        opts = f"driver=qcow2,file.filename={p},encrypt.key-secret=sec0"
        qrc, want = qemu_json("check", "--output=json", "--object", "secret,id=sec0,data=virtopt-test",
                              "--image-opts", opts)
        cp = virtopt("qcow2", "check", "--qemu-only", "--output=json", str(p))
        got = json.loads(cp.stdout)
        assert cp.returncode == qrc
        assert {k: v for k, v in got.items() if k != "filename"} == {k: v for k, v in want.items() if k != "filename"}
        cp = virtopt("qcow2", "convert", str(p), str(p) + ".raw")
        assert cp.returncode == 2 and "encrypted" in cp.stderr and cp.stderr.count("\n") == 1


@pytest.mark.parametrize("name", ["snapshots", "bitmaps", "zstd"])
def test_info_extras_keep_qemu_fields(images: dict[str, Path], name: str) -> None:
    p = images[name]
    _, want = qemu_json("info", "--output=json", str(p))
    cp = virtopt("qcow2", "info", "--output=json", str(p))
    assert cp.returncode == 0, cp.stderr
    got = json.loads(cp.stdout)
    extras = got.pop("virtopt")
    assert got == want
    assert extras["l2-tables-allocated"] >= 1
    assert len(extras["snapshots"]) == len(want.get("snapshots", []))
    assert [b["name"] for b in extras["bitmaps"]] == [
        b["name"] for b in want["format-specific"]["data"].get("bitmaps", [])
    ]


@pytest.mark.parametrize("name", ["chain3", "rawbacking"])
def test_info_backing_chain(images: dict[str, Path], name: str) -> None:
    p = images[name]
    q = run(["qemu-img", "info", "--backing-chain", "--output=json", str(p)])
    cp = virtopt("qcow2", "info", "--backing-chain", "--qemu-only", "--output=json", str(p))
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == q.stdout


@pytest.mark.parametrize("name", MATRIX + CORRUPT)
def test_map_matches_qemu_img(images: dict[str, Path], name: str) -> None:
    p = images[name]
    with _unchanged(p):
        q = run(["qemu-img", "map", "--output=json", str(p)], check=False)
        cp = virtopt("qcow2", "map", "--output=json", str(p))
    if q.returncode != 0:  # qemu-img map refuses (unaligned L2 entry): so must we, with one line
        assert cp.returncode != 0
        assert cp.stderr.count("\n") == 1 and "Traceback" not in cp.stderr
        return
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == q.stdout


@pytest.mark.parametrize("name", ["c64k-rc16", "chain3", "extl2", "zlib"])
def test_map_human_matches_qemu_img(images: dict[str, Path], name: str) -> None:
    """Same lines; with compressed clusters both stop with the same error after the same lines."""
    p = images[name]
    q = run(["qemu-img", "map", str(p)], check=False)
    cp = virtopt("qcow2", "map", str(p))
    assert (cp.returncode != 0) == (q.returncode != 0), cp.stderr
    assert cp.stdout == q.stdout
    if q.returncode:
        assert q.stderr.strip().split(": ", 1)[1] in cp.stderr


@pytest.mark.parametrize("name", MATRIX + CORRUPT)
def test_check_matches_qemu_img(images: dict[str, Path], name: str) -> None:
    p = images[name]
    with _unchanged(p):
        qrc, want = qemu_json("check", "--output=json", str(p))
        cp = virtopt("qcow2", "check", "--output=json", str(p))
    if name.startswith("corrupt-"):  # the edit really broke the image, by qemu-img's own verdict
        assert qrc in (2, 3)
    assert cp.returncode == qrc, cp.stderr
    got = json.loads(cp.stdout)
    problems = got.pop("problems")
    got.pop("problems-not-listed", None)
    assert got == want
    # every counted corruption and leak is listed with what is wrong
    assert len([x for x in problems if x["kind"] in ("corruption", "leak")]) == want.get("corruptions", 0) + want.get(
        "leaks", 0
    )


@pytest.mark.parametrize("name", [*MATRIX, "corrupt-leak", "corrupt-refcount-low", "corrupt-overlap", "corrupt-l2-past-eof"])
def test_convert_byte_identical(images: dict[str, Path], name: str, tmp_path: Path) -> None:
    p = images[name]
    want = tmp_path / "qemu.raw"
    got = tmp_path / "virtopt.raw"
    with _unchanged(p):
        run(["qemu-img", "convert", "-O", "raw", str(p), str(want)])
        cp = virtopt("qcow2", "convert", str(p), str(got))
    assert cp.returncode == 0, cp.stderr
    assert sha256(got) == sha256(want)


def test_read_matches_qemu_io(images: dict[str, Path]) -> None:
    """`read` through a chain of three equals what qemu-io reads (its -P pattern check)."""
    p = images["chain3"]
    # 0xc1 from top at 64k, 0xb1 from mid at 512k, 0xa1 from base at 0, 0xa2 from base at 8M..8M+4k zeroed by mid
    for off, pattern in ((65536, 0xC1), (524288, 0xB1), (0, 0xA1), (8 << 20, 0)):
        run(["qemu-io", "-f", "qcow2", "-r", "-c", f"read -P {pattern} {off} 4096", str(p)])
        cp = virtopt("qcow2", "read", str(p), str(off), "4096", "--output=json")
        assert cp.returncode == 0, cp.stderr
        assert bytes.fromhex(json.loads(cp.stdout)["data"]) == bytes([pattern]) * 4096


def test_dump_l2_agrees_with_map(images: dict[str, Path]) -> None:
    """The host offsets `dump l2` decodes are the ones qemu-img map reports."""
    p = images["c64k-rc16"]
    qmap = json.loads(run(["qemu-img", "map", "--output=json", str(p)]).stdout)
    cp = virtopt("qcow2", "dump", str(p), "l2", "--l1-index", "0", "--output=json")
    assert cp.returncode == 0, cp.stderr
    ents = {e["guest_offset"]: e for e in json.loads(cp.stdout)["entries"]}
    for m in qmap:
        if m["data"] and "offset" in m:
            e = ents[m["start"]]
            assert e["type"] == "normal" and e["host_offset"] == m["offset"]
    for what in ("header", "extensions", "l1", "refcounts", "snapshots", "bitmaps"):
        cp = virtopt("qcow2", "dump", str(images["snapshots"]), what)
        assert cp.returncode == 0, (what, cp.stderr)


def test_check_names_the_referrers(images: dict[str, Path]) -> None:
    """Data pointed at the L1 table: the cluster qemu-img counts as corrupt is listed with both referrers."""
    p = images["corrupt-overlap"]
    q = run(["qemu-img", "check", str(p)], check=False)
    cp = virtopt("qcow2", "check", "--output=json", str(p))
    assert cp.returncode == q.returncode == 2
    bad = [line.split()[2] for line in q.stderr.splitlines() if line.startswith("ERROR cluster")]
    assert bad, q.stderr
    got = {x["cluster"]: x for x in json.loads(cp.stdout)["problems"] if x["what"].startswith("cluster ")}
    for c in bad:
        refs = got[int(c)]["referrers"]
        assert any("L1 table" in r for r in refs) and any("L2 table" in r for r in refs)
    # a leaked cluster is referenced by nothing
    leak = json.loads(virtopt("qcow2", "check", "--output=json", str(images["corrupt-leak"])).stdout)["problems"]
    assert [x["referrers"] for x in leak if x["kind"] == "leak"] == [[]]


def test_info_extras_agree_with_qemu_img_check(images: dict[str, Path]) -> None:
    """The allocation/fragmentation/compression figures info adds are the ones qemu-img check counts."""
    for name in ("zlib", "zstd", "c512", "snapshots", "extl2"):
        p = images[name]
        _, chk = qemu_json("check", "--output=json", str(p))
        x = json.loads(virtopt("qcow2", "info", "--output=json", str(p)).stdout)["virtopt"]
        assert x["allocated-clusters"] == chk.get("allocated-clusters", 0), name
        assert x["fragmented-clusters"] == chk.get("fragmented-clusters", 0), name
        assert x["compressed-clusters"] == chk.get("compressed-clusters", 0), name
    snaps = run(["qemu-img", "snapshot", "-l", str(images["snapshots"])]).stdout
    x = json.loads(virtopt("qcow2", "info", "--output=json", str(images["snapshots"])).stdout)["virtopt"]
    assert [s["name"] for s in x["snapshots"]] == [ln.split()[1] for ln in snaps.splitlines()[2:]]


@pytest.mark.parametrize("name", ["snapshots", "c512", "corrupt-overlap", "corrupt-leak", "lazy-dirty"])
def test_check_json_text_identical(images: dict[str, Path], name: str) -> None:
    p = images[name]
    q = run(["qemu-img", "check", "--output=json", str(p)], check=False)
    cp = virtopt("qcow2", "check", "--qemu-only", "--output=json", str(p))
    assert (cp.returncode, cp.stdout) == (q.returncode, q.stdout)
    # human: stdout is qemu-img's summary text; the findings go to stderr, one line each (as qemu-img's)
    q = run(["qemu-img", "check", str(p)], check=False)
    cp = virtopt("qcow2", "check", str(p))
    assert (cp.returncode, cp.stdout) == (q.returncode, q.stdout)
    assert len(cp.stderr.splitlines()) >= (1 if q.returncode else 0)


@pytest.mark.parametrize("name", ["snapshots", "bitmaps", "chain3", "lazy-dirty", "luks", "v2", "datafile"])
def test_info_human_matches_qemu_img(images: dict[str, Path], name: str) -> None:
    """The human text for qemu-img's fields is qemu-img info's text; virtopt's extras follow it."""
    p = images[name]
    q = run(["qemu-img", "info", "--backing-chain", str(p)])
    cp = virtopt("qcow2", "info", "--backing-chain", "--qemu-only", str(p))
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == q.stdout
    full = virtopt("qcow2", "info", str(p)).stdout
    top = run(["qemu-img", "info", str(p)]).stdout
    assert full.startswith(top) and "virtopt (not shown by qemu-img):" in full


@pytest.mark.parametrize("seed", range(6))
def test_random_workload_agrees(tmp_path: Path, seed: int) -> None:
    """A random layout (cluster size, refcount width, extended L2, compression) over a backing file and a
    random qemu-io workload: map/check/info/convert all agree with qemu-img, the image is never written."""
    import random

    rnd = random.Random(seed)
    cs = rnd.choice(["512", "4k", "16k", "64k", "256k", "2M"])
    opts = {
        "cluster_size": cs,
        "refcount_bits": rnd.choice([1, 2, 4, 8, 16, 32, 64]),
        "extended_l2": rnd.choice(["on", "off"]) if cs not in ("512", "4k") else "off",
        "compression_type": rnd.choice(["zlib", "zstd"]),
    }
    make_qcow2(tmp_path / "base.qcow2", size="32M", options={"cluster_size": rnd.choice(["4k", "64k"])},
               io=["write -P 7 0 3M", "write -c 8M 64k"])
    io = []
    for _ in range(12):
        off = rnd.randrange(0, 47 << 20) // 512 * 512
        ln = rnd.randrange(1, 300) * 512
        op = rnd.choice([f"write -P {rnd.randrange(1, 250)}", "write -z", "write -c", "discard"])
        if op == "write -c":  # compressed writes are whole, aligned clusters
            csb = {"512": 512, "4k": 4096, "16k": 16384, "64k": 65536, "256k": 262144, "2M": 2 << 20}[cs]
            off, ln = off // csb * csb, csb
        io.append(f"{op} {off} {ln}")
    p = make_qcow2(tmp_path / "top.qcow2", size="48M", options=opts, backing="base.qcow2", io=io)
    with _unchanged(p):
        for argv in (["map", "--output=json"], ["info", "--output=json"]):
            q = run(["qemu-img", *argv, str(p)])
            extra = ["--qemu-only"] if argv[0] == "info" else []
            assert virtopt("qcow2", *argv, *extra, str(p)).stdout == q.stdout, (opts, io, argv)
        q = run(["qemu-img", "check", "--output=json", str(p)], check=False)
        cp = virtopt("qcow2", "check", "--qemu-only", "--output=json", str(p))
        assert (cp.returncode, cp.stdout) == (q.returncode, q.stdout), (opts, io)
        run(["qemu-img", "convert", "-O", "raw", str(p), str(tmp_path / "q.raw")])
        assert virtopt("qcow2", "convert", str(p), str(tmp_path / "v.raw")).returncode == 0
        assert sha256(tmp_path / "q.raw") == sha256(tmp_path / "v.raw"), (opts, io)


@pytest.mark.parametrize("window", [["-s", "65536"], ["-s", "100000", "-l", "3000000"], ["-l", "1"], ["-s", "70M"]])
def test_map_window_matches_qemu_img(images: dict[str, Path], window: list[str]) -> None:
    p = images["chain3"]
    q = run(["qemu-img", "map", "--output=json", *window, str(p)])
    cp = virtopt("qcow2", "map", "--output=json", *window, str(p))
    assert cp.stdout == q.stdout


def test_convert_snapshot_matches_qemu_img(images: dict[str, Path], tmp_path: Path) -> None:
    """convert --snapshot NAME equals qemu-img convert -l snapshot.name=NAME (and differs from the active state)."""
    p = images["snapshots"]
    active = tmp_path / "active.raw"
    run(["qemu-img", "convert", "-O", "raw", str(p), str(active)])
    for name in ("first", "second"):
        want, got = tmp_path / f"q-{name}.raw", tmp_path / f"v-{name}.raw"
        with _unchanged(p):
            run(["qemu-img", "convert", "-O", "raw", "-l", f"snapshot.name={name}", str(p), str(want)])
            cp = virtopt("qcow2", "convert", str(p), str(got), "--snapshot", name)
        assert cp.returncode == 0, cp.stderr
        assert sha256(got) == sha256(want) != sha256(active)
    cp = virtopt("qcow2", "read", str(p), "65536", "16", "--snapshot", "first", "--output=json")
    assert bytes.fromhex(json.loads(cp.stdout)["data"]) == (tmp_path / "q-first.raw").read_bytes()[65536:65552]


EDITS = ["l1-unaligned", "l1-reserved", "l2-reserved", "compressed-copied", "reftable-unaligned", "refblock-outside",
         "reftable-reserved", "l2-zero-plain", "l2-zero-alloc"]


@pytest.fixture(scope="module")
def edited(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_metadata_edits(tmp_path_factory.mktemp("qcow2edits"))


@pytest.mark.parametrize("name", EDITS)
def test_metadata_edits_check_and_map_like_qemu_img(edited: dict[str, Path], name: str) -> None:
    """check: same JSON text and exit code (1 when qemu-img's check cannot finish); map: same text, or
    both refuse."""
    p = edited[name]
    with _unchanged(p):
        q = run(["qemu-img", "check", "--output=json", str(p)], check=False)
        cp = virtopt("qcow2", "check", "--qemu-only", "--output=json", str(p))
        assert (cp.returncode, cp.stdout) == (q.returncode, q.stdout)
        q = run(["qemu-img", "map", "--output=json", str(p)], check=False)
        cp = virtopt("qcow2", "map", "--output=json", str(p))
        if q.returncode:
            assert cp.returncode != 0 and cp.stderr.count("\n") == 1
        else:
            assert (cp.returncode, cp.stdout) == (0, q.stdout)
