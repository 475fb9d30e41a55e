"""`virtopt gdb PID -c ...` end to end, and the pure-Python pieces the pack relies on."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from gdb_util import proc_threads
from helpers import virtopt

from qemu_ext.errors import BadInputError
from qemu_ext.gdbmi import elfsyms, kvm, query

DEBIAN_QEMU = "/usr/bin/qemu-system-x86_64"


def test_cli_returns_command_data_and_meaningful_exit_codes(qemu):
    before = set(proc_threads(qemu.pid))
    cp = virtopt("gdb", str(qemu.pid), "-c", "virtopt threads --json")
    after = set(proc_threads(qemu.pid))
    assert cp.returncode == 0, cp.stderr
    data = json.loads(cp.stdout)
    # idle thread-pool workers may exit meanwhile: threads there before and after must be listed
    assert before & after <= {t["tid"] for t in data["threads"]} <= before | after

    # several commands in one attach; plain gdb commands pass through; --output=json wraps them
    cp = virtopt("gdb", str(qemu.pid), "-c", "info", "-c", "trace list 'qcow2_cache_get' --json",
                 "-c", "no-such-gdb-command", "--output=json")
    assert cp.returncode == 1
    res = json.loads(cp.stdout)
    assert [r["ok"] for r in res] == [True, True, False]
    assert res[1]["data"]["events"] == [{"name": "qcow2_cache_get", "state": "disabled", "dstate": 0,
                                         "vcpu": False}]
    assert qemu.client.cmd("trace-event-get-state", name="qcow2_cache_get")[0]["state"] == "disabled"

    cp = virtopt("gdb", str(qemu.pid), "-c", "mtree")  # Debian's QEMU has no debug info
    assert cp.returncode == 2 and cp.stderr.count("\n") == 1 and "needs QEMU's debug info" in cp.stderr
    assert qemu.client.cmd("query-status")["status"] in ("running", "prelaunch")

    # the library call other areas use
    assert query(qemu.pid, "info")["pid"] == qemu.pid


def test_cli_dead_pid_and_help():
    sleeper = subprocess.Popen(["sleep", "0"])
    sleeper.wait()
    cp = virtopt("gdb", str(sleeper.pid), "-c", "threads")
    assert cp.returncode == 1 and cp.stderr.strip() == f"virtopt: no process with pid {sleeper.pid}"
    cp = virtopt("gdb", "--help")
    assert cp.returncode == 0 and "examples:" in cp.stdout


def test_elf_symbols_match_nm_and_reject_truncated_files(tmp_path: Path):
    nm = subprocess.run(["nm", "-D", "--defined-only", DEBIAN_QEMU], capture_output=True, text=True,
                        check=True).stdout
    want = {}
    for line in nm.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2].startswith("_TRACE_") and parts[2].endswith("_DSTATE"):
            want[parts[2]] = int(parts[0], 16)
    got = elfsyms.read_symbols(DEBIAN_QEMU, want=lambda n: n.startswith("_TRACE_") and n.endswith("_DSTATE"))
    assert {n: s.value for n, s in got.items()} == want and len(want) > 1000
    short = tmp_path / "short"
    with open(DEBIAN_QEMU, "rb") as f:
        short.write_bytes(f.read(4096))
    before = short.read_bytes()
    with pytest.raises(BadInputError):
        elfsyms.read_symbols(str(short))
    assert short.read_bytes() == before
    (tmp_path / "text").write_text("not an ELF file at all, but long enough to hold a header..........")
    with pytest.raises(BadInputError):
        elfsyms.read_symbols(str(tmp_path / "text"))


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
