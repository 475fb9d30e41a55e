"""Every `virtopt l2cache` example of the README and of --help runs, as written, on files a user has:
a qcow2 image, QEMU's stderr with qcow2_cache_* events captured with QEMU's DEFAULT cache (whose
slices are as large as the clusters: the examples used to fail on it), qemu-io commands. The
examples with a QMP socket run in test_l2cache_tune.py against a running QEMU. Also: a long run
shows a progress bar on a terminal, and nothing on a pipe."""

from __future__ import annotations

import os
import pty
import re
import shlex
import subprocess
import sys

import pytest
from helpers import REPO, make_qcow2, virtopt
from l2cache_util import random_cmds

from qemu_ext.l2cache import cli, tune_cli


def examples() -> list[str]:
    readme = (REPO / "README.md").read_text()
    sec = readme[readme.index("### L2-cache simulator"):]
    sec = sec[: sec.index("\n### ", 5)]
    text = "\n".join([cli.EPILOG, tune_cli.TUNE_EPILOG, sec])
    found = {ln.strip() for ln in text.splitlines() if ln.strip().startswith("virtopt l2cache ")}
    return sorted(found)


# examples on a running QEMU: a socket (test_l2cache_tune.py) or a libvirt domain vm1 (test_l2cache_libvirt.py)
FILE_EXAMPLES = [e for e in examples() if "/run/vm.qmp" not in e and " vm1 " not in e and "libvirt:vm1" not in e]


def test_the_socket_examples_are_run_by_the_tune_tests():
    tune_tests = (REPO / "tests" / "test_l2cache_tune.py").read_text()
    for e in examples():
        if "/run/vm.qmp" in e:
            words = [w for w in e.split()[2:] if w not in ("/run/vm.qmp",) and not re.fullmatch(r"[\d.]+", w)]
            assert "example(vmt" in tune_tests and any(w in tune_tests for w in words), e


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("examples")
    make_qcow2(d / "disk.qcow2", size="1G", io=["write -P 1 0 64M", "write -P 2 512M 32M"])
    cmds = random_cmds(3, 2000, 1 << 30, ops=("read",), sizes=(4096, 65536))
    (d / "cmds.txt").write_text("\n".join(cmds) + "\n")
    # QEMU with its default cache (it covers this disk: 64 KiB entries), events on stderr
    cp = subprocess.run(["qemu-io", "-T", "qcow2_cache_*", "-f", "qcow2", str(d / "disk.qcow2")],
                        input="\n".join([*cmds, "quit"]) + "\n", capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    (d / "qemu-stderr.log").write_text(cp.stderr)
    (d / "qemu.log").write_text(cp.stderr)
    return d


@pytest.mark.parametrize("line", FILE_EXAMPLES)
def test_example_runs(workdir, line):
    argv = shlex.split(line)[1:]
    cp = virtopt(*argv, cwd=workdir)
    assert cp.returncode == 0, (line, cp.stderr)
    assert cp.stdout.strip()
    if "--trace" in argv:
        # what the trace can answer: 64 KiB entries; the smaller ones are named and why
        assert "not evaluated: entry sizes 4 KiB, 8 KiB, 16 KiB, 32 KiB" in cp.stdout
        assert "65536-byte L2 slices" in cp.stdout
        if "--l2-cache-size" not in argv:  # the current setting is what QEMU used, not QEMU's default
            assert "as the trace shows" in cp.stdout
    if "--plot" in argv:
        png = workdir / argv[argv.index("--plot") + 1]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if "--max-memory" in argv:
        assert "sampled:" in cp.stdout and "rate" in cp.stdout


def test_a_long_run_shows_a_progress_bar_on_a_terminal_only():
    args = ["l2cache", "curve", "--virtual-size", "1T", "--pattern", "zipf", "--count", "4000000", "--entry-sizes", "4k"]
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal of 100 columns
    try:
        p = subprocess.Popen([sys.executable, "-m", "qemu_ext", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=slave)
        os.close(slave)
        err = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            err += chunk
        assert p.wait(120) == 0
    finally:
        os.close(master)
    text = err.decode(errors="replace")
    assert re.search(r"curve: +\d+%\|", text), text[-500:]
    piped = virtopt(*args[:-2], "--count", "200000")
    assert piped.returncode == 0 and piped.stderr == ""
