"""QEMU's own hostile images (7.2's tests/qemu-iotests 060, 061, 080, 112, 138, 217, 261, 289, 290,
029, 031, 036, 054, 108, 114, 196, 214, 220, 242, 271, 272, 287, 305, qemu-img-bitmaps), built the
way each test builds them (tests/iotests-data/NNN.sh keeps the tests' own lines), then
`virtopt qcow2 info/check/map/convert` against the qemu-img of each QEMU (7.2 and 10.0):

- where qemu-img answers, virtopt prints the same bytes (info and map as that version prints them,
  check's JSON and exit code, convert's raw bytes);
- where qemu-img refuses, virtopt refuses too, with qemu-img's reason in its one line;
- no image is modified.

The images are built once per module with Debian's QEMU 7.2 (the version whose iotests these are).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from qcow2_util import cached_iotest_images, files_equal, qemu_reason, tree_state, vo


@pytest.fixture(scope="module")
def iotest_images() -> dict[str, Path]:
    return cached_iotest_images()


def compare_one(build, img: Path, tmp: Path) -> list[str]:
    """Every disagreement between virtopt and this build's qemu-img on one image (empty: agree).
    The four qemu-img runs go in the background while virtopt answers in this process."""
    bad: list[str] = []
    compat = build.series
    want, got = tmp / "q.raw", tmp / "v.raw"
    for p in (want, got):
        if p.exists():
            p.unlink()

    def start(*args: str) -> subprocess.Popen:
        return subprocess.Popen([build.img, *args], cwd=img.parent, env=build.env(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    procs = {
        "info": start("info", "--output=json", str(img)),
        "check": start("check", "--output=json", str(img)),
        "map": start("map", "--output=json", str(img)),
        "convert": start("convert", "-O", "raw", str(img), str(want)),
    }
    ours = {
        "info": vo("qcow2", "info", "--qemu-only", "--qemu-compat", compat, "--output=json", str(img), cwd=img.parent),
        "check": vo("qcow2", "check", "--qemu-only", "--output=json", str(img), cwd=img.parent),
        "map": vo("qcow2", "map", "--qemu-compat", compat, "--output=json", str(img), cwd=img.parent),
        "convert": vo("qcow2", "convert", str(img), str(got), cwd=img.parent),
    }
    theirs = {}
    for what, p in procs.items():
        out, err = p.communicate(timeout=120)
        theirs[what] = subprocess.CompletedProcess(p.args, p.returncode, out, err)

    def agree(what: str, qcp, rc: int, out: str, err: str) -> None:
        err = err.replace(str(got), str(want))
        if qcp.returncode == 0:
            if rc != 0 or out != qcp.stdout:
                diff = next((f"{a!r} != {b!r}" for a, b in zip(out.splitlines(), qcp.stdout.splitlines()) if a != b),
                            f"{len(out)} vs {len(qcp.stdout)} bytes")
                bad.append(f"{what}: qemu-img answers, virtopt {'differs: ' + diff if rc == 0 else 'refuses: ' + err.strip()}")
            return
        reason = qemu_reason(qcp.stderr)
        if re.match(r"error while reading at byte \d+: ", reason):  # qemu-img reads in chunks of its own
            reason = reason.split(": ", 1)[1]
        if rc == 0:
            bad.append(f"{what}: qemu-img refuses ({reason}), virtopt answers")
        elif reason not in err:
            bad.append(f"{what}: qemu-img says {reason!r}, virtopt {err.strip()!r}")
        elif err.count("\n") != 1 or "internal error" in err:
            bad.append(f"{what}: not one clean line: {err!r}")

    agree("info", theirs["info"], *ours["info"])
    qcp, (rc, out, err) = theirs["check"], ours["check"]
    if (rc, out) != (qcp.returncode, qcp.stdout):
        bad.append(f"check: qemu-img exit {qcp.returncode} {qcp.stdout.strip()!r} {qemu_reason(qcp.stderr)!r}, "
                   f"virtopt exit {rc} {out.strip()!r} {err.strip()!r}")
    elif not qcp.stdout and qemu_reason(qcp.stderr) not in err:  # refused before checking: say why
        bad.append(f"check: qemu-img says {qemu_reason(qcp.stderr)!r}, virtopt {err.strip()!r}")
    agree("map", theirs["map"], *ours["map"])
    qcp, (rc, out, err) = theirs["convert"], ours["convert"]
    if qcp.returncode == 0 and rc == 0:
        if not files_equal(want, got):
            bad.append("convert: different bytes")
    else:
        agree("convert", qcp, rc, "" if rc else qcp.stdout, err)
    return bad


def test_iotest_images_agree_with_qemu_img(iotest_images: dict[str, Path], qemu_build, tmp_path: Path) -> None:
    """Every ported image: same answer as this QEMU's qemu-img, or the same refusal; never modified."""
    assert len(iotest_images) >= 100
    problems = {}
    for name, img in iotest_images.items():
        before = tree_state(img.parent)
        bad = compare_one(qemu_build, img, tmp_path)
        if tree_state(img.parent) != before:
            bad.append("image modified")
        if bad:
            problems[name] = bad
    assert not problems, json.dumps(problems, indent=1)
