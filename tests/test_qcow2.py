"""virtopt qcow2 info/map/check/convert/read against qemu-img and qemu-io of each QEMU (7.2 and 10.0)
on a matrix of real images (made by qemu-img/qemu-io: cluster sizes, refcount widths, extended L2,
zlib/zstd, backing chains, snapshots, bitmaps, data files, LUKS, v2, preallocation, corruptions).

virtopt runs in this process through its real argument parser (``vo``); a few tests run the
installed command line as a user would. Images are proven unchanged after every comparison.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from helpers import make_qcow2, qemu_tool, run, sha256, virtopt
from qcow2_util import build_corrupted, build_matrix, build_metadata_edits, files_equal, tree_state, vo
from test_qcow2_iotests import compare_one

SECRET = "secret,id=sec0,data=virtopt-test"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("qcow2")
    imgs = build_matrix(d)
    imgs.update(build_corrupted(d))
    imgs.update(build_metadata_edits(d))
    return imgs


def _human(build, img: Path, *args: str) -> tuple[int, str, str]:
    cp = qemu_tool(build, "img", *args, str(img), check=False, cwd=img.parent)
    return cp.returncode, cp.stdout, cp.stderr


def test_matrix_agrees_with_qemu_img(images: dict[str, Path], qemu_build, tmp_path: Path) -> None:
    """info (JSON as this QEMU prints it), check (JSON and exit code), map (JSON) and convert (bytes)
    agree with this build's qemu-img on every image of the matrix, or both refuse for the same
    reason; the human texts of info, check and map are qemu-img's too. No image is written."""
    compat = qemu_build.series
    problems = {}
    for name, img in images.items():
        if name == "luks":
            continue  # needs the key on qemu-img's side: test_luks_image
        before = tree_state(img.parent)
        bad = compare_one(qemu_build, img, tmp_path)
        for fmt in ([], ["--output=json"]):
            qrc, qout, _ = _human(qemu_build, img, "info", "--backing-chain", *fmt)
            rc, out, err = vo("qcow2", "info", "--backing-chain", "--qemu-only", "--qemu-compat", compat, *fmt,
                              str(img), cwd=img.parent)
            if qrc == 0 and (rc, out) != (0, qout):
                bad.append(f"info --backing-chain {fmt} differs: {err.strip()}")
        qrc, qout, _ = _human(qemu_build, img, "check")
        rc, out, _ = vo("qcow2", "check", str(img), cwd=img.parent)
        if (rc, out) != (qrc, qout):
            bad.append(f"human check: exit {rc} vs {qrc}")
        qrc, qout, _ = _human(qemu_build, img, "map")
        rc, out, err = vo("qcow2", "map", str(img), cwd=img.parent)
        if (rc != 0) != (qrc != 0) or (qrc in (0,) and out != qout):
            bad.append(f"human map: exit {rc} vs {qrc}")
        if tree_state(img.parent) != before:
            bad.append("image modified")
        if bad:
            problems[name] = bad
    assert not problems, json.dumps(problems, indent=1)


def test_luks_image(images: dict[str, Path], qemu_build) -> None:
    """LUKS: info (with the LUKS header) byte-identical; check and map equal to qemu-img's run with the
    key (virtopt needs none for metadata); guest data needs the key, which virtopt does not take:
    one line, exit 2 (not available)."""
    p = images["luks"]
    before = sha256(p)
    q = qemu_tool(qemu_build, "img", "info", "--output=json", str(p))
    rc, out, err = vo("qcow2", "info", "--qemu-only", "--qemu-compat", qemu_build.series, "--output=json", str(p))
    assert (rc, out) == (0, q.stdout) and '"format": "luks"' in out, err
    opts = f"driver=qcow2,file.filename={p},encrypt.key-secret=sec0"
    q = qemu_tool(qemu_build, "img", "check", "--output=json", "--object", SECRET, "--image-opts", opts, check=False)
    rc, out, _ = vo("qcow2", "check", "--qemu-only", "--output=json", str(p))
    want, got = json.loads(q.stdout), json.loads(out)
    assert rc == q.returncode and {k: v for k, v in got.items() if k != "filename"} == {
        k: v for k, v in want.items() if k != "filename"}
    q = qemu_tool(qemu_build, "img", "map", "--output=json", "--object", SECRET, "--image-opts", opts)
    rc, out, _ = vo("qcow2", "map", "--output=json", "--qemu-compat", qemu_build.series, str(p))
    assert (rc, out) == (0, q.stdout)
    rc, out, err = vo("qcow2", "convert", str(p), str(p) + ".raw")
    assert rc == 2 and "encrypted" in err and err.count("\n") == 1 and not os.path.exists(str(p) + ".raw")
    assert sha256(p) == before


def test_info_extras_keep_qemu_fields(images: dict[str, Path], qemu_build) -> None:
    """Without --qemu-only, info is qemu-img's JSON plus one "virtopt" object; the extras' allocation,
    fragmentation and compression figures are the ones qemu-img check counts."""
    for name in ("snapshots", "bitmaps", "zstd", "zlib", "c512", "extl2"):
        p = images[name]
        want = json.loads(qemu_tool(qemu_build, "img", "info", "--output=json", str(p)).stdout)
        rc, out, err = vo("qcow2", "info", "--output=json", "--qemu-compat", qemu_build.series, str(p))
        assert rc == 0, err
        got = json.loads(out)
        x = got.pop("virtopt")
        assert got == want
        assert x["l2-tables-allocated"] >= 1
        assert len(x["snapshots"]) == len(want.get("snapshots", []))
        assert [b["name"] for b in x["bitmaps"]] == [b["name"] for b in want["format-specific"]["data"].get("bitmaps", [])]
        chk = json.loads(qemu_tool(qemu_build, "img", "check", "--output=json", str(p), check=False).stdout)
        for key in ("allocated-clusters", "fragmented-clusters", "compressed-clusters"):
            assert x[key] == chk.get(key, 0), (name, key)
    snaps = qemu_tool(qemu_build, "img", "snapshot", "-l", str(images["snapshots"])).stdout
    x = json.loads(vo("qcow2", "info", "--output=json", str(images["snapshots"]))[1])["virtopt"]
    assert [s["name"] for s in x["snapshots"]] == [ln.split()[1] for ln in snaps.splitlines()[2:]]


def test_default_shape_is_the_qemu_img_on_path(images: dict[str, Path], qemu_build) -> None:
    """Without --qemu-compat, info and map print what the qemu-img first on PATH prints (the real
    command line, as a user runs it)."""
    p = images["chain3"]
    env = dict(qemu_build.env(), PATH=f"{qemu_build.bindir}:{os.environ['PATH']}")
    for args in (["info", "--output=json"], ["info"], ["map", "--output=json"]):
        q = run([qemu_build.img, *args, str(p)], env=qemu_build.env())
        extra = ["--qemu-only"] if args[0] == "info" else []
        cp = virtopt("qcow2", *args, *extra, str(p), env=env)
        assert (cp.returncode, cp.stdout) == (0, q.stdout), (args, cp.stderr)


@pytest.mark.parametrize("seed", range(4))
def test_random_workload_agrees(tmp_path: Path, qemu_build, seed: int) -> None:
    """A random layout (cluster size, refcount width, extended L2, compression) over a backing file and
    a random qemu-io workload: info/check/map/convert agree with qemu-img, the image is never written."""
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
    csb = {"512": 512, "4k": 4096, "16k": 16384, "64k": 65536, "256k": 262144, "2M": 2 << 20}[cs]
    for _ in range(12):
        off = rnd.randrange(0, 47 << 20) // 512 * 512
        ln = rnd.randrange(1, 300) * 512
        op = rnd.choice([f"write -P {rnd.randrange(1, 250)}", "write -z", "write -c", "discard"])
        if op == "write -c":  # compressed writes are whole, aligned clusters
            off, ln = off // csb * csb, csb
        io.append(f"{op} {off} {ln}")
    p = make_qcow2(tmp_path / "top.qcow2", size="48M", options=opts, backing="base.qcow2", io=io)
    before = sha256(p)
    assert compare_one(qemu_build, p, tmp_path) == [], (opts, io)
    assert sha256(p) == before


@pytest.mark.parametrize("window", [["-s", "65536"], ["-s", "100000", "--max-length", "3000000"],
                                    ["--max-length", "1"], ["-s", "70M"]])
def test_map_window_matches_qemu_img(images: dict[str, Path], qemu_build, window: list[str]) -> None:
    """--start-offset/--max-length as qemu-img map's -s/--max-length (qemu-img has no -l for it)."""
    p = images["chain3"]
    q = qemu_tool(qemu_build, "img", "map", "--output=json", *window, str(p))
    rc, out, err = vo("qcow2", "map", "--output=json", "--qemu-compat", qemu_build.series, *window, str(p))
    assert (rc, out) == (0, q.stdout), err


def test_convert_snapshot_matches_qemu_img(images: dict[str, Path], qemu_build, tmp_path: Path) -> None:
    """convert -l NAME equals qemu-img convert -l snapshot.name=NAME (and differs from the active
    state); read -l NAME reads the same bytes."""
    p = images["snapshots"]
    active = tmp_path / "active.raw"
    qemu_tool(qemu_build, "img", "convert", "-O", "raw", str(p), str(active))
    before = sha256(p)
    for name in ("first", "second"):
        want, got = tmp_path / f"q-{name}.raw", tmp_path / f"v-{name}.raw"
        qemu_tool(qemu_build, "img", "convert", "-O", "raw", "-l", f"snapshot.name={name}", str(p), str(want))
        rc, _, err = vo("qcow2", "convert", "-l", name, str(p), str(got))
        assert rc == 0, err
        assert files_equal(got, want) and not files_equal(want, active)
    rc, out, _ = vo("qcow2", "read", str(p), "65536", "16", "-l", "first", "--output=json")
    assert bytes.fromhex(json.loads(out)["data"]) == (tmp_path / "q-first.raw").read_bytes()[65536:65552]
    assert sha256(p) == before


def test_read_matches_qemu_io(images: dict[str, Path], qemu_build) -> None:
    """`read` through a chain of three equals what this QEMU's qemu-io reads (its -P pattern check)."""
    p = images["chain3"]
    # 0xc1 from top at 64k, 0xb1 from mid at 512k, 0xa1 from base at 0, 8M..8M+4k zeroed by mid
    for off, pattern in ((65536, 0xC1), (524288, 0xB1), (0, 0xA1), (8 << 20, 0)):
        qemu_tool(qemu_build, "io", "-f", "qcow2", "-r", "-c", f"read -P {pattern} {off} 4096", str(p))
        rc, out, err = vo("qcow2", "read", str(p), str(off), "4096", "--output=json")
        assert rc == 0, err
        assert bytes.fromhex(json.loads(out)["data"]) == bytes([pattern]) * 4096


def test_dump_header_is_qcow2_py(images: dict[str, Path]) -> None:
    """`dump header` prints what QEMU's tests/qemu-iotests/qcow2.py dump-header prints (header, then every
    extension, bitmap directories and tables included); JSON keys are kebab-case."""
    qcow2_py = Path(__file__).parent / "iotests-data" / "qcow2.py"
    for name in ("c512", "bitmaps", "luks", "datafile", "chain3", "v2", "zstd", "snapshots"):
        p = images[name]
        want = run(["python3", str(qcow2_py), str(p), "dump-header"]).stdout
        rc, out, err = vo("qcow2", "dump", str(p), "header")
        assert (rc, out) == (0, want), (name, err)
    rc, out, _ = vo("qcow2", "dump", str(images["bitmaps"]), "header", "--output=json")
    d = json.loads(out)

    def keys(o: object) -> list[str]:
        if isinstance(o, dict):
            return [*o, *(k for v in o.values() for k in keys(v))]
        if isinstance(o, list):
            return [k for v in o for k in keys(v)]
        return []

    assert rc == 0 and d["header"]["l1-table-offset"] and all("_" not in k for k in keys(d))


def test_bulk_decoding_agrees_with_the_bitstructs(images: dict[str, Path]) -> None:
    """The masks that decode whole tables (dump, entries.py) give the fields the construct BitStructs of
    format.py describe, on real L1/L2 entries (standard, compressed, zero, extended) and refcount table
    and bitmap table entries."""
    from qemu_ext.qcow2 import format as F
    from qemu_ext.qcow2.dump import dump
    from qemu_ext.qcow2.entries import compressed_span

    for name in ("zlib", "extl2", "c64k-rc16", "bitmaps", "zstd-c4k"):
        p = images[name]
        l1 = dump(p, "l1")["entries"]
        for r in l1:
            e = F.L1Entry.parse(r["raw"].to_bytes(8, "big"))
            assert (r["l2-offset"], r["copied"], r["reserved-bits"]) == (
                e.l2_offset_9 << 9, e.copied, (e.reserved_hi << 56) | e.reserved_lo)
        d = dump(p, "l2", l1_index=l1[0]["index"])
        cb = d["cluster-size"].bit_length() - 1
        for r in d["entries"]:
            raw = r["raw"].to_bytes(8, "big")
            if r["type"] == "compressed":
                c = F.L2CompressedEntry(cb).parse(raw)
                assert (r["compressed-offset"], r["compressed-bytes"]) == (
                    c.host_offset, (c.additional_sectors + 1) * 512 - (c.host_offset & 511)) == compressed_span(r["raw"], cb)
            else:
                s = F.L2StandardEntry.parse(raw)
                assert (r["host-offset"], r["zero-flag"], r["copied"], r["reserved-bits"]) == (
                    s.host_offset_9 << 9, s.zero, s.copied, (s.reserved_hi << 56) | (s.reserved_lo << 1))
            if d["extended-l2"]:
                bits = int(r["zero-bitmap"][::-1], 2) << 32 | int(r["alloc-bitmap"][::-1], 2)
                b = F.L2SubclusterBitmap.parse(bits.to_bytes(8, "big"))
                assert (b.alloc, b.zero) == (bits & 0xFFFFFFFF, bits >> 32)
        for r in dump(p, "refcounts")["blocks"]:
            assert F.RefcountTableEntry.parse(r["raw"].to_bytes(8, "big")).block_offset_9 << 9 == r["block-offset"]
        for bm in dump(p, "bitmaps")["bitmaps"]:
            for r in bm["table"]:
                raw = (r["offset"] | r["reserved"] | (r["type"] in ("all-ones", "invalid"))).to_bytes(8, "big")
                assert F.BitmapTableEntry.parse(raw).offset_9 << 9 == r["offset"]


def test_dump_l2_agrees_with_map(images: dict[str, Path], qemu_build) -> None:
    """The host offsets `dump l2` decodes are the ones qemu-img map reports."""
    p = images["c64k-rc16"]
    qmap = json.loads(qemu_tool(qemu_build, "img", "map", "--output=json", str(p)).stdout)
    rc, out, err = vo("qcow2", "dump", str(p), "l2", "--l1-index", "0", "--output=json")
    assert rc == 0, err
    ents = {e["guest-offset"]: e for e in json.loads(out)["entries"]}
    for m in qmap:
        if m["data"] and "offset" in m:
            e = ents[m["start"]]
            assert e["type"] == "normal" and e["host-offset"] == m["offset"]


def test_check_names_the_referrers(images: dict[str, Path], qemu_build) -> None:
    """Data pointed at the L1 table: the cluster qemu-img counts as corrupt is listed with both referrers;
    a leaked cluster is referenced by nothing."""
    p = images["corrupt-overlap"]
    q = qemu_tool(qemu_build, "img", "check", str(p), check=False)
    rc, out, _ = vo("qcow2", "check", "--output=json", str(p))
    assert rc == q.returncode == 2
    bad = [line.split()[2] for line in q.stderr.splitlines() if line.startswith("ERROR cluster")]
    assert bad, q.stderr
    got = {x["cluster"]: x for x in json.loads(out)["problems"] if x["what"].startswith("cluster ")}
    for c in bad:
        refs = got[int(c)]["referrers"]
        assert any("L1 table" in r for r in refs) and any("L2 table" in r for r in refs)
    leak = json.loads(vo("qcow2", "check", "--output=json", str(images["corrupt-leak"]))[1])["problems"]
    assert [x["referrers"] for x in leak if x["kind"] == "leak"] == [[]]


def test_check_command_line(images: dict[str, Path], qemu_build) -> None:
    """The installed command: qemu-img check's summary on stdout, each finding one line on stderr,
    qemu-img check's exit codes (0 clean, 2 corruptions, 3 leaks only)."""
    for name, code in (("c512", 0), ("corrupt-overlap", 2), ("corrupt-leak", 3)):
        p = images[name]
        q = qemu_tool(qemu_build, "img", "check", str(p), check=False)
        cp = virtopt("qcow2", "check", str(p))
        assert (cp.returncode, cp.stdout) == (q.returncode, q.stdout) == (code, q.stdout)
        assert (len(cp.stderr.splitlines()) >= 1) == (code != 0)
