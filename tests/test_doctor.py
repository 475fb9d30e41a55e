"""`virtopt doctor` against captured /proc and /sys trees (tests/fixtures/host, see its README).

baseline/ is a real capture of this kind of machine; isolated/, tracing/ and nox2apic/ are edited
copies of it. Expected values are read from the fixture files themselves in each test.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from helpers import REPO, virtopt
from hypothesis import given
from hypothesis import strategies as st

from qemu_ext.host import procfs
from qemu_ext.host.doctor import CHECK_IDS, run_doctor
from qemu_ext.host.threads import thread_map

FIX = REPO / "tests" / "fixtures" / "host"


def scenario(name: str) -> Path:
    return FIX / name


def qemu_pid(root: Path) -> int:
    return int((root / "qemu.pid").read_text())


def qmp_answers(root: Path) -> tuple[list[dict], list[dict]]:
    return (json.loads((root / "qmp/query-cpus-fast.json").read_text()),
            json.loads((root / "qmp/query-iothreads.json").read_text()))


def doctor_json(root: Path, *extra: str, pid: bool = True) -> dict:
    args = ["doctor", "--root", str(root), "--second-sample", str(root / "later"), "--output=json", *extra]
    if pid:
        args += ["--pid", str(qemu_pid(root))]
    cp = virtopt(*args)
    assert cp.returncode == 0, cp.stderr
    assert "Traceback" not in cp.stderr
    return {c["id"]: c for c in json.loads(cp.stdout)["checks"]}


def loc_line(path: Path) -> list[int]:
    for line in path.read_text().splitlines():
        if line.strip().startswith("LOC:"):
            return [int(x) for x in line.split(":", 1)[1].split() if x.isdigit()]
    raise AssertionError("no LOC line")


def copy_scenario(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(scenario(name), dst)
    return dst


def test_baseline_verdicts_match_the_capture():
    root = scenario("baseline")
    checks = doctor_json(root)
    assert set(checks) == set(CHECK_IDS)
    cmdline = (root / "proc/cmdline").read_text().split()
    assert not any(p.startswith(("isolcpus=", "nohz_full=")) for p in cmdline)
    assert checks["cpu-isolation"]["verdict"] == "warn"
    assert "isolcpus=" in checks["cpu-isolation"]["fix"]
    # ticks per second = LOC(later) - LOC(first) over the 1 s interval, per CPU
    first, later = loc_line(root / "proc/interrupts"), loc_line(root / "later/proc/interrupts")
    rates = checks["timer-ticks"]["found"]["ticks-per-second"]
    assert rates == {str(i): float(b - a) for i, (a, b) in enumerate(zip(first, later))}
    assert checks["timer-ticks"]["found"]["hz"] == 250  # CONFIG_HZ of the captured kernel (proc/config.gz)
    # x2apic: flag in cpuinfo and the kernel log's own line
    assert " x2apic " in (root / "proc/cpuinfo").read_text()
    assert checks["x2apic"]["verdict"] == "ok"
    assert any("x2apic" in ln for ln in checks["x2apic"]["found"]["kernel-log"])
    assert checks["tracing"]["verdict"] == "ok"
    assert checks["tracing"]["found"]["current-tracer"] == (root / "sys/kernel/tracing/current_tracer").read_text().strip()
    # KVM modules are the ones under sys/module
    mods = sorted(p.name for p in (root / "sys/module").iterdir())
    assert checks["kvm"]["found"]["modules"] == mods
    assert checks["kvm"]["verdict"] == "ok"
    # IRQ affinity: every IRQ directory with its list
    irqs = {p.parent.name: p.read_text().strip() for p in (root / "proc/irq").glob("*/smp_affinity_list")}
    assert {k: v["affinity"] for k, v in checks["irq-affinity"]["found"]["irqs"].items()} == irqs
    # memory from smaps_rollup: USS = Private_Clean + Private_Dirty
    roll = procfs.kb_fields((root / f"proc/{qemu_pid(root)}/smaps_rollup").read_text())
    mem = checks["qemu-memory"]["found"]
    assert mem["rss"] == roll["Rss"] and mem["pss"] == roll["Pss"]
    assert mem["uss"] == roll["Private_Clean"] + roll["Private_Dirty"]
    assert mem["uss"] <= mem["pss"] <= mem["rss"]
    # cache topology: the L3 of CPU 0 as sysfs says
    l3 = (root / "sys/devices/system/cpu/cpu0/cache/index3")
    c0 = {c["level"]: c for c in checks["cache-topology"]["found"]["cpus"]["0"] if c["type"] != "Instruction"}
    assert c0[3]["size"] == (l3 / "size").read_text().strip()
    assert c0[3]["shared-cpu-list"] == (l3 / "shared_cpu_list").read_text().strip()


KEBAB = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
DATA_KEY = re.compile(r"^[0-9][0-9,/-]*$")  # keys that are data: CPU and IRQ numbers, "package/core", CPU lists


def keys_of(obj: object, where: str = "") -> list[tuple[str, str]]:
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append((k, where))
            out += keys_of(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for v in obj:
            out += keys_of(v, where + "[]")
    return out


@pytest.mark.parametrize("name", ["baseline", "isolated", "tracing"])
def test_json_keys_are_kebab_case(name):
    """CONTRIBUTING.md: every JSON key kebab-case, as qemu-img and QMP write them (kernel and module
    parameter names too: the kernel treats "-" and "_" in them alike)."""
    root = scenario(name)
    cp = virtopt("doctor", "--root", str(root), "--second-sample", str(root / "later"), "--output=json",
                 "--pid", str(qemu_pid(root)))
    data = json.loads(cp.stdout)
    bad = [(k, w) for k, w in keys_of(data) if not KEBAB.match(k) and not DATA_KEY.match(k)]
    assert bad == []
    assert data["interval-seconds"] == 1.0


def test_isolated_scenario():
    root = scenario("isolated")
    checks = doctor_json(root)
    assert checks["cpu-isolation"]["verdict"] == "ok"
    assert checks["cpu-isolation"]["found"]["isolated"] == "1"
    t = checks["timer-ticks"]
    assert t["verdict"] == "ok"
    assert t["found"]["ticks-per-second"] == {"0": 250.0, "1": 1.0}
    assert checks["irq-affinity"]["verdict"] == "ok"
    assert checks["isolated-use"]["verdict"] == "ok"
    # vCPU 0 was pinned to CPU 1 at capture time, vCPU 1 was not: the doctor names vCPU 1
    vp = checks["vcpu-pinning"]
    assert vp["verdict"] == "warn"
    cpus, _ = qmp_answers(root)
    vcpu1 = next(c["thread-id"] for c in cpus if c["cpu-index"] == 1)
    assert any(f"vCPU 1 (TID {vcpu1})" in d for d in vp["details"])
    assert not any("vCPU 0" in d for d in vp["details"])


def test_isolated_cpu_that_still_ticks_is_bad(tmp_path):
    root = copy_scenario("isolated", tmp_path)
    first = loc_line(root / "proc/interrupts")
    text = (root / "later/proc/interrupts").read_text()
    lines = [f"LOC: {first[0] + 250:>10} {first[1] + 250:>10}   Local timer interrupts" if ln.strip().startswith("LOC:")
             else ln for ln in text.splitlines()]
    (root / "later/proc/interrupts").write_text("\n".join(lines) + "\n")
    c = run_doctor(str(root), interval=1.0, second_root=str(root / "later"), only=["timer-ticks"]).check("timer-ticks")
    assert c.verdict == "bad" and "CPU 1 still tick" in c.summary


def test_thread_on_isolated_cpu_is_reported(tmp_path):
    root = copy_scenario("isolated", tmp_path)
    pid = qemu_pid(root)
    stat = root / f"proc/{pid}/task/{pid}/stat"
    head, _, tail = stat.read_text().rpartition(")")
    f = tail.split()
    f[36] = "1"
    stat.write_text(head + ") " + " ".join(f) + "\n")
    c = run_doctor(str(root), pid=pid, interval=0, only=["isolated-use"]).check("isolated-use")
    assert c.verdict == "warn"
    assert [o["tid"] for o in c.found["others"]] == [pid]


def test_tracing_left_on_is_bad_and_says_how_to_turn_it_off():
    root = scenario("tracing")
    cp = virtopt("doctor", "--root", str(root), "--interval", "0", "--check", "tracing")
    assert cp.returncode == 0, cp.stderr
    assert "[BAD ] tracing" in cp.stdout and "function_graph" in cp.stdout
    assert "echo 0 > /sys/kernel/tracing/tracing_on" in cp.stdout
    assert "echo nop > /sys/kernel/tracing/current_tracer" in cp.stdout
    fail = virtopt("doctor", "--root", str(root), "--interval", "0", "--check", "tracing", "--fail-on", "bad")
    assert fail.returncode == 1


def test_trace_events_enabled_is_a_warning(tmp_path):
    root = copy_scenario("baseline", tmp_path)
    (root / "sys/kernel/tracing/set_event").write_text("kvm:kvm_exit\nkvm:kvm_entry\n")
    c = run_doctor(str(root), interval=0, only=["tracing"]).check("tracing")
    assert c.verdict == "warn" and c.found["enabled-event-count"] == 2
    assert "set_event" in c.fix


def test_nox2apic_is_bad():
    checks = doctor_json(scenario("nox2apic"), "--check", "x2apic", pid=False)
    x = checks["x2apic"]
    assert x["verdict"] == "bad" and x["found"]["nox2apic"] is True and x["found"]["cpuinfo-flag"] is False
    assert "nox2apic" in x["fix"]


def test_missing_and_garbled_files_give_unknown_never_a_crash(tmp_path):
    root = copy_scenario("baseline", tmp_path)
    pid = qemu_pid(root)
    (root / "proc/cmdline").unlink()
    shutil.rmtree(root / "sys/kernel/tracing")
    (root / "proc/interrupts").write_text("garbage\x00\xff not interrupts\n")
    (root / f"proc/{pid}/smaps_rollup").unlink()
    (root / f"proc/{pid}/smaps_rollup").mkdir()  # a directory where a file should be
    shutil.rmtree(root / "sys/devices/system/cpu/cpu0/cache")
    cp = virtopt("doctor", "--root", str(root), "--second-sample", str(root / "later"), "--pid", str(pid),
                 "--output=json")
    assert cp.returncode == 0, cp.stderr
    assert cp.stderr == ""
    checks = {c["id"]: c for c in json.loads(cp.stdout)["checks"]}
    for cid in ("cpu-isolation", "tracing", "timer-ticks", "qemu-memory", "cache-topology"):
        assert checks[cid]["verdict"] == "unknown", (cid, checks[cid])
    assert "cmdline" in checks["cpu-isolation"]["summary"]
    assert "mount -t tracefs" in checks["tracing"]["fix"]
    # the rest still ran on what is there
    assert checks["x2apic"]["verdict"] == "ok" and checks["threads"]["verdict"] == "ok"
    assert checks["irq-load"]["verdict"] == "ok"  # /proc/stat is intact


def test_thread_map_from_a_captured_tree():
    root = scenario("baseline")
    pid = qemu_pid(root)
    cpus, ios = qmp_answers(root)
    comm = {int(t.name): (t / "comm").read_text().strip() for t in (root / f"proc/{pid}/task").iterdir()}
    for threads in (thread_map(pid, root=str(root)), thread_map(pid, cpus, ios, root=str(root))):
        assert [t.tid for t in threads] == sorted(comm)
        by_tid = {t.tid: t for t in threads}
        assert {t.name for t in threads} == set(comm.values())
        for c in cpus:
            t = by_tid[c["thread-id"]]
            assert t.role == "vcpu" and t.vcpu_index == c["cpu-index"] and comm[t.tid] == f"CPU {c['cpu-index']}/KVM"
        for io in ios:
            assert by_tid[io["thread-id"]].role == "iothread" and by_tid[io["thread-id"]].iothread_id == io["id"]
        assert by_tid[pid].role == "main-loop"
        mon = [t for t in threads if t.name == "IO mon_iothread"]
        assert len(mon) == 1 and mon[0].role == "monitor-iothread"
        # the one unnamed non-main thread of a debug-threads QEMU is call_rcu (named before -name is parsed)
        unnamed = [t for t in threads if t.tid != pid and t.name == comm[pid]]
        assert [t.role for t in unnamed] == ["call-rcu"] and unnamed[0].identified_by == "inferred"
        # affinity and last CPU are the task's own status/stat
        for t in threads:
            st = procfs.status(pid, t.tid, str(root))
            assert procfs.format_cpu_list(t.affinity) == st["Cpus_allowed_list"]


def test_cli_usage_errors():
    cp = virtopt("doctor", "--root", "/nonexistent-root")
    assert cp.returncode == 2 and cp.stderr.count("\n") == 1 and "not a directory" in cp.stderr
    cp = virtopt("doctor", "--root", str(scenario("baseline")), "--check", "nosuch")
    assert cp.returncode == 2 and "unknown check nosuch" in cp.stderr
    cp = virtopt("doctor", "--help")
    assert cp.returncode == 0 and "examples:" in cp.stdout


@pytest.mark.parametrize("name", ["baseline", "isolated", "tracing", "nox2apic"])
def test_human_output_lists_every_check(name):
    root = scenario(name)
    cp = virtopt("doctor", "--root", str(root), "--second-sample", str(root / "later"), "--pid", str(qemu_pid(root)))
    assert cp.returncode == 0, cp.stderr
    for cid in CHECK_IDS:
        assert f" {cid} " in cp.stdout


def test_isolcpus_with_flags_and_no_sysfs_file(tmp_path):
    """Older kernels have no /sys/devices/system/cpu/isolated: isolcpus= (with its flags) is read instead."""
    root = copy_scenario("baseline", tmp_path)
    cmd = (root / "proc/cmdline").read_text()
    (root / "proc/cmdline").write_text(cmd.replace(" -- ", " isolcpus=nohz,domain,managed_irq,1 -- ", 1))
    (root / "sys/devices/system/cpu/isolated").unlink()
    c = run_doctor(str(root), interval=0, only=["cpu-isolation", "irq-affinity"])
    iso = c.check("cpu-isolation")
    assert iso.found["isolated"] == "1" and iso.verdict == "warn"
    assert "nohz_full=1" in iso.fix  # isolated but still ticking: nohz_full missing
    irq = c.check("irq-affinity")
    # every captured IRQ may go to CPU 1 (their smp_affinity_list is 0-1 in the capture)
    lists = {p.parent.name for p in (root / "proc/irq").glob("*/smp_affinity_list")
             if 1 in procfs.parse_cpu_list(p.read_text())}
    assert set(irq.found["irqs-on-isolated"]) == lists and irq.verdict == "warn"
    assert "smp_affinity_list" in irq.fix


@given(st.sets(st.integers(min_value=0, max_value=300)))
def test_cpu_list_round_trip(cpus):
    text = procfs.format_cpu_list(cpus)
    assert procfs.parse_cpu_list(text) == sorted(cpus)


def test_hostile_tree_is_bounded(tmp_path):
    """A captured tree from elsewhere may hold anything: a gzip bomb as config.gz, an endless CPU mask."""
    import gzip

    root = copy_scenario("baseline", tmp_path)
    (root / "proc/config.gz").write_bytes(gzip.compress(b"\0" * (17 << 20)))
    irq = sorted((root / "proc/irq").glob("*/smp_affinity_list"))[0]
    irq.unlink()
    (irq.parent / "smp_affinity").write_text("f" * 100000 + "\n")
    rep = run_doctor(str(root), interval=1.0, second_root=str(root / "later"),
                     only=["cpu-isolation", "timer-ticks", "irq-affinity"])
    assert rep.check("timer-ticks").found["hz"] is None  # CONFIG_HZ unknown, the rates are still there
    assert rep.check("timer-ticks").verdict == "ok"
    assert rep.check("cpu-isolation").found["config-no-hz-full"] is None
    assert rep.check("irq-affinity").verdict == "unknown" and "too long" in rep.check("irq-affinity").summary


def stat_cpus(path: Path) -> dict[str, list[int]]:
    return {ln.split()[0]: [int(x) for x in ln.split()[1:]] for ln in path.read_text().splitlines()
            if ln.startswith("cpu") and ln.split()[0] != "cpu"}


def test_irq_load_from_proc_stat_deltas(tmp_path):
    """irq+softirq ticks per CPU between the samples, summed up the topology as irqbalance does."""
    root = copy_scenario("baseline", tmp_path)
    later = root / "later/proc/stat"
    lines = []
    for ln in later.read_text().splitlines():
        if ln.startswith("cpu0 "):
            f = ln.split()
            f[6] = str(int(f[6]) + 10)  # irq
            f[7] = str(int(f[7]) + 30)  # softirq
            ln = " ".join(f)
        lines.append(ln)
    later.write_text("\n".join(lines) + "\n")
    c = run_doctor(str(root), interval=1.0, second_root=str(root / "later"), only=["irq-load"]).check("irq-load")
    a, b = stat_cpus(root / "proc/stat"), stat_cpus(later)
    for cpu in a:
        d = [y - x for x, y in zip(a[cpu], b[cpu])]
        got = c.found["cpus"][cpu[3:]]
        assert (got["irq-ticks"], got["softirq-ticks"]) == (d[5], d[6])
        assert got["load"] == round((d[5] + d[6]) / sum(d), 4)
    assert c.found["cpus"]["0"]["share"] == 1.0
    assert c.verdict == "warn" and "CPU0 takes 100%" in c.summary
    total = sum(v["load-ticks"] for v in c.found["cpus"].values())
    assert sum(c.found["packages"].values()) == total == sum(c.found["cache-domains"].values())
    pkg0 = (root / "sys/devices/system/cpu/cpu0/topology/physical_package_id").read_text().strip()
    core0 = (root / "sys/devices/system/cpu/cpu0/topology/core_id").read_text().strip()
    assert c.found["cores"][f"{pkg0}/{core0}"] == 40


def test_vcpus_spanning_cache_domains_and_numa_nodes(tmp_path):
    """Split the captured 2-CPU machine into two L3 domains and two NUMA nodes (edits): vCPU 1, whose
    captured affinity is 0-1, then spans both; vCPU 0 (pinned to CPU 1 at capture) does not."""
    root = copy_scenario("baseline", tmp_path)
    for cpu in (0, 1):
        (root / f"sys/devices/system/cpu/cpu{cpu}/cache/index3/shared_cpu_list").write_text(f"{cpu}\n")
    (root / "sys/devices/system/node/node0/cpulist").write_text("0\n")
    (root / "sys/devices/system/node/node1").mkdir()
    (root / "sys/devices/system/node/node1/cpulist").write_text("1\n")
    rep = run_doctor(str(root), pid=qemu_pid(root), interval=0, only=["cache-topology", "numa"])
    cache, numa = rep.check("cache-topology"), rep.check("numa")
    assert cache.verdict == "warn" and "span 2 L3 domains" in cache.summary
    assert cache.found["last-level-domains"] == ["0", "1"]
    assert numa.verdict == "warn"
    cpus, _ = qmp_answers(root)
    assert numa.found["vcpu-nodes"] == {"0": [1], "1": [0, 1]}
    assert [c["cpu-index"] for c in cpus] == [0, 1]


def test_relative_root_and_a_vm_name_in_a_captured_tree(tmp_path):
    """--root given relative to the working directory; the QEMU named by its -name in the tree's
    proc/PID/cmdline (the capture has no exe links: the command line says it is QEMU); a process of the
    tree that is not QEMU is refused."""
    cp = virtopt("doctor", "--root", "baseline", "--vm", "capture", "--interval", "0", "--check", "threads",
                 "--output=json", cwd=FIX)
    assert cp.returncode == 0, cp.stderr
    data = json.loads(cp.stdout)
    assert data["pid"] == qemu_pid(FIX / "baseline")
    assert data["checks"][0]["verdict"] == "ok" and len(data["checks"][0]["found"]["threads"]) == 7
    root = copy_scenario("baseline", tmp_path)
    (root / "proc/4242").mkdir()
    (root / "proc/4242/comm").write_text("sleep\n")
    (root / "proc/4242/cmdline").write_bytes(b"/usr/bin/sleep\x00300\x00")
    cp = virtopt("doctor", "--root", "baseline", "--vm", "4242", "--interval", "0", cwd=tmp_path)
    assert cp.returncode == 1 and cp.stderr == "virtopt: process 4242 is not QEMU (sleep, /usr/bin/sleep)\n"
