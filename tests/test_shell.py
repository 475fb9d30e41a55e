"""virtopt shell on real QEMU 7.2 and 10.0: -c scripts, QMP/HMP input, schema checks, built-ins, completion.

One QEMU per series serves the module. It has three QMP monitors: ``qmp.sock`` for the shell under
test, ``ctl.sock`` for the test's own client (QEMU serves one client per monitor; this one is the
ground truth) and a TCP one.
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
from helpers import make_qcow2, qemu_tool, virtopt
from shell_util import LAUNCHER, connect_ctl, hmp, json_lines, run_lines, shell_cmd

from qemu_ext.qmp.builtins import l2cache as l2b
from qemu_ext.qmp.capture import capture
from qemu_ext.qmp.client import connect_sync, run_sync
from qemu_ext.qmp.completion import CompletionData

N_SLICES = 20  # distinct 4 KiB L2 slices the l2cache test touches (each maps 32 MiB with 64 KiB clusters)


@pytest.fixture(scope="module")
def vmq(module_qemu_factory, tmp_path_factory: pytest.TempPathFactory):
    build = module_qemu_factory.build
    d = tmp_path_factory.mktemp("shellvm")
    img = make_qcow2(d / "disk.qcow2", size="1G", io=["write 0 64k"], build=build)
    l2img = make_qcow2(d / "l2.qcow2", size="1G", io=[f"write {i * 32}M 4k" for i in range(N_SLICES)], build=build)
    ctl = d / "ctl.sock"
    with socket.socket() as probe:  # a free port for a third monitor, on TCP
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    qp = module_qemu_factory(
        name="virtopt-shell",
        smp=2,
        drives=[f"file={img},if=none,id=drv0,node-name=disk0,l2-cache-size=64k"],
        extra_args=["-qmp", f"unix:{ctl},server=on,wait=off", "-qmp", f"tcp:127.0.0.1:{port},server=on,wait=off",
                    # a device with an id= at an I/O port of our choice, for /mtree lookup
                    "-chardev", "null,id=dbgchr", "-device", "isa-debugcon,iobase=0x402,chardev=dbgchr,id=dbgcon",
                    # a hot-pluggable device with an id (device_del completion)
                    "-device", "pci-testdev,id=ptest"],
    )
    qp.ctl = connect_ctl(ctl)  # type: ignore[attr-defined]
    qp.img, qp.l2img, qp.dir = img, l2img, d  # type: ignore[attr-defined]
    qp.tcp = f"127.0.0.1:{port}"  # type: ignore[attr-defined]
    qp.addr = str(qp.qmp_path)  # type: ignore[attr-defined]
    yield qp
    qp.ctl.close()


def lines(vmq, *ls: str, **opts: Any) -> tuple[int, str, str]:
    return run_lines(vmq.addr, *ls, **opts)


# -- -c scripts, QMP and HMP input ------------------------------------------------------------------


def test_c_lines_print_qemus_replies_and_exit_0(vmq):
    cp = shell_cmd(vmq.addr, "-c", "query-version", "-c", "query-status")
    assert cp.returncode == 0, cp.stderr
    replies = json_lines(cp.stdout)
    assert replies[0] == {"return": vmq.ctl.cmd("query-version")}
    assert replies[1] == {"return": vmq.ctl.cmd("query-status")}
    assert cp.stderr == ""


def test_c_stops_at_the_first_qmp_error_and_keep_going_runs_on(vmq):
    truth = vmq.ctl.cmd_obj({"execute": "device_del", "arguments": {"id": "nosuch"}})["error"]
    try:
        rc, out, err = lines(vmq, "stop", '{"execute": "device_del", "arguments": {"id": "nosuch"}}', "cont")
        assert rc == 1
        assert err.strip().splitlines() == [f"error: {truth['class']}: {truth['desc']}"]
        assert vmq.ctl.cmd("query-status")["running"] is False  # the line after the error did not run
        assert any(m.get("event") == "STOP" for m in json_lines(out))  # events print like replies
        cp = shell_cmd(vmq.addr, "--keep-going", "-c", "stop", "-c", "no-such-command", "-c", "cont")
        assert cp.returncode == 1  # the first error's code, after every line ran
        assert vmq.ctl.cmd("query-status")["running"] is True
        assert [m for m in json_lines(cp.stdout) if "return" in m] == [{"return": {}}, {"return": {}}]
    finally:
        vmq.ctl.cmd("cont")


def test_launcher_runs_from_the_checkout_without_virtopt_installed(vmq):
    # no site processing (so no editable install of virtopt), only the third-party packages on the path
    env = {"PYTHONPATH": sysconfig.get_paths()["purelib"], "PATH": os.environ.get("PATH", "")}
    probe = subprocess.run([sys.executable, "-S", "-c", "import qemu_ext"], env=env, capture_output=True, cwd="/")
    assert probe.returncode != 0  # virtopt itself is not importable like this
    cp = subprocess.run([sys.executable, "-S", str(LAUNCHER), vmq.addr, "--history", "", "-c", "query-name"],
                        env=env, capture_output=True, text=True, cwd="/")
    assert cp.returncode == 0, cp.stderr
    assert json_lines(cp.stdout) == [{"return": vmq.ctl.cmd("query-name")}]
    assert "examples:" in virtopt("shell", "--help").stdout


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
    rc, out, err = run_lines(vmq.tcp, "query-status", "/json threads")
    assert rc == 0, err
    replies = json_lines(out)
    assert replies[0] == {"return": vmq.ctl.cmd("query-status")}
    # over TCP to this host the shell still finds QEMU's pid: the threads are QEMU's
    assert replies[1]["pid"] == vmq.pid
    assert {t["tid"] for t in replies[1]["threads"]} <= {int(p.name) for p in Path(f"/proc/{vmq.pid}/task").iterdir()}
    # oob was negotiated: QEMU accepts exec-oob (and migrate-pause then fails for its own reason)
    truth = _raw_qmp_without_oob(vmq.tcp, {"exec-oob": "migrate-pause"})["error"]
    assert "unexpected" in truth["desc"]  # what QEMU says when oob was not enabled
    rc, out, err = lines(vmq, '{"exec-oob": "migrate-pause"}')
    assert rc == 1 and "postcopy" in err and "unexpected" not in err


def test_lines_piped_on_stdin_run_like_c(vmq):
    cp = shell_cmd(vmq.addr, input="query-name\n\n/mtree lookup 0x70\nno-such-command\nquery-status\n")
    assert cp.returncode == 1
    assert json_lines(cp.stdout) == [{"return": vmq.ctl.cmd("query-name")}]  # stopped at the error
    assert "port 0x70 -> rtc" in cp.stdout and "(QEMU" not in cp.stdout  # no prompt when not a terminal
    line, = cp.stderr.strip().splitlines()
    assert line.startswith("error: QEMU has no command 'no-such-command'")


def test_pretty_verbose_logfile_and_events_destination(vmq, tmp_path: Path):
    log = tmp_path / "shell.log"
    rc, out, err = lines(vmq, "query-status", pretty=True, verbose=True, logfile=str(log))
    assert rc == 0, err
    status = vmq.ctl.cmd("query-status")
    # -v echoes the command, -p indents with sorted keys
    assert out.startswith(json.dumps({"execute": "query-status", "arguments": {}}, indent=4, sort_keys=True))
    assert json.dumps({"return": status}, indent=4, sort_keys=True) in out
    logged = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert {"execute": "query-status", "arguments": {}} in logged and {"return": status} in logged
    try:
        for where in ("stderr", "off"):
            rc, out, err = lines(vmq, "stop", "cont", events=where)
            assert rc == 0 and json_lines(out) == [{"return": {}}, {"return": {}}]
            evs = [m.get("event") for m in json_lines(err)]
            assert evs == (["STOP", "RESUME"] if where == "stderr" else [])
    finally:
        vmq.ctl.cmd("cont")


def test_hmp_mode_and_hmp_from_qmp_mode(vmq):
    rc, out, err = lines(vmq, "info status", "info version", hmp=True)
    assert rc == 0, err
    want = hmp(vmq.ctl, "info status") + hmp(vmq.ctl, "info version")
    assert out.split() == want.split()
    rc, out, err = lines(vmq, "/hmp info block -n", '/hmp qemu-io drv0 "write -P 0x5a 0 4k"')
    assert rc == 0, err
    assert hmp(vmq.ctl, "info block -n").split() == out.split()
    # the quoted qemu-io command reached QEMU whole: the pattern is in the (allocated) first cluster
    check = qemu_tool(vmq.build, "io", "-U", "-r", "-c", "read -P 0x5a 0 4k", str(vmq.img))
    assert "read 4096/4096 bytes at offset 0" in check.stdout and "verification failed" not in check.stdout


def test_transaction_raw_json_and_dotted_keys_reach_qemu(vmq, tmp_path: Path):
    other = make_qcow2(tmp_path / "other.qcow2", size="16M", build=vmq.build)
    rc, _out, err = lines(
        vmq,
        "transaction(",
        "block-dirty-bitmap-add node=disk0 name=b1",
        "block-dirty-bitmap-add node=disk0 name=b2 persistent=false granularity=131072",
        ")",
        f"blockdev-add driver=qcow2 node-name=extra read-only=true file.driver=file file.filename={other}",
        '{"execute": "block-dirty-bitmap-remove", "arguments": {"node": "disk0", "name": "b1"}}')
    try:
        assert rc == 0, err
        nodes = {n["node-name"]: n for n in vmq.ctl.cmd("query-named-block-nodes")}
        assert nodes["extra"]["file"] == str(other) and nodes["extra"]["ro"] is True
        bitmaps = {b["name"]: b for b in nodes["disk0"].get("dirty-bitmaps", [])}
        assert set(bitmaps) == {"b2"} and bitmaps["b2"]["granularity"] == 131072
    finally:
        vmq.ctl.cmd_obj({"execute": "block-dirty-bitmap-remove", "arguments": {"node": "disk0", "name": "b2"}})
        vmq.ctl.cmd_obj({"execute": "blockdev-del", "arguments": {"node-name": "extra"}})
    rc, _, err = lines(vmq, "transaction(", "abort")
    assert rc == 1 and err.strip() == "error: transaction( was not closed with ): 1 action(s) not sent"


def test_parse_error_is_one_clear_line(vmq):
    rc, _, err = lines(vmq, "query-status justaword")
    assert rc == 1
    line, = err.strip().splitlines()
    assert "expected a key=value pair, got 'justaword'" in line


def test_lines_are_checked_against_the_schema_before_sending(vmq):
    # unknown command: nothing sent, the nearest names offered
    rc, out, err = lines(vmq, "query-statu")
    assert rc == 1 and out == ""
    assert err.strip() == "error: QEMU has no command 'query-statu'; did you mean query-status, query-stats, " \
        "query-colo-status?"
    # unknown argument: the valid ones
    rc, out, err = lines(vmq, "block-dirty-bitmap-add node=disk0 name=x granularty=65536")
    args = sorted(m["name"] for m in _schema(vmq)[_schema(vmq)["block-dirty-bitmap-add"]["arg-type"]]["members"])
    assert rc == 1 and f"its arguments: {', '.join(args)}" in err and "did you mean granularity?" in err
    assert not [b for n in vmq.ctl.cmd("query-named-block-nodes") for b in n.get("dirty-bitmaps", [])]
    # qmp-shell sends name=123 as a number, which QEMU refuses; the schema says it is a string
    qmp_shell_way = vmq.ctl.cmd_obj({"execute": "block-dirty-bitmap-add",
                                     "arguments": {"node": "disk0", "name": 123}})
    assert "error" in qmp_shell_way
    try:
        rc, out, err = lines(vmq, "block-dirty-bitmap-add node=disk0 name=123 granularity=128k")
        assert rc == 0, err
        assert "note: granularity=128k sent as 131072" in err
        bm, = [b for n in vmq.ctl.cmd("query-named-block-nodes") for b in n.get("dirty-bitmaps", [])]
        assert (bm["name"], bm["granularity"]) == ("123", 131072)
    finally:
        vmq.ctl.cmd_obj({"execute": "block-dirty-bitmap-remove", "arguments": {"node": "disk0", "name": "123"}})


def test_json_output_prints_qmp_errors_as_qemu_sends_them(vmq):
    truth = vmq.ctl.cmd_obj({"execute": "device_del", "arguments": {"id": "nosuch"}})
    cp = shell_cmd(vmq.addr, "--output=json", "-c", "device_del id=nosuch")
    assert cp.returncode == 1
    assert json.loads(cp.stdout) == {"error": truth["error"]}
    assert cp.stderr.strip() == f"error: {truth['error']['class']}: {truth['error']['desc']}"
    # what the schema check refuses reads as QEMU would answer it
    _, out, _ = lines(vmq, "no-such-command", output="json")
    assert json.loads(out)["error"]["class"] == "CommandNotFound"


def test_skip_negotiation(vmq):
    rc, out, err = lines(vmq, "query-status", negotiate=False)
    # QEMU's greeting was not waited for and no qmp_capabilities sent: QEMU says so itself
    assert rc == 1 and "qmp_capabilities" in err and "CommandNotFound" in err
    rc, out, err = lines(vmq, "qmp_capabilities", "query-status", negotiate=False)
    assert rc == 0, err
    assert json_lines(out)[-1] == {"return": vmq.ctl.cmd("query-status")}


# -- built-ins ---------------------------------------------------------------------------------------


def test_trace_list_on_off_follow_qemu(vmq):
    pattern = "qcow2_cache_get*"
    truth = vmq.ctl.cmd("trace-event-get-state", name=pattern)
    rc, out, err = lines(vmq, f"/trace list {pattern}", output="json")
    assert rc == 0, err
    assert sorted((e["name"], e["state"]) for e in json.loads(out)) == sorted((e["name"], e["state"]) for e in truth)
    try:
        rc, out, err = lines(vmq, f"/trace on {pattern}")
        assert rc == 0, err
        now = vmq.ctl.cmd("trace-event-get-state", name=pattern)
        assert {e["state"] for e in now} == {"enabled"}
        for e in now:
            assert re.search(rf"^{e['name']}\s+enabled$", out, re.M)
    finally:
        lines(vmq, f"/trace off {pattern}")
    assert {e["state"] for e in vmq.ctl.cmd("trace-event-get-state", name=pattern)} == {"disabled"}


@pytest.mark.parametrize("line", ["/trace list nosuch", "/trace list nosuch*", "/trace on nosuch*",
                                  "/trace off nosuch", "/trace capture nosuch* 0", "/l2cache nosuch",
                                  "/help nosuch", "/mtree tree nosuch"])
def test_one_no_match_rule_for_every_builtin(vmq, line):
    rc, out, err = lines(vmq, line)
    what = line.split()[-1] if not line.endswith(" 0") else line.split()[-2]
    assert (rc, out) == (1, "")
    assert re.match(rf"error: no [a-z0-9 ]+ matches '{re.escape(what)}'", err), err


def test_trace_file_on_a_stock_qemu_names_the_log_backend(vmq):
    assert "unknown command: 'trace-file'" in hmp(vmq.ctl, "trace-file")  # log backend only
    rc, _, err = lines(vmq, "/trace-file on")
    assert rc == 2
    line, = err.strip().splitlines()
    assert "no simple trace backend" in line and "-D" in line


def _mtree_io_lines(text: str) -> list[tuple[int, int, str]]:
    # up to the next address space or, when I/O is printed last (QEMU walks a hash table of roots,
    # so the order changes from run to run), the aliased memory regions that follow
    sec = re.split(r"(?:address-space|memory-region):", text.split("address-space: I/O", 1)[1], maxsplit=1)[0]
    out = []
    for ln in sec.splitlines():
        m = re.match(r"\s*([0-9a-f]+)-([0-9a-f]+) \(prio [-\d]+, [^)]+\): (\S+)", ln)
        if m:
            out.append((int(m[1], 16), int(m[2], 16), m[3]))
    return out


def test_mtree_lookup_and_tree(vmq):
    rc, out, err = lines(vmq, "/mtree lookup 0x70 io", "/json mtree lookup 0x70", "/json mtree lookup 0x402",
                         "/mtree lookup 0x3f8", "/mtree", "/json mtree tree io")
    assert rc == 0, err
    assert out.startswith("port 0x70 -> rtc ")
    m70, m402, tree_io = json_lines(out)
    text = hmp(vmq.ctl, "info mtree")
    rtc = [r for r in _mtree_io_lines(text) if r[2] == "rtc"]
    assert rtc and (m70["start"], m70["end"]) == rtc[0][:2] and rtc[0][0] <= 0x70 <= rtc[0][1]
    assert m70["region"] == "rtc" and m70["chain"][0] == "io"
    assert m70["device-type"] == vmq.ctl.cmd("qom-get", path=m70["owner"], property="type")
    # a device given id= on the command line is named by its id
    owner = hmp(vmq.ctl, "info mtree -o")
    assert re.search(r"0000000000000402-0000000000000402 \(prio 0, i/o\): (\S+) owner:\{dev id=dbgcon\}", owner)
    assert m402["device-id"] == "dbgcon" and m402["device-type"] == "isa-debugcon"
    # -nodefaults: no serial port, nothing claims 0x3f8 (QEMU's tree has no region there)
    assert not [r for r in _mtree_io_lines(text)[1:] if r[0] <= 0x3f8 <= r[1]]
    assert "port 0x3f8: no device claims it" in out
    # /mtree without an address: the tree of memory and I/O, every region info mtree shows
    assert "address-space: memory" in out and "address-space: I/O" in out
    assert [(r["start"], r["end"], r["name"]) for r in tree_io["I/O"]] == _mtree_io_lines(text)
    rc, out, err = lines(vmq, "/mtree lookup nonsense")
    assert rc == 1 and "not an address" in err


def test_threads_are_virtopt_threads_json_and_columns(vmq):
    rc, out, err = lines(vmq, "/json threads", "/threads")
    assert rc == 0, err
    data = json_lines(out)[0]
    cp = virtopt("threads", str(vmq.pid), "--output=json")
    assert cp.returncode == 0, cp.stderr
    theirs = json.loads(cp.stdout)
    keys = ["tid", "name", "role", "vcpu-index", "iothread-id", "label", "affinity"]
    assert list(data["threads"][0])[:9] == list(theirs["threads"][0])[:9]  # same keys, same order
    mine = {t["tid"]: [t[k] for k in keys] for t in data["threads"]}
    assert {t["tid"]: [t[k] for k in keys] for t in theirs["threads"] if t["tid"] in mine} == \
        {tid: v for tid, v in mine.items() if tid in {t["tid"] for t in theirs["threads"]}}
    vcpus = {c["thread-id"]: c["cpu-index"] for c in vmq.ctl.cmd("query-cpus-fast")}
    assert {t["tid"]: t["vcpu-index"] for t in data["threads"] if t["role"] == "vcpu"} == vcpus
    from qemu_ext.host import roles

    header = next(ln for ln in out.splitlines() if ln.lstrip().startswith("TID"))
    assert re.split(r"\s{2,}", header.strip()) == list(roles.COLUMNS)
    for tid, idx in vcpus.items():
        assert re.search(rf"^\s*{tid}\s+CPU {idx}/\S+\s+vCPU {idx}\s", out, re.M)
    assert "debug-threads=on" not in out  # this QEMU names its threads: no hint


def test_threads_hint_without_debug_threads(qemu_factory):
    qp = qemu_factory(extra_args=["-name", "plain,debug-threads=off"])
    rc, out, err = run_lines(str(qp.qmp_path), "/threads")
    assert rc == 0, err
    names = {(Path(f"/proc/{qp.pid}/task") / t / "comm").read_text().strip()
             for t in os.listdir(f"/proc/{qp.pid}/task")}
    assert len({n for n in names if not n.startswith("kvm-")}) == 1  # QEMU left its threads unnamed
    assert " other " in out and "-name NAME,debug-threads=on" in out.splitlines()[-1]


def _schema(vmq) -> dict[str, dict]:
    if not hasattr(vmq, "schema"):
        vmq.schema = {e["name"]: e for e in vmq.ctl.cmd("query-qmp-schema")}
    return vmq.schema


def test_stats_rates_units_and_width(vmq):
    if vmq.accel != "kvm":
        pytest.skip("query-stats needs KVM and /dev/kvm does not open on this host")
    schema = [p for p in vmq.ctl.cmd("query-stats-schemas") if p["target"] == "vcpu"]
    names = {s["name"]: s for p in schema for s in p["stats"]}
    before = vmq.ctl.cmd("query-stats", target="vcpu")
    exits_before = sum(s["value"] for r in before for s in r["stats"] if s["name"] == "exits")
    rc, out, err = lines(vmq, "/json stats vcpu --interval 0.3")
    assert rc == 0, err
    rep = json.loads(out)
    rows = {r["name"]: r for r in rep["rows"]}
    assert set(rows) == set(names)
    assert [r["name"] for r in rep["rows"]] == sorted(rows)  # a stable order, not by rate
    assert rows["exits"]["value"] >= exits_before and rows["exits"]["rate"] is not None
    assert rows["exits"]["rate"] == pytest.approx(rows["exits"]["delta"] / rep["interval-seconds"], rel=0.05)
    cpus = {str(c["cpu-index"]) for c in vmq.ctl.cmd("query-cpus-fast")}
    assert set(rows["exits"]["per-vcpu"]) == cpus == set(rep["vcpus"])
    ns = next(n for n, s in names.items() if s.get("unit") == "seconds" and s.get("exponent") == -9
              and s["type"] == "cumulative")
    assert rows[ns]["unit"] == "ns"
    # text: totals and rates with separators; per-vCPU columns when they fit, left out when not
    os.environ["COLUMNS"] = "200"
    try:
        rc, out, err = lines(vmq, "/stats vcpu --interval 0.2")
        assert "vCPU 0 /s" in out and "vCPU 1 /s" in out and max(map(len, out.splitlines())) <= 200
        exits_line = next(ln for ln in out.splitlines() if ln.startswith("exits "))
        assert re.search(r"\d,\d{3}", exits_line) or rows["exits"]["value"] < 1000
        os.environ["COLUMNS"] = "60"
        rc, out, err = lines(vmq, "/stats vcpu --interval 0.2")
        assert "vCPU 0 /s" not in out and "per-vCPU columns left out" in out
        assert max(len(ln) for ln in out.splitlines()[1:-1]) <= 60
    finally:
        del os.environ["COLUMNS"]
    rc, out, err = lines(vmq, "/stats vm --watch 0.2 --count 2")
    assert out.count("vm stats over") == 2 and "every statistic is zero" not in out


def _qemu_io_trace(build, img: Path, opts: str, cmds: list[str], pattern: str) -> list[str]:
    """Standalone qemu-io of the same QEMU with the same cache options: QEMU's own trace lines (ground truth)."""
    args = ["-r", "-U", "--image-opts", f"driver=qcow2,file.filename={img},{opts}", "-T", pattern]
    for c in cmds:
        args += ["-c", c]
    cp = qemu_tool(build, "io", *args)
    return [ln for ln in cp.stderr.splitlines() if ln.startswith("qcow2_cache_")]


def _l2_misses(lines_: list[str]) -> int:
    return sum(1 for ln in lines_ if ln.startswith("qcow2_cache_get_replace_entry ") and " is_l2_cache 1 " in ln)


def test_l2cache_settings_and_capture_on_the_log_backend(vmq, tmp_path: Path):
    # every slice twice, in a cycle longer than the cache: LRU misses every time, full coverage only once
    cmds = [f"read {i * 32}M 512" for i in range(N_SLICES)] * 2
    rc, out, err = lines(vmq, f"blockdev-add driver=qcow2 node-name=l2t read-only=true l2-cache-size=64k "
                              f"file.driver=file file.filename={vmq.l2img}",
                         "/json l2cache l2t", "/json l2cache drv0", "/l2cache l2t")
    try:
        assert rc == 0, err
        (l2t,), (disk0,) = json_lines(out)[1:3]
        info = json.loads(qemu_tool(vmq.build, "img", "info", "-U", "--output=json", str(vmq.l2img)).stdout)
        assert (l2t["virtual-size"], l2t["cluster-size"]) == (info["virtual-size"], info["cluster-size"])
        assert l2t["settings-source"] == "blockdev-add options" and disk0["settings-source"] == "command line"
        assert not l2t["full-coverage"] and "l2-cache-size=" in l2t["recommendation"]
        assert "l2t: " in out and "l2-cache-size 64 KiB in 16 entries of 4 KiB" in out

        async def io(s):
            for c in cmds:
                await s.hmp(f'qemu-io l2t "{c}"')

        with connect_sync(vmq.addr, timeout=30) as s:
            res = s.call(capture, "qcow2_cache_get*", 0, during=io, file=str(tmp_path / "c.log"))
            geo = s.call(l2b.l2cache_info, "l2t", {"l2t": {"l2-cache-size": 65536}})
    finally:
        vmq.ctl.cmd_obj({"execute": "blockdev-del", "arguments": {"node-name": "l2t"}})
    assert res.backend == "log"
    truth = _qemu_io_trace(vmq.build, vmq.l2img, "l2-cache-size=65536", cmds, "qcow2_cache_get*")
    want: dict[str, int] = {}
    for ln in truth:
        want[ln.split()[0]] = want.get(ln.split()[0], 0) + 1
    assert res.counts == want
    # the cache QEMU really built has as many entries as /l2cache says: replace_entry indexes cycle over them
    idx = [int(ln.split()[-1]) for ln in truth if ln.startswith("qcow2_cache_get_replace_entry")
           and " is_l2_cache 1 " in ln]
    assert max(idx) + 1 == l2t["l2-cache-entries"] < N_SLICES
    # the L2-cache simulator replays the captured lookups: same misses as QEMU with this cache, and with the
    # recommended full-coverage size the same misses as QEMU itself opened with that size
    sim = l2b.simulate_capture(res.records, geo[0], res.notes)
    assert sim["node"] == "l2t" and sim["observed"]["misses"] == _l2_misses(truth) == len(cmds)
    assert sim["simulated-current"]["misses"] == _l2_misses(truth)
    full = l2t["full-coverage-l2-cache-size"]
    truth_full = _qemu_io_trace(vmq.build, vmq.l2img, f"l2-cache-size={full}", cmds, "qcow2_cache_get*")
    assert sim["simulated-full-coverage"]["misses"] == _l2_misses(truth_full) < sim["simulated-current"]["misses"]
    # events the capture turned on are off again
    assert {e["state"] for e in vmq.ctl.cmd("trace-event-get-state", name="qcow2_cache_get*")} == {"disabled"}


def test_builtin_usage_errors_are_one_line_exit_2(vmq):
    for line in ["/nosuch", "/trace", "/stats --watch x", "/l2cache a b", "/trace capture x", "/stats --count 0"]:
        rc, _, err = lines(vmq, line)
        assert rc == 2 and len(err.strip().splitlines()) == 1, (line, err)
    _, _, err = lines(vmq, "/tracee list")
    assert "did you mean /trace" in err
    # numbers typed to a built-in are worded as every CLI number option words them (output.number)
    for line, want in [("/trace capture x abc", "not a number: 'abc'"),
                       ("/stats --interval -1", "-1 is out of range (above 0 and at most 3600)"),
                       ("/l2cache tune d0 --target 2", "2 is out of range (above 0 and at most 1)")]:
        rc, _, err = lines(vmq, line)
        assert rc == 2 and want in err, (line, err)


def test_help_from_the_registry_and_the_schema(vmq):
    rc, out, err = lines(vmq, "help", "/help trace", "/help /stats", "query-stats ?", "/json help blockdev-add",
                         "/help quit")
    assert rc == 0, err
    from qemu_ext.qmp.builtins import commands

    for b in commands():  # help lists every registered built-in with its summary
        assert f"/{b.name}" in out and b.summary in out
    assert "usage: /trace" in out and "capture" in out and "usage: /stats" in out and "--interval S" in out
    schema = _schema(vmq)
    # query-stats ?: its arguments from the schema, with types, required and enum values
    qs = schema[schema["query-stats"]["arg-type"]]
    target = next(m for m in qs["members"] if m["name"] == "target")
    assert re.search(r"^  target\s+enum, required$", out, re.M)
    assert " ".join(schema[target["type"]]["values"]) in out
    bd = next(m for m in json_lines(out) if m.get("name") == "blockdev-add")
    assert {(a["name"], a["required"]) for a in bd["arguments"] if not a["variant"] and "." not in a["name"]} == {
        (m["name"], "default" not in m) for m in schema[schema["blockdev-add"]["arg-type"]]["members"]}
    assert {"name": "l2-cache-size", "type": "int", "required": False, "values": [], "features": [],
            "variant": "driver=qcow2"} in bd["arguments"]
    assert "quit  (returns" in out  # /help quit: QEMU's quit (the /quit built-in is /help /quit)


# -- completion ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def comp(vmq) -> CompletionData:
    async def load(s):
        from qemu_ext.qmp.builtins import complete

        d = CompletionData(builtin_completer=complete)
        await d.load(s)
        return d

    return run_sync(vmq.addr, load)


def _qcow2_members(schema: dict[str, dict]) -> dict[str, str]:
    union = schema[schema["blockdev-add"]["arg-type"]]
    members = {m["name"]: m["type"] for m in union["members"]}
    variant = next(v for v in union["variants"] if v["case"] == "qcow2")
    members.update({m["name"]: m["type"] for m in schema[variant["type"]]["members"]})
    return members


def test_completion_from_the_real_schema(vmq, comp):
    schema = _schema(vmq)
    assert comp.complete("query-bl") == sorted(n for n, e in schema.items()
                                               if e["meta-type"] == "command" and n.startswith("query-bl"))
    qcow2 = _qcow2_members(schema)
    assert set(comp.complete("blockdev-add driver=qcow2 l2-cache")) == {f"{n}=" for n in qcow2 if n.startswith("l2-cache")}
    enum = schema[qcow2["discard"]]
    assert comp.complete("blockdev-add driver=qcow2 discard=") == [f"discard={v}" for v in enum["values"]]
    assert comp.complete("trace-event-set-state enable=") == ["enable=true", "enable=false"]
    assert "file.filename=" in comp.complete("blockdev-add driver=qcow2 file.driver=file file.fi")
    evs = sorted(e["name"] for e in vmq.ctl.cmd("trace-event-get-state", name="qcow2_cache_get_r*"))
    assert comp.complete("trace-event-set-state name=qcow2_cache_get_r") == [f"name={e}" for e in evs]
    assert comp.complete("/trace on qcow2_cache_get_r") == evs
    assert set(comp.complete("/l2cache ")) - {"tune"} == {"disk0"}  # the qcow2 nodes (and the tune sub-command)
    # the menu says each argument's type and whether it is required
    from qemu_ext.qmp.completion import complete_items

    items = dict(complete_items(comp, "block-dirty-bitmap-add "))
    assert items["node="] == "str, required" and items["granularity="] == "int"


def test_completion_offers_only_values_qemu_accepts(vmq, comp):
    nodes = {n["node-name"] for n in vmq.ctl.cmd("query-named-block-nodes")}
    drives = {b["device"] for b in vmq.ctl.cmd("query-block") if b["device"]}
    assert {c.split("=", 1)[1] for c in comp.complete("block_resize node-name=")} == nodes
    offered = {c.split("=", 1)[1] for c in comp.complete("block_resize device=")}
    assert offered == drives  # drive ids only: QEMU refuses node names there
    size = vmq.ctl.cmd("query-block")[0]["inserted"]["image"]["virtual-size"]
    for name in offered:  # each offered value is accepted (a resize to the same size changes nothing)
        assert vmq.ctl.cmd_obj({"execute": "block_resize", "arguments": {"device": name, "size": size}}) == {"return": {}}
    for n in nodes - drives:
        assert "error" in vmq.ctl.cmd_obj({"execute": "block_resize", "arguments": {"device": n, "size": size}})
    # device_del id=: the -device ids; not node names or block QOM paths (QEMU refuses those)
    assert comp.complete("device_del id=") == ["id=dbgcon", "id=ptest"]
    for bad in [*nodes, *(b["qdev"] for b in vmq.ctl.cmd("query-block") if b.get("qdev"))]:
        assert "error" in vmq.ctl.cmd_obj({"execute": "device_del", "arguments": {"id": bad}})
    # where the schema says nothing usable, nothing is offered
    assert comp.complete("human-monitor-command command-line=") == []
    assert comp.complete("blockdev-add node-name=") == []


def test_completion_in_transactions_builtins_and_hmp(vmq, comp):
    schema = _schema(vmq)
    actions = schema[schema[schema[schema["transaction"]["arg-type"]]["members"][0]["type"]]["element-type"]]
    types = sorted(v["case"] for v in actions["variants"])
    assert "abort" in types
    assert comp.complete("", transaction=True) == [*types, ")"]
    assert comp.complete("ab", transaction=True) == ["abort"]
    assert "query-status" not in comp.complete("query", transaction=True)
    bm = next(v for v in actions["variants"] if v["case"] == "block-dirty-bitmap-add")
    data_t = next(m["type"] for m in schema[bm["type"]]["members"] if m["name"] == "data")
    assert set(comp.complete("block-dirty-bitmap-add ", transaction=True)) - {")"} == {
        f"{m['name']}=" for m in schema[data_t]["members"]}
    assert comp.complete("transaction( ab") == ["abort"]
    # built-ins: names, sub-commands, options and values from their one registry
    assert comp.complete("/st") == ["/stats"]
    assert comp.complete("/stats ") == ["vm", "vcpu"]
    assert comp.complete("/stats --") == ["--interval", "--watch", "--count", "--all", "--json"]
    assert comp.complete("/stats vcpu --interval 1 --w") == ["--watch"]
    assert comp.complete("/json st") == ["stats"]
    assert comp.complete("/json stats v") == ["vm", "vcpu"]
    assert comp.complete("/json mtree lookup 0x70 ") == ["io", "memory"]
    assert comp.complete("/help query-sta") == ["query-stats", "query-stats-schemas", "query-status"]
    # HMP (in -H mode and after /hmp): command names, info topics, trace events, devices for qemu-io/device_del
    info = {ln.split()[1] for ln in hmp(vmq.ctl, "help info").splitlines() if ln.startswith("info ")}
    assert set(comp.complete("info ", hmp=True)) == info
    assert comp.complete("/hmp info mtr") == ["mtree"]
    assert comp.complete("trace-event qcow2_cache_get_r", hmp=True) == evs_like(vmq, "qcow2_cache_get_r*")
    assert comp.complete("trace-event qcow2_cache_get on", hmp=True) == ["on"]
    assert set(comp.complete("qemu-io ", hmp=True)) == {"drv0", "disk0"} | {
        n["node-name"] for n in vmq.ctl.cmd("query-named-block-nodes")}
    assert comp.complete("device_del ", hmp=True) == ["dbgcon", "ptest"]


def evs_like(vmq, pattern: str) -> list[str]:
    return sorted(e["name"] for e in vmq.ctl.cmd("trace-event-get-state", name=pattern))


def test_completion_through_the_repl(vmq):
    """The same completion, through prompt-toolkit's Tab in the real REPL (QMP mode, then HMP mode)."""
    from shell_util import Repl

    r = Repl(vmq.addr)
    try:
        r.wait_prompt()
        r.send("device_del id=\t")
        r.wait_until(lambda: r.menu() == ["id=dbgcon", "id=ptest"], "device_del's menu: -device ids only")
        r.send("\x15")  # Ctrl-U
        r.send("/json st\t")
        r.wait_typed("/json stats")
        r.send(" vcpu --i\t")
        r.wait_typed("/json stats vcpu --interval")
        r.send("\x15/hmp info mtr\t")  # HMP names from QMP mode too
        r.wait_typed("/hmp info mtree")
        r.send("\x15block-dirty-bitmap-add \t")
        r.wait_until(lambda: r.menu() is not None, "the argument menu")
        ps = r.shell.prompt_session
        meta = {c.text: c.display_meta_text for c in ps.default_buffer.complete_state.completions}
        assert meta["node="] == "str, required" and meta["granularity="] == "int"
    finally:
        r.close()
    r = Repl(vmq.addr, hmp=True)
    try:
        r.wait_prompt()
        r.send("info mtre\t")
        r.wait_typed("info mtree")
        r.send(" -f\n")
        r.wait_line(hmp(vmq.ctl, "info mtree -f").strip().splitlines()[0].strip())
        r.send("/trace list qcow2_cache_get\n")  # built-ins work in HMP mode too
        r.wait_line("qcow2_cache_get  disabled")
    finally:
        r.close()
