"""`virtopt gdb` end to end on real QEMUs (stock and debug builds of 7.2 and 10.0) and on cores made
with gdb's generate-core-file; the pure-Python pieces the pack relies on (ELF symbols, build-ids,
core notes, KVM exit reasons) against binutils and QEMU's own headers."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import _factory
from gdb_util import PauseSampler, proc_threads
from helpers import gdb_batch, virtopt

from qemu_ext import vm as vmlib
from qemu_ext.errors import BadInputError
from qemu_ext.gdbmi import corefile, elfsyms, kvm, query, watchdog
from qemu_ext.gdbmi.cli import EPILOG
from qemu_ext.gdbmi.driver import normalize, pack_path

DEBIAN_QEMU = "/usr/bin/qemu-system-x86_64"


@pytest.fixture(scope="module")
def stock(module_qemu_factory):
    qp = module_qemu_factory(name=f"gdbcli-{module_qemu_factory.build.series}-{os.getpid()}")
    qp.client = qp.qmp()
    return qp


@pytest.fixture(scope="module")
def dbg(module_debug_qemu_factory):
    qp = module_debug_qemu_factory(name=f"gdbcli-dbg-{module_debug_qemu_factory.build.series}-{os.getpid()}")
    qp.client = qp.qmp()
    return qp


@pytest.fixture(scope="module")
def core(module_debug_qemu_factory, tmp_path_factory):
    """A core of a live debug QEMU (gdb generate-core-file), what virtopt said on it just before the
    dump, and that QEMU killed: (core path, live run JSON, build)."""
    build = module_debug_qemu_factory.build
    qp = module_debug_qemu_factory(name=f"gdbcli-core-{build.series}-{os.getpid()}", memory_mb=32,
                                   extra_args=["-machine", "dump-guest-core=off"])
    live = json.loads(virtopt("gdb", str(qp.pid), "-c", "info --json", "-c", "threads --json",
                              "--output=json").stdout)
    path = tmp_path_factory.mktemp("core") / f"core.{qp.pid}"
    cp = gdb_batch(qp.pid, [f"generate-core-file {path}"])
    assert path.is_file(), cp.stderr
    qp.stop()
    assert not qp.alive()
    yield path, live, build
    path.unlink()


# ---------------------------------------------------------------- live QEMU


def test_cli_returns_command_data_and_meaningful_exit_codes(stock):
    before = set(proc_threads(stock.pid))
    cp = virtopt("gdb", str(stock.pid), "-c", "virtopt threads --json")
    after = set(proc_threads(stock.pid))
    assert cp.returncode == 0, cp.stderr
    data = json.loads(cp.stdout)  # stdout is the command's JSON alone
    # idle thread-pool workers may exit meanwhile: threads there before and after must be listed
    assert before & after <= {t["tid"] for t in data["threads"]} <= before | after
    assert re.fullmatch(rf"QEMU {stock.pid} was paused \S+ \S+ \(gdb attach to detach\); it runs again\n", cp.stderr)

    # several commands in one attach; plain gdb commands pass through; --output=json wraps them
    with PauseSampler(stock.pid) as sampler:
        cp = virtopt("gdb", str(stock.pid), "-c", "info", "-c", "trace list 'qcow2_cache_get' --json",
                     "-c", "no-such-gdb-command", "--output=json")
    assert cp.returncode == 1
    res = json.loads(cp.stdout)
    assert [r["ok"] for r in res["commands"]] == [True, True, False]
    assert res["pid"] == stock.pid and res["core"] is None and res["resumed"] is False
    assert res["exe"] == os.path.realpath(f"/proc/{stock.pid}/exe")
    assert res["build-id"] == elfsyms.build_id(res["exe"])
    # QEMU was seen stopped only inside the window virtopt reports
    assert 0 < sampler.seconds <= res["paused-seconds"] + 0.005
    assert res["commands"][1]["data"]["events"][0]["name"] == "qcow2_cache_get"
    assert res["commands"][1]["data"]["events"][0]["state"] == "disabled"
    assert stock.client.cmd("trace-event-get-state", name="qcow2_cache_get")[0]["state"] == "disabled"
    assert "Undefined command" in res["commands"][2]["error"]

    cp = virtopt("gdb", str(stock.pid), "-c", "mtree")  # stock QEMU has no debug info
    assert cp.returncode == 2
    err = cp.stderr.splitlines()
    assert len(err) == 2 and "needs QEMU's debug info" in err[0] and err[1].startswith(f"QEMU {stock.pid} was paused")
    assert stock.client.cmd("query-status")["status"] == "running"

    # the library call other areas use
    assert query(stock.pid, "info")["pid"] == stock.pid


def test_gdb_own_commands_run_as_is_and_run_control_is_refused(stock):
    cp = virtopt("gdb", str(stock.pid), "-c", "info registers rip", "-c", "info", "-c", "info threads",
                 "-c", "bt", "--output=json")
    assert cp.returncode == 0, cp.stderr
    rip, info, threads, bt = json.loads(cp.stdout)["commands"]
    assert bt["output"].startswith("#0  ") and bt["command"] == "bt"  # gdb's backtrace of the main thread
    assert re.match(r"rip\s+0x[0-9a-f]+\s+0x[0-9a-f]+", rip["output"]), rip  # gdb's, not `virtopt info`
    # --output=json: virtopt's own commands give their data (as with --json), gdb's their text
    assert info["command"] == "virtopt info --json" and info["data"]["pid"] == stock.pid
    tids = set(proc_threads(stock.pid))
    listed = {int(t) for t in re.findall(r"LWP (\d+)", threads["output"])}
    assert listed and listed <= tids | listed and len(listed) >= len(tids) - 2
    words = ("info", "info --json", "info frame", "trace list", "trace foo", "bt", "bt 3", "bt -full", "bt all",
             "bt --json", "threads", "virtopt bt")
    assert [normalize(c) for c in words] == [
        "virtopt info", "virtopt info --json", "info frame", "virtopt trace list", "trace foo", "bt", "bt 3",
        "bt -full", "virtopt bt all", "virtopt bt --json", "virtopt threads", "virtopt bt"]

    for cmd in ("continue", "kill", "signal SIGINT", "detach"):
        with PauseSampler(stock.pid) as sampler:
            cp = virtopt("gdb", str(stock.pid), "-c", "info", "-c", cmd)
        assert cp.returncode == 2 and cp.stdout == "", cp.stderr
        assert cp.stderr.count("\n") == 1 and "virtopt gdb only inspects" in cp.stderr
        assert sampler.first is None  # refused before gdb attached: QEMU never stopped
    assert stock.client.cmd("query-status")["status"] == "running"


def test_vm_by_name_non_qemu_dead_pid_and_usage(stock):
    cp = virtopt("gdb", stock.argv[stock.argv.index("-name") + 1].split(",")[0], "-c", "info --json")
    assert cp.returncode == 0 and json.loads(cp.stdout)["pid"] == stock.pid, cp.stderr
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        cp = virtopt("gdb", str(sleeper.pid), "-c", "threads")
        assert cp.returncode == 1 and cp.stdout == ""
        assert cp.stderr == f"virtopt: process {sleeper.pid} is not QEMU (sleep, {shutil.which('sleep')})\n"
        assert sleeper.poll() is None and "t" not in Path(f"/proc/{sleeper.pid}/stat").read_text().split()[2]
    finally:
        sleeper.kill()
        sleeper.wait()
    cp = virtopt("gdb", str(sleeper.pid), "-c", "threads")
    assert cp.returncode == 1 and cp.stderr == f"virtopt: no process {sleeper.pid}\n"
    cp = virtopt("gdb", "1")
    assert cp.returncode == 1 and cp.stderr.startswith("virtopt: process 1 is not QEMU (")
    for argv in ([], ["-c", "info"], [str(stock.pid), "--core", "/nonexistent"], ["--path", str(stock.pid)]):
        cp = virtopt("gdb", *argv)
        assert cp.returncode == 2 and cp.stderr.count("\n") == 1 and cp.stderr.startswith("virtopt: "), (argv, cp)
    for value, said in (("0", "0 is out of range (above 0)"), ("abc", "not a number: 'abc'")):
        cp = virtopt("gdb", str(stock.pid), "--timeout", value)
        assert cp.returncode == 2 and cp.stderr.splitlines()[-1].endswith(f"argument --timeout: {said}"), cp.stderr
    cp = virtopt("gdb", "no-such-vm-name-xyz")
    assert cp.returncode == 1 and cp.stderr.startswith("virtopt: no QEMU named 'no-such-vm-name-xyz'")


def test_a_qemu_held_by_another_debugger_is_one_line(stock):
    other = subprocess.Popen(["gdb", "-q", "-nx", "-p", str(stock.pid)], stdin=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while f"TracerPid:\t{other.pid}" not in Path(f"/proc/{stock.pid}/status").read_text():
            assert time.monotonic() < deadline and other.poll() is None
            time.sleep(0.02)
        cp = virtopt("gdb", str(stock.pid), "-c", "info")
        assert cp.returncode == 1 and cp.stdout == ""
        assert cp.stderr == (f"virtopt: QEMU {stock.pid} is already traced by process {other.pid} (gdb): a process "
                             "has one tracer; detach that debugger first\n")
    finally:
        other.communicate(b"detach\nquit\n", timeout=60)
    assert stock.client.cmd("query-status")["status"] == "running"


def test_a_stopped_qemu_is_left_stopped(stock):
    """virtopt resumes only what it stopped: a QEMU stopped (SIGSTOP, state T) before stays stopped."""
    os.kill(stock.pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 10
        while "T" not in watchdog.states(stock.pid).values():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        cp = virtopt("gdb", str(stock.pid), "-c", "info --json", "--output=json")
        assert cp.returncode == 0, cp.stderr
        res = json.loads(cp.stdout)
        assert res["was-stopped"] is True and res["resumed"] is False
        cp = virtopt("gdb", str(stock.pid), "-c", "info")
        assert cp.stderr == f"QEMU {stock.pid} was already stopped (state T) before gdb attached; it is left stopped\n"
        time.sleep(0.3)
        assert "T" in watchdog.states(stock.pid).values()
    finally:
        os.kill(stock.pid, signal.SIGCONT)
    assert stock.client.cmd("query-status")["status"] == "running"


def test_path_is_the_script_a_gdb_sources():
    cp = virtopt("gdb", "--path")
    assert cp.returncode == 0 and cp.stderr == ""
    path = Path(cp.stdout.strip())
    assert path.is_file() and path == pack_path()
    out = subprocess.run(["gdb", "-q", "-nx", "-batch", "-ex", f"source {path}", "-ex", "help virtopt"],
                         capture_output=True, text=True, timeout=60)
    assert "virtopt threads --" in out.stdout and "did not load" not in out.stderr


def test_help_examples_run(dbg, core):
    """Every example of `virtopt gdb --help` runs (12345 is the debug QEMU, core.12345 a core of its series)."""
    core_path, _live, build = core
    assert build.series == dbg.build.series
    cp = virtopt("gdb", "--help")
    assert cp.returncode == 0 and cp.stdout.count("virtopt gdb ") >= 8
    examples = [ln.strip() for ln in EPILOG.splitlines() if ln.startswith("  virtopt gdb")]
    assert len(examples) >= 8
    name = dbg.argv[dbg.argv.index("-name") + 1].split(",")[0]
    subst = {"12345": str(dbg.pid), "web1": name, "core.12345": str(core_path), DEBIAN_QEMU: build.system}
    for ex in examples:
        line = re.split(r"\s{2,}\(", ex)[0]
        argv = [subst.get(w, w) for w in shlex.split(line)][2:]
        cp = virtopt("gdb", *argv)
        assert cp.returncode == 0, (ex, cp.stderr)
        assert cp.stdout.strip() and "Traceback" not in cp.stderr, ex
    # the trace example changed the VM, and said so
    states = dbg.client.cmd("trace-event-get-state", name="qcow2_cache_get")
    assert states[0]["state"] == "enabled"
    virtopt("gdb", str(dbg.pid), "-c", "trace disable 'qcow2_cache_*'", check=True)
    assert dbg.client.cmd("query-status")["status"] == "running"


# ---------------------------------------------------------------- cores


def test_core_runs_read_only_commands_with_the_executable_from_its_notes(core):
    path, live, build = core
    info = corefile.read_core(str(path))
    exe = os.path.realpath(build.system)  # the core names the file as the kernel saw it
    assert info.exe == exe and info.pid == live["pid"]
    assert info.build_id == elfsyms.build_id(build.system)
    cp = virtopt("gdb", "--core", str(path), "-c", "info --json", "-c", "threads --json", "--output=json")
    assert cp.returncode == 0, cp.stderr
    res = json.loads(cp.stdout)
    assert res["core"] == str(path) and res["pid"] is None and res["paused-seconds"] is None
    assert res["exe"] == exe and res["build-id"] == info.build_id
    got_info, got_threads = (r["data"] for r in res["commands"])
    live_info, live_threads = (r["data"] for r in live["commands"])
    for key in ("version", "binary", "debug-info", "accelerator"):
        assert got_info[key] == live_info[key], key
    assert {t["tid"] for t in got_threads["threads"]} == {t["tid"] for t in live_threads["threads"]}
    core_roles = {(t["tid"], t["role"], t["vcpu-index"]) for t in got_threads["threads"]}
    assert {(t["tid"], t["role"], t["vcpu-index"]) for t in live_threads["threads"]
            if t["role"] in ("main-loop", "vcpu")} <= core_roles
    # no pause line for a core: nothing was paused
    cp = virtopt("gdb", "--core", str(path), "-c", "info")
    assert cp.returncode == 0 and cp.stderr == "" and "core file" in cp.stdout


def test_core_whose_executable_is_gone_is_opened_with_the_qemu_of_the_same_build_id(qemu_build, tmp_path):
    """QEMU ran from a copy that is deleted since: the core's build-id finds the installed binary."""
    copy_dir = tmp_path / "bin"
    copy_dir.mkdir()
    shutil.copy2(qemu_build.system, copy_dir / "qemu-system-x86_64")
    moved = dataclasses.replace(qemu_build, bindir=copy_dir, firmware=qemu_build.firmware or vmlib.FIRMWARE_DIRS)
    start = _factory(moved)  # leak-checked like every fixture QEMU
    try:
        qp = start(name=f"gdbcli-gone-{os.getpid()}", memory_mb=32, extra_args=["-machine", "dump-guest-core=off"])
        path = tmp_path / f"core.{qp.pid}"
        cp = gdb_batch(qp.pid, [f"generate-core-file {path}"])
        assert path.is_file(), cp.stderr
    finally:
        for qp in start.started:
            qp.stop()
    (copy_dir / "qemu-system-x86_64").unlink()
    assert corefile.read_core(str(path)).exe == str(copy_dir / "qemu-system-x86_64")
    cp = virtopt("gdb", "--core", str(path), "-c", "info --json", "--output=json")
    assert cp.returncode == 0, cp.stderr
    res = json.loads(cp.stdout)
    assert res["exe"] == os.path.realpath(qemu_build.system) and res["build-id"] == elfsyms.build_id(qemu_build.system)
    version = subprocess.run([qemu_build.system, "--version"], capture_output=True, text=True, env=qemu_build.env(),
                             check=True).stdout.splitlines()[0]
    assert version == f"QEMU emulator version {res['commands'][0]['data']['version']}"
    path.unlink()


def test_core_refuses_writes_without_trying(core):
    path = core[0]
    for cmd in ("trace enable qcow2_cache_get", "virtopt trace disable 'qcow2_*'", "continue"):
        t0 = time.monotonic()
        cp = virtopt("gdb", "--core", str(path), "-c", "info", "-c", cmd)
        assert cp.returncode == 2 and cp.stdout == "" and cp.stderr.count("\n") == 1, cp.stderr
        assert time.monotonic() - t0 < 5  # refused before gdb opened the core
    assert "a core file has no QEMU to change" in virtopt("gdb", "--core", str(path), "-c", "trace enable x").stderr


def test_mismatched_executable_is_detected_by_build_id(core, dbg):
    path, _live, build = core
    other = vmlib.find_build(build.series, debug=False)
    assert other is not None and elfsyms.build_id(other.system) != elfsyms.build_id(build.system)
    cp = virtopt("gdb", "--core", str(path), "--exe", other.system, "-c", "info")
    assert cp.returncode == 1 and cp.stdout == "" and cp.stderr.count("\n") == 1
    assert f"{other.system} is not the QEMU that made {path}: build-id" in cp.stderr
    cp = virtopt("gdb", str(dbg.pid), "--exe", other.system, "-c", "info")
    assert cp.returncode == 1 and cp.stderr.count("\n") == 1
    assert f"{other.system} is not the executable of QEMU {dbg.pid}" in cp.stderr
    cp = virtopt("gdb", str(dbg.pid), "--exe", build.system, "-c", "info --json")  # the right one is accepted
    assert cp.returncode == 0 and json.loads(cp.stdout)["debug-info"] is True


def test_bad_core_files_are_one_line_each(core, tmp_path):
    path = core[0]
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "text").write_text("not a core file, just some text that is long enough for a header....\n")
    trunc = tmp_path / "trunc"
    with open(path, "rb") as f:
        trunc.write_bytes(f.read(8192))
    cases = {
        tmp_path / "missing": "cannot open {p}: No such file or directory",
        tmp_path: "cannot open {p}: Is a directory",
        fifo: "{p}: not a regular file or block device",
        tmp_path / "empty": "{p}: empty file",
        tmp_path / "text": "{p}: not a core file (not an ELF file)",
        Path(shutil.which("sleep") or "/bin/sleep"): "{p}: not a core file (an ELF executable)",
        trunc: "{p}: truncated core file (notes beyond the end of the file)",
    }
    for p, want in cases.items():
        cp = virtopt("gdb", "--core", str(p), "-c", "info")
        assert cp.returncode == 1 and cp.stdout == "", (p, cp.stderr)
        assert cp.stderr == f"virtopt: {want.format(p=p)}\n"


def test_bad_exe_is_one_line_and_qemu_never_paused(stock, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "text").write_text("text\n")
    cases = {
        fifo: "{p}: not a regular file or block device",  # refused without blocking on the FIFO
        tmp_path: "cannot open {p}: Is a directory",
        tmp_path / "missing": "cannot open {p}: No such file or directory",
        tmp_path / "text": "{p}: not a usable ELF file (shorter than an ELF header)",
    }
    for p, want in cases.items():
        with PauseSampler(stock.pid) as sampler:
            cp = virtopt("gdb", str(stock.pid), "--exe", str(p), "-c", "info", timeout=60)
        assert cp.returncode == 1 and cp.stdout == "" and cp.stderr == f"virtopt: {want.format(p=p)}\n"
        assert sampler.first is None


# ---------------------------------------------------------------- the pure-Python pieces


def test_elf_symbols_and_build_id_match_binutils_and_reject_truncated_files(tmp_path: Path):
    nm = subprocess.run(["nm", "-D", "--defined-only", DEBIAN_QEMU], capture_output=True, text=True,
                        check=True).stdout
    want = {}
    for line in nm.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2].startswith("_TRACE_") and parts[2].endswith("_DSTATE"):
            want[parts[2]] = int(parts[0], 16)
    got = elfsyms.read_symbols(DEBIAN_QEMU, want=lambda n: n.startswith("_TRACE_") and n.endswith("_DSTATE"))
    assert {n: s.value for n, s in got.items()} == want and len(want) > 1000
    notes = subprocess.run(["readelf", "-n", DEBIAN_QEMU], capture_output=True, text=True, check=True).stdout
    assert elfsyms.build_id(DEBIAN_QEMU) == re.search(r"Build ID: ([0-9a-f]+)", notes).group(1)
    short = tmp_path / "short"
    with open(DEBIAN_QEMU, "rb") as f:
        short.write_bytes(f.read(4096))
    before = short.read_bytes()
    with pytest.raises(BadInputError):
        elfsyms.read_symbols(str(short))
    assert short.read_bytes() == before
    (tmp_path / "text").write_text("not an ELF file at all, but long enough to hold a header..........")
    for fn in (elfsyms.read_symbols, elfsyms.build_id):
        with pytest.raises(BadInputError):
            fn(str(tmp_path / "text"))


def test_kvm_exit_reason_table_matches_linux_header(debug_src):
    header = debug_src / "linux-headers" / "linux" / "kvm.h"
    parsed = kvm.exit_reasons_from_header(header)
    assert len(parsed) >= 30
    for code, name in parsed.items():
        assert kvm.KVM_EXIT_REASONS[code] == name


@pytest.mark.skipif(shutil.which("nm") is None, reason="binutils (nm) is not installed")
def test_version_string_found_in_binary():
    out = subprocess.run([DEBIAN_QEMU, "--version"], capture_output=True, text=True, check=True).stdout
    first = out.splitlines()[0]
    assert elfsyms.find_string(DEBIAN_QEMU, b"QEMU emulator version ") == first
    assert re.match(r"QEMU emulator version \d+\.\d+\.\d+", first)
