"""`virtopt l2cache tune` and the shell's `/trace capture` on a libvirt domain, on a real libvirtd (Debian 12's
libvirt 9.0, started by the conftest fixtures) running a KVM domain (Debian's QEMU 7.2, the one Debian's
libvirt drives) with a metadata-preallocated qcow2 disk whose <metadata_cache> gives a small L2 cache.

I/O: HMP qemu-io reads of allocated clusters through a second libvirt monitor client (a running domain's
disk refuses qemu-io writes: its device does not share write), cycling over HOT L2 slices.
Ground truth: QEMU's own qcow2_cache_get events in the domain log, QEMU's command line after a restart
(/proc/PID/cmdline -blockdev JSON), libvirt's taint record, QEMU's event states through virsh."""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from helpers import make_qcow2, virtopt

from qemu_ext.host import procfs
from qemu_ext.l2cache import options

URI = "qemu:///system"
CLUSTER = 65536
SLICE_SPAN = 32 << 20  # guest bytes one 4 KiB L2 slice maps (512 entries x 64 KiB clusters)
HOT = 24  # slices read in turn: 8 entries (32 KiB) thrash, 24 hold them all
L2_BEFORE = 8 * 4096  # what the domain starts with: <max_size> = L2 + the refcount cache's 4 clusters
MAX_SIZE_BEFORE = L2_BEFORE + 4 * CLUSTER


def example(name: str, *words: str, seconds: str = "2.5") -> list[str]:
    """The --help/README example on the libvirt domain vm1 with these words, as the arguments to run on the
    test's domain: its name, captures of `seconds`; and --baseline 0 on tune (the tracing-cost probe, 400
    monitor round trips, is tested on a socket in test_l2cache_tune.py)."""
    from test_l2cache_examples import examples

    found = [e.split()[1:] for e in examples() if ("vm1 " in e or "libvirt:vm1" in e) and all(w in e.split() for w in words)]
    assert len(found) == 1, (words, found)
    argv = [w.replace("vm1", name) for w in found[0]]
    argv[argv.index("--seconds") + 1] = seconds
    return argv + (["--baseline", "0"] if argv[1] == "tune" else [])


def test_every_domain_example_is_run_here():
    """Each --help/README example on a domain is one that a test below runs (through example())."""
    import re

    from test_l2cache_examples import examples

    calls = [re.findall(r'"([^"]+)"', c) for c in re.findall(r'example\((?:d|small)\.name((?:, "[^"]+")+)',
                                                             Path(__file__).read_text())]
    domain = [e for e in examples() if " vm1 " in e or "libvirt:vm1" in e]
    assert len(domain) == 3
    for e in domain:
        assert any(all(w in e.split() for w in ws) for ws in calls), e


def virsh(*args: str, **kw: Any) -> str:
    return subprocess.run(["virsh", "-q", "-c", URI, *args], capture_output=True, text=True, check=True,
                          timeout=60, **kw).stdout


def events_enabled(name: str) -> set[str]:
    """The qcow2 cache events QEMU has on (asked through virsh, as a user would)."""
    states = json.loads(virsh("qemu-monitor-command", name, json.dumps(
        {"execute": "trace-event-get-state", "arguments": {"name": "qcow2_cache_*"}})))["return"]
    return {e["name"] for e in states if e["state"] == "enabled"}


def tainted(d: Any) -> bool:
    return any("custom monitor" in m for m in d.dom.messages(0))


def qcow2_blockdev(pid: int) -> dict[str, Any]:
    """The qcow2 -blockdev of QEMU's command line (libvirt writes JSON)."""
    found = [json.loads(a) for a in procfs.process(pid).argv if a.startswith("{") and '"driver":"qcow2"' in a]
    assert len(found) == 1, found
    return found[0]


@contextlib.contextmanager
def driving(d: Any, after_taint: bool = False) -> Iterator[list[int]]:
    """Reads cycling over HOT L2 slices of vda (HMP qemu-io on libvirt's node), from this process's own
    libvirt monitor client, until the block ends. ``after_taint``: start only once libvirt marked
    the domain tainted, so that the first monitor command is virtopt's."""
    from qemu_ext.libvirt.monitor import DomainMonitor

    stop = threading.Event()
    done = [0]
    errors: list[BaseException] = []

    def run() -> None:
        try:
            if after_taint:
                deadline = time.monotonic() + 30
                while not tainted(d) and not stop.is_set():
                    assert time.monotonic() < deadline, "virtopt sent no monitor command"
                    time.sleep(0.01)
            m = DomainMonitor(d.name)
            m.open()
            try:
                r = random.Random(5)
                while not stop.is_set():
                    off = (done[0] % HOT) * SLICE_SPAN + r.randrange(0, SLICE_SPAN // 4096) * 4096
                    text = m.hmp(f'qemu-io libvirt-1-format "read {off} 4k"')  # its report goes to the log
                    assert "rror" not in text, text
                    done[0] += 1
            finally:
                m.close()
        except BaseException as exc:  # reported in the test's thread
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield done
    finally:
        stop.set()
        t.join(30)
    if errors:
        raise errors[0]


@pytest.fixture
def tuned(libvirt_domain_factory, tmp_path):
    """A persistent domain (it is restarted) with a 16 GiB metadata-preallocated vda and an L2 cache of 8
    entries of 4 KiB from <metadata_cache><max_size>."""
    img = make_qcow2(tmp_path / "big.qcow2", size="16G", options={"preallocation": "metadata"})
    return libvirt_domain_factory("l2tune", image=img, persistent=True, metadata_cache=MAX_SIZE_BEFORE)


def editor(tmp_path: Path, snippet: str) -> dict[str, str]:
    """An $EDITOR for `virsh edit` that puts the printed <metadata_cache> into vda's <driver>, as a user
    following the printed line would."""
    script = tmp_path / "edit.py"
    script.write_text(f"""import sys, xml.etree.ElementTree as ET
path = sys.argv[1]
root = ET.parse(path).getroot()
disk = next(d for d in root.iter("disk") if d.find("target").get("dev") == "vda")
drv = disk.find("driver")
for old in drv.findall("metadata_cache"):
    drv.remove(old)
drv.append(ET.fromstring({snippet!r}))
ET.ElementTree(root).write(path)
""")
    return {**os.environ, "EDITOR": f"{sys.executable} {script}", "VISUAL": f"{sys.executable} {script}"}


def test_tune_apply_on_a_domain_and_its_xml_advice_round_trips(tuned, tmp_path):
    """--apply reopens libvirt's node live with the cache-size the printed XML holds (its other options
    kept) and says it is live only; the XML put in with the printed `virsh edit` line survives a restart:
    QEMU's command line then carries that cache-size, split into the recommended L2 cache, and a second
    tune measures the warm hit ratio the first one predicted."""
    d = tuned
    argv_before = qcow2_blockdev(d.pid)
    assert argv_before["cache-size"] == MAX_SIZE_BEFORE and not tainted(d)
    with driving(d, after_taint=True) as done:
        cp = virtopt(*example(d.name, "--domain", "--apply"))
    assert cp.returncode == 0, cp.stderr + cp.stdout
    assert done[0] > 2 * HOT
    r = json.loads(cp.stdout)
    from test_l2cache_cli import kebab_only

    assert kebab_only(r) == []
    n = r["node"]
    assert n["node-name"] == "libvirt-1-format" and n["settings-source"] == "command line"
    assert n["l2-cache-size"] == L2_BEFORE and n["l2-cache-entry-size"] == 4096
    b = r["before"]
    assert b["lookups"] > HOT and b["warm-hit-ratio"] < 0.1  # 8 entries for 24 slices in turn
    assert r["prediction-exact"] is True
    rec = r["recommended"]
    # what libvirt can keep: 4 KiB entries (cache-size alone, below full coverage), every hot slice held
    assert rec["l2-cache-entry-size"] == 4096 and rec["entries"] == HOT and rec["warm-hit-ratio"] == 1.0
    assert r["recommended-l2-cache-size"] == rec["l2-cache-size"] == HOT * 4096
    lv = rec["libvirt"]
    assert rec["cache-size"] == lv["max-size"] == HOT * 4096 + 4 * CLUSTER
    assert lv["xml"] == f"<metadata_cache><max_size unit='KiB'>{lv['max-size'] // 1024}</max_size></metadata_cache>"
    assert lv["virsh"].startswith(f"virsh edit {d.name} ") and "<target dev='vda'/>" in lv["virsh"]
    assert lv["virt-xml"].startswith(f"virt-xml {d.name} --edit target=vda --disk driver.metadata_cache.max_size=")
    # applied live through libvirt's monitor: libvirt's node, its options as on the command line, cache-size swapped
    a = r["applied"]
    assert a["done"] is True and a["options"] == {**argv_before, "cache-size": lv["max-size"]}
    assert (a["l2-cache-size"], a["l2-cache-entry-size"]) == (HOT * 4096, 4096)
    af = r["after"]
    assert af["lookups"] > HOT and af["warm-hit-ratio"] == af["predicted-warm-hit-ratio"] == 1.0
    assert af["prediction-exact"] is True
    dom = r["libvirt"]
    assert dom["domain"] == d.name and dom["target"] == "vda" and dom["alias"] == "virtio-disk0"
    assert dom["trace-read-from"] == f"/var/log/libvirt/qemu/{d.name}.log" and dom["live-only"] is True
    assert dom["metadata-cache-max-size"] == MAX_SIZE_BEFORE
    assert tainted(d) and len(dom["tainted-by-virtopt"]) == 1
    assert "tainted (custom-monitor) because of query-named-block-nodes" in dom["tainted-by-virtopt"][0]
    assert r["events-left-enabled"] == [] and not events_enabled(d.name)

    # the printed virsh edit line, then a restart: QEMU's command line has the advised cache-size
    virsh("edit", d.name, env=editor(tmp_path, lv["xml"]))
    d.restart()
    bd = qcow2_blockdev(d.pid)
    assert bd == {**argv_before, "cache-size": lv["max-size"]}
    split = options.resolve(CLUSTER, 16 << 30, cache_size=bd["cache-size"])  # read_cache_sizes, checked vs qemu-io
    assert (split.l2_cache_size, split.l2_cache_entry_size, split.l2_cache_entries) == (HOT * 4096, 4096, HOT)

    # a second tune, by the address form and the device's name: QEMU now does what was predicted
    assert not tainted(d)  # a new QEMU
    with driving(d, after_taint=True):
        cp = virtopt(*example(d.name, "virtio-disk0"))
    assert cp.returncode == 0, cp.stderr
    out = cp.stdout
    assert f"l2-cache-size {HOT * 4} KiB in {HOT} entries of 4 KiB [command line]" in out
    before = next(ln for ln in out.splitlines() if ln.startswith("before ("))
    assert before.endswith("warm 100.0%")  # the predicted warm hit ratio, measured by QEMU
    assert "equal: the simulator reproduces QEMU" in out
    assert "note: the current setting is already the recommended one" in out
    assert f"libvirt domain {d.name} (qemu:///system), disk vda (virtio-disk0) = node libvirt-1-format; trace lines " \
           f"read from the domain's log /var/log/libvirt/qemu/{d.name}.log" in out
    assert f"domain {d.name}, disk vda: {lv['xml']}" in out and lv["virsh"] in out
    assert "tainted (custom-monitor)" in out  # libvirt marked the new QEMU again, and virtopt says so
    assert not events_enabled(d.name)


@pytest.fixture(scope="module")
def small(module_libvirt_domain_factory, tmp_path_factory):
    img = make_qcow2(tmp_path_factory.mktemp("l2lv") / "small.qcow2", size="2G", options={"preallocation": "metadata"})
    return module_libvirt_domain_factory("l2small", image=img)  # libvirt's default: no <metadata_cache>


def test_trace_capture_in_the_shell_reads_the_domain_log(small):
    """`/trace capture` through the shell's -c on a libvirt:NAME address: the log backend's lines come from the
    domain's libvirt log, the output says so, and the L2 lookups are replayed for the node `vda` names."""
    d = small
    log = Path(f"/var/log/libvirt/qemu/{d.name}.log")
    start = log.stat().st_size
    with driving(d):
        cp = virtopt("shell", f"libvirt:{d.name}", "--output=json", "-c", "/trace capture qcow2_cache_get* 1.5 --node vda")
    assert cp.returncode == 0, cp.stderr
    res = json.loads(cp.stdout)
    assert res["backend"] == "log" and res["counts"]["qcow2_cache_get"] > HOT
    assert f"read QEMU's log file {log}" in res["notes"]
    sim = res["l2cache"]  # one lookup per qcow2_cache_get, replayed with the node's cache: QEMU's default,
    # every L2 table of 2 GiB (4 of 64 KiB)
    assert sim["node"] == "libvirt-1-format" and sim["observed"]["lookups"] == res["counts"]["qcow2_cache_get"]
    assert (sim["simulated-current"]["l2-cache-entries"], sim["simulated-current"]["l2-cache-entry-size"]) == (4, CLUSTER)
    # every line captured is one QEMU wrote to the domain log during the capture
    captured = Path(res["file"]).read_text().splitlines()
    with open(log, "rb") as f:
        f.seek(start)
        written = set(f.read().decode(errors="replace").splitlines())
    assert len(captured) >= res["total"] and set(captured) <= written
    assert sum("qcow2_cache_get " in ln for ln in captured) == res["counts"]["qcow2_cache_get"]
    os.unlink(res["file"])
    assert not events_enabled(d.name)


def test_every_name_of_a_domain_disk_names_its_node(small):
    """vda, virtio-disk0, libvirt-1-format and libvirt-1-storage are one node wherever a node is asked for;
    a name that is none is one line listing the names there are."""
    cmds = [c for name in ("vda", "virtio-disk0", "libvirt-1-format", "libvirt-1-storage")
            for c in ("-c", f"/l2cache {name}")]
    cp = virtopt("shell", f"libvirt:{small.name}", "--output=json", *cmds)
    assert cp.returncode == 0, cp.stderr
    docs = [json.loads(x) for x in cp.stdout.replace("}]\n[{", "}]\x00[{").split("\x00")]
    assert len(docs) == 4 and all(len(x) == 1 and x[0]["node-name"] == "libvirt-1-format" for x in docs)
    assert all(x[0]["settings-source"] == "command line" for x in docs)
    cp = virtopt("l2cache", "tune", "--domain", small.name, "--node", "vdz", "--seconds", "0.2")
    assert cp.returncode == 1 and len(cp.stderr.splitlines()) == 1, cp.stderr
    assert "no qcow2 node matches 'vdz'; there is: libvirt-1-format = virtio-disk0 = vda" in cp.stderr


def test_tune_needs_one_target():
    for args, what in (([], "give SOCKET"), (["/run/vm.qmp", "--domain", "vm1"], "not both")):
        cp = virtopt("l2cache", "tune", *args, "--node", "vda")
        assert cp.returncode == 2 and what in cp.stderr and len(cp.stderr.splitlines()) == 1, cp.stderr


def test_watch_on_a_domain_at_libvirts_default_keeps_full_coverage(small):
    """recommend --watch --domain: window after window, Ctrl-C prints the final answer with the domain XML
    change. At libvirt's default QEMU covers the disk with 64 KiB entries; a smaller cache would get 4 KiB
    entries through <metadata_cache>, which these lookups cannot evaluate: full coverage stays the advice."""
    import signal

    from helpers import REPO

    with driving(small):
        p = subprocess.Popen([sys.executable, "-m", "qemu_ext", *example(small.name, "--watch", seconds="0.7")],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert p.stdout is not None
            line = p.stdout.readline()
            assert line.startswith("node libvirt-1-format: "), p.stderr.read() if p.stderr else line
            p.send_signal(signal.SIGINT)
            out, err = p.communicate(timeout=30)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert p.returncode == 0, err
    full = options.full_coverage_size(CLUSTER, 2 << 30)
    max_size = (full + 4 * CLUSTER) // 1024
    assert f"libvirt domain {small.name} (qemu:///system), disk vda (virtio-disk0) = node libvirt-1-format" in out
    assert (f"recommended: l2-cache-size {full >> 10} KiB with 64 KiB entries" in out
            and f"domain {small.name}, disk vda: <metadata_cache><max_size unit='KiB'>{max_size}</max_size>" in out), out
    assert "the cache-size libvirt sets gives 4096-byte L2 cache entries, and this capture cannot evaluate those" in out
    assert not events_enabled(small.name)
