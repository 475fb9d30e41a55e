"""The defects issue 12 §4 measured in the gdb pack, each shown gone on a real QEMU (both debug
builds): single-threaded TCG's thread, a qcow2 node named by another path than QEMU's, `--bt` of
something that is not a coroutine, the loaded QEMU script shown, completion at the prompt, a
mismatched executable (refused by build-id). (Trace names and `mtree --flat` are checked in test_gdb.py and
test_inspect.py against QMP and HMP.)"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

from conftest import _require
from gdb_util import PACK
from helpers import make_qcow2, virtopt

from qemu_ext.gdbmi import GdbSession
from qemu_ext.introspect import views


def test_pack_defects_are_gone(debug_build, debug_qemu_factory):
    wd = Path(tempfile.mkdtemp(prefix="virtopt-defects-"))
    img = make_qcow2(wd / "rel.qcow2", size="16M", io=["write 0 64k"])
    # QEMU opens the image by a relative name (its working directory is wd), single-threaded TCG
    qp = debug_qemu_factory(name="virtopt-defects", smp=2, accel="tcg,thread=single", workdir=wd,
                            drives=["file=rel.qcow2,if=none,id=d0,format=qcow2"])
    try:
        with GdbSession(qp.pid) as s:
            threads = s.run("threads --json").data
            by_path = s.run(f"qcow2 {img} --json")
            bt = s.run("coroutines --bt 999")
        (tcg,) = [t for t in threads["threads"] if t["name"] == "ALL CPUs/TCG"]
        assert (tcg["role"], tcg["vcpu-index"], tcg["label"]) == ("vcpu", None, "vCPUs (single-threaded TCG)")
        assert by_path.ok, by_path.error
        assert [n["filename"] for n in by_path.data["nodes"]] == ["rel.qcow2"]
        assert not bt.ok and bt.error.startswith("virtopt coroutines: 999 is not") and "a Coroutine" in bt.error
        mine = virtopt("inspect", str(qp.pid), "threads", "--json")
        assert mine.returncode == 0 and '"label": "vCPUs (single-threaded TCG)"' in mine.stdout

        cp = subprocess.run(["gdb", "-q", "-nx", "-batch", "-p", str(qp.pid), "-ex", f"source {PACK}",
                             "-ex", "show virtopt-qemu-gdb-script",
                             "-ex", "complete virtopt trace list qcow2_cache_get_r",
                             "-ex", "complete virtopt trace enable scsi_disk_dma_command_RE",
                             "-ex", "complete virtopt mtree I/",
                             "-ex", "complete virtopt qcow2 d",
                             "-ex", "help virtopt"], capture_output=True, text=True, timeout=60)
        out = cp.stdout
        # `help virtopt` names every command the pack registers (each one a view), trace's three as one
        listed = out.split("Commands:", 1)[1].split("`help virtopt COMMAND`", 1)[0]
        names = {w.strip(" .\n") for w in listed.replace("\n", " ").split(",")}
        registered = set(re.findall(r"^virtopt (\w+(?: \w+)?) -- ", out, re.M)) - {"trace"}
        assert registered <= {n.split(" ")[0] for n in names} and "trace list|enable|disable" in names, names
        assert names - {"trace list|enable|disable"} == set(views.NAMES) - {"trace list", "trace enable",
                                                                          "trace disable"}, names
        assert f'"{os.path.realpath(debug_build.src / "scripts" / "qemu-gdb.py")}"' in out  # what was loaded
        assert "virtopt trace list qcow2_cache_get_read\n" in out
        assert "virtopt trace list qcow2_cache_get_replace_entry\n" in out
        assert "virtopt trace enable scsi_disk_dma_command_READ\n" in out  # QEMU's own spelling
        assert "virtopt mtree I/O\n" in out
        assert "virtopt qcow2 d0\n" in out

        # another build's executable: refused in one line, never read at wrong addresses. (Not tried
        # through `gdb OTHER -p PID`: gdb itself then fails to insert its breakpoints and leaves QEMU
        # stopped, before the pack runs; the wrapper refuses that before attaching.)
        other = _require("7.2" if debug_build.series == "10.0" else "10.0", debug=True)
        wrong = virtopt("inspect", str(qp.pid), "--exe", other.system, "threads")
        assert wrong.returncode == 1 and "build-id" in wrong.stderr and len(wrong.stderr.splitlines()) == 1
        assert qp.qmp().cmd("query-status")["status"] == "running"
    finally:
        qp.stop()
