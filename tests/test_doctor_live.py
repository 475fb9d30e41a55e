"""`virtopt doctor` on the live machine with a real QEMU: the QEMU checks agree with /proc and ps."""

from __future__ import annotations

import json
import os
import subprocess

from helpers import REPO, virtopt

from qemu_ext.host.doctor import CHECK_IDS
from qemu_ext.host.target import qmp_threads


def ps_rss(pid: int) -> int:
    """RSS as procps' ps reports it (kB), in bytes."""
    return int(subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True,
                              check=True).stdout) * 1024


def test_live_doctor_with_qmp(qemu):
    vcpu_tid = qemu.client.cmd("query-cpus-fast")[0]["thread-id"]
    qemu.client.close()  # QMP serves one client at a time: let virtopt in
    ps_before = ps_rss(qemu.pid)
    cp = virtopt("doctor", "--qmp", str(qemu.qmp_path), "--interval", "0.3", "--output=json")
    assert cp.returncode == 0, cp.stderr
    data = json.loads(cp.stdout)
    assert data["pid"] == qemu.pid
    checks = {c["id"]: c for c in data["checks"]}
    assert set(checks) == set(CHECK_IDS)
    # every CPU the kernel has online got a tick rate
    online = open("/sys/devices/system/cpu/online").read().strip()
    from qemu_ext.host.procfs import parse_cpu_list

    assert sorted(map(int, checks["timer-ticks"]["found"]["ticks-per-second"])) == parse_cpu_list(online)
    # thread map: the task list of the process; the vCPU is the one query-cpus-fast names
    th = checks["threads"]["found"]["threads"]
    tasks = {int(x): open(f"/proc/{qemu.pid}/task/{x}/comm").read().strip()
             for x in os.listdir(f"/proc/{qemu.pid}/task")}
    kernel = "kvm-nx-lpage-re"  # KVM's worker in the thread group; the kernel may start it late
    assert sorted(t["tid"] for t in th if t["name"] != kernel) == sorted(t for t, n in tasks.items() if n != kernel)
    assert [t["tid"] for t in th if t["role"] == "vcpu"] == [vcpu_tid]
    # memory: RSS as procps' ps sees it just before and after the doctor ran (a booting guest grows)
    rss = checks["qemu-memory"]["found"]["rss"]
    assert 0.95 * min(ps_before, ps_rss(qemu.pid)) <= rss <= 1.05 * max(ps_before, ps_rss(qemu.pid))
    # KVM: /dev/kvm is there exactly when the doctor says so
    assert checks["kvm"]["found"]["dev-kvm"] == os.path.exists("/dev/kvm")
    # x2apic: the flag as /proc/cpuinfo has it
    assert checks["x2apic"]["found"]["cpuinfo-flag"] == (" x2apic" in open("/proc/cpuinfo").read())
    # nothing crashed: every check has a verdict
    assert {c["verdict"] for c in data["checks"]} <= {"ok", "warn", "bad", "unknown"}


def test_live_pinning_seen_by_doctor(qemu_factory):
    name = f"vt-doctor-{os.getpid()}"
    qp = qemu_factory(name=name)
    vcpu_tid = qmp_threads(str(qp.qmp_path))[1]["query-cpus-fast"][0]["thread-id"]
    cpu = max(os.sched_getaffinity(0))
    cp = virtopt("threads", "--qmp", str(qp.qmp_path), "--pin", f"vcpu0={cpu}")
    assert cp.returncode == 0, cp.stderr
    # the QEMU by its PID and by its -name: the same finding
    for vm in (str(qp.pid), name):
        cp = virtopt("doctor", "--vm", vm, "--interval", "0", "--check", "vcpu-pinning", "--output=json")
        assert cp.returncode == 0, cp.stderr
        data = json.loads(cp.stdout)
        assert data["pid"] == qp.pid
        c = data["checks"][0]
        assert c["found"]["vcpus"] == [{"vcpu-index": 0, "tid": vcpu_tid, "affinity": str(cpu),
                                        "last-cpu": c["found"]["vcpus"][0]["last-cpu"]}]
        assert "1/1 vCPUs pinned" in c["summary"]
    human = virtopt("doctor", "--vm", name, "--interval", "0", "--check", "threads")
    assert f"QEMU pid {qp.pid} (vm {name})" in human.stdout


def test_unprivileged_user_gets_unknowns_not_a_crash():
    """A non-root user (nobody) cannot read everything (other users' /proc files, maybe the kernel log)."""
    cp = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
         os.path.join(REPO, ".venv/bin/python"), "-m", "qemu_ext", "doctor", "--interval", "0.2", "--output=json"],
        capture_output=True, text=True, cwd=REPO, env={"PATH": os.environ["PATH"], "HOME": "/tmp"},
    )
    assert cp.returncode == 0, cp.stderr
    assert "Traceback" not in cp.stderr
    checks = json.loads(cp.stdout)["checks"]
    assert len(checks) == 11
