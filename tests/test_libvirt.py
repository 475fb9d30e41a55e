"""libvirt-managed QEMUs, on a real libvirtd (Debian 12's libvirt 9.0, started by the tests) running real
KVM domains (Debian's QEMU 7.2, the one Debian's libvirt drives): the domain behind a name, threads with
libvirt's pinning, the monitor through libvirt (QMP, HMP, events, the taint it causes), node names,
the domain log as the log trace backend's output, doctor's XML checks and the <metadata_cache> advice
round-tripped through a domain restart. Ground truth: virsh, /proc, QEMU's command line and answers."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from helpers import virtopt

from qemu_ext.host import procfs
from qemu_ext.l2cache import options
from qemu_ext.libvirt import cache, domain, nodes
from qemu_ext.libvirt import xml as lvxml
from qemu_ext.libvirt.monitor import DomainMonitor
from qemu_ext.qmp.errors import QmpCommandError

URI = "qemu:///system"


def virsh(*args: str) -> str:
    return subprocess.run(["virsh", "-q", "-c", URI, *args], capture_output=True, text=True, check=True,
                          timeout=60).stdout


def monitor_json(name: str, cmd: str) -> object:
    """What virsh qemu-monitor-command answers (the tool users fall back to)."""
    return json.loads(virsh("qemu-monitor-command", name, json.dumps({"execute": cmd})))["return"]


def one_line(cp: subprocess.CompletedProcess) -> str:
    assert cp.stderr.count("\n") == 1 and cp.stderr.startswith("virtopt: "), cp.stderr
    return cp.stderr.strip()


@pytest.fixture(scope="module")
def dom(module_libvirt_domain_factory):
    """2 vCPUs (vCPU 0 pinned to the last CPU), an iothread, the emulator pinned to CPU 0, a 64 MiB qcow2
    vda. Module-wide: the monitor tests taint it (custom-monitor) after the threads tests read it."""
    last = max(os.sched_getaffinity(0))
    return module_libvirt_domain_factory(
        "main", vcpus=2, iothreads=1, cputune=f"<vcpupin vcpu='0' cpuset='{last}'/><emulatorpin cpuset='0'/>",
        disk_io=["write -P 0x5a 0 64k"])


def tainted(d) -> bool:
    return any("custom monitor" in m for m in d.dom.messages(0))


def test_threads_of_a_domain_show_libvirts_pinning_beside_the_real_one(dom):
    """`threads --domain`: vCPU TIDs from libvirt's record (no monitor command: the domain stays untainted),
    libvirt's pinning beside the affinity /proc shows."""
    for args in (["--domain", dom.name], [f"libvirt:{dom.name}"], [f"qemu+libvirt:///system?domain={dom.name}"]):
        cp = virtopt("threads", *args, "--output=json")
        assert cp.returncode == 0, cp.stderr
        data = json.loads(cp.stdout)
        assert data["pid"] == dom.pid == int(open(f"/run/libvirt/qemu/{dom.name}.pid").read())
        by_role = {(t["role"], t["vcpu-index"] if t["role"] == "vcpu" else t["iothread-id"]): t for t in data["threads"]}
        for t in data["threads"]:
            assert t["affinity"] == procfs.format_cpu_list(os.sched_getaffinity(t["tid"]))
        last = max(os.sched_getaffinity(0))
        assert by_role[("vcpu", 0)]["libvirt-pinning"] == str(last) == by_role[("vcpu", 0)]["affinity"]
        assert by_role[("vcpu", 0)]["identified-by"] == "libvirt"
        assert by_role[("main-loop", None)]["libvirt-pinning"] == "0"  # <emulatorpin cpuset='0'/>
        assert ("iothread", "iothread1") in by_role
    assert not tainted(dom)  # nothing went through the monitor
    # the vCPU TIDs are QEMU's own (query-cpus-fast through virsh: this taints, so it runs last)
    vcpus = monitor_json(dom.name, "query-cpus-fast")
    assert {(t["vcpu-index"], t["tid"]) for t in data["threads"] if t["role"] == "vcpu"} == {
        (c["cpu-index"], c["thread-id"]) for c in vcpus}
    human = virtopt("threads", "--domain", dom.name).stdout
    assert "LIBVIRT PINNING" in human and f"(domain {dom.name})" in human


def test_pinning_a_domain_says_libvirt_does_not_know(dom):
    cpu = min(os.sched_getaffinity(0))
    cp = virtopt("threads", "--domain", dom.name, "--pin", f"vcpu1={cpu}")
    assert cp.returncode == 0, cp.stderr
    assert "libvirt does not know of this change" in cp.stdout and f"virsh edit {dom.name}" in cp.stdout
    tid = next(t for t in (json.loads(virtopt("threads", "--domain", dom.name, "--output=json").stdout))["threads"]
               if t["role"] == "vcpu" and t["vcpu-index"] == 1)
    assert tid["affinity"] == str(cpu)


def test_monitor_through_libvirt_qmp_hmp_events_and_the_taint(libvirt_domain_factory):
    d = libvirt_domain_factory("mon")
    notes: list[str] = []
    m = DomainMonitor(d.name, on_notice=notes.append)
    m.open()
    try:
        assert m.pid == d.pid and m.version["qemu"]["major"] == 7
        assert not tainted(d)
        events: list[dict] = []
        m.subscribe(events.append)
        assert m.execute("query-name") == {"name": d.name}
        assert tainted(d)  # libvirt's own record
        assert len(notes) == 1 and "tainted (custom-monitor) because of query-name" in notes[0]
        assert m.execute("query-status")["status"] == "running"
        assert len(notes) == 1  # said once
        status = m.hmp("info status")
        assert status.strip() == virsh("qemu-monitor-command", "--hmp", d.name, "info status").strip()
        with pytest.raises(QmpCommandError) as exc:
            m.execute("no-such-command")
        assert exc.value.error_class == "CommandNotFound"
        m.execute("stop")
        m.execute("cont")
        deadline = time.monotonic() + 10
        while len(events) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [e["event"] for e in events[:2]] == ["STOP", "RESUME"]
        assert all(e["timestamp"]["seconds"] > 0 for e in events)
        # QEMU gone under us: one meaningful error
        d.dom.destroy()
        with pytest.raises(Exception, match="went away"):
            m.execute("query-status")
    finally:
        m.close()


def test_the_qmp_client_and_the_shell_reach_a_domain(dom):
    """libvirt:NAME and qemu+libvirt:///system?domain=NAME are addresses of the one QMP client (its libvirt
    transport), so the shell and its built-ins work on a domain as on a socket."""
    from qemu_ext.qmp.client import connect_sync

    for addr in (f"libvirt:{dom.name}", f"qemu+libvirt:///system?domain={dom.name}"):
        with connect_sync(addr) as s:
            assert s.pid == dom.pid
            assert s.execute("query-name") == {"name": dom.name}
            assert s.hmp("info status").strip() == "VM status: running"
            assert s.session.transport.log_path() == domain.log_path(dom.name)
            assert s.version_text.startswith("7.2.")
    cp = virtopt("shell", f"libvirt:{dom.name}", "-c", "query-status", "-c", "/threads")
    assert cp.returncode == 0, cp.stderr
    assert '"status": "running"' in cp.stdout and "vCPU 1" in cp.stdout and "main loop" in cp.stdout
    cp = virtopt("shell", "libvirt:virtopt-test-nosuch", "-c", "query-status")
    assert cp.returncode == 1 and "cannot connect to QMP at libvirt:virtopt-test-nosuch: no libvirt domain" in cp.stderr


def test_missing_and_stopped_domains_are_one_line(libvirt_daemon):
    cp = virtopt("threads", "--domain", "virtopt-test-nosuch")
    assert cp.returncode == 1
    assert one_line(cp).startswith("virtopt: no libvirt domain 'virtopt-test-nosuch' at qemu:///system")
    cp = virtopt("doctor", "--domain", "virtopt-test-nosuch", "--interval", "0")
    assert cp.returncode == 1 and "no libvirt domain" in one_line(cp)
    cp = virtopt("threads", "qemu+libvirt:///system")
    assert cp.returncode == 2 and "no domain=NAME" in one_line(cp)


def test_node_names_targets_and_drive_names_name_one_node(dom):
    qb = monitor_json(dom.name, "query-block")
    disks = domain.open_domain_info(dom.name).xml.disks
    node = next(b["inserted"]["node-name"] for b in qb if b.get("inserted"))
    assert node == "libvirt-1-format"  # libvirt's -blockdev naming
    for name in ("vda", "virtio-disk0", "libvirt-1-format", "libvirt-1-storage"):
        n = nodes.resolve_node(name, qb, disks)
        assert n.node_name == node and n.target == "vda" and n.filename == str(dom.image)
    with pytest.raises(Exception, match=r"no block node, drive or disk called 'vdz'.*vda"):
        nodes.resolve_node("vdz", qb, disks)


def test_log_trace_lines_come_from_the_domain_log(dom):
    """QEMU's stderr goes through virtlogd to /var/log/libvirt/qemu/NAME.log: the log trace backend's lines
    are read there from an offset, after an event is enabled and a read runs in QEMU's block layer
    (HMP qemu-io; its own report goes to QEMU's stdout, the same log)."""
    path = domain.log_path(dom.name)
    assert path == domain.open_domain_info(dom.name).log_path and path.exists()
    _, offset = domain.read_log(path, 0)
    m = DomainMonitor(f"libvirt:{dom.name}")
    m.open()
    try:
        m.execute("trace-event-set-state", {"name": "qcow2_cache_get", "enable": True})
        m.hmp('qemu-io libvirt-1-format "read 0 64k"')  # an allocated cluster: its L2 table is looked up
        m.execute("trace-event-set-state", {"name": "qcow2_cache_get", "enable": False})
    finally:
        m.close()
    lines: list[str] = []
    deadline = time.monotonic() + 10
    while not any("qcow2_cache_get " in ln for ln in lines) and time.monotonic() < deadline:
        new, offset = domain.read_log(path, offset)
        lines += new
        time.sleep(0.1)
    got = [ln for ln in lines if "qcow2_cache_get " in ln]
    assert got and all("is_l2_cache" in ln for ln in got), lines
    assert any("read 65536/65536 bytes" in ln for ln in lines)
    assert domain.read_log(path, offset) == ([], offset)  # nothing new: nothing twice


def test_doctor_on_a_domain_checks_its_xml_against_the_host(dom):
    cp = virtopt("doctor", "--domain", dom.name, "--interval", "0", "--output=json")
    assert cp.returncode == 0, cp.stderr
    data = json.loads(cp.stdout)
    assert data["pid"] == dom.pid and data["domain"] == dom.name
    checks = {c["id"]: c for c in data["checks"]}
    last = max(os.sched_getaffinity(0))
    v = checks["libvirt-vcpupin"]
    assert v["found"]["vcpupin"] == {"0": str(last)}
    assert v["verdict"] == "warn" and "vCPU 1 has no <vcpupin>" in " ".join([v["summary"], *v["details"]])
    assert "<vcpupin vcpu='1' cpuset=" in v["fix"] and f"virsh edit {dom.name}" in v["fix"]
    e = checks["libvirt-emulatorpin"]
    assert e["found"]["emulatorpin"] == "0" and "iothread 1 has no <iothreadpin>" in " ".join([e["summary"], *e["details"]])
    assert "<iothreadpin iothread='1' cpuset=" in e["fix"]
    h = checks["libvirt-hugepages"]
    assert h["verdict"] == "warn" and "<hugepages>" in h["fix"] and h["found"]["memory"] == 128 << 20
    assert checks["libvirt-cpu"]["verdict"] == "warn" and "host-passthrough" in checks["libvirt-cpu"]["fix"]
    assert checks["threads"]["verdict"] == "ok"  # the QEMU checks ran on the domain's QEMU too
    human = virtopt("doctor", "--domain", dom.name, "--interval", "0", "--check", "libvirt-vcpupin").stdout
    assert "[WARN] libvirt-vcpupin" in human and "fix: <cputune>" in human


ISOLATED_XML = """<domain type='kvm'><name>tuned</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>
<iothreads>1</iothreads><cputune><vcpupin vcpu='0' cpuset='1'/><emulatorpin cpuset='0'/>
<iothreadpin iothread='1' cpuset='0'/></cputune><memoryBacking><hugepages/></memoryBacking>
<cpu mode='host-passthrough'><topology sockets='1' dies='1' cores='1' threads='1'/></cpu>
<os><type>hvm</type></os><devices/></domain>"""


def test_doctor_domain_checks_on_a_captured_isolated_host(tmp_path):
    """The XML a tuned domain has, on the captured host with CPU 1 isolated (tests/fixtures/host/isolated):
    pinning verdicts ok; huge pages asked for while the host reserves none is bad."""
    import shutil

    from qemu_ext.host.doctor import run_doctor
    from qemu_ext.host.doctor_libvirt import DOMAIN_CHECK_IDS

    root = tmp_path / "isolated"
    shutil.copytree(os.path.join(os.path.dirname(__file__), "fixtures/host/isolated"), root)
    rep = run_doctor(str(root), interval=0, only=DOMAIN_CHECK_IDS, domain=lvxml.parse(ISOLATED_XML))
    verdicts = {c.id: c.verdict for c in rep.checks}
    assert verdicts == {"libvirt-vcpupin": "ok", "libvirt-emulatorpin": "ok", "libvirt-numa": "ok",
                        "libvirt-hugepages": "bad", "libvirt-cpu": "ok"}
    assert "echo 128 > /proc/sys/vm/nr_hugepages" in rep.check("libvirt-hugepages").fix
    # the same domain with its vCPU on the housekeeping CPU and the emulator on the isolated one
    bad = ISOLATED_XML.replace("<vcpupin vcpu='0' cpuset='1'/><emulatorpin cpuset='0'/>",
                               "<vcpupin vcpu='0' cpuset='0'/><emulatorpin cpuset='1'/>")
    rep = run_doctor(str(root), interval=0, only=DOMAIN_CHECK_IDS, domain=lvxml.parse(bad))
    assert rep.check("libvirt-vcpupin").verdict == "warn"
    assert "CPU 0, which is not isolated (1)" in rep.check("libvirt-vcpupin").summary
    assert rep.check("libvirt-vcpupin").fix.startswith("<cputune><vcpupin vcpu='0' cpuset='1'/><emulatorpin cpuset='0'/>")
    assert rep.check("libvirt-emulatorpin").verdict == "warn"


def test_metadata_cache_advice_round_trips_through_a_restart(libvirt_domain_factory):
    """Apply the advised <max_size> to the domain XML, restart the domain: QEMU's command line carries the
    cache-size whose read_cache_sizes() split is the wanted L2 cache (model tested against qemu-io in
    the l2cache tests); a full-coverage wish gives every L2 table plus the wanted refcount cache."""
    import libvirt

    d = libvirt_domain_factory("cache", disk_size="4G", persistent=True)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-U", str(d.image)], capture_output=True,
                                     text=True, check=True).stdout)
    cs, vsize = info["cluster-size"], info["virtual-size"]
    full = options.full_coverage_size(cs, vsize)  # 512 KiB for 4 GiB of 64 KiB clusters
    for wanted_l2, wanted_rc in ((full // 2, None), (full, 1 << 20)):
        adv = cache.metadata_cache_for(wanted_l2, cs, vsize, wanted_rc, target="vda", domain=d.name)
        inactive = d.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)  # the persistent definition
        d.conn.defineXML(lvxml.set_metadata_cache(inactive, "vda", adv.max_size))
        d.restart()
        argv = procfs.process(d.pid).argv
        blockdev = [json.loads(a) for a in argv if a.startswith("{") and '"driver":"qcow2"' in a]
        assert [b.get("cache-size") for b in blockdev] == [adv.max_size]
        split = options.resolve(cs, vsize, cache_size=blockdev[0]["cache-size"])
        assert split.l2_cache_size == wanted_l2
        assert split.refcount_cache_size == (wanted_rc or 4 * cs)
        # and the live XML says what the advice printed
        live = lvxml.parse(d.xml())
        assert live.disks[0].metadata_cache_max_size == adv.max_size
        assert f"<max_size unit='KiB'>{adv.max_size // 1024}</max_size>" in adv.xml
        assert adv.virt_xml.startswith(f"virt-xml {d.name} --edit target=vda --disk driver.metadata_cache.max_size=")
