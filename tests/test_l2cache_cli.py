"""`virtopt l2cache` as a user runs it: real images, qemu-io's own traces as the reference."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import make_qcow2, sha256, virtopt
from l2cache_util import qemu_io_trace, random_cmds, trace_misses, trace_sequence

if shutil.which("qemu-io") is None:  # a real user condition: QEMU's tools not installed
    pytest.skip("qemu-io is not installed (apt-get install qemu-utils)", allow_module_level=True)

MiB = 1 << 20


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    d = tmp_path_factory.mktemp("l2cli")
    return make_qcow2(d / "disk.qcow2", size="1G", io=["write -P 3 0 40M", "write -P 4 600M 20M"])


def test_simulate_detailed_json_is_qemus_trace(image, tmp_path):
    cmds = random_cmds(11, 300, 1 << 30, ops=("read",), sizes=(4096, 65536))
    f = tmp_path / "cmds.txt"
    f.write_text("\n".join(cmds) + "\n")
    before = sha256(image)
    cp = virtopt("l2cache", "simulate", str(image), "--qemu-io", str(f), "--l2-cache-size", "16k",
                 "--l2-cache-entry-size", "4k", "--detailed", "--output=json")
    assert cp.returncode == 0, cp.stderr
    assert sha256(image) == before
    res = json.loads(cp.stdout)
    work = tmp_path / "w.qcow2"
    shutil.copyfile(image, work)
    trace, _ = qemu_io_trace(work, cmds, 16384, 4096)
    assert [(e["offset"], e["index"], e["hit"]) for e in res["events"]] == trace_sequence(trace)
    assert res["misses"] == trace_misses(trace)
    human = virtopt("l2cache", "simulate", str(image), "--qemu-io", str(f), "--l2-cache-size", "16k",
                    "--l2-cache-entry-size", "4k")
    assert human.returncode == 0
    assert f"misses:              {trace_misses(trace)} " in human.stdout


def test_curve_plot_and_recommend(image, tmp_path):
    png = tmp_path / "c.png"
    cp = virtopt("l2cache", "curve", str(image), "--pattern", "zipf", "--count", "3000", "--plot", str(png))
    assert cp.returncode == 0, cp.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cp = virtopt("l2cache", "curve", str(image), "--pattern", "uniform", "--count", "2000", "--entry-sizes", "4k")
    assert cp.returncode == 0 and "hit ratio" in cp.stdout and "|" in cp.stdout  # terminal plot
    cp = virtopt("l2cache", "recommend", "--virtual-size", "200G", "--pattern", "hotset", "--count", "3000",
                 "--output=json")
    assert cp.returncode == 0, cp.stderr
    rec = json.loads(cp.stdout)
    full = rec["full-coverage"]
    assert full["l2-cache-size"] == 200 * 1024**3 * 8 // 65536  # disk size x 8 / cluster size
    best = rec["recommended"]
    assert best["warm-hit-ratio"] >= 0.99 and best["l2-cache-size"] <= full["l2-cache-size"]
    assert f"l2-cache-size={best['l2-cache-size']}" in best["options"]["drive"]


def test_recommended_setting_reaches_target_in_qemu(image, tmp_path):
    cmds = random_cmds(12, 400, 1 << 30, ops=("read",), sizes=(4096,), regions=[(0, 40 * MiB), (600 * MiB, 20 * MiB)])
    f = tmp_path / "cmds.txt"
    f.write_text("\n".join(cmds) + "\n")
    cp = virtopt("l2cache", "recommend", str(image), "--qemu-io", str(f), "--target", "0.95", "--output=json")
    assert cp.returncode == 0, cp.stderr
    best = json.loads(cp.stdout)["recommended"]
    work = tmp_path / "w.qcow2"
    shutil.copyfile(image, work)
    trace, _ = qemu_io_trace(work, cmds, best["l2-cache-size"], best["l2-cache-entry-size"])
    distinct = len({t.offset for t in trace})
    warm = 1 - (trace_misses(trace) - distinct) / (len(trace) - distinct)
    assert warm >= 0.95
    assert warm == pytest.approx(best["warm-hit-ratio"], abs=1e-6)
    assert 1 - trace_misses(trace) / len(trace) == pytest.approx(best["hit-ratio"], abs=1e-6)
    # one entry less would not reach the target in QEMU either (it is the smallest)
    if best["entries"] > 2:
        smaller = (best["entries"] - 1) * best["l2-cache-entry-size"]
        shutil.copyfile(image, work)
        trace2, _ = qemu_io_trace(work, cmds, smaller, best["l2-cache-entry-size"])
        assert 1 - (trace_misses(trace2) - distinct) / (len(trace2) - distinct) < 0.95


def _run(capsys, *args: str) -> tuple[int, str, str]:
    """The CLI in-process (same main() as the `virtopt` command): exit code, stdout, stderr."""
    from qemu_ext.cli import main

    code = main(["l2cache", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    "args,code,text",
    [
        # QEMU's own refusals of the options: the job fails (exit 1), in QEMU's words
        (["simulate", "--virtual-size", "1G", "--l2-cache-entry-size", "3000"], 1, "power of two"),
        (["simulate", "--virtual-size", "1G", "--cache-size", "64k", "--l2-cache-size", "1M"], 1, "may not exceed"),
        # usage errors (exit 2), each with the option's range
        (["simulate", "--virtual-size", "nonsense"], 2, "invalid size"),
        (["simulate"], 2, "give an image or --virtual-size"),
        (["simulate", "IMAGE", "--virtual-size", "1G"], 2, "not both"),
        (["simulate", "--virtual-size", "1E"], 2, "The image size is too large for file format 'qcow2'"),
        (["simulate", "--virtual-size", "4P"], 2, "The image size is too large for file format 'qcow2'"),
        (["simulate", "--virtual-size", "8E"], 2, "Must be between 0 and 9223372036854775807"),
        (["simulate", "--virtual-size", "1G", "--hot-fraction", "-1"], 2, "above 0 and at most 1"),
        (["simulate", "--virtual-size", "1G", "--hot-fraction", "0"], 2, "above 0 and at most 1"),
        (["simulate", "--virtual-size", "1G", "--hot-fraction", "1.5"], 2, "above 0 and at most 1"),
        (["simulate", "--virtual-size", "1G", "--zipf-s", "0"], 2, "above 0 and at most 10"),
        (["simulate", "--virtual-size", "1G", "--zipf-s", "-1"], 2, "above 0 and at most 10"),
        (["simulate", "--virtual-size", "1G", "--read-ratio", "nan"], 2, "from 0 to 1"),
        (["simulate", "--virtual-size", "1G", "--working-set", "2G"], 2, "--working-set must be one request to the disk size"),
        (["simulate", "--virtual-size", "1G", "--cache-clean-interval", "-5"], 2, "from 0 to 4294967295"),
        (["simulate", "--virtual-size", "1G", "--count", "0"], 2, "from 1 to 1000000000000"),
        (["simulate", "--virtual-size", "1G", "--request-size", "1000"], 2, "a multiple of 512"),
        (["simulate", "--virtual-size", "1G", "--qemu-io", "a", "--trace", "b"], 2, "either --qemu-io or --trace"),
        (["simulate", "--virtual-size", "1G", "--trace", "b", "--pattern", "zipf"], 2, "do not apply to --qemu-io/--trace"),
        (["curve", "--virtual-size", "1G", "--plot", "x.txt"], 2, "ending in .png"),
        (["curve", "--virtual-size", "1G", "--plot", "/nonexistent/x.png"], 1, "cannot open /nonexistent/x.png: No such"),
        # the request model keeps every lookup: refused before any array is allocated (was a MemoryError)
        (["simulate", "--virtual-size", "1T", "--allocation", "empty", "--count", "100000000000"], 2,
         "too large for the request model"),
    ],
)
def test_bad_input_one_line(capsys, image, args, code, text):
    args = [str(image) if a == "IMAGE" else a for a in args]
    try:
        got, _out, err = _run(capsys, *args)
    except SystemExit as exc:  # argparse: its own usage message, exit 2
        got, err = exc.code, capsys.readouterr().err
    assert got == code, err
    assert text in err
    assert "Traceback" not in err


def test_qemu_io_input_one_line_each(capsys, image, tmp_path):
    """A disk image, /dev/null, an empty file, a directory, a FIFO, a missing file, a file of
    commands without a request: one line each, exit 1, at once (an image was read as commands
    for minutes before)."""
    import os

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    quit_only = tmp_path / "quit.txt"
    quit_only.write_text("# nothing\nquit\n")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases = [
        (image, "not a qemu-io command file (binary data)"),
        ("/dev/null", "/dev/null: not a regular file or block device"),
        (fifo, "not a regular file or block device"),
        (empty, "empty.txt: empty file"),
        (tmp_path, "Is a directory"),
        (tmp_path / "missing.txt", "cannot open"),
        (quit_only, "no read or write commands"),
    ]
    for path, text in cases:
        code, out, err = _run(capsys, "simulate", "--virtual-size", "1G", "--qemu-io", str(path))
        assert code == 1 and text in err and err.count("\n") == 1 and not out, (path, err)


def test_memory_follows_the_lookups_not_the_disk_size():
    """A 64T and a 1P disk with 1000 requests: what is touched costs memory, not the size (64T,
    256T and 1P took 2.1 GB, 8.4 GB and a MemoryError). Peak RSS of the real command."""
    import subprocess
    import sys

    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, check=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    for size in ("64T", "1P"):
        cp = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "qemu_ext", "l2cache", "simulate",
                             "--virtual-size", size, "--count", "1000", "--output=json"], capture_output=True, text=True)
        assert cp.returncode == 0, cp.stderr
        assert int(cp.stdout) < 250 * 1024, (size, cp.stdout)  # KiB: numpy and the interpreter are most of it


def test_hostile_files_one_line(tmp_path):
    junk = tmp_path / "junk.qcow2"
    junk.write_bytes(b"QFI\xfb" + b"\xff" * 200)
    cp = virtopt("l2cache", "simulate", str(junk), "--pattern", "uniform", "--count", "10")
    assert cp.returncode == 1 and "Traceback" not in cp.stderr and cp.stderr.count("\n") == 1
    bad = tmp_path / "cmds.txt"
    bad.write_text("read 0 4k\nfrobnicate 1 2\n")
    cp = virtopt("l2cache", "simulate", "--virtual-size", "1G", "--qemu-io", str(bad))
    assert cp.returncode == 1 and "unsupported qemu-io command" in cp.stderr
    tr = tmp_path / "t.log"
    tr.write_text("qcow2_cache_get co 0x1 is_l2_cache 1 offset zzz read_from_disk 1\n")
    cp = virtopt("l2cache", "simulate", "--virtual-size", "1G", "--trace", str(tr))
    assert cp.returncode == 1 and "malformed" in cp.stderr


def test_hostile_l2_entries_one_line(image, tmp_path):
    """L2 entries pointing far beyond the file, or an L1 entry pointing past EOF: one clear line."""
    from qemu_ext.qcow2 import open_image

    bad = tmp_path / "bad.qcow2"
    shutil.copyfile(image, bad)
    with open_image(bad) as img:
        l2 = img.l2_table_offset(0)
        l1_off = img.header.l1_table_offset
    with open(bad, "r+b") as f:
        f.seek(l2)
        f.write(((0x00FFFFFFFFFF0000 | 1 << 63).to_bytes(8, "big")) + bytes(8))  # cluster 0 far away, cluster 1 empty
    cmds = tmp_path / "w.txt"
    cmds.write_text("write 0 128k\n")
    before = sha256(bad)
    cp = virtopt("l2cache", "simulate", str(bad), "--qemu-io", str(cmds))
    assert cp.returncode == 1 and "far beyond the image file" in cp.stderr and "Traceback" not in cp.stderr
    assert sha256(bad) == before
    with open(bad, "r+b") as f:
        f.seek(l1_off)
        f.write((0x40000000000 | 1 << 63).to_bytes(8, "big"))  # L2 table past EOF
    cmds.write_text("read 0 4k\n")
    cp = virtopt("l2cache", "simulate", str(bad), "--qemu-io", str(cmds))
    assert cp.returncode == 1 and cp.stderr.count("\n") == 1 and "Traceback" not in cp.stderr


def _keys(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield f"{path}.{k}", k
            yield from _keys(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for x in obj:
            yield from _keys(x, path + "[]")


def kebab_only(doc) -> list[str]:
    """Keys of a JSON document that are not kebab-case (QEMU's convention)."""
    import re

    return [p for p, k in _keys(doc) if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", k)]


@pytest.mark.parametrize("args", [
    ["simulate", "--virtual-size", "1G", "--count", "500", "--output=json"],
    ["simulate", "IMAGE", "--qemu-io", "CMDS", "--detailed", "--output=json"],
    ["curve", "--virtual-size", "64G", "--count", "3000", "--target", "0.9", "--output=json"],
    ["curve", "--virtual-size", "64T", "--count", "20000", "--entry-sizes", "4k", "--max-memory", "1M", "--output=json"],
    ["recommend", "--virtual-size", "64G", "--pattern", "hotset-scan", "--count", "3000", "--output=json"],
])
def test_json_keys_are_kebab_case_and_ratios_fractions(capsys, image, tmp_path, args):
    cmds = tmp_path / "c.txt"
    cmds.write_text("read 0 4k\nwrite 1M 64k\nread 600M 8k\n")
    args = [str(image) if a == "IMAGE" else str(cmds) if a == "CMDS" else a for a in args]
    code, out, err = _run(capsys, *args)
    assert code == 0, err
    doc = json.loads(out)
    assert kebab_only(doc) == []
    ratios = [v for p, k in _keys(doc) if k.endswith("hit-ratio") for v in [_get(doc, p)] if v is not None]
    assert ratios and all(0.0 <= r <= 1.0 for r in ratios)


def _get(doc, path):
    cur = [doc]
    for part in path.strip(".").split("."):
        nxt = []
        for c in cur:
            name = part.replace("[]", "")
            v = c.get(name) if isinstance(c, dict) else None
            if part.endswith("[]") and isinstance(v, list):
                nxt.extend(v)
            elif v is not None:
                nxt.append(v)
        cur = nxt
    return cur[0] if cur else None
