"""Post-mortem (issue 12 §2, the pack side; issue 17 on cores): every read-only view works on a core
file, through gdb (`gdb QEMU CORE` + the pack) and through `virtopt inspect --core`, and says what
the live QEMU said just before the dump.

Cores are made by gdb's generate-core-file of live debug QEMUs (KVM mid-I/O: a read suspended by
blkdebug; TCG idle), in the same gdb session that first ran every view on the live process; then
the QEMU is killed.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from gdb_util import check_core_timers, comparable, differences, gdb_on_core, hmp
from helpers import virtopt

from qemu_ext import vm
from qemu_ext.gdbmi import GdbSession
from qemu_ext.introspect import views
from qemu_ext.introspect.drgn_backend import DrgnTarget

VIEWS = ["info", "threads", "vcpus", "mtree", "mtree --flat", "mtree lookup 0xfee00000", "timers",
         "trace list qcow2_*", "qcow2", "coroutines --pools"]


def _view_call(v: str) -> tuple[str, dict[str, Any]]:
    """The library call `virtopt inspect ... v` makes."""
    if v.startswith("mtree lookup"):
        return "mtree lookup", {"addr": v.split()[2]}
    if v.startswith("mtree"):
        return "mtree", {"flat_view": "--flat" in v}
    if v.startswith("trace list"):
        return "trace list", {"patterns": v.split()[2:]}
    if v.startswith("coroutines"):
        return "coroutines", {"pools": "--pools" in v}
    return v, {}


def _core_comparable(view: str, live: Any, core: Any) -> tuple[Any, Any]:
    """What must be equal between the live answer and the core's, knowing what a core cannot hold."""
    a, b = comparable(view.split()[0] if not view.startswith("mtree lookup") else "mtree lookup", live), \
        comparable(view.split()[0] if not view.startswith("mtree lookup") else "mtree lookup", core)
    if view == "info":
        for d in (a, b):
            d.pop("commands")
            d.pop("target")
    if view == "threads":  # names come from QEMU's structures on a core: only the roles are compared
        kernel = {t["tid"] for t in a["threads"] if t["role"] == "kvm-kernel"}  # the kernel's (no QEMU trace)
        for d in (a, b):
            for t in d["threads"]:
                for k in ("name", "affinity", "identified-by", "label"):
                    t.pop(k)
                if t["tid"] in kernel:
                    t["role"] = "kvm-kernel"
    return a, b


@pytest.mark.parametrize("accel", ["kvm", "tcg"])
def test_every_view_on_a_core_says_what_the_live_qemu_said(debug_qemu_factory, debug_build, image_factory,
                                                          tmp_path: Path, accel: str):
    if accel == "kvm" and not vm.kvm_available():
        pytest.skip("/dev/kvm does not open here: no KVM core to make")
    img = image_factory("c.qcow2", size="16M", io=["write -P 0x55 0 64k"])
    qp = debug_qemu_factory(name="virtopt-core", smp=2, accel=accel, memory_mb=64, drives=[
        f"if=none,id=d1,driver=qcow2,file.driver=blkdebug,file.image.filename={img}"],
        extra_args=["-object", "iothread,id=io0"])
    qp.client = qp.qmp()
    mid_io = accel == "kvm"
    if mid_io:
        hmp(qp, 'qemu-io d1 "break read_aio A"')
        hmp(qp, 'qemu-io d1 "aio_read -P 0x55 0 4k"')
        deadline = time.monotonic() + 10
        while "Suspended request 'A'" not in qp.stderr_text():
            assert time.monotonic() < deadline, qp.stderr_text()
            time.sleep(0.05)
    cpus = qp.client.cmd("query-cpus-fast")
    pid = qp.pid
    core = tmp_path / "qemu.core"
    attaching = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    with GdbSession(qp.pid) as s:
        live = {}
        for v in VIEWS:
            r = s.run(f"{v} --json")
            assert r.ok, f"{v}: {r.error}"
            live[v] = r.data
            if v == VIEWS[0]:
                stopped = (attaching, time.clock_gettime_ns(time.CLOCK_MONOTONIC))
        inflight = [c for c in live["coroutines --pools"]["coroutines"] if c["source"].startswith("tracked-request:")]
        assert len(inflight) == int(mid_io)
        live_bt = s.run(f"coroutines --bt {inflight[0]['address']:#x} --json").data if mid_io else None
        began = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        dumped = s.run(f"generate-core-file {core}")
        ended = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        assert dumped.ok, dumped.error
    qp.stop()
    exe = debug_build.system

    # gdb QEMU CORE + the pack
    on_core = gdb_on_core(exe, core, [f"virtopt {v} --json" for v in VIEWS] + (
        [f"virtopt coroutines --bt {inflight[0]['address']:#x} --json"] if mid_io else []) + [
        "virtopt trace enable qcow2_cache_get"], tmp_path)
    by_view = dict(zip(VIEWS, on_core))
    for v in VIEWS:
        r = by_view[v]
        assert r["ok"] and r["data"] is not None, f"{v} on the core: {r.get('error')}"
        a, b = _core_comparable(v, live[v], r["data"])
        assert a == b, (v, differences(a, b))
    info = by_view["info"]["data"]
    assert info["target"] == "core"
    assert info["commands"]["trace enable"]["available"] is False
    refused = on_core[-1]
    assert not refused["ok"] and "core file" in refused["error"] and "\n" not in refused["error"]
    vc = by_view["vcpus"]["data"]["vcpus"]
    assert [(v["cpu-index"], v["thread-id"]) for v in vc] == [(c["cpu-index"], c["thread-id"]) for c in cpus]
    if accel == "kvm":  # kvm_run is a device mapping, not in the dump: said, not failed
        assert {v["kvm-exit-reason-name"] for v in vc} == {"unknown"}
    th = by_view["threads"]["data"]["threads"]
    names = {t["tid"]: t["name"] for t in th}
    for c in cpus:  # thread names rebuilt from QEMU's structures, as qemu_thread_create named them
        assert names[c["thread-id"]] == f"CPU {c['cpu-index']}/{accel.upper()}"
    assert {"IO mon_iothread", "IO io0"} <= set(names.values())  # -object iothread too (QOM /objects)
    live_names = {t["tid"]: t["name"] for t in live["threads"]["threads"]}
    assert names[pid] == live_names[pid] == "qemu-system-x86"  # the main thread's, from NT_PRPSINFO
    # "expires in" counted from the dump (the core file's birth time), within the bound the view states
    timers = by_view["timers"]["data"]
    running = check_core_timers(live["timers"], timers, stopped, (began, ended))
    clocks = {c["clock"]: c for c in timers["clocks"]}
    assert clocks["virtual"]["now-ns"] is not None and clocks["host"]["now-ns"] is not None
    # the qcow2 node's cache-clean timer (QEMU_CLOCK_VIRTUAL) and the RTC's (QEMU_CLOCK_HOST) are there,
    # and the core counts them from the dump, later than the live reading
    assert {c for c, _live, _core in running} >= {"virtual", "host"}
    assert all(abs(live_in - core_in) < ended - attaching for _c, live_in, core_in in running)
    if mid_io:
        core_bt = on_core[len(VIEWS)]
        assert core_bt["ok"], core_bt.get("error")
        frames = [f["function"] for f in core_bt["data"]["backtrace"]["frames"]]
        assert frames == [f["function"] for f in live_bt["backtrace"]["frames"]]
        assert frames[:2] == ["qemu_coroutine_switch", "qemu_coroutine_yield"] and "coroutine_trampoline" in frames

    # drgn: `virtopt inspect --core` once end to end (the executable found from the core's notes),
    # then every view through the same library call the CLI makes
    cp = virtopt("inspect", "--core", str(core), "info", "--json")
    assert cp.returncode == 0, cp.stderr
    assert json.loads(cp.stdout)["binary"] == str(Path(exe).resolve())
    t = DrgnTarget.open_core(str(core), exe)
    for v in VIEWS:
        name, kw = _view_call(v)
        mine = views.run(t, name, **kw)
        assert mine["snapshot"]["target"] == "core"
        a, b = _core_comparable(v, by_view[v]["data"], json.loads(json.dumps(mine)))
        assert a == b, (v, differences(a, b))
    human = virtopt("inspect", "--core", str(core), "--exe", exe, "vcpus")
    assert human.returncode == 0 and "core file" in human.stdout
    if accel == "kvm":
        assert "kvm_run is not in the core file" in human.stdout
    no = virtopt("inspect", "--core", str(core), "--exe", exe, "trace", "enable", "x")
    assert no.returncode == 2 and re.search(r"never writes", no.stderr)


def _core_offset(core: Path, addr: int) -> int:
    """The file offset of virtual address addr in a core (its PT_LOAD segments)."""
    import struct

    data = core.read_bytes()[:1 << 20]
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    with open(core, "rb") as f:
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    for i in range(phnum):
        p_type, _fl, off, vaddr, _pa, filesz, _ms, _al = struct.unpack_from("<IIQQQQQQ", table, i * phentsize)
        if p_type == 1 and vaddr <= addr < vaddr + filesz:
            return off + addr - vaddr
    raise AssertionError(f"{addr:#x} is not in the core")


def test_a_list_that_loops_is_one_line_not_a_hang(debug_qemu_factory, debug_build, tmp_path: Path):
    """A core whose address-space list was made to loop (the first element's next points to itself):
    the bounded, cycle-checked walk says so in one line, through drgn and through gdb."""
    qp = debug_qemu_factory(name="virtopt-loop", memory_mb=32, extra_args=["-S"])
    core = tmp_path / "good.core"
    with GdbSession(qp.pid) as s:
        assert s.run(f"generate-core-file {core}").ok
    qp.stop()
    t = DrgnTarget.open_core(str(core), debug_build.system)
    head = t.var("address_spaces")
    first = head["tqh_first"].ptr()
    link = first + t.type("AddressSpace").offset("address_spaces_link")  # tqe_next first in the union
    bad = tmp_path / "loop.core"
    data = bytearray(core.read_bytes())
    off = _core_offset(core, link)
    data[off:off + 8] = first.to_bytes(8, "little")
    bad.write_bytes(bytes(data))
    cp = virtopt("inspect", "--core", str(bad), "--exe", debug_build.system, "mtree")
    assert cp.returncode == 1 and len(cp.stderr.splitlines()) == 1 and "loops back" in cp.stderr, cp.stderr
    (r,) = gdb_on_core(debug_build.system, bad, ["virtopt mtree --flat"], tmp_path)
    assert not r["ok"] and "loops back" in r["error"] and "\n" not in r["error"]
