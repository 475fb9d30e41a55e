"""`virtopt threads` and the thread map on a real QEMU: roles against /proc/PID/task/*/comm and
QMP's query-cpus-fast / query-iothreads, pinning read back from /proc, refusals that change nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import virtopt

from qemu_ext import vm
from qemu_ext.host.threads import pin_threads, query_qmp, thread_map


def comms(pid: int) -> dict[int, str]:
    out = {}
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(t.name)] = (t / "comm").read_text().strip()
        except OSError:
            pass
    return out


KERNEL_WORKER = "kvm-nx-lpage-re"  # KVM's worker in QEMU's thread group; the kernel may start it late


def qemu_named(threads: dict[int, str]) -> dict[int, str]:
    return {tid: n for tid, n in threads.items() if n != KERNEL_WORKER}


def allowed(pid: int, tid: int) -> str:
    for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError("no Cpus_allowed_list")


def affinities(pid: int) -> dict[int, str]:
    return {tid: allowed(pid, tid) for tid in comms(pid)}


@pytest.fixture(scope="module")
def vm2():
    """One QEMU with 2 vCPUs and an iothread for the whole module (pinning tests restore nothing: each
    test sets what it needs). No QMP client stays connected: QEMU's QMP serves one client at a time."""
    qp = vm.start_qemu(name="virtopt-threads", smp=2, extra_args=["-object", "iothread,id=io0"])
    try:
        yield qp
    finally:
        qp.stop()


def test_roles_match_comm_and_query_cpus_fast(qemu):
    vcpus = qemu.client.cmd("query-cpus-fast")
    threads = thread_map(qemu.pid, vcpus, qemu.client.cmd("query-iothreads"))
    names = comms(qemu.pid)
    by_tid = {t.tid: t for t in threads}
    assert set(qemu_named({t.tid: t.name for t in threads})) == set(qemu_named(names))
    for t in threads:
        assert t.name == names.get(t.tid, KERNEL_WORKER)
    for c in vcpus:
        t = by_tid[c["thread-id"]]
        assert (t.role, t.vcpu, t.source) == ("vcpu", c["cpu-index"], "qmp")
        assert t.name == f"CPU {c['cpu-index']}/KVM" or t.name == f"CPU {c['cpu-index']}/TCG"
    assert by_tid[qemu.pid].role == "main loop"
    assert [t.role for t in threads if t.name == "IO mon_iothread"] == ["monitor iothread"]
    # without QMP the names alone give the same vCPUs
    by_name = {t.tid: t for t in thread_map(qemu.pid)}
    assert {tid for tid, t in by_name.items() if t.role == "vcpu"} == {c["thread-id"] for c in vcpus}
    # the affinity is what the kernel says for each thread
    for t in threads:
        assert set(t.affinity) == os.sched_getaffinity(t.tid)


def test_cli_over_qmp_finds_pid_vcpus_and_iothread(vm2):
    cp = virtopt("threads", "--qmp", str(vm2.qmp_path), "--output=json")
    assert cp.returncode == 0, cp.stderr
    data = json.loads(cp.stdout)
    assert data["pid"] == vm2.pid  # from SO_PEERCRED on the QMP socket
    names = comms(vm2.pid)
    assert qemu_named({t["tid"]: t["name"] for t in data["threads"]}) == qemu_named(names)
    q = query_qmp(str(vm2.qmp_path))
    vcpus = q.vcpus
    got = {t["tid"]: t["vcpu"] for t in data["threads"] if t["role"] == "vcpu"}
    assert got == {c["thread-id"]: c["cpu-index"] for c in vcpus}
    io = q.iothreads
    assert [(t["tid"], t["iothread"]) for t in data["threads"] if t["role"] == "iothread"] == [
        (i["thread-id"], i["id"]) for i in io]
    human = virtopt("threads", str(vm2.pid))
    assert human.returncode == 0
    assert "vCPU 1" in human.stdout and "iothread io0" in human.stdout and "main loop" in human.stdout


def test_pin_changes_the_affinity_read_back_from_proc(vm2):
    q = query_qmp(str(vm2.qmp_path))
    v = {c["cpu-index"]: c["thread-id"] for c in q.vcpus}
    io0 = q.iothreads[0]["thread-id"]
    last = max(os.sched_getaffinity(0))
    first = min(os.sched_getaffinity(0))
    cp = virtopt("threads", "--qmp", str(vm2.qmp_path), "--pin", f"vcpu0={last},vcpu1={first},io={first}",
                 "--output=json")
    assert cp.returncode == 0, cp.stderr
    assert allowed(vm2.pid, v[0]) == str(last)
    assert allowed(vm2.pid, v[1]) == str(first)
    assert allowed(vm2.pid, io0) == str(first)
    pinned = {r["tid"]: r["after"] for r in json.loads(cp.stdout)["pinned"]}
    assert pinned == {v[0]: str(last), v[1]: str(first), io0: str(first)}
    # and back to every CPU through the library
    every = sorted(os.sched_getaffinity(0))
    res = pin_threads(vm2.pid, {"vcpus": every}, q.vcpus, q.iothreads)
    assert {r.tid for r in res} == set(v.values())
    assert all(os.sched_getaffinity(tid) == set(every) for tid in v.values())


@pytest.mark.parametrize("plan", ["vcpu0=0,vcpu7=0", "vcpu0=0,bogus=1", "vcpu0=0,vcpu1=4096", "vcpu0=0,io:nosuch=0"])
def test_refused_plans_change_nothing(vm2, plan):
    pin_threads(vm2.pid, {"vcpus": sorted(os.sched_getaffinity(0))})
    before = affinities(vm2.pid)
    cp = virtopt("threads", "--qmp", str(vm2.qmp_path), "--pin", plan)
    assert cp.returncode == 1
    assert cp.stderr.count("\n") == 1 and cp.stderr.startswith("virtopt: ") and "Traceback" not in cp.stderr
    assert affinities(vm2.pid) == before


def test_busy_monitor_is_reported_not_hung(qemu):
    """The qemu fixture keeps its QMP client connected: a second client gets no greeting."""
    cp = virtopt("threads", "--qmp", str(qemu.qmp_path), "--timeout", "1", timeout=60)
    assert cp.returncode == 1
    assert "no answer within" in cp.stderr and "one client at a time" in cp.stderr


def test_dead_socket_and_missing_pid(tmp_path):
    notsock = tmp_path / "qmp.sock"
    notsock.write_text("")
    cp = virtopt("threads", "--qmp", str(notsock))
    assert cp.returncode == 1 and cp.stderr.startswith("virtopt: cannot connect to QMP socket")
    cp = virtopt("threads", "999999999")
    assert cp.returncode == 1 and "no process 999999999" in cp.stderr
    cp = virtopt("threads")
    assert cp.returncode == 2


def test_without_thread_names_qmp_still_finds_the_vcpus(qemu_factory):
    """-name ...,debug-threads=off (QEMU's default): every thread is called qemu-system-x86; only QMP's
    thread-ids tell the vCPUs and iothreads apart."""
    qp = qemu_factory(name="nonames", smp=2, extra_args=["-name", "nonames,debug-threads=off",
                                                        "-object", "iothread,id=io1"])
    kernel = KERNEL_WORKER
    names = comms(qp.pid)
    assert len({n for n in names.values() if n != kernel}) == 1  # QEMU really left its threads unnamed
    plain = thread_map(qp.pid)
    assert {t.role for t in plain if t.name != kernel} == {"main loop", "other"}
    human = virtopt("threads", str(qp.pid))
    assert "debug-threads=on" in human.stdout  # the hint
    q = query_qmp(str(qp.qmp_path))
    roles = {t.tid: t for t in thread_map(qp.pid, q.vcpus, q.iothreads)}
    for c in q.vcpus:
        assert (roles[c["thread-id"]].role, roles[c["thread-id"]].vcpu) == ("vcpu", c["cpu-index"])
    assert roles[q.iothreads[0]["thread-id"]].iothread == "io1"
    # pinning by role works through QMP too
    cpu = min(os.sched_getaffinity(0))
    res = pin_threads(qp.pid, {"vcpu1": [cpu]}, q.vcpus, q.iothreads)
    vcpu1 = next(c["thread-id"] for c in q.vcpus if c["cpu-index"] == 1)
    assert [r.tid for r in res] == [vcpu1] and allowed(qp.pid, vcpu1) == str(cpu)
