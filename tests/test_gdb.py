"""virtopt's gdb pack on live QEMUs: the debug build (DWARF) and Debian's QEMU (symbols only).

Each test attaches one gdb (pygdbmi or batch), runs several commands, detaches, and checks
the answers against QEMU itself: /proc/PID/task, QMP query-cpus-fast, HMP `info mtree`,
QMP trace-event-get-state, the log backend's output, and the -drive options given.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import _require
from gdb_util import (
    PACK,
    assert_alive,
    flat_ranges,
    gdb_json,
    hmp,
    line_counts,
    proc_threads,
    start,
)
from helpers import gdb_batch, make_qcow2

from qemu_ext import vm
from qemu_ext.gdbmi import GdbSession

L2_CACHE = 64 << 10
L2_ENTRY = 4 << 10
REFCOUNT_CACHE = 256 << 10
CLEAN_INTERVAL = 30
DRIVE_OPTS = (f"l2-cache-size={L2_CACHE},l2-cache-entry-size={L2_ENTRY},"
              f"refcount-cache-size={REFCOUNT_CACHE},cache-clean-interval={CLEAN_INTERVAL}")
DEBUG_ONLY = {"mtree", "mtree lookup", "qcow2", "coroutines", "block", "waiters", "cpustate"}
# without DWARF, vcpus works from KVM's own view (kvm_run mappings) and so needs KVM
DEBUG_ONLY_HERE = DEBUG_ONLY if vm.kvm_available() else DEBUG_ONLY | {"vcpus"}
# the views of this pack that work from the symbol table alone (other views may be listed too)
SYMBOL_ONLY = {"threads", "timers", "trace list", "trace enable", "trace disable"} | (
    {"vcpus"} if vm.kvm_available() else set())


def _unavailable(info: dict) -> set:
    """The views of DEBUG_ONLY | SYMBOL_ONLY that info says do not work here."""
    return {n for n, c in info["commands"].items() if not c["available"] and n in DEBUG_ONLY | SYMBOL_ONLY}


@pytest.fixture(scope="module")
def qemus(tmp_path_factory) -> Any:
    """QEMUs shared by this module, started on first use: ("debug", series) is the debug build (2 vCPUs)
    with a 1 GiB qcow2 drive d0 and qcow2_cache_get traced from the start; ("stock", series) the
    distribution's build (no debug info, log trace backend) with a small qcow2 drive d0."""
    started: dict[tuple[str, str], vm.QemuProcess] = {}

    def get(kind: str, series: str) -> vm.QemuProcess:
        if (kind, series) not in started:
            build = _require(series, debug=kind == "debug")
            d = tmp_path_factory.mktemp("gdb")
            if kind == "debug":
                img = make_qcow2(d / "d0.qcow2", size="1G",
                                 io=["write -P 0x11 0 64k", "write -P 0x22 40M 64k", "write -P 0x33 600M 64k"])
                started[kind, series] = start(None, build=build, name="virtopt-gdb", smp=2,
                                              drives=[f"file={img},if=none,id=d0,format=qcow2,{DRIVE_OPTS}"],
                                              extra_args=["-trace", "qcow2_cache_get"])
            else:
                img = make_qcow2(d / "e0.qcow2", size="64M", io=["write -P 0x44 0 64k"])
                started[kind, series] = start(None, build=build, name="virtopt-gdb",
                                              drives=[f"file={img},if=none,id=d0,format=qcow2"])
        return started[kind, series]

    try:
        yield get
    finally:
        for qp in started.values():
            qp.stop()


@pytest.fixture(params=vm.SERIES, ids=lambda s: f"debug{s}")
def dbg(request, qemus) -> vm.QemuProcess:
    return qemus("debug", request.param)


@pytest.fixture(params=vm.SERIES, ids=lambda s: f"stock{s}")
def deb(request, qemus) -> vm.QemuProcess:
    return qemus("stock", request.param)


@pytest.fixture(params=[(k, s) for k in ("debug", "stock") for s in vm.SERIES], ids=lambda p: f"{p[0]}{p[1]}")
def any_qemu(request, qemus) -> vm.QemuProcess:
    return qemus(*request.param)


def _qmp_version(qp: vm.QemuProcess) -> str:
    """QEMU_FULL_VERSION as `qemu --version` prints it, rebuilt from QMP query-version."""
    ver = qp.client.cmd("query-version")
    q, pkg = ver["qemu"], ver["package"].strip()
    return f"{q['major']}.{q['minor']}.{q['micro']}" + (f" ({pkg})" if pkg else "")


def test_pack_loads_beside_qemus_own_scripts_and_info_matches_qmp(dbg):
    cp = gdb_batch(dbg.pid, [f"source {PACK}", "help qemu", "help virtopt", "virtopt info"])
    assert "Traceback" not in cp.stdout + cp.stderr
    assert "qemu mtree" in cp.stdout  # QEMU's scripts/qemu-gdb.py was found through the binary's path
    for cmd in ("virtopt threads", "virtopt mtree", "virtopt trace", "virtopt qcow2", "virtopt coroutines"):
        assert cmd in cp.stdout
    (info,) = gdb_json(dbg.pid, "virtopt info --json")
    assert info["version"] == _qmp_version(dbg)
    assert info["accelerator"] == dbg.accel
    assert info["debug-info"] is True
    assert {"simple", "log"} <= set(info["trace-backends"])
    assert all(info["commands"][n]["available"] for n in DEBUG_ONLY | SYMBOL_ONLY), info["commands"]
    assert_alive(dbg)


def test_symbol_only_paths_on_the_debug_build(dbg):
    """With its DWARF ignored, the debug build behaves like a stripped QEMU: trace still works from the
    symbol table, the DWARF-only commands refuse in one line, and info says so."""
    with GdbSession(dbg.pid) as s:
        s.run("set virtopt-ignore-debug-info on")
        info = s.run("info --json").data
        lst = s.run("trace list 'qcow2_cache_get*' --json")
        vc = s.run("vcpus --json")
        mt = s.run("mtree")
        tm = s.run("timers --json").data
        s.run("set virtopt-ignore-debug-info off")
        tm2 = s.run("timers --json").data
        vc2 = s.run("vcpus --json")
    assert info["debug-info"] is False
    assert _unavailable(info) == DEBUG_ONLY_HERE
    states = {e["name"]: e["state"] for e in lst.data["events"]}
    assert states == _qmp_state(dbg, "qcow2_cache_get*")
    assert not mt.ok and "needs QEMU's debug info" in mt.error and "\n" not in mt.error
    # timers: the hand-cast 7.2 layouts walk exactly what the DWARF walk finds
    assert (tm["source"], tm2["source"]) == ("symbols", "debug-info")
    assert _strip_now(tm["clocks"]) == _strip_now(tm2["clocks"])
    # and the virtual clock's "now" from the hand-made TimersState layout is DWARF's, to the ns
    assert _virtual_offset(tm) == _virtual_offset(tm2)
    if dbg.accel == "kvm":  # same stopped process, two ways: KVM's kvm_run pages agree with CPUState's
        assert vc.data["source"] == "kvm" and vc2.data["source"] == "CPUState"
        key = ("cpu-index", "thread-id", "kvm-fd", "kvm-exit-reason")
        assert [[v[k] for k in key] for v in vc.data["vcpus"]] == [[v[k] for k in key] for v in vc2.data["vcpus"]]


def test_info_on_debian_qemu_says_what_works_without_debug_info(deb):
    (info,) = gdb_json(deb.pid, "info --json")
    assert info["version"] == _qmp_version(deb)
    assert info["debug-info"] is False and info["accelerator"] == deb.accel
    assert info["trace-backends"] == ["log"]
    nm = subprocess.run(["nm", "-D", "--defined-only", deb.build.system],
                        capture_output=True, text=True, check=True).stdout
    assert info["trace-events"] == len(re.findall(r" _TRACE_\w+_DSTATE$", nm, re.M))
    assert _unavailable(info) == DEBUG_ONLY_HERE
    assert_alive(deb)


SMOKE = ["info", "threads", "vcpus", "mtree", "mtree --flat", "mtree lookup 0xfee00000", "timers",
         "trace list 'qcow2_cache_*'", "qcow2", "qcow2 d0 --slices", "coroutines", "coroutines --pools"]


def test_smoke_every_command_in_both_qemus(any_qemu):
    debug = any_qemu.build.debug
    with GdbSession(any_qemu.pid) as s:
        for cmd in SMOKE:
            for variant in (cmd, cmd + " --json"):
                r = s.run(variant)
                assert "Traceback" not in r.output and "Traceback" not in (r.error or "")
                base = "mtree lookup" if cmd.startswith("mtree lookup") else cmd.split()[0]
                if debug or base not in DEBUG_ONLY_HERE:
                    assert r.ok, f"{variant}: {r.error}"
                    assert r.output.strip()
                    if variant.endswith("--json"):
                        assert r.data is not None, variant
                else:
                    assert not r.ok and "\n" not in r.error.strip()
                    assert "needs QEMU's debug info" in r.error
    assert_alive(any_qemu)


def test_threads_match_proc_and_query_cpus_fast(any_qemu):
    with GdbSession(any_qemu.pid) as s:
        data = s.run("threads --json").data
        truth = proc_threads(any_qemu.pid)  # read while gdb holds QEMU stopped: no thread comes or goes
    mine = {t["tid"]: t for t in data["threads"]}
    assert set(mine) == set(truth)
    for tid, comm in truth.items():
        assert mine[tid]["name"] == comm
    assert mine[any_qemu.pid]["role"] == "main-loop"
    cpus = any_qemu.client.cmd("query-cpus-fast")
    assert cpus
    for cpu in cpus:
        t = mine[cpu["thread-id"]]
        assert t["role"] == "vcpu" and t["vcpu-index"] == cpu["cpu-index"]
        assert t["label"] == f"vCPU {cpu['cpu-index']}"
    vcpu_tids = {t["tid"] for t in data["threads"] if t["role"] == "vcpu"}
    assert vcpu_tids == {c["thread-id"] for c in cpus}
    mon = [t for t in data["threads"] if t["name"] == "IO mon_iothread"]
    assert mon and mon[0]["role"] == "monitor-iothread"  # qemu_ext.host.roles, as `virtopt threads` says
    for t in data["threads"]:  # CONTRIBUTING's thread shape, the same keys in every thread view
        assert list(t)[:9] == ["tid", "name", "role", "vcpu-index", "iothread-id", "label", "last-cpu", "affinity",
                               "identified-by"]
    bql = data["bql"]
    assert bql["known"] == any_qemu.build.debug
    assert bql["holder"] is None or bql["holder"] in truth
    assert_alive(any_qemu)


def test_vcpus_without_debug_info_match_query_cpus_fast(deb):
    if deb.accel != "kvm":
        pytest.skip("no KVM here: without debug info vcpus reads KVM's kvm_run pages")
    (data,) = gdb_json(deb.pid, "vcpus --json")
    cpus = deb.client.cmd("query-cpus-fast")
    assert data["source"] == "kvm"
    assert [(v["cpu-index"], v["thread-id"]) for v in data["vcpus"]] == [
        (c["cpu-index"], c["thread-id"]) for c in cpus]
    names = {int(ln.split(":")[-1]): ln for ln in _vcpu_fd_links(deb.pid)}
    for v in data["vcpus"]:
        assert v["kvm-exit-reason-name"] and not v["kvm-exit-reason-name"].startswith("#")
        assert names[v["cpu-index"]] == f"anon_inode:kvm-vcpu:{v['cpu-index']}"
        assert v["halted"] is None  # not guessed without CPUState
    assert_alive(deb)


def _vcpu_fd_links(pid: int) -> list[str]:
    out = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = str(fd.readlink())
        except OSError:
            continue
        if link.startswith("anon_inode:kvm-vcpu:"):
            out.append(link)
    return out


def test_vcpus_match_query_cpus_fast(dbg):
    (data,) = gdb_json(dbg.pid, "vcpus --json")
    cpus = dbg.client.cmd("query-cpus-fast")
    assert [(v["cpu-index"], v["thread-id"]) for v in data["vcpus"]] == [
        (c["cpu-index"], c["thread-id"]) for c in cpus]
    assert len(data["vcpus"]) == 2
    for v in data["vcpus"]:
        assert v["created"] and not v["stopped"]
        if dbg.accel == "kvm":
            assert v["kvm-exit-reason-name"] is not None and not v["kvm-exit-reason-name"].startswith("#")
            assert v["kvm-fd"] > 0
    status = dbg.client.cmd("query-status")
    assert status["running"] is True
    assert_alive(dbg)


def test_mtree_matches_info_mtree_and_lookup_matches_flat_view(dbg):
    hmp_tree, hmp_disabled, hmp_flat = hmp(dbg, "info mtree"), hmp(dbg, "info mtree -D"), hmp(dbg, "info mtree -f")
    flat_mem = flat_ranges(hmp_flat, "memory")
    flat_io = flat_ranges(hmp_flat, "I/O")
    assert flat_mem and flat_io
    probes = []
    for start_, end, _kind, _name in flat_mem:
        probes += [start_, end, (start_ + end) // 2]
    hole = next(e + 1 for (_s, e, _k, _n), (s2, _e2, _k2, _n2) in zip(flat_mem, flat_mem[1:]) if s2 > e + 1)
    with GdbSession(dbg.pid) as s:
        tree, tree_d, flat = (s.run(c) for c in ("mtree", "mtree --disabled", "mtree --flat"))
        lookups = [s.run(f"mtree lookup {a:#x} --json").data for a in probes]
        io = s.run(f"mtree lookup {flat_io[0][0]:#x} --as I/O --json").data
        unassigned = s.run(f"mtree lookup {hole:#x} --json").data
        bad = s.run("mtree NO-SUCH-AS")
    assert line_counts(tree.output) == line_counts(hmp_tree)
    assert line_counts(tree_d.output) == line_counts(hmp_disabled)
    assert line_counts(flat.output) == line_counts(hmp_flat)
    by_addr = {}
    for start_, end, kind, name in flat_mem:
        for a in (start_, end, (start_ + end) // 2):
            by_addr[a] = (name, kind, start_, end)
    for a, got in zip(probes, lookups):
        name, kind, start_, end = by_addr[a]
        assert got["found"] and got["region"] == name and got["kind"] == kind
        assert (got["range-start"], got["range-end"]) == (start_, end)
    assert io["found"] and io["region"] == flat_io[0][3]
    assert unassigned["found"] is False
    assert not bad.ok and "no address space named" in bad.error
    assert_alive(dbg)


def _log_lines(qp: vm.QemuProcess, event: str) -> list[str]:
    return [ln for ln in qp.stderr_text().splitlines() if re.search(rf"\b{event} ", ln)]


def _qmp_state(qp: vm.QemuProcess, name: str) -> dict[str, str]:
    return {e["name"]: e["state"] for e in qp.client.cmd("trace-event-get-state", name=name)}


def test_trace_toggle_from_gdb_agrees_with_qmp_and_log_backend_prints(any_qemu):
    qp = any_qemu
    assert _qmp_state(qp, "blk_co_p*") == {"blk_co_preadv": "disabled", "blk_co_pwritev": "disabled"}
    before = len(_log_lines(qp, "blk_co_preadv"))
    (on,) = gdb_json(qp.pid, "trace enable blk_co_preadv --json")
    assert on["changed"] == ["blk_co_preadv"]
    assert on["enabled-count"] == on["enabled-count-before"] + 1
    assert _qmp_state(qp, "blk_co_p*") == {"blk_co_preadv": "enabled", "blk_co_pwritev": "disabled"}
    hmp(qp, 'qemu-io d0 "read 0 4k"')
    lines = _log_lines(qp, "blk_co_preadv")[before:]
    assert len(lines) == 1 and re.search(r"offset 0 bytes 4096 ", lines[0]), lines

    # QMP -> gdb: the state QMP sets is what gdb lists
    qp.client.cmd("trace-event-set-state", name="blk_co_pwritev", enable=True)
    lst, off = gdb_json(qp.pid, "trace list 'blk_co_p*' --json", "trace disable 'blk_co_p*' --json")
    assert {e["name"]: e["state"] for e in lst["events"]} == {"blk_co_preadv": "enabled",
                                                              "blk_co_pwritev": "enabled"}
    assert sorted(off["changed"]) == ["blk_co_preadv", "blk_co_pwritev"]
    assert off["enabled-count"] == lst["enabled-count"] - 2
    assert _qmp_state(qp, "blk_co_p*") == {"blk_co_preadv": "disabled", "blk_co_pwritev": "disabled"}
    hmp(qp, 'qemu-io d0 "read 4k 4k"')
    assert len(_log_lines(qp, "blk_co_preadv")) == before + 1  # disabled again: nothing more printed
    with GdbSession(qp.pid) as s:
        nomatch = s.run("trace enable no_such_event_xyz")
    assert not nomatch.ok and "no trace event matches" in nomatch.error
    assert_alive(qp)


def _cache_get_offsets(qp: vm.QemuProcess, l2: bool) -> set[int]:
    pat = re.compile(rf"qcow2_cache_get co 0x[0-9a-f]+ is_l2_cache {int(l2)} offset (0x[0-9a-f]+)")
    return {int(m.group(1), 16) for m in map(pat.search, qp.stderr_text().splitlines()) if m}


def test_qcow2_caches_match_drive_options_and_qemus_trace(dbg):
    for off in ("0", "40M", "600M", "600M"):
        hmp(dbg, f'qemu-io d0 "read {off} 4k"')
    data, = gdb_json(dbg.pid, "qcow2 d0 --json")
    (node,) = data["nodes"]
    assert node["device"] == "d0" and node["virtual-size"] == 1 << 30
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", node["filename"]],
                                     capture_output=True, text=True, check=True).stdout)
    assert node["cluster-size"] == info["cluster-size"]
    assert node["cache-clean-interval"] == CLEAN_INTERVAL
    l2, rc = node["l2-cache"], node["refcount-cache"]
    assert l2["entries"] == L2_CACHE // L2_ENTRY and l2["entry-size"] == L2_ENTRY
    assert rc["entries"] == REFCOUNT_CACHE // info["cluster-size"] and rc["entry-size"] == info["cluster-size"]
    assert l2["l2-entry-size"] == 8 and node["l2-slice-size"] == L2_ENTRY // 8
    assert l2["covers-per-entry"] == node["l2-slice-size"] * info["cluster-size"]
    # every L2 slice QEMU looked up (trace) is cached: the cache is big enough that nothing was evicted
    cached = {s["offset"] for s in l2["slices"]}
    assert cached == _cache_get_offsets(dbg, l2=True) and len(cached) >= 3
    assert l2["entries-in-use"] == len(cached) and l2["dirty-entries"] == 0
    assert {s["offset"] for s in rc["slices"]} == _cache_get_offsets(dbg, l2=False)
    assert l2["lru-counter"] >= len(cached)
    with GdbSession(dbg.pid) as s:
        by_node = s.run(f"qcow2 {node['node-name']} --json").data
        missing = s.run("qcow2 no-such-node")
    assert by_node["nodes"][0]["l2-cache"]["slices"] == l2["slices"]
    assert not missing.ok and "no qcow2 node named" in missing.error
    assert_alive(dbg)


def test_coroutines_found_and_backtraced_without_calls(dbg):
    hmp(dbg, 'qemu-io d0 "read 1M 4k"')
    last = [ln for ln in dbg.stderr_text().splitlines() if "qcow2_cache_get co " in ln][-1]
    co = int(re.search(r"co (0x[0-9a-f]+)", last).group(1), 16)  # the coroutine QEMU itself reported
    with GdbSession(dbg.pid) as s:
        listing = s.run("coroutines --pools --json").data
        bt = s.run(f"coroutines --bt {co:#x} --json").data
    found = {c["address"]: c for c in listing["coroutines"]}
    assert co in found
    assert found[co]["source"].endswith("pool") and found[co]["entry"]
    frames = [f["function"] for f in bt["backtrace"]["frames"]]
    assert frames[0] == "qemu_coroutine_switch" and "coroutine_trampoline" in frames
    # registers were put back: QEMU still serves I/O through the same coroutine machinery
    n = len(dbg.stderr_text().splitlines())
    hmp(dbg, 'qemu-io d0 "read 2M 4k"')
    assert any("qcow2_cache_get co " in ln for ln in dbg.stderr_text().splitlines()[n:])
    assert_alive(dbg)


def _strip_now(clocks: list) -> list:
    """Timer data without the fields computed from the reader's own moment ("now")."""
    drop = ("now-ns", "error-bound-seconds")
    return [{**{k: v for k, v in c.items() if k not in drop},
             "timer-lists": [{**tl, "timers": [{k: v for k, v in t.items() if k != "expires-in-ns"}
                                               for t in tl["timers"]]} for tl in c["timer-lists"]]}
            for c in clocks]


def _virtual_offset(timers: dict) -> int:
    """timers_state.cpu_clock_offset as the view used it: virtual now less the reference's monotonic now."""
    virt = {c["clock"]: c for c in timers["clocks"]}["virtual"]
    assert virt["now-from"] == "CLOCK_MONOTONIC + timers_state.cpu_clock_offset", virt["now-from"]
    return virt["now-ns"] - timers["reference"]["monotonic-ns"]


def test_timers_list_the_qcow2_cache_clean_timer(any_qemu):
    """A qcow2 node arms a QEMU_CLOCK_VIRTUAL timer (SCALE_MS) at now + cache-clean-interval:
    30 s as given to the debug QEMU's -drive, QEMU's default 600 s on Debian's."""
    debug = any_qemu.build.debug
    interval = CLEAN_INTERVAL if debug else 600
    (data,) = gdb_json(any_qemu.pid, "timers --json")
    assert data["source"] == ("debug-info" if debug else "symbols")
    clocks = {c["clock"]: c for c in data["clocks"]}
    assert list(clocks) == ["realtime", "virtual", "host", "virtual_rt"]
    virt = [t for tl in clocks["virtual"]["timer-lists"] for t in tl["timers"] if t["scale"] == 1000000]
    assert len(virt) == 1
    if debug:
        assert virt[0]["cb"] == "cache_clean_timer_cb"
    # expire_time is in ns of the virtual clock, which starts near 0 with the VM
    assert interval * 10**9 <= virt[0]["expire-time"] < (interval + 3600) * 10**9
    for c in data["clocks"]:
        assert c["enabled"] and sum(tl["owner"] == "main-loop" for tl in c["timer-lists"]) == 1
    assert_alive(any_qemu)


def test_non_qemu_process_gives_one_line_error(tmp_path: Path):
    cp = subprocess.run(["gdb", "-q", "-nx", "-batch", "-ex", f"source {PACK}", "-ex", "virtopt threads"],
                        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert cp.stderr.strip() == "virtopt threads: no process: attach to a running QEMU first (gdb -p PID)"
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        cp = gdb_batch(sleeper.pid, [f"source {PACK}", "virtopt threads", "virtopt trace list"])
        errs = [ln for ln in cp.stderr.splitlines() if "virtopt" in ln]
        assert len(errs) == 2 and all(e.endswith(f"process {sleeper.pid} is not QEMU (sleep, /usr/bin/sleep)")
                                      for e in errs), errs
        assert "Traceback" not in cp.stdout + cp.stderr
        assert sleeper.poll() is None  # gdb detached, sleep still runs
    finally:
        sleeper.kill()
        sleeper.wait()


def test_in_flight_coroutine_found_and_backtraced_then_completes(debug_qemu_factory, image_factory):
    """A read suspended by blkdebug is a yielded coroutine: found via tracked_requests, unwound, resumed."""
    img = image_factory("bk.qcow2", size="16M", io=["write -P 0x55 0 64k"])
    qp = debug_qemu_factory(name="virtopt-co", drives=[
        f"if=none,id=d1,driver=qcow2,file.driver=blkdebug,file.image.filename={img}"])
    qp.client = qp.qmp()
    hmp(qp, 'qemu-io d1 "break read_aio A"')
    hmp(qp, 'qemu-io d1 "aio_read -P 0x55 0 4k"')
    deadline = time.monotonic() + 10
    while "Suspended request 'A'" not in qp.stderr_text():
        assert time.monotonic() < deadline, qp.stderr_text()
        time.sleep(0.05)
    with GdbSession(qp.pid) as s:
        listing = s.run("coroutines --json").data
        inflight = [c for c in listing["coroutines"] if c["source"].startswith("tracked-request:")]
        assert len(inflight) == 1
        bt = s.run(f"coroutines --bt {inflight[0]['address']:#x} --json").data
    frames = [f["function"] for f in bt["backtrace"]["frames"]]
    # blkdebug_debug_event (7.2) became the coroutine_fn blkdebug_co_debug_event (10.0)
    assert frames[:2] == ["qemu_coroutine_switch", "qemu_coroutine_yield"]
    assert frames[2] in ("blkdebug_debug_event", "blkdebug_co_debug_event")
    assert "qcow2_co_preadv_part" in frames and "coroutine_trampoline" in frames
    # the coroutine's registers were only borrowed: resuming completes the read with the right data
    hmp(qp, 'qemu-io d1 "resume A"')
    while "read 4096/4096 bytes at offset 0" not in qp.stderr_text():
        assert time.monotonic() < deadline + 10, qp.stderr_text()
        time.sleep(0.05)
    assert "Pattern verification failed" not in qp.stderr_text()
    assert qp.client.cmd("query-status")["running"] is True


def test_vcpu_threads_found_without_names_or_debug_info(qemu_factory):
    """debug-threads=off and no DWARF: vCPU threads are still found, from ioctl(KVM_RUN) on kvm-vcpu:N fds."""
    if not vm.kvm_available():
        pytest.skip("/dev/kvm does not open here: the KVM_RUN ioctl heuristic needs KVM")
    qp = qemu_factory(name="virtopt-nonames", smp=2, extra_args=["-name", "virtopt-nonames,debug-threads=off"])
    qp.client = qp.qmp()
    cpus = {c["thread-id"]: c["cpu-index"] for c in qp.client.cmd("query-cpus-fast")}
    assert set(proc_threads(qp.pid).values()) <= {"qemu-system-x86", "kvm-nx-lpage-re"}  # really unnamed
    found: dict[int, int] = {}
    for _ in range(8):  # a vCPU caught in userspace (handling an exit) is not in KVM_RUN: look again
        (data,) = gdb_json(qp.pid, "threads --json")
        for t in data["threads"]:
            if t["role"] == "vcpu":
                assert t["identified-by"] == "kvm-vcpu-fd"
                found[t["tid"]] = t["vcpu-index"]
        if set(found) == set(cpus):
            break
        time.sleep(0.3)
    assert found == cpus
    for _ in range(8):
        (vc,) = gdb_json(qp.pid, "vcpus --json")
        if all(v["thread-id"] for v in vc["vcpus"]):
            break
        time.sleep(0.3)
    assert {v["thread-id"]: v["cpu-index"] for v in vc["vcpus"]} == cpus
    assert_alive(qp)


def test_pack_installed_in_a_virtualenv_finds_its_site_packages(deb, tmp_path: Path):
    """A copy of the pack under <venv>/share/virtopt/gdb, sourced from elsewhere by a gdb whose Python
    is the system's: it finds qemu_ext only through the venv's site-packages."""
    import shutil
    import sys

    venv = tmp_path / "venv"
    site = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    site.mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (site / "qemu_ext").symlink_to(PACK.parent.parent / "qemu_ext")
    dest = venv / "share" / "virtopt" / "gdb"
    shutil.copytree(PACK.parent, dest, ignore=shutil.ignore_patterns("__pycache__"))
    cp = subprocess.run(["gdb", "-q", "-nx", "-batch", "-p", str(deb.pid), "-ex", f"source {dest / PACK.name}",
                         "-ex", "python import qemu_ext; print('QEMU_EXT', qemu_ext.__file__)",
                         "-ex", "virtopt info"], capture_output=True, text=True, timeout=60, cwd="/")
    assert "did not load" not in cp.stderr and "Traceback" not in cp.stderr, cp.stderr
    assert f"QEMU_EXT {site / 'qemu_ext' / '__init__.py'}" in cp.stdout
    assert "trace backends: log" in cp.stdout
    assert_alive(deb)


def test_trace_names_are_qemus_own_spelling(deb):
    """Every event name the pack lists is one QMP knows (13 have upper case: scsi_disk_dma_command_READ),
    and a mixed-case event toggles by its real name."""
    with GdbSession(deb.pid) as s:  # QEMU is stopped while gdb is attached: QMP only after
        listed = {e["name"] for e in s.run("trace list --json").data["events"]}
        on = s.run("trace enable scsi_disk_dma_command_READ --json")
    state = _qmp_state(deb, "scsi_disk_dma_command_READ")
    with GdbSession(deb.pid) as s:
        off = s.run("trace disable scsi_disk_dma_command_READ --json")
    assert listed == {e["name"] for e in deb.client.cmd("trace-event-get-state", name="*")}
    assert any(n != n.lower() for n in listed)
    assert on.ok and on.data["changed"] == ["scsi_disk_dma_command_READ"], on.error
    assert state == {"scsi_disk_dma_command_READ": "enabled"}
    assert off.ok and _qmp_state(deb, "scsi_disk_dma_command_READ") == {"scsi_disk_dma_command_READ": "disabled"}
    assert_alive(deb)
