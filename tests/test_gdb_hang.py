"""Why is QEMU hung: `virtopt block`, `waiters`, `locks`, `bt` and `cpustate` on the debug builds of
7.2 and 10.0, checked against QEMU itself (QMP query-named-block-nodes / query-block /
x-debug-query-block-graph / query-iothreads, HMP info registers, the completions qemu-io prints
when a parked request is let go, the kernel's /proc/PID/task/TID/syscall), and on a core file of
the same process (gdb generate-core-file; gdb and drgn read it) against what the live process said.

The states are real: a write queued by a throttle group (-drive throttling.* and -blockdev
throttle), a qcow2 write suspended by blkdebug while it holds the qcow2 lock and a second write
waiting for that lock, a vCPU blocked on the BQL while the main loop runs a synchronous HMP
qemu-io write into a throttled drive, a coroutine stopped at a breakpoint.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Optional

import pytest
from gdb_util import PACK, assert_alive, check_core_timers, hmp
from helpers import make_qcow2, virtopt

from qemu_ext import vm
from qemu_ext.gdbmi import GdbSession
from qemu_ext.gdbmi.driver import JSON_MARKER

THROTTLE_BPS = 4096  # a second 64 KiB write waits 16 s: the tests let it go (block_set_io_throttle, a drain)
BQL_THROTTLE_BPS = 16384


def firmware(path: Path, code: bytes) -> Path:
    """A 64 KiB -bios image whose reset vector (0xffff0, real mode) runs code: no BIOS that would
    reset devices (a virtio reset drains the block layer and lets throttled requests go) or change
    the vCPUs' state behind the tests' back."""
    blob = bytearray(64 << 10)
    blob[0xFFF0:0xFFF0 + len(code)] = code
    path.write_bytes(bytes(blob))
    return path


HALT = bytes([0xFA, 0xF4, 0xEB, 0xFD])  # cli; hlt; jmp $-1 (back to hlt)
SPIN_OUT = bytes([0xE6, 0x80, 0xEB, 0xFC])  # out 0x80, al; jmp $-2: every iteration exits and takes the BQL


def _images(d: Path, build: vm.QemuBuild) -> dict[str, Path]:
    return {n: make_qcow2(d / f"{n}.qcow2", size="64M", build=build) for n in ("a", "b", "c", "e")}


@pytest.fixture(scope="module")
def hang_vm(module_debug_qemu_factory, debug_build, tmp_path_factory) -> Any:
    """A debug QEMU with 4 vCPUs, an IOThread and 11 block nodes: d0 (qcow2, -drive throttling in group
    tg0, on ide-hd disk0), bthr (-blockdev throttle in group tg1 over qcow2 bfmt over file bfile, on
    virtio-blk-pci vd0), d2 (qcow2 over blkdebug), d3 (plain qcow2), nio (null-co, moved into iothread io0
    with x-blockdev-set-iothread)."""
    d = tmp_path_factory.mktemp("hang")
    img = _images(d, debug_build)
    qp = module_debug_qemu_factory(name="virtopt-hang", smp=4, drives=[
        f"file={img['a']},if=none,id=d0,format=qcow2,throttling.bps-write={THROTTLE_BPS},throttling.group=tg0",
        f"if=none,id=d2,driver=qcow2,file.driver=blkdebug,file.image.filename={img['c']}",
        f"file={img['e']},if=none,id=d3,format=qcow2",
    ], extra_args=[
        "-object", "iothread,id=io0",
        "-bios", str(firmware(d / "halt.bin", HALT)),
        "-object", f"throttle-group,id=tg1,x-bps-write={THROTTLE_BPS}",
        "-blockdev", f"driver=file,filename={img['b']},node-name=bfile",
        "-blockdev", "driver=qcow2,file=bfile,node-name=bfmt",
        "-blockdev", "driver=throttle,throttle-group=tg1,file=bfmt,node-name=bthr",
        "-blockdev", "driver=null-co,node-name=nio",
        "-device", "virtio-blk-pci,drive=bthr,id=vd0",
        "-device", "ide-hd,drive=d0,id=disk0,bus=ide.0",
    ])
    qp.client = qp.qmp()
    qp.client.cmd("x-blockdev-set-iothread", **{"node-name": "nio", "iothread": "io0"})
    return qp


def _no_snapshot(d: Any) -> Any:
    return {k: v for k, v in d.items() if k != "snapshot"}


def _core_json(build: vm.QemuBuild, core: Path, commands: list[str], tmp: Path) -> list[Any]:
    """Run `virtopt ... --json` commands in `gdb QEMU CORE` (the pack sourced); their JSON in order."""
    jd = tmp / "core-json"
    jd.mkdir(exist_ok=True)
    argv = ["gdb", "-q", "-nx", "-batch", build.system, str(core), "-ex", f"source {PACK}",
            "-ex", f"set virtopt-json-dir {jd}"]
    for c in commands:
        argv += ["-ex", c]
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=build.env())
    paths = [ln[len(JSON_MARKER):].strip() for ln in cp.stdout.splitlines() if ln.startswith(JSON_MARKER)]
    assert len(paths) == len(commands), cp.stdout[-2000:] + cp.stderr[-2000:]
    assert "Traceback" not in cp.stderr, cp.stderr
    return [json.loads(Path(p).read_text()) for p in paths]


def _drgn_core(core: Path, build: vm.QemuBuild, *names: str) -> list[Any]:
    from qemu_ext.introspect import views
    from qemu_ext.introspect.drgn_backend import DrgnTarget

    t = DrgnTarget.open_core(str(core), build.system)
    return [views.run(t, n) for n in names]


def _drgn_live(pid: int, name: str) -> Any:
    from qemu_ext.introspect import views
    from qemu_ext.introspect.drgn_backend import DrgnTarget

    return views.run(DrgnTarget.attach(pid), name)


def _wait_stderr(qp: vm.QemuProcess, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while text not in qp.stderr_text():
        assert time.monotonic() < deadline, f"QEMU never printed {text!r}: {qp.stderr_text()[-800:]}"
        time.sleep(0.05)


# ---------------------------------------------------------------- the block graph


def test_block_graph_matches_qmp(hang_vm):
    qp = hang_vm
    named = qp.client.cmd("query-named-block-nodes")  # also refreshes bs->filename (bdrv_refresh_filename)
    blocks = qp.client.cmd("query-block")
    graph = qp.client.cmd("x-debug-query-block-graph")
    iothreads = {i["id"]: i["thread-id"] for i in qp.client.cmd("query-iothreads")}
    with GdbSession(qp.pid) as s:
        r = s.run("virtopt block --json")
        text = s.run("virtopt block")
        one = s.run("virtopt block d0 --json")
        bad = s.run("virtopt block no-such-node")
    assert r.ok, r.error
    d = r.data
    nodes = {n["node-name"]: n for n in d["nodes"]}
    assert len(nodes) == 11
    assert set(nodes) == {n["node-name"] for n in named}
    for n in named:
        mine = nodes[n["node-name"]]
        assert (mine["driver"], mine["filename"]) == (n["drv"], n["file"])
        assert mine["in-flight"] == 0 and mine["quiesce-counter"] == 0 and mine["tracked-requests"] == []
    # the graph's edges, node to node, by child name: x-debug-query-block-graph (bdrv_get_xdbg_block_graph)
    gnodes = {g["id"]: g for g in graph["nodes"]}
    want = {(gnodes[e["parent"]]["name"], e["name"], gnodes[e["child"]]["name"]) for e in graph["edges"]
            if gnodes[e["parent"]]["type"] == "block-driver"}
    got = {(n["node-name"], c["name"], c["node-name"]) for n in d["nodes"] for c in n["children"]}
    assert got == want and ("bthr", "file", "bfmt") in got
    # and the BlockBackends' root edges (bdrv_get_xdbg_block_graph names a backend without a name by
    # its device, as query-block's qdev)
    roots = sorted((gnodes[e["parent"]]["name"], gnodes[e["child"]]["name"]) for e in graph["edges"]
                   if gnodes[e["parent"]]["type"] == "block-backend")
    assert roots == sorted((b["name"] or b["device"]["qdev"], b["node-name"]) for b in d["backends"])
    # backends: query-block's device, qdev and root node, and the throttle group
    backends = {b["node-name"]: b for b in d["backends"]}
    for b in blocks:
        ins = b["inserted"]
        mine = backends[ins["node-name"]]
        assert mine["name"] == b["device"]
        assert (mine["device"] or {}).get("qdev") == b.get("qdev")
        assert mine["throttle-group"] == ins.get("group")
    assert backends[nodes["bthr"]["node-name"]]["device"]["qdev"] == "/machine/peripheral/vd0/virtio-backend"
    assert nodes["bthr"]["throttle-group"] == "tg1"
    # AioContexts: nio was moved into io0 (query-iothreads' thread), the others are the main loop's
    assert nodes["nio"]["aio-context"]["iothread"] == "io0"
    assert nodes["nio"]["aio-context"]["thread-id"] == iothreads["io0"]
    main = [n for n in d["nodes"] if n["node-name"] != "nio"]
    assert all(n["aio-context"]["name"] == "main-loop" and n["aio-context"]["thread-id"] == qp.pid for n in main)
    assert one.ok and {n["backend"] for n in one.data["nodes"]} == {"d0"}
    assert "BlockBackend d0: device disk0 (ide-hd)" in text.output
    assert not bad.ok and "no block node named no-such-node" in bad.error and "\n" not in bad.error
    assert_alive(qp)


# ---------------------------------------------------------------- parked coroutines, on a core too


def _parked(d: dict[str, Any], **want: Any) -> list[dict[str, Any]]:
    def match(p: dict[str, Any]) -> bool:
        return all((p.get(k) if k != "owner" else p["owner"].get("name")) == v for k, v in want.items())

    return [p for p in d["parked"] if match(p)]


def _let_go(qp: vm.QemuProcess) -> None:
    """Best effort, idempotent: lift d0's limits, resume blkdebug's A, drain bthr (a reopen)."""
    for step in (lambda: qp.client.cmd("block_set_io_throttle", device="d0", bps=0, bps_rd=0, bps_wr=0, iops=0,
                                       iops_rd=0, iops_wr=0),
                 lambda: hmp(qp, 'qemu-io d2 "resume A"'),
                 lambda: _wait_stderr(qp, "wrote 65536/65536 bytes at offset 1048576", timeout=5),
                 lambda: qp.client.cmd("blockdev-reopen", options=[{"driver": "throttle", "node-name": "bthr",
                                                                    "file": "bfmt", "throttle-group": "tg1"}])):
        try:
            step()
        except Exception:  # the test already failed: keep going, say nothing more
            pass


def test_parked_requests_are_found_named_and_the_same_on_a_core(hang_vm, debug_build, tmp_path):
    qp = hang_vm
    vd0 = "/machine/peripheral/vd0/virtio-backend"
    n0 = qp.stderr_text().count("wrote 65536/65536 bytes at offset 65536")
    for line in ('qemu-io d0 "aio_write 0 64k"', 'qemu-io d0 "aio_write 64k 64k"',  # 2nd waits in tg0
                 f'qemu-io -d {vd0} "aio_write 0 64k"', f'qemu-io -d {vd0} "aio_write 64k 64k"',  # in tg1
                 'qemu-io d2 "break cluster_alloc A"', 'qemu-io d2 "aio_write 0 64k"'):
        assert hmp(qp, line) == ""
    _wait_stderr(qp, "Suspended request 'A'")
    assert hmp(qp, 'qemu-io d2 "aio_write 1M 64k"') == ""  # waits for the qcow2 lock the first one holds
    try:
        core = tmp_path / "qemu.core"
        cmds = ["virtopt waiters --json", "virtopt block --json", "virtopt cpustate --json", "virtopt coroutines --json"]
        attaching = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        with GdbSession(qp.pid) as s:
            live = []
            for c in cmds:
                r = s.run(c)
                assert r.ok, f"{c}: {r.error}"
                live.append(r.data)
                if c == cmds[0]:
                    stopped = (attaching, time.clock_gettime_ns(time.CLOCK_MONOTONIC))
            text = s.run("virtopt waiters").output
            co_text = s.run("virtopt coroutines").output
            live_timers = s.run("virtopt timers --json").data  # just before the dump
            began = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            gen = s.console(f"generate-core-file {core}", timeout=120)
            dump = (began, time.clock_gettime_ns(time.CLOCK_MONOTONIC))
            assert gen.ok, gen.error
        waiters, block, cpus, cos = live
        assert len(cpus["vcpus"]) == 4
        # virtopt inspect (drgn, QEMU keeps running) says the same of this frozen state, JSON for JSON
        cp = virtopt("inspect", str(qp.pid), "block", "--json")
        assert cp.returncode == 0, cp.stderr
        assert _no_snapshot(json.loads(cp.stdout)) == _no_snapshot(block)
        assert _no_snapshot(_drgn_live(qp.pid, "waiters")) == _no_snapshot(waiters)
        # the throttled writes: parked in their group's write queue, before the block layer tracks them
        tg0 = _parked(waiters, owner="d0", field="throttled_reqs[1]")
        assert len(tg0) == 1 and tg0[0]["throttle-group"] == "tg0"
        assert tg0[0]["request"] == {"type": "write", "offset": 65536, "bytes": 65536}
        assert tg0[0]["entry"] == "blk_aio_write_entry"
        tg1 = _parked(waiters, owner="bthr", field="throttled_reqs[1]")
        assert len(tg1) == 1 and tg1[0]["throttle-group"] == "tg1" and tg1[0]["request"]["offset"] == 65536
        # blkdebug holds the first write (with the qcow2 lock); the second waits for that lock
        (held,) = _parked(waiters, **{"waits-on": "blkdebug-break"})
        assert held["tag"] == "A" and held["request"] == {"type": "write", "offset": 0, "bytes": 65536}
        (locked,) = _parked(waiters, structure="BDRVQcow2State", field="lock")
        assert locked["holder"] == held["coroutine"]
        assert locked["request"] == {"type": "write", "offset": 1 << 20, "bytes": 65536}
        (mutex,) = [m for m in waiters["co-mutexes"] if m["structure"] == "BDRVQcow2State"]
        assert mutex["holder"] == held["coroutine"] and mutex["waiters"] == [locked["coroutine"]]
        assert "tag 'A'" in text and "throttle group tg0" in text
        # the coroutines view lists them too, with what each waits on (the throttled write is in no
        # tracked request: before, the view said "no coroutine in flight" for it)
        by_co = {c["address"]: c for c in cos["coroutines"]}
        assert by_co[tg0[0]["coroutine"]]["source"] == by_co[tg0[0]["coroutine"]]["waits-on"] == "throttled-writes:tg0:d0"
        assert by_co[tg1[0]["coroutine"]]["waits-on"] == "throttled-writes:tg1:bthr"
        assert by_co[held["coroutine"]]["waits-on"].startswith("blkdebug-break:A:")
        assert by_co[locked["coroutine"]]["waits-on"].startswith("co-mutex:BDRVQcow2State.lock:")
        assert by_co[tg0[0]["coroutine"]]["entry"] == "blk_aio_write_entry"
        assert "no coroutine in flight" not in co_text and f"{tg0[0]['coroutine']:#x} throttled-writes:tg0:d0" in co_text
        assert "waits on throttled-writes:tg1:bthr" in co_text
        # the block view: in flight at the backend, queued in the group, tracked below the throttle node
        backends = {b["name"] or b["node-name"]: b for b in block["backends"]}
        assert backends["d0"]["in-flight"] >= 1
        (g0,) = [g for g in block["throttle-groups"] if g["name"] == "tg0"]
        assert [q["coroutine"] for q in g0["queued"]] == [tg0[0]["coroutine"]]
        nodes = {n["node-name"]: n for n in block["nodes"]}
        assert [r["coroutine"] for r in nodes["bthr"]["tracked-requests"]] == [tg1[0]["coroutine"]]
        d2 = nodes[backends["d2"]["node-name"]]
        assert sorted(r["offset"] for r in d2["tracked-requests"]) == [0, 1 << 20]

        # QEMU agrees: what was parked completes once let go, and not before (d0: its limits lifted; tg1: a
        # reopen drains bthr, and a drained throttle node lets its queue go; A: resumed)
        assert qp.stderr_text().count("wrote 65536/65536 bytes at offset 65536") == n0  # none of them yet
        assert "wrote 65536/65536 bytes at offset 1048576" not in qp.stderr_text()
        qp.client.cmd("block_set_io_throttle", device="d0", bps=0, bps_rd=0, bps_wr=0, iops=0, iops_rd=0, iops_wr=0)
        assert hmp(qp, 'qemu-io d2 "resume A"') == ""
        _wait_stderr(qp, "wrote 65536/65536 bytes at offset 1048576")  # the lock's waiter, after the holder
        # (10.0 drains every node for a graph change: with A still suspended the reopen would never return)
        qp.client.cmd("blockdev-reopen", options=[{"driver": "throttle", "node-name": "bthr", "file": "bfmt",
                                                   "throttle-group": "tg1"}])

        # the core says what the live process said just before the dump: gdb and drgn alike
        try:
            *on_core, core_timers = _core_json(debug_build, core, [*cmds, "virtopt timers --json"], tmp_path)
            for a, b in zip(live, on_core):
                assert _no_snapshot(a) == _no_snapshot(b)
            assert on_core[0]["snapshot"]["target"] == "core"
            *by_drgn, drgn_timers = _drgn_core(core, debug_build, "waiters", "block", "cpustate", "coroutines",
                                               "timers")
            for a, b in zip(live, by_drgn):
                assert _no_snapshot(a) == _no_snapshot(b)
        finally:
            core.unlink(missing_ok=True)
        # the throttle timers (QEMU_CLOCK_REALTIME) were some seconds ahead when read live, just before the
        # dump: the core counts them from the dump, within the bound it states (gdb and drgn alike)
        for mine in (core_timers, drgn_timers):
            running = check_core_timers(live_timers, mine, stopped, dump)
            ahead = [(a, b) for c, a, b in running if c == "realtime"]
            assert len(ahead) == 2 and all(a > 10**9 for a, _b in ahead), ahead  # tg0's and tg1's
            assert all(abs(a - b) < dump[1] - stopped[0] for a, b in ahead), (ahead, stopped, dump)
        assert drgn_timers["reference"]["kind"] == core_timers["reference"]["kind"]

        deadline = time.monotonic() + 30
        while (qp.stderr_text().count("wrote 65536/65536 bytes at offset 65536") < n0 + 2
               or "wrote 65536/65536 bytes at offset 1048576" not in qp.stderr_text()):
            assert time.monotonic() < deadline, qp.stderr_text()[-1500:]
            time.sleep(0.05)
        after = _drgn_live(qp.pid, "waiters")  # read without stopping QEMU
        assert after["parked"] == [] and after["co-mutexes"] == []
        assert_alive(qp)
    finally:
        _let_go(qp)  # a failure above leaves no parked request to wedge the next tests
        core.unlink(missing_ok=True)


# ---------------------------------------------------------------- guest vCPU state


_HMP_REGS = {
    "rip": r"[RE]IP=([0-9a-f]+)", "cpl": r"CPL=(\d)", "smm": r"SMM=(\d)", "halted": r"HLT=(\d)",
    "cs": r"\nCS =([0-9a-f]{4}) ([0-9a-f]+) ([0-9a-f]{8}) ([0-9a-f]{8})",
    "cr": r"CR0=([0-9a-f]+) CR2=([0-9a-f]+) CR3=([0-9a-f]+) CR4=([0-9a-f]+)", "efer": r"EFER=([0-9a-f]+)",
}


def _info_registers(text: str) -> list[dict[str, Any]]:
    """x86_cpu_dump_state (target/i386/cpu-dump.c) per CPU of `info registers -a`."""
    out = []
    for block in re.split(r"^CPU#\d+\r?$", text, flags=re.M)[1:]:
        m = {k: re.search(p, block) for k, p in _HMP_REGS.items()}
        assert all(m.values()), block
        cs = m["cs"].groups()
        cr = m["cr"].groups()
        out.append({"rip": int(m["rip"].group(1), 16), "cpl": int(m["cpl"].group(1)), "smm": m["smm"].group(1) == "1",
                    "halted": m["halted"].group(1) == "1",
                    "cs": {"selector": int(cs[0], 16), "base": int(cs[1], 16), "limit": int(cs[2], 16),
                           "flags": int(cs[3], 16)},
                    "cr0": int(cr[0], 16), "cr2": int(cr[1], 16), "cr3": int(cr[2], 16), "cr4": int(cr[3], 16),
                    "efer": int(m["efer"].group(1), 16)})
    return out


def test_cpustate_matches_info_registers_and_says_when_kvm_has_not_synced(hang_vm):
    qp = hang_vm
    with GdbSession(qp.pid) as s:
        running = s.run("virtopt cpustate --json").data
    kvm = qp.accel == "kvm"
    assert running["accelerator"] == qp.accel and len(running["vcpus"]) == 4
    for c in running["vcpus"]:
        # KVM: nothing synchronised the registers since the vCPUs started running; TCG: env is the state
        assert c["registers-current"] is (not kvm)
    qp.client.cmd("stop")
    try:
        hmp_regs = _info_registers(hmp(qp, "info registers -a"))  # under KVM this synchronises them
        with GdbSession(qp.pid) as s:
            r = s.run("virtopt cpustate --json")
            one = s.run("virtopt cpustate 2 --json")
            text = s.run("virtopt cpustate").output
            frozen = s.run("virtopt timers --json").data
        frozen_later = _drgn_live(qp.pid, "timers")
    finally:
        resumed = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        qp.client.cmd("cont")
    running_again = _drgn_live(qp.pid, "timers")
    # the stopped VM's virtual clock stands still (timers_state.cpu_clock_offset): every reader, at any
    # moment, gives the same "now" and the same expires-in, exactly; after `cont` it goes on from there
    virt = [{c["clock"]: c for c in d["clocks"]}["virtual"] for d in (frozen, frozen_later, running_again)]
    assert virt[0]["now-from"].startswith("frozen") and virt[0]["error-bound-seconds"] == 0.0
    assert virt[0]["now-ns"] == virt[1]["now-ns"] and virt[0]["timer-lists"] == virt[1]["timer-lists"]
    assert frozen_later["reference"]["monotonic-ns"] > frozen["reference"]["monotonic-ns"]
    assert sum(len(tl["timers"]) for tl in virt[0]["timer-lists"]) >= 3  # the qcow2 nodes' cache-clean timers
    assert virt[2]["now-from"] == "CLOCK_MONOTONIC + timers_state.cpu_clock_offset"
    since = time.clock_gettime_ns(time.CLOCK_MONOTONIC) - resumed
    assert 0 <= virt[2]["now-ns"] - virt[0]["now-ns"] <= since, (virt[0]["now-ns"], virt[2]["now-ns"], since)
    assert r.ok, r.error
    mine = r.data["vcpus"]
    assert [c["cpu-index"] for c in mine] == [0, 1, 2, 3]
    for c, h in zip(mine, hmp_regs):
        assert {k: c[k] for k in h} == h
        assert c["registers-current"] is True and c["vcpu-dirty"] is kvm
    # the firmware: vCPU 0 halted on its hlt at f000:fff1 in real mode; the others wait for a SIPI
    assert mine[0]["mode"] == "real" and mine[0]["cs"]["base"] + mine[0]["rip"] in (0xFFFFFFF1, 0xFFFFFFF2)
    assert mine[0]["halted"] is True
    assert [c["cpu-index"] for c in one.data["vcpus"]] == [2]
    assert "vCPU 0 (thread" in text and "CR0=" in text
    assert_alive(qp)


# ---------------------------------------------------------------- backtraces with coroutines stitched in


def _wait_attached_and_continued(pid: int, gdb: subprocess.Popen, timeout: float = 60) -> None:
    """Until a tracer stopped QEMU (state t) and let it run again (after `continue` inserted the
    breakpoints)."""
    deadline = time.monotonic() + timeout
    stopped = False
    while True:
        st = Path(f"/proc/{pid}/status").read_text()
        traced = int(re.search(r"TracerPid:\s+(\d+)", st).group(1)) != 0
        state = re.search(r"State:\s+(\S)", st).group(1)
        if traced and state == "t":
            stopped = True
        elif stopped and traced:
            return
        assert gdb.poll() is None, gdb.communicate()
        assert time.monotonic() < deadline, st
        time.sleep(0.01)


def test_bt_stitches_the_coroutine_a_thread_runs_to_the_stack_that_entered_it(hang_vm, debug_build, tmp_path):
    """gdb stops QEMU at a breakpoint inside a coroutine (qcow2_co_pwritev_part of a synchronous HMP
    qemu-io write on d3): the thread's own frames end at the coroutine's trampoline, and the view
    continues with the main loop's stack saved when it entered the coroutine (hmp_qemu_io...main)."""
    qp = hang_vm
    core = tmp_path / "bp.core"
    jd = tmp_path / "json"
    jd.mkdir()
    argv = ["gdb", "-q", "-nx", "-batch", "-p", str(qp.pid), "-ex", f"source {PACK}",
            "-ex", f"set virtopt-json-dir {jd}", "-ex", "break qcow2_co_pwritev_part", "-ex", "continue",
            "-ex", "virtopt bt 1 --json", "-ex", "python print('PLAIN-BT')", "-ex", "bt",
            "-ex", f"generate-core-file {core}", "-ex", "delete", "-ex", "detach"]
    qp.client.settimeout(120)  # the HMP write returns when gdb lets QEMU go
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hmp_out: list[Optional[str]] = [None]
    writer = threading.Thread(target=lambda: hmp_out.__setitem__(0, hmp(qp, 'qemu-io d3 "write 0 4k"')))
    try:
        _wait_attached_and_continued(qp.pid, proc)
        writer.start()  # the breakpoint is in: the write stops in its coroutine
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    writer.join(timeout=30)
    lines = out.splitlines()
    assert "Breakpoint 1, qcow2_co_pwritev_part" in out, out[-2000:] + err[-2000:]
    (path,) = [ln[len(JSON_MARKER):].strip() for ln in lines if ln.startswith(JSON_MARKER)]
    live = json.loads(Path(path).read_text())
    (th,) = live["threads"]
    assert th["tid"] == qp.pid
    first, *rest = th["segments"]
    assert first["kind"] == "coroutine" and first["entry"] == "blk_co_pwrite_entry"
    fns = [f["function"] for f in first["frames"]]
    assert fns[0] == "qcow2_co_pwritev_part" and "coroutine_trampoline" in fns
    # gdb's own bt of the same thread shows exactly these frames, and stops where the coroutine began
    plain = [(None if fn == "??" else fn) for pc, fn in re.findall(r"^#\d+\s+(?:(0x[0-9a-f]+) in )?(\S+) ",
                                                                   out.split("PLAIN-BT", 1)[1], re.M)
             if not pc or int(pc, 16)]
    assert plain == fns
    assert len(rest) == 1 and rest[0]["kind"] == "thread"
    callers = [f["function"] for f in rest[0]["frames"]]
    assert callers[0] == "qemu_coroutine_switch"
    assert "blk_pwrite" in callers and "hmp_qemu_io" in callers and callers[-1] in ("_start", "main")
    assert hmp_out[0] == ""
    _wait_stderr(qp, "wrote 4096/4096 bytes at offset 0")
    try:
        (on_core,) = _core_json(debug_build, core, ["virtopt bt 1 --json"], tmp_path)
    finally:
        core.unlink(missing_ok=True)
    # the same stacks from the dump (a dead process has no /proc name: the name is not compared)
    assert [{**t, "name": None} for t in on_core["threads"]] == [{**t, "name": None} for t in live["threads"]]
    assert_alive(qp)


# ---------------------------------------------------------------- the BQL and its waiters


def _exe_base(pid: int) -> int:
    """Where the kernel mapped QEMU's executable (its first, offset-0 mapping)."""
    exe = os.readlink(f"/proc/{pid}/exe")
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[-1] == exe and int(parts[2], 16) == 0:
                return int(parts[0].split("-")[0], 16)
    raise AssertionError(f"{exe} not mapped in {pid}")


def _nm_address(exe: str, name: str) -> Optional[int]:
    out = subprocess.run(["nm", exe], capture_output=True, text=True, check=True).stdout
    m = re.search(rf"^([0-9a-f]+) [bBdD] {name}$", out, re.M)
    return int(m.group(1), 16) if m else None


def _kernel_futex(pid: int, tid: int) -> Optional[int]:
    try:
        fields = Path(f"/proc/{pid}/task/{tid}/syscall").read_text().split()
    except OSError:
        return None
    return int(fields[1], 16) if fields and fields[0] == "202" else None


def test_a_vcpu_blocked_on_the_bql_is_named_with_the_holder(debug_qemu_factory, debug_build, tmp_path):
    """vCPU 0 runs `out 0x80, al` in a loop (a 4-byte firmware): each exit takes the BQL. The main loop
    holds the BQL while HMP runs a synchronous qemu-io write into a throttled drive (blk_pwrite polls in
    aio_poll): vCPU 0 blocks in futex(2) on the BQL, as the kernel shows."""
    fw = firmware(tmp_path / "spin.bin", SPIN_OUT)
    img = make_qcow2(tmp_path / "t.qcow2", size="16M", build=debug_build)
    qp = debug_qemu_factory(name="virtopt-bql", smp=2, drives=[
        f"file={img},if=none,id=t0,format=qcow2,throttling.bps-write={BQL_THROTTLE_BPS}"],
        extra_args=["-bios", str(fw)])
    qp.client = qp.qmp()
    vcpu0 = qp.client.cmd("query-cpus-fast")[0]["thread-id"]
    sym = "bql" if debug_build.series != "7.2" else "qemu_global_mutex"
    bql = _exe_base(qp.pid) + _nm_address(debug_build.system, sym)
    assert hmp(qp, 'qemu-io t0 "write 0 48k"') == ""  # fills the throttle bucket: the next write waits ~3 s
    done: list[str] = []
    qp.client.settimeout(120)  # the call returns when the throttled write is done, gdb's pause included
    bg = threading.Thread(target=lambda: done.append(hmp(qp, 'qemu-io t0 "write 64k 4k"')))
    bg.start()
    try:
        deadline = time.monotonic() + 10
        while _kernel_futex(qp.pid, vcpu0) != bql:
            assert time.monotonic() < deadline, Path(f"/proc/{qp.pid}/task/{vcpu0}/syscall").read_text()
            time.sleep(0.02)
        core = tmp_path / "bql.core"
        with GdbSession(qp.pid) as s:
            r = s.run("virtopt locks --json")
            text = s.run("virtopt locks").output
            bt = s.run(f"virtopt bt {qp.pid} --json").data
            s.console(f"generate-core-file {core}", timeout=120)
        assert r.ok, r.error
        d = r.data
        assert d["bql"]["name"] == sym and d["bql"]["address"] == bql
        assert d["bql"]["holder"] == qp.pid and vcpu0 in d["bql"]["waiters"]
        rows = {t["tid"]: t for t in d["threads"]}
        assert rows[vcpu0]["waits-on"]["object"] == "BQL" and rows[vcpu0]["waits-on"]["holder"] == qp.pid
        assert rows[vcpu0]["waits-on"]["address"] == bql and rows[vcpu0]["label"] == "vCPU 0"
        assert f"waiting: thread {vcpu0} (vCPU 0)" in text
        # AioContext locks: 7.2 has them (hmp_qemu_io took the main loop's), 10.0 has none
        locks = d["aio-context-locks"]
        if debug_build.series == "7.2":
            (main,) = [lk for lk in locks["locks"] if lk["aio-context"]["name"] == "main-loop"]
            assert locks["version-has-them"] and main["holder"] == qp.pid and main["count"] >= 1
        else:
            assert locks == {"version-has-them": False, "locks": []}
            assert "aio_context_acquire was removed" in text
        # why the main loop holds it: the synchronous write, from the main thread's stack
        fns = [f["function"] for seg in bt["threads"][0]["segments"] for f in seg["frames"]]
        assert "hmp_qemu_io" in fns and "aio_poll" in fns
        try:
            (on_core,) = _core_json(debug_build, core, ["virtopt locks --json"], tmp_path)
            (by_drgn,) = _drgn_core(core, debug_build, "locks")  # registers from the core's NT_PRSTATUS notes
        finally:
            core.unlink(missing_ok=True)
        assert on_core["bql"] == d["bql"] and on_core["aio-context-locks"] == d["aio-context-locks"]
        key = ("tid", "syscall", "state", "waits-on")
        assert [[t[k] for k in key] for t in on_core["threads"]] == [[t[k] for k in key] for t in d["threads"]]
        # drgn on the same core tells what each thread waits on as gdb does (the vCPU on the BQL included)
        assert by_drgn["bql"] == on_core["bql"] and by_drgn["aio-context-locks"] == on_core["aio-context-locks"]
        assert [[t[k] for k in key] for t in by_drgn["threads"]] == [[t[k] for k in key] for t in on_core["threads"]]
        assert not any("registers" in lim for lim in by_drgn["snapshot"]["limits"]), by_drgn["snapshot"]["limits"]
    finally:
        bg.join(timeout=120)
    assert done == [""]
    _wait_stderr(qp, "wrote 4096/4096 bytes at offset 65536")
    assert_alive(qp)


def test_views_refuse_in_one_line_where_they_cannot_work(hang_vm):
    """drgn on a live QEMU cannot see registers: bt says so and names the gdb command; locks still
    names the futexes from /proc (the kernel's view); block works without stopping QEMU."""
    from qemu_ext.introspect import views
    from qemu_ext.introspect.drgn_backend import DrgnTarget
    from qemu_ext.introspect.target import NotAvailable

    qp = hang_vm
    t = DrgnTarget.attach(qp.pid)
    with pytest.raises(NotAvailable) as exc:
        views.run(t, "bt")
    assert "virtopt gdb PID -c 'bt all'" in str(exc.value) and "\n" not in str(exc.value)
    cp = virtopt("inspect", str(qp.pid), "bt")
    assert cp.returncode == 2 and cp.stderr == f"virtopt: {exc.value}\n" and not cp.stdout
    blk = views.run(t, "block")
    assert blk["snapshot"]["process-stopped"] is False and len(blk["nodes"]) == 11
    lk = views.run(t, "locks")
    states = {r["tid"]: r["state"] for r in lk["threads"]}
    assert states[qp.pid] != "unknown"
    assert_alive(qp)


def test_without_debug_info_locks_and_bt_work_and_the_rest_refuse(qemu_factory, tmp_path):
    """Debian's QEMU (no DWARF): thread states come from registers and backtraces from gdb's CFI
    unwinding, so `locks` and `bt` work; the views that read QEMU's structures refuse in one line."""
    qp = qemu_factory(name="virtopt-stock", extra_args=["-bios", str(firmware(tmp_path / "halt.bin", HALT))])
    qp.client = qp.qmp()
    with GdbSession(qp.pid) as s:
        lk = s.run("virtopt locks --json")
        bt = s.run(f"virtopt bt {qp.pid} --json")
        refused = {v: s.run(f"virtopt {v}") for v in ("block", "waiters", "cpustate")}
    assert lk.ok and bt.ok, (lk.error, bt.error)
    assert lk.data["bql"]["known"] is False
    rows = {r["tid"]: r for r in lk.data["threads"]}
    assert rows[qp.pid]["state"].startswith("waits for events")  # the main loop in ppoll
    fns = [f["function"] for f in bt.data["threads"][0]["segments"][0]["frames"]]
    assert "main" in fns or "_start" in fns or "__libc_start_main" in fns, fns
    for v, r in refused.items():
        assert not r.ok and "needs QEMU's debug info" in r.error and "\n" not in r.error, (v, r.error)
    assert_alive(qp)


def test_tcg_vcpus_halted_wait_on_their_halt_cond_and_state_matches(debug_qemu_factory, tmp_path):
    """Under TCG QEMU's CPUX86State is the state itself (current without any synchronisation), and a
    halted vCPU's thread sleeps in qemu_cond_wait on its CPUState's halt_cond."""
    qp = debug_qemu_factory(name="virtopt-tcg", smp=2, accel="tcg",
                            extra_args=["-bios", str(firmware(tmp_path / "halt.bin", HALT))])
    qp.client = qp.qmp()
    vcpu_tids = {c["thread-id"]: c["cpu-index"] for c in qp.client.cmd("query-cpus-fast")}
    deadline = time.monotonic() + 10
    while "HLT=1" not in hmp(qp, "info registers"):  # vCPU 0 reached its hlt
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with GdbSession(qp.pid) as s:
        running = s.run("virtopt cpustate --json").data
        lk = s.run("virtopt locks --json").data
    assert running["accelerator"] == "tcg"
    assert all(c["registers-current"] for c in running["vcpus"])
    rows = {r["tid"]: r for r in lk["threads"]}
    mttcg = len(vcpu_tids) == 2  # one thread per vCPU; single-threaded TCG runs both on one
    for tid, idx in vcpu_tids.items():
        w = rows[tid]["waits-on"]
        assert w and w["kind"] == "cond", rows[tid]
        assert w["object"] == f"vCPU {idx} halt_cond" if mttcg else re.fullmatch(r"vCPU \d halt_cond", w["object"])
    qp.client.cmd("stop")
    try:
        regs = _info_registers(hmp(qp, "info registers -a"))
        with GdbSession(qp.pid) as s:
            mine = s.run("virtopt cpustate --json").data["vcpus"]
    finally:
        qp.client.cmd("cont")
    for c, h in zip(mine, regs):
        assert {k: c[k] for k in h} == h and c["vcpu-dirty"] is False
    assert mine[0]["halted"] and mine[0]["mode"] == "real" and mine[0]["exception"] is None
    assert_alive(qp)
