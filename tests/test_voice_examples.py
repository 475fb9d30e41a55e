"""Every example a user reads runs: each `virtopt ...` line of every `--help` (read from the argparse
tree, so a new example is covered without a line here), of the shell's built-ins (their /help), and
of README.md's code blocks, with its placeholders replaced by real objects this test makes
(CONTRIBUTING.md "Examples" lists them): a qcow2 image and its overlay, QEMU's own traces, a
debug QEMU 7.2 named like the examples' VM with a QMP socket, a TCP QMP port, a qcow2 node disk0,
a -drive drive0, an iothread and two vCPUs, a core of it, a captured /proc tree.

Each example exits 0 (or the code its text announces, e.g. "exits 1") with no traceback; those
that watch until Ctrl-C get SIGINT after a few seconds and must end cleanly. Durations in
examples (--seconds, --interval, --baseline, --watch, capture seconds) are capped at 1 s and counts
of --watch at 2, CPU numbers of --pin are taken modulo the CPUs this machine has.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO, gdb_batch, make_qcow2, qemu_tool, run

README = REPO / "README.md"

# Examples that are not run here, and why.
NOT_RUN = {
    "make demo": "the demo itself: tests/test_demo.py runs it",
    "make test": "the whole suite, this test included",
}
# Demo examples: tests/test_demo.py runs them (with --reads to bound the time); they must stay these.
DEMO_EXAMPLES = {"virtopt demo", "virtopt demo --keep /tmp/demo", "virtopt demo --size 1G --l2-cache-size 1M"}
LIBVIRT = re.compile(r"--domain|libvirt:|\bvm1\b")
QEMU_GA = re.compile(r"\bga\.sock\b")


# -- the examples ------------------------------------------------------------------------------------


def _clean(line: str) -> str:
    """The command of an example line: without the leading `$ `, a trailing `# comment` or the
    explanation after two or more spaces."""
    line = line.strip()
    if line.startswith("$ "):
        line = line[2:]
    line = re.split(r"\s+#\s", line)[0]
    parts = re.split(r"\s{2,}", line)
    return parts[0].strip()


def help_examples() -> dict[str, str]:
    """example -> where it is shown (`virtopt X --help`)."""
    from qemu_ext.cli import build_parser

    out: dict[str, str] = {}

    def walk(p: argparse.ArgumentParser, path: list[str]) -> None:
        for ln in (p.epilog or "").splitlines():
            if re.match(r"\s+(virtopt |printf |gdb )", ln):
                out.setdefault(_clean(ln), f"virtopt {' '.join(path)} --help".replace("  ", " "))
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sp in a.choices.items():
                    walk(sp, [*path, name])

    walk(build_parser(), [])
    return out


def builtin_examples() -> dict[str, str]:
    from qemu_ext.qmp.builtins import commands

    return {e: f"/help {b.name}" for b in commands() for e in b.examples}


def readme_examples() -> dict[str, str]:
    """Command lines in README.md's code blocks (fenced, or indented by four spaces)."""
    out: dict[str, str] = {}
    fenced = False
    for n, ln in enumerate(README.read_text().splitlines(), 1):
        if ln.startswith("```"):
            fenced = not fenced
            continue
        if fenced or ln.startswith("    "):
            cmd = _clean(ln)
            if re.match(r"(virtopt|gdb|make|printf) ", cmd + " "):
                out.setdefault(cmd, f"README.md:{n}")
    return out


# -- the world the placeholders stand for ---------------------------------------------------------------


@dataclass
class World:
    tmp: Path
    img: Path
    top: Path
    log: Path
    simple: Path
    cmds: Path
    captured: Path
    sock: Path
    port: int
    name: str
    pid: int
    exe: str
    core: Path
    ncpu: int
    env: dict[str, str]


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def world(module_debug_qemu_factory, debug_build, tmp_path_factory, request) -> World:
    tmp = tmp_path_factory.mktemp("examples")
    img = make_qcow2(tmp / "disk-image.qcow2", size="256M", io=["write -P 1 0 1M", "write -P 2 128M 64k"])
    run(["qemu-img", "snapshot", "-c", "snap1", str(img)])
    run(["qemu-img", "bitmap", "--add", str(img), "bm0"])
    top = make_qcow2(tmp / "top-image.qcow2", size=None, backing=str(img), io=["write -P 3 1M 64k"])
    log = tmp / "qemu-io-stderr.log"  # QEMU's log backend text
    log.write_text(run(["qemu-io", "-T", "qcow2_cache_*", "-c", "read 0 1M", "-c", "read 128M 64k", str(img)]).stderr)
    simple = tmp / "simpletrace.bin"  # the debug build's simple backend
    qemu_tool(debug_build, "io", "--trace", f"enable=qcow2_cache_*,file={simple}", "-c", "read 0 1M", str(top))
    cmds = tmp / "qemu-io-cmds.txt"
    cmds.write_text("read 0 64k\nread 128M 64k\nwrite 1M 4k\nread 0 64k\n")
    captured = tmp / "captured"
    for d in (captured / "proc", captured / "later" / "proc"):
        d.mkdir(parents=True)
        for f in ("interrupts", "stat", "cmdline", "cpuinfo", "meminfo"):
            (d / f).write_bytes(Path(f"/proc/{f}").read_bytes())
        time.sleep(0.2)
    vmdisk = make_qcow2(tmp / "vm-disk.qcow2", size="4G")
    drive = make_qcow2(tmp / "vm-drive.qcow2", size="64M")
    sock, port, name = tmp / "vm.sock", _free_port(), f"voice-web1-{os.getpid()}"
    qp = module_debug_qemu_factory(name=name, smp=2, memory_mb=32, extra_args=[
        "-blockdev", f"driver=qcow2,node-name=disk0,l2-cache-size=131072,file.driver=file,file.filename={vmdisk}",
        "-drive", f"file={drive},if=none,id=drive0", "-object", "iothread,id=io0",
        "-D", str(tmp / "qemu.log"), "-qmp", f"unix:{sock},server=on,wait=off",
        "-qmp", f"tcp:127.0.0.1:{port},server=on,wait=off"])
    c = qp.qmp()  # QEMU's first monitor: the test's own, for the guest-like I/O below
    for i in range(8):  # allocated clusters in several L2 slices: lookups for the captures to see
        c.cmd("human-monitor-command", **{"command-line": f'qemu-io disk0 "write {i << 28} 64k"'})
    stop = threading.Event()

    def guest_io() -> None:
        """What a guest would do: reads on disk0 (40 a second), so that captures, stats and tune see I/O.
        A read that times out (gdb holds QEMU stopped) is given up and the monitor connected again."""
        nonlocal c
        rng = random.Random(3)
        while not stop.wait(0.025):
            try:
                c.cmd("human-monitor-command",
                      **{"command-line": f'qemu-io disk0 "read {(rng.randrange(8) << 28) + rng.randrange(16) * 4096} 4k"'})
            except Exception:
                try:
                    c.close()
                except Exception:
                    pass
                if stop.wait(0.5):
                    return
                try:
                    c = qp.qmp()
                except Exception:  # QEMU stopped at teardown
                    return

    io = threading.Thread(target=guest_io, daemon=True)
    io.start()
    request.addfinalizer(lambda: (stop.set(), io.join(10)))
    core = tmp / "qemu.core"
    cp = gdb_batch(qp.pid, [f"generate-core-file {core}"], timeout=120)
    assert core.exists(), cp.stderr
    bindir = tmp / "bin"  # `virtopt` as a user has it on PATH: this checkout's
    bindir.mkdir()
    (bindir / "virtopt").write_text(f"#!/bin/sh\nexec {sys.executable} -m qemu_ext \"$@\"\n")
    (bindir / "virtopt").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "VIRTOPT_DEBUG"}
    env["PATH"] = f"{bindir}:{env['PATH']}"
    env["PYTHONPATH"] = str(REPO)
    return World(tmp, img, top, log, simple, cmds, captured, sock, port, name, qp.pid, qp.binary, core,
                 os.cpu_count() or 1, env)


def substitute(cmd: str, w: World) -> str:
    """The example with its placeholders replaced (CONTRIBUTING.md "Examples")."""
    def cap(m: re.Match) -> str:
        return f"{m.group(1)}{min(float(m.group(2)), 1.0):g}"

    subs = [
        (r"(?<![\w/])/tmp/", f"{w.tmp}/out-"),  # first: the paths put in below are in /tmp too
        (r"(?<![\w/.-])top\.qcow2\b", str(w.top)),
        (r"(?<![\w/.-])disk\.qcow2\b", str(w.img)),
        (r"(?<![\w/.-])(/run/)?vm\.qmp\b", str(w.sock)),
        (r"\blocalhost:4444\b", f"localhost:{w.port}"),
        (r"\bweb1\b", w.name),
        (r"\bcore\.12345\b", str(w.core)),
        (r"\btrace-12345\b|\bFILE\b", str(w.simple)),
        (r"\bQEMU CORE\b", f"{w.exe} {w.core}"),
        (r"\b12345\b|\bPID\b", str(w.pid)),
        (r"/usr/bin/qemu-system-x86_64", w.exe),
        (r"\bqemu-stderr\.log\b", str(w.log)),
        (r"\bcmds\.txt\b", str(w.cmds)),
        (r"\bcaptured/", f"{w.captured}/"),
        (r"\bdrv0\b", "disk0"),
    ]
    for rx, rep in subs:
        cmd = re.sub(rx, lambda _m, r=rep: r, cmd)
    cmd = re.sub(r"(--seconds |--interval |--baseline |--watch )(\d+(?:\.\d+)?)", cap, cmd)
    cmd = re.sub(r"(capture \S+ )(\d+(?:\.\d+)?)", cap, cmd)
    cmd = re.sub(r"(--count )(\d+)", lambda m: m.group(1) + str(min(int(m.group(2)), 2))
                 if "--watch" in cmd else m.group(0), cmd)
    if re.search(r"\btune\b", cmd) and "--seconds" not in cmd:
        cmd += " --seconds 1"
    if re.search(r"\btune\b", cmd) and "--baseline" not in cmd:
        cmd += " --baseline 0"

    def pin(m: re.Match) -> str:
        def cpus(text: str) -> str:
            return re.sub(r"\d+", lambda d: str(int(d.group(0)) % w.ncpu), text)
        return m.group(1) + ",".join(f"{k}={cpus(v)}" for k, v in (kv.split("=") for kv in m.group(2).split(",")))

    return re.sub(r"(--pin )(\S+)", pin, cmd)


def expected_exit(cmd: str) -> int:
    """What the example announces: `(... exits 1)`, a -drive node that cannot be reopened, or 0."""
    if "exits 1" in cmd or "no-such" in cmd or ("--node drive0" in cmd and "--apply" in cmd):
        return 1
    return 0


def run_example(cmd: str, w: World, watch: bool = False) -> tuple[int, str, str]:
    p = subprocess.Popen(["bash", "-c", cmd], cwd=w.tmp, env=w.env, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        if watch:
            try:
                out, err = p.communicate(timeout=4)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGINT)  # Ctrl-C, as a person ends a watch
                out, err = p.communicate(timeout=60)
        else:
            out, err = p.communicate(timeout=180)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return p.returncode, out, err


# -- the tests ---------------------------------------------------------------------------------------


def _all() -> dict[str, str]:
    out = {**readme_examples(), **help_examples()}
    return {c: where for c, where in out.items() if c not in DEMO_EXAMPLES and c not in NOT_RUN}


EXAMPLES = _all()


def test_the_examples_are_found():
    """The harvest itself: every --help with an epilog has examples, the README's code blocks too."""
    assert len(help_examples()) >= 80 and len(readme_examples()) >= 15 and len(builtin_examples()) >= 20
    assert any(w == "README.md:23" or w.startswith("README.md") for w in readme_examples().values())
    demo = {c for c, where in help_examples().items() if c.startswith("virtopt demo")}
    assert demo == DEMO_EXAMPLES, "the demo's examples changed: keep tests/test_demo.py running each of them"


def _params() -> list[Any]:
    out = []
    for cmd, where in sorted(EXAMPLES.items()):
        if LIBVIRT.search(cmd):
            continue  # test_libvirt_example_runs
        out.append(pytest.param(cmd, where, id=f"{where}: {cmd}"))
    return out


def _lane(cmd: str) -> str:
    """Examples that talk to the VM run one after another (QEMU's monitor serves one client at a time,
    one debugger at a time can attach, and a debugger's pause would starve a capture of its I/O);
    the others run beside them."""
    if re.search(r"vm\.qmp|localhost:4444|web1\b", cmd):
        return "qmp"
    if re.search(r"\bgdb\b|inspect", cmd):
        return "ptrace"
    return "free"


@pytest.fixture(scope="module")
def results(world: World) -> dict[str, tuple[str, int, str, bool, str]]:
    """Every example, run once in three lanes side by side: example -> (line, exit code, stderr, watch,
    stdout)."""
    from concurrent.futures import ThreadPoolExecutor

    runnable = [c for c in EXAMPLES if not LIBVIRT.search(c) and not QEMU_GA.search(c)]

    def one(cmd: str) -> tuple[str, int, str, bool, str]:
        line = substitute(cmd, world)
        watch = "--watch" in cmd and "--count" not in cmd
        rc, out, err = run_example(line, world, watch)
        return line, rc, err, watch, out

    lanes: dict[str, list[str]] = {}
    for c in runnable:
        lanes.setdefault(_lane(c), []).append(c)
    out: dict[str, tuple[str, int, str, bool, str]] = {}
    with ThreadPoolExecutor(3) as ex:
        vm = ex.submit(lambda cs: [(c, one(c)) for c in cs], lanes.get("qmp", []) + lanes.get("ptrace", []))
        out.update(ex.map(lambda c: (c, one(c)), lanes.get("free", [])))
        out.update(vm.result())
    return out


# the examples run once, on the debug QEMU 7.2 (the series of Debian's /usr/bin/qemu-system-x86_64 they name)
ON_72 = pytest.mark.parametrize("debug_build", ["7.2"], indirect=True)


@ON_72
@pytest.mark.parametrize("cmd, where", _params())
def test_example_runs(cmd: str, where: str, world: World, results):
    if QEMU_GA.search(cmd):
        _qemu_ga(world, cmd)
        return
    line, rc, err, watch, _out = results[cmd]
    assert "Traceback" not in err and "internal error" not in err, f"{where}: {line}\n{err}"
    want = expected_exit(cmd)
    if watch:
        assert rc in (0, 130), f"{where}: {line}: exit {rc}\n{err}"
    else:
        assert rc == want, f"{where}: {line}: exit {rc}, the example says {want}\n{err[-2000:]}"


# What human output never shows (CONTRIBUTING.md "Output"): Python's reprs, scientific notation,
# sysfs/ls-style sizes (1024K) where qemu-img writes 1 MiB, microseconds as "us".
NOT_HUMAN = re.compile(r"\b(True|False|None)\b|\{'|\d\.?\d*e[+-]\d\d\b|\b\d+[KMG]\b|\d us\b")


@ON_72
def test_human_output_speaks_one_voice(results):
    """Every example's human output (not --output=json/csv, not raw bytes) in the words CONTRIBUTING.md gives."""
    bad = []
    for cmd, (line, _rc, _err, _watch, out) in results.items():
        if re.search(r"--output[= ](json|csv|hex)|--json|> |\| |/dev/null|read \S+ \S+ \S+$|--path|-H\b", cmd):
            continue
        for ln in out.splitlines():
            m = NOT_HUMAN.search(ln)
            if m and not ln.lstrip().startswith(("{", "[", '"')):
                bad.append(f"{line}: {ln.strip()[:160]}")
    assert not bad, "\n".join(bad)


@ON_72
def test_builtin_examples_run(world: World):
    """The shell's built-in examples (/help NAME shows them), in one shell: each line runs."""
    lines = [substitute(e, world) for e in builtin_examples() if not ("--watch" in e and "--count" not in e)]
    argv = ["virtopt", "shell", str(world.sock), "--keep-going"]
    for ln in lines:
        argv += ["-c", ln]
    rc, _out, err = run_example(shlex.join(argv), world)
    assert "Traceback" not in err
    assert rc == 0, err


@pytest.fixture(scope="module")
def libvirt_world(module_libvirt_domain_factory, world: World, request) -> Any:
    """A libvirt domain for the libvirt examples (2 vCPUs, an iothread, a qcow2 vda with allocated
    clusters) and guest-like reads on it through libvirt's monitor (HMP qemu-io). Skips when libvirt
    is not set up on this host (tests/libvirt/setup-libvirt; a failure under make test)."""
    from qemu_ext.libvirt.monitor import DomainMonitor

    d = module_libvirt_domain_factory("examples", vcpus=2, iothreads=1, disk_size="1G",
                                      disk_io=[f"write -P 0x5a {i << 26} 64k" for i in range(8)])
    m = DomainMonitor(f"libvirt:{d.name}")
    m.open()
    stop = threading.Event()

    def guest_io() -> None:
        rng = random.Random(5)
        while not stop.wait(0.05):
            try:
                m.hmp(f'qemu-io libvirt-1-format "read {(rng.randrange(8) << 26) + rng.randrange(16) * 4096} 4k"')
            except Exception:  # the domain stopped at teardown
                return

    io = threading.Thread(target=guest_io, daemon=True)
    io.start()

    def done() -> None:
        stop.set()
        io.join(10)
        m.close()

    request.addfinalizer(done)
    return d


@ON_72
@pytest.mark.parametrize("cmd, where", [pytest.param(c, w, id=f"{w}: {c}") for c, w in sorted(EXAMPLES.items())
                                        if LIBVIRT.search(c)])
def test_libvirt_example_runs(cmd: str, where: str, world: World, libvirt_world: Any):
    line = substitute(re.sub(r"\b(vm1|web1)\b", libvirt_world.name, cmd), world)
    watch = "--watch" in cmd and "--count" not in cmd
    rc, _out, err = run_example(line, world, watch)
    assert "Traceback" not in err and "internal error" not in err, f"{where}: {line}\n{err}"
    if watch:
        assert rc in (0, 130), f"{where}: {line}: exit {rc}\n{err}"
    else:
        assert rc == expected_exit(cmd), f"{where}: {line}: exit {rc}\n{err[-2000:]}"


def _qemu_ga(w: World, cmd: str) -> None:
    """The qemu-ga example against a real guest agent listening on ga.sock in the examples' directory
    (qemu-ga runs on the host as well: it answers guest-ping without a VM)."""
    ga = "/usr/sbin/qemu-ga"
    if not Path(ga).exists():
        pytest.skip("qemu-ga is not installed (apt-get install qemu-guest-agent): the example talks to a guest agent")
    sock = w.tmp / "ga.sock"
    sock.unlink(missing_ok=True)
    agent = subprocess.Popen([ga, "-m", "unix-listen", "-p", str(sock), "-t", str(w.tmp), "-f", str(w.tmp / "ga.pid")],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert agent.poll() is None, f"qemu-ga exited: {agent.stderr.read()!r}"
            assert time.monotonic() < deadline, "qemu-ga did not open its socket"
            time.sleep(0.05)
        line = substitute(cmd, w)
        rc, out, err = run_example(line, w)
        assert rc == 0, f"{line}: exit {rc}\n{err}"
        assert "Traceback" not in err and '"return"' in out, (out, err)
    finally:
        agent.kill()
        agent.wait()
