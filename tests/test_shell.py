"""virtopt shell on a real Debian QEMU: -c scripts, QMP/HMP input, built-ins, completion, events.

One QEMU serves the module. It has two QMP monitors: ``qmp.sock`` for the shell under test and
``ctl.sock`` for the test's own client (QEMU serves one client per monitor), which is the ground truth.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest
from helpers import make_qcow2, virtopt
from shell_util import LAUNCHER, Repl, connect_ctl, shell_cmd

from qemu_ext import vm
from qemu_ext.qmp import builtins
from qemu_ext.qmp.client import run_sync
from qemu_ext.qmp.completion import CompletionData, ShellCompleter

N_SLICES = 20  # distinct 4 KiB L2 slices the l2cache test touches (each maps 32 MiB with 64 KiB clusters)


@pytest.fixture(scope="module")
def vmq(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("shellvm")
    img = make_qcow2(d / "disk.qcow2", size="1G", io=["write 0 64k"])
    l2img = make_qcow2(d / "l2.qcow2", size="1G", io=[f"write {i * 32}M 4k" for i in range(N_SLICES)])
    ctl = d / "ctl.sock"
    with socket.socket() as probe:  # a free port for a third monitor, on TCP
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    qp = vm.start_qemu(
        name="virtopt-shell",
        smp=2,
        drives=[f"file={img},if=none,id=drv0,node-name=disk0,l2-cache-size=64k"],
        extra_args=["-qmp", f"unix:{ctl},server=on,wait=off", "-qmp", f"tcp:127.0.0.1:{port},server=on,wait=off",
                    # a device with an id= at an I/O port of our choice, for /mtree lookup
                    "-chardev", "null,id=dbgchr", "-device", "isa-debugcon,iobase=0x402,chardev=dbgchr,id=dbgcon"],
    )
    client = None
    try:
        client = connect_ctl(ctl)
        qp.ctl = client  # type: ignore[attr-defined]
        qp.img = img  # type: ignore[attr-defined]
        qp.l2img = l2img  # type: ignore[attr-defined]
        qp.dir = d  # type: ignore[attr-defined]
        qp.tcp = f"127.0.0.1:{port}"  # type: ignore[attr-defined]
        yield qp
    finally:
        if client is not None:
            client.close()
        qp.stop()


def sh(vmq, *args: str) -> subprocess.CompletedProcess:
    return shell_cmd(str(vmq.qmp_path), *args)


def json_lines(text: str) -> list[Any]:
    return [json.loads(ln) for ln in text.splitlines() if ln.startswith(("{", "["))]


# -- -c scripts, QMP and HMP input ------------------------------------------------------------------


def test_c_lines_print_qemus_replies_and_exit_0(vmq):
    cp = sh(vmq, "-c", "query-version", "-c", "query-status")
    assert cp.returncode == 0, cp.stderr
    replies = json_lines(cp.stdout)
    assert replies[0] == {"return": vmq.ctl.cmd("query-version")}
    assert replies[1] == {"return": vmq.ctl.cmd("query-status")}
    assert "Traceback" not in cp.stderr


def test_c_stops_at_the_first_qmp_error_with_its_class_and_description(vmq):
    truth = vmq.ctl.cmd_obj({"execute": "no-such-command"})["error"]
    try:
        cp = sh(vmq, "-c", "stop", "-c", "no-such-command", "-c", "cont")
        assert cp.returncode == 1
        assert cp.stderr.strip().splitlines() == [f"error: {truth['class']}: {truth['desc']}"]
        # the line after the error did not run: the VM is still paused
        assert vmq.ctl.cmd("query-status")["running"] is False
        # the STOP event QEMU sent is printed like a reply
        assert any(m.get("event") == "STOP" for m in json_lines(cp.stdout))
    finally:
        vmq.ctl.cmd("cont")


def test_same_through_the_virtopt_cli(vmq):
    cp = virtopt("shell", str(vmq.qmp_path), "--history", "", "-c", "query-name")
    assert cp.returncode == 0, cp.stderr
    assert json_lines(cp.stdout) == [{"return": vmq.ctl.cmd("query-name")}]
    assert "examples:" in virtopt("shell", "--help").stdout


def test_launcher_runs_from_the_checkout_without_virtopt_installed(vmq):
    # no site processing (so no editable install of virtopt), only the third-party packages on the path
    env = {"PYTHONPATH": sysconfig.get_paths()["purelib"], "PATH": os.environ.get("PATH", "")}
    probe = subprocess.run([sys.executable, "-S", "-c", "import qemu_ext"], env=env, capture_output=True, cwd="/")
    assert probe.returncode != 0  # virtopt itself is not importable like this
    cp = subprocess.run([sys.executable, "-S", str(LAUNCHER), str(vmq.qmp_path), "--history", "", "-c", "query-name"],
                        env=env, capture_output=True, text=True, cwd="/")
    assert cp.returncode == 0, cp.stderr
    assert json_lines(cp.stdout) == [{"return": vmq.ctl.cmd("query-name")}]


def _raw_qmp_without_oob(address: str, msg: dict) -> dict:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        f = s.makefile("rwb")
        greeting = json.loads(f.readline())
        assert "oob" in greeting["QMP"]["capabilities"]  # offered
        for m in ({"execute": "qmp_capabilities"}, msg):
            f.write(json.dumps(m).encode() + b"\n")
            f.flush()
            reply = json.loads(f.readline())
        return reply


def test_tcp_address_and_oob(vmq):
    cp = sh(vmq, "-c", "query-status")
    cp_tcp = shell_cmd(vmq.tcp, "--history", "", "-c", "query-status", "-c", "/json threads")
    assert cp_tcp.returncode == 0, cp_tcp.stderr
    replies = json_lines(cp_tcp.stdout)
    assert replies[0] == json_lines(cp.stdout)[0]
    # over TCP to this host the shell still finds QEMU's pid: the threads are QEMU's
    assert {t["tid"] for t in replies[1]} <= {int(p.name) for p in Path(f"/proc/{vmq.pid}/task").iterdir()}
    # oob was negotiated: QEMU accepts exec-oob (and migrate-pause then fails for its own reason)
    truth = _raw_qmp_without_oob(vmq.tcp, {"exec-oob": "migrate-pause"})["error"]
    assert "unexpected" in truth["desc"]  # what QEMU says when oob was not enabled
    cp = sh(vmq, "-c", '{"exec-oob": "migrate-pause"}')
    assert cp.returncode == 1 and "postcopy" in cp.stderr and "unexpected" not in cp.stderr


def test_lines_piped_on_stdin_run_like_c(vmq):
    cp = subprocess.run([sys.executable, str(LAUNCHER), str(vmq.qmp_path), "--history", ""],
                        input="query-name\n\n/mtree lookup 0x70\nno-such-command\nquery-status\n",
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 1
    assert json_lines(cp.stdout) == [{"return": vmq.ctl.cmd("query-name")}]  # stopped at the error
    assert "port 0x70 -> rtc" in cp.stdout and "(QEMU)" not in cp.stdout  # no prompt when not a terminal
    assert cp.stderr.strip() == "error: CommandNotFound: The command no-such-command has not been found"


def test_pretty_verbose_and_logfile(vmq, tmp_path: Path):
    log = tmp_path / "shell.log"
    cp = sh(vmq, "-p", "-v", "-l", str(log), "-c", "query-status")
    assert cp.returncode == 0, cp.stderr
    status = vmq.ctl.cmd("query-status")
    # -v echoes the command, -p indents with sorted keys
    assert cp.stdout.startswith(json.dumps({"execute": "query-status", "arguments": {}}, indent=4, sort_keys=True))
    assert json.dumps({"return": status}, indent=4, sort_keys=True) in cp.stdout
    logged = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert {"execute": "query-status", "arguments": {}} in logged
    assert {"return": status} in logged


def test_hmp_mode_prints_hmp_text(vmq):
    cp = sh(vmq, "-H", "-c", "info status", "-c", "info version")
    assert cp.returncode == 0, cp.stderr
    want = (vmq.ctl.cmd("human-monitor-command", **{"command-line": "info status"})
            + vmq.ctl.cmd("human-monitor-command", **{"command-line": "info version"}))
    assert cp.stdout.split() == want.split()


def test_transaction_raw_json_and_dotted_keys_reach_qemu(vmq, tmp_path: Path):
    other = make_qcow2(tmp_path / "other.qcow2", size="16M")
    cp = sh(vmq,
            "-c", "transaction(",
            "-c", "block-dirty-bitmap-add node=disk0 name=b1",
            "-c", "block-dirty-bitmap-add node=disk0 name=b2 persistent=false granularity=131072",
            "-c", ")",
            "-c", f"blockdev-add driver=qcow2 node-name=extra read-only=true file.driver=file file.filename={other}",
            "-c", '{"execute": "block-dirty-bitmap-remove", "arguments": {"node": "disk0", "name": "b1"}}')
    try:
        assert cp.returncode == 0, cp.stderr
        nodes = {n["node-name"]: n for n in vmq.ctl.cmd("query-named-block-nodes")}
        assert nodes["extra"]["file"] == str(other) and nodes["extra"]["ro"] is True
        bitmaps = {b["name"]: b for b in nodes["disk0"].get("dirty-bitmaps", [])}
        assert set(bitmaps) == {"b2"} and bitmaps["b2"]["granularity"] == 131072
    finally:
        vmq.ctl.cmd_obj({"execute": "block-dirty-bitmap-remove", "arguments": {"node": "disk0", "name": "b2"}})
        vmq.ctl.cmd_obj({"execute": "blockdev-del", "arguments": {"node-name": "extra"}})


def test_parse_error_is_one_clear_line(vmq):
    cp = sh(vmq, "-c", "query-status justaword")
    assert cp.returncode == 1
    line, = cp.stderr.strip().splitlines()
    assert "expected a key=value pair, got 'justaword'" in line


# -- built-ins ---------------------------------------------------------------------------------------


def test_trace_list_on_off_follow_qemu(vmq):
    pattern = "qcow2_cache_get*"
    truth = vmq.ctl.cmd("trace-event-get-state", name=pattern)
    cp = sh(vmq, "--output=json", "-c", f"/trace list {pattern}")
    assert cp.returncode == 0, cp.stderr
    got = json.loads(cp.stdout)
    assert sorted((e["name"], e["state"]) for e in got) == sorted((e["name"], e["state"]) for e in truth)
    try:
        cp = sh(vmq, "-c", f"/trace on {pattern}")
        assert cp.returncode == 0, cp.stderr
        now = vmq.ctl.cmd("trace-event-get-state", name=pattern)
        assert {e["state"] for e in now} == {"enabled"}
        for e in now:
            assert re.search(rf"^{e['name']}\s+enabled$", cp.stdout, re.M)
    finally:
        cp = sh(vmq, "-c", f"/trace off {pattern}")
    assert {e["state"] for e in vmq.ctl.cmd("trace-event-get-state", name=pattern)} == {"disabled"}
    cp = sh(vmq, "-c", "/trace on no_such_event_xyz*")
    assert cp.returncode == 1 and "no trace event matches" in cp.stderr


def test_trace_file_on_debian_names_the_log_backend(vmq):
    hmp = vmq.ctl.cmd("human-monitor-command", **{"command-line": "trace-file"})
    assert "unknown command: 'trace-file'" in hmp  # Debian's QEMU: log backend only
    cp = sh(vmq, "-c", "/trace-file on")
    assert cp.returncode == 2
    line, = cp.stderr.strip().splitlines()
    assert "no simple trace backend" in line and "-D" in line


def _mtree_io_lines(text: str) -> list[tuple[int, int, str]]:
    sec = text.split("address-space: I/O", 1)[1].split("address-space:", 1)[0]
    out = []
    for ln in sec.splitlines():
        m = re.match(r"\s*([0-9a-f]+)-([0-9a-f]+) \(prio [-\d]+, [^)]+\): (\S+)", ln)
        if m:
            out.append((int(m[1], 16), int(m[2], 16), m[3]))
    return out


def test_mtree_lookup_names_rtc_for_port_0x70(vmq):
    cp = sh(vmq, "-c", "/mtree lookup 0x70 io")
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.startswith("port 0x70 -> rtc ")
    m = json.loads(sh(vmq, "--output=json", "-c", "/mtree lookup 0x70").stdout)
    text = vmq.ctl.cmd("human-monitor-command", **{"command-line": "info mtree"})
    rtc = [r for r in _mtree_io_lines(text) if r[2] == "rtc"]
    assert rtc and (m["start"], m["end"]) == rtc[0][:2] and rtc[0][0] <= 0x70 <= rtc[0][1]
    assert m["region"] == "rtc" and m["chain"][0] == "io"
    assert m["device_type"] == vmq.ctl.cmd("qom-get", path=m["owner"], property="type")
    # a memory address: the HPET's MMIO window as QEMU's flat view shows it
    flat = vmq.ctl.cmd("human-monitor-command", **{"command-line": "info mtree -f"})
    hp = re.search(r"([0-9a-f]+)-[0-9a-f]+ \(prio [-\d]+, i/o\): hpet", flat)
    assert hp
    m = json.loads(sh(vmq, "--output=json", "-c", f"/mtree lookup 0x{hp[1]} memory").stdout)
    assert m["region"] == "hpet" and m["flat_region"] == "hpet"
    # a device given id= on the command line is named by its id
    m = json.loads(sh(vmq, "--output=json", "-c", "/mtree lookup 0x402").stdout)
    owner = vmq.ctl.cmd("human-monitor-command", **{"command-line": "info mtree -o"})
    assert re.search(r"0000000000000402-0000000000000402 \(prio 0, i/o\): (\S+) owner:\{dev id=dbgcon\}", owner)
    assert m["device_id"] == "dbgcon" and m["device_type"] == "isa-debugcon"
    assert m["device_type"] == vmq.ctl.cmd("qom-get", path="/machine/peripheral/dbgcon", property="type")
    # -nodefaults: no serial port, nothing claims 0x3f8 (QEMU's tree has no region there)
    assert not [r for r in _mtree_io_lines(text)[1:] if r[0] <= 0x3f8 <= r[1]]
    cp = sh(vmq, "-c", "/mtree lookup 0x3f8")
    assert cp.returncode == 0 and "no device claims it" in cp.stdout
    cp = sh(vmq, "-c", "/mtree lookup nonsense")
    assert cp.returncode == 1 and "not an address" in cp.stderr


def test_threads_match_proc_and_query_cpus_fast(vmq):
    cp = sh(vmq, "--output=json", "-c", "/threads")
    assert cp.returncode == 0, cp.stderr
    threads = json.loads(cp.stdout)
    task = Path(f"/proc/{vmq.pid}/task")
    assert {t["tid"] for t in threads} <= {int(p.name) for p in task.iterdir()}
    for t in threads:
        try:
            comm = (task / str(t["tid"]) / "comm").read_text().strip()
        except FileNotFoundError:  # a worker thread that finished meanwhile
            continue
        assert t["name"] == comm
    vcpus = {c["thread-id"]: c["cpu-index"] for c in vmq.ctl.cmd("query-cpus-fast")}
    assert {t["tid"]: t["vcpu"] for t in threads if t["role"] == "vcpu"} == vcpus
    human = sh(vmq, "-c", "/threads").stdout
    for tid, idx in vcpus.items():
        assert re.search(rf"^\s*{tid}\s+CPU {idx}/\S+\s+vCPU {idx}\s", human, re.M)


def test_stats_are_deltas_with_units_from_the_schema(vmq):
    if vmq.accel != "kvm":
        pytest.skip("query-stats needs KVM and /dev/kvm does not open on this host")
    schema = [p for p in vmq.ctl.cmd("query-stats-schemas") if p["target"] == "vcpu"]
    names = {s["name"]: s for p in schema for s in p["stats"]}
    before = vmq.ctl.cmd("query-stats", target="vcpu")
    exits_before = sum(s["value"] for r in before for s in r["stats"] if s["name"] == "exits")
    cp = sh(vmq, "--output=json", "-c", "/stats vcpu --interval 0.3")
    assert cp.returncode == 0, cp.stderr
    rep = json.loads(cp.stdout)
    rows = {r["name"]: r for r in rep["rows"]}
    assert set(rows) == set(names)
    assert rows["exits"]["value"] >= exits_before and rows["exits"]["rate"] is not None
    assert rows["exits"]["rate"] == pytest.approx(rows["exits"]["delta"] / rep["interval"], rel=0.05)
    assert set(rows["exits"]["per_vcpu"]) == {str(c["cpu-index"]) for c in vmq.ctl.cmd("query-cpus-fast")}
    ns = next(n for n, s in names.items() if s.get("unit") == "seconds" and s.get("exponent") == -9
              and s["type"] == "cumulative")
    assert rows[ns]["unit"] == "ns"
    text = sh(vmq, "-c", "/stats vm --watch 0.2 --count 2").stdout
    assert text.count("vm stats over") == 2


def _qemu_io_trace(img: Path, opts: str, cmds: list[str], pattern: str) -> list[str]:
    """Standalone qemu-io with the same cache options: QEMU's own trace lines (ground truth)."""
    argv = ["qemu-io", "-r", "-U", "--image-opts", f"driver=qcow2,file.filename={img},{opts}", "-T", pattern]
    for c in cmds:
        argv += ["-c", c]
    cp = subprocess.run(argv, capture_output=True, text=True, check=True)
    return [ln for ln in cp.stderr.splitlines() if ln.startswith("qcow2_cache_")]


def _l2_misses(lines: list[str]) -> int:
    return sum(1 for ln in lines if ln.startswith("qcow2_cache_get_replace_entry ") and " is_l2_cache 1 " in ln)


def test_l2cache_settings_and_capture_on_the_log_backend(vmq, tmp_path: Path):
    # every slice twice, in a cycle longer than the cache: LRU misses every time, full coverage only once
    cmds = [f"read {i * 32}M 512" for i in range(N_SLICES)] * 2
    cp = sh(vmq, "--output=json",
            "-c", f"blockdev-add driver=qcow2 node-name=l2t read-only=true l2-cache-size=65536 "
                  f"file.driver=file file.filename={vmq.l2img}",
            "-c", "/l2cache l2t", "-c", "/l2cache drv0")
    assert cp.returncode == 0, cp.stderr
    (l2t,), (disk0,) = json_lines(cp.stdout)[1:]
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(vmq.l2img)],
                                     capture_output=True, text=True, check=True).stdout)
    assert (l2t["virtual_size"], l2t["cluster_size"]) == (info["virtual-size"], info["cluster-size"])
    assert l2t["settings_source"] == "blockdev-add options" and disk0["settings_source"] == "command line"
    assert not l2t["full_coverage"] and "l2-cache-size=" in l2t["recommendation"]

    async def io(s):
        for c in cmds:
            await s.hmp(f'qemu-io l2t "{c}"')

    try:
        res = run_sync(str(vmq.qmp_path), builtins.trace_capture, "qcow2_cache_get*", 0, str(tmp_path / "c.log"),
                       during=io, node="l2t", known_options={"l2t": {"l2-cache-size": 65536}})
    finally:
        vmq.ctl.cmd_obj({"execute": "blockdev-del", "arguments": {"node-name": "l2t"}})
    assert res.backend == "log"
    truth = _qemu_io_trace(vmq.l2img, "l2-cache-size=65536", cmds, "qcow2_cache_get*")
    want: dict[str, int] = {}
    for ln in truth:
        want[ln.split()[0]] = want.get(ln.split()[0], 0) + 1
    assert res.counts == want
    # the cache QEMU really built has as many entries as /l2cache says: replace_entry indexes cycle over them
    idx = [int(ln.split()[-1]) for ln in truth if ln.startswith("qcow2_cache_get_replace_entry")
           and " is_l2_cache 1 " in ln]
    assert max(idx) + 1 == l2t["l2_cache_entries"] < N_SLICES
    # the L2-cache simulator replays the captured lookups: same misses as QEMU with this cache, and with the
    # recommended full-coverage size the same misses as QEMU itself opened with that size
    sim = res.l2cache
    assert sim["node"] == "l2t" and sim["observed"]["misses"] == _l2_misses(truth) == len(cmds)
    assert sim["simulated_current"]["misses"] == _l2_misses(truth)
    full = l2t["full_coverage_l2_cache_size"]
    truth_full = _qemu_io_trace(vmq.l2img, f"l2-cache-size={full}", cmds, "qcow2_cache_get*")
    assert sim["simulated_full_coverage"]["misses"] == _l2_misses(truth_full) < sim["simulated_current"]["misses"]


def test_builtin_usage_errors_are_one_line(vmq):
    for line in ["/nosuch", "/trace", "/stats --watch x", "/l2cache a b", "/trace capture x"]:
        cp = sh(vmq, "-c", line)
        assert cp.returncode != 0 and len(cp.stderr.strip().splitlines()) == 1, (line, cp.stderr)
        assert "Traceback" not in cp.stderr


# -- completion ---------------------------------------------------------------------------------------


def _schema(vmq) -> dict[str, dict]:
    return {e["name"]: e for e in vmq.ctl.cmd("query-qmp-schema")}


def _qcow2_members(schema: dict[str, dict]) -> dict[str, str]:
    union = schema[schema["blockdev-add"]["arg-type"]]
    members = {m["name"]: m["type"] for m in union["members"]}
    variant = next(v for v in union["variants"] if v["case"] == "qcow2")
    members.update({m["name"]: m["type"] for m in schema[variant["type"]]["members"]})
    return members


def test_completion_from_the_real_schema(vmq):
    async def load(s):
        d = CompletionData()
        await d.load(s)
        return d

    data = run_sync(str(vmq.qmp_path), load)
    schema = _schema(vmq)
    assert data.complete("query-bl") == sorted(n for n, e in schema.items()
                                               if e["meta-type"] == "command" and n.startswith("query-bl"))
    qcow2 = _qcow2_members(schema)
    assert set(data.complete("blockdev-add driver=qcow2 l2-cache")) == {
        f"{n}=" for n in qcow2 if n.startswith("l2-cache")}
    enum = schema[qcow2["discard"]]
    assert data.complete("blockdev-add driver=qcow2 discard=") == [f"discard={v}" for v in enum["values"]]
    assert data.complete("trace-event-set-state enable=") == ["enable=true", "enable=false"]
    assert "file.filename=" in data.complete("blockdev-add driver=qcow2 file.driver=file file.fi")
    nodes = {n["node-name"] for n in vmq.ctl.cmd("query-named-block-nodes")}
    assert {c.split("=", 1)[1] for c in data.complete("block_resize node-name=")} == nodes
    devices = {b["device"] for b in vmq.ctl.cmd("query-block") if b["device"]}
    assert devices and devices <= {c.split("=", 1)[1] for c in data.complete("block_resize device=")}
    evs = sorted(e["name"] for e in vmq.ctl.cmd("trace-event-get-state", name="qcow2_cache_get_r*"))
    assert data.complete("trace-event-set-state name=qcow2_cache_get_r") == [f"name={e}" for e in evs]
    assert data.complete("/trace on qcow2_cache_get_r") == evs
    assert data.complete("/l2cache ") == ["disk0"]
    # the prompt-toolkit adapter replaces just the word under the cursor
    from prompt_toolkit.completion import CompleteEvent
    from prompt_toolkit.document import Document

    comps = list(ShellCompleter(data).get_completions(Document("query-stats tar"), CompleteEvent()))
    assert [(c.text, c.start_position) for c in comps] == [("target=", -3)]


def test_repl_completes_with_tab_and_prints_events_while_idle(vmq, tmp_path: Path):
    hist = tmp_path / "history"
    r = Repl(str(vmq.qmp_path), history=str(hist))
    try:
        r.wait_line("Connected to QEMU 7.")
        assert "oob enabled" in r.text()  # Debian's QEMU offers oob: the shell enabled it
        r.send("query-hotp\t")
        r.wait_typed("query-hotpluggable-cpus")
        r.send("\n")
        truth = vmq.ctl.cmd("query-hotpluggable-cpus")
        r.wait_for(lambda t: {"return": truth} in json_lines(t))
        # the shell sits at its prompt; QEMU sends events on its own (here caused through the other monitor)
        vmq.ctl.cmd("stop")
        r.wait_for(lambda t: any(m.get("event") == "STOP" for m in json_lines(t)))
        vmq.ctl.cmd("cont")
        r.wait_for(lambda t: any(m.get("event") == "RESUME" for m in json_lines(t)))
        r.send("/mtree lookup 0x70\n")
        r.wait_line("port 0x70 -> rtc")
        r.send("no-such-command\n")
        r.wait_line("error: CommandNotFound: The command no-such-command has not been found")
    finally:
        rc = r.close()
    assert rc == 0
    assert "query-hotpluggable-cpus" in hist.read_text()


def test_capture_reads_the_D_log_file_when_qemu_has_one(qemu_factory, tmp_path: Path):
    log = tmp_path / "qemu.log"
    img = make_qcow2(tmp_path / "d.qcow2", size="64M", io=["write 0 64k"])
    qp = qemu_factory(extra_args=["-D", str(log)],
                      drives=[f"file={img},if=none,id=drv0,node-name=d0"])

    async def io(s):
        await s.hmp('qemu-io d0 "read 0 4k"')

    res = run_sync(str(qp.qmp_path), builtins.trace_capture, "qcow2_cache_get", 0, str(tmp_path / "cap.log"),
                   during=io)
    assert res.backend == "log" and f"read QEMU's log file {log}" in res.notes
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("qcow2_cache_get ")]
    assert res.counts == {"qcow2_cache_get": len(lines)} and lines
    assert (tmp_path / "cap.log").read_text().splitlines() == lines


def test_repl_in_hmp_mode_completes_hmp_commands(vmq):
    r = Repl(str(vmq.qmp_path), hmp=True)
    try:
        r.wait_line("Connected to QEMU 7.")
        assert "(HMP;" in r.text()
        info_help = vmq.ctl.cmd("human-monitor-command", **{"command-line": "help info"})
        subs = {ln.split()[1] for ln in info_help.splitlines() if ln.startswith("info ")}
        r.wait_for(lambda t: bool(r.shell.completion.hmp_info))
        assert set(r.shell.completion.hmp_info) == subs
        r.send("info mtre\t")
        r.wait_typed("info mtree")
        r.send(" -f\n")
        truth = vmq.ctl.cmd("human-monitor-command", **{"command-line": "info mtree -f"})
        first = truth.strip().splitlines()[0].strip()
        r.wait_line(first)
        r.send("/trace list qcow2_cache_get\n")  # built-ins work in HMP mode too
        r.wait_line("qcow2_cache_get  disabled")
    finally:
        assert r.close() == 0
