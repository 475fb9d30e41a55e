"""`make demo` as a user runs it: a guided tour on a real QEMU whose headlines say what was found,
checked against what QEMU itself wrote (its trace events, qemu-img check), for a cache that is too
small and one that covers the disk; nothing left behind (no QEMU, no socket, no temp files).

These runs are the demo's --help examples (test_voice_examples.py checks that they are these):
`virtopt demo` and `virtopt demo --keep /tmp/demo` (the first test), `virtopt demo --size 1G
--l2-cache-size 1M` (the second); --reads, --writes and --skip-inspect only bound the time."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from helpers import virtopt

HEADLINE = re.compile(r"^\[(\d)/(\d)\] (.+)$", re.M)


def _headlines(out: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(3) for m in HEADLINE.finditer(out)}


def _pct(text: str) -> float:
    return float(text.rstrip("%"))


def _gone(pid: int) -> bool:
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except FileNotFoundError:
        return True
    except PermissionError:  # pragma: no cover - root reads every exe link
        return False
    return "qemu" not in exe  # the pid was reused by another program


def test_demo_tells_the_story_of_a_too_small_cache(tmp_path):
    keep, tmp = tmp_path / "kept", tmp_path / "tmp"
    tmp.mkdir()
    cp = virtopt("demo", "--reads", "600", "--keep", str(keep), timeout=240, env={"TMPDIR": str(tmp)})
    assert cp.returncode == 0, cp.stderr
    assert cp.stderr == ""  # progress lines only on a terminal
    out = cp.stdout
    h = _headlines(out)
    assert sorted(h) == list(range(1, 9)), out
    # 1: what the VM is and what its cache maps (256 KiB of 8-byte entries -> 32768 clusters of 64 KiB)
    assert re.fullmatch(r"QEMU \d+\.\d+\.\d+ runs a throw-away VM whose 16 GiB qcow2 disk has a 256 KiB L2 cache: "
                        r"enough to map 2 GiB of it \(1/8\)", h[1]), h[1]
    # 2: the image, as qemu-img check sees it
    qi = subprocess.run(["qemu-img", "check", str(keep / "demo.qcow2")], capture_output=True, text=True)
    assert qi.returncode == 0 and "No errors were found" in qi.stdout
    assert h[2].startswith("The image is consistent") and "192 data clusters, 32 L2 tables" in h[2]
    # 3: the threads, with both vCPUs named as QEMU names them
    m = re.fullmatch(r"QEMU runs (\d+) threads; 2 are vCPUs \(CPU 0/(KVM|TCG), CPU 1/(KVM|TCG)\): .*", h[3])
    assert m, h[3]
    # 4: the measured hit ratio, held against QEMU's own trace events in the kept log: both captures
    # (before and after the change) ran the same 600 reads; each miss is one qcow2_cache_get_read
    m4 = re.fullmatch(r"The 256 KiB cache gives a ([\d.]+)% hit ratio on this workload: ([\d,]+) of ([\d,]+) L2 "
                      r"lookups read a table slice from the disk \(([\d.]+)% hit once warm\)", h[4])
    assert m4, h[4]
    misses, lookups = int(m4.group(2).replace(",", "")), int(m4.group(3).replace(",", ""))
    assert abs(_pct(m4.group(1)) - 100 * (lookups - misses) / lookups) < 0.06
    m6 = re.fullmatch(r"Set live with blockdev-reopen, no restart: hit ratio once warm ([\d.]+)% -> ([\d.]+)% "
                      r"\(predicted ([\d.]+)%\)", h[6])
    assert m6, h[6]
    after = re.search(r"the same 600 random 4 KiB reads again: ([\d,]+) of ([\d,]+) lookups missed", out)
    assert after
    log = (keep / "qemu.log").read_text()
    l2 = [ln for ln in log.splitlines() if "is_l2_cache 1" in ln]
    assert sum(" qcow2_cache_get " in f" {ln.split(':', 1)[1]}" for ln in l2) == lookups + int(after.group(2))
    assert sum("qcow2_cache_get_read " in ln for ln in l2) == misses + int(after.group(1).replace(",", ""))
    # 5: full coverage is 16 GiB * 8 / 64 KiB, and the option to set
    assert h[5].startswith("2 MiB covers the whole 16 GiB disk; for a 99.0% hit ratio once warm, set l2-cache-size=")
    size = int(re.search(r"l2-cache-size=(\d+)", h[5]).group(1))
    assert 256 * 1024 < size <= 2 * 1024 * 1024
    assert f'"l2-cache-size":{size}' in out and f"node-name=disk0,l2-cache-size={size}" in out
    # 6: QEMU after the change did exactly what the simulator predicted (the model is exact once warm)
    assert _pct(m6.group(1)) == _pct(m4.group(4))
    assert _pct(m6.group(2)) == _pct(m6.group(3)) >= 99.0
    # 7, 8: host checks in one line; QEMU's memory read without stopping it, the events off again
    assert re.match(r"Host and VM checks: \d+ ok", h[7])
    assert h[8].startswith("Read from QEMU's memory without stopping it: the 4 qcow2_cache_get* trace events are off "
                           "again"), h[8]
    # no internals, no 170-character repeats, no paths of the removed QEMU directory
    for bad in ("state 0", "LOG_TRACE", "needs QEMU's debug info", "Traceback", str(tmp)):
        assert bad not in out
    assert out.count("debug info") <= 2
    assert f"Kept in {keep}" in out and f"virtopt qcow2 info {keep / 'demo.qcow2'}" in out
    # nothing dead left behind: the kept directory holds the image and the log, the temp dir nothing
    assert sorted(p.name for p in keep.iterdir()) == ["demo.qcow2", "qemu.log"]
    assert list(tmp.iterdir()) == []
    assert _gone(int(re.search(r"pid (\d+), accelerator", out).group(1)))


def test_demo_with_a_cache_that_covers_the_disk_leaves_it_alone(tmp_path):
    cp = virtopt("demo", "--size", "1G", "--l2-cache-size", "1M", "--writes", "64", "--reads", "300",
                 "--skip-inspect", timeout=240, env={"TMPDIR": str(tmp_path)})
    assert cp.returncode == 0, cp.stderr
    h = _headlines(cp.stdout)
    assert sorted(h) == list(range(1, 8)), cp.stdout
    assert h[1].endswith("qcow2 disk has a 128 KiB L2 cache: enough to map the whole disk"), h[1]
    assert "l2-cache-size=1048576 was asked; QEMU caps it at what covers the disk: 128 KiB" in cp.stdout
    assert re.fullmatch(r"The 128 KiB cache gives a 100\.0% hit ratio on this workload: none of [\d,]+ L2 lookups "
                        r"read from the disk: the cache holds every slice they touch", h[4]), h[4]
    assert h[6] in ("Nothing set live: the cache already has the recommended size",) or \
        h[6].startswith("Set live with blockdev-reopen"), h[6]
    assert h[5].startswith("128 KiB covers the whole 1 GiB disk")
    # without --keep: no path into the directory it removed, and that directory is gone
    assert str(tmp_path) not in cp.stdout
    assert "virtopt demo --keep DIR" in cp.stdout
    assert list(Path(tmp_path).iterdir()) == []


@pytest.mark.parametrize("argv, message", [
    (["--size", "abc"], "argument --size: invalid size 'abc'"),
    (["--writes", "-1"], "argument --writes: -1 is out of range (from 0 to 100000)"),
    (["--keep", "/dev/null"], "argument --keep: /dev/null: not a directory"),
    (["--l2-cache-size", "1x"], "argument --l2-cache-size: invalid size '1x'"),
    (["--reads", "many"], "argument --reads: not a number: 'many'"),
])
def test_demo_bad_options_are_usage_errors(argv, message):
    cp = virtopt("demo", *argv, timeout=30)
    assert cp.returncode == 2
    assert message in cp.stderr and "Traceback" not in cp.stderr
    assert cp.stdout == ""


def test_demo_on_a_terminal_says_what_it_waits_for(tmp_path):
    """Through a real pty, as `make demo` runs in a terminal: the headlines, and on stderr (the same
    terminal) what each wait is for; the progress bars leave no line behind."""
    import pty
    import select
    import sys
    import time

    from helpers import REPO

    main, sub = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k != "VIRTOPT_DEBUG"}
    env["TMPDIR"] = str(tmp_path)
    p = subprocess.Popen([sys.executable, "-m", "qemu_ext", "demo", "--size", "1G", "--writes", "32", "--reads",
                          "200", "--skip-inspect"], stdin=sub, stdout=sub, stderr=sub, cwd=REPO, env=env,
                         close_fds=True)
    os.close(sub)
    buf = b""
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            r, _, _ = select.select([main], [], [], 1)
            if r:
                try:
                    chunk = os.read(main, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                buf += chunk
            elif p.poll() is not None:
                break
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
        os.close(main)
    text = buf.decode(errors="replace")
    assert p.returncode == 0, text[-2000:]
    assert "... before: capturing QEMU's L2 lookups during 200 random reads" in text
    heads = _headlines(text.replace("\r\n", "\n"))
    assert sorted(heads) == list(range(1, 8)), text[-2000:]
    assert "Traceback" not in text
    assert list(Path(tmp_path).iterdir()) == []
