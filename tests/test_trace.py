"""virtopt trace: real traces from each debug QEMU (7.2 and 10.0: simple + log backends), checked
against that version's own scripts/simpletrace.py; log-backend text from each stock QEMU.

Every test that takes ``debug_build`` (or a capture made with it) runs once per QEMU series;
a missing debug build skips by conftest's rule (a failure under make test).
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import make_qcow2, sha256, virtopt
from trace_util import capture_qemu_io, events_file, parse_simpletrace_text, simpletrace_py

from qemu_ext.errors import BadInputError
from qemu_ext.trace import TraceRecord, decode_simple, parse_log_lines, read_columns, read_trace
from qemu_ext.trace.simple import DROPPED_EVENT_ID, DroppedRecord

pytestmark = pytest.mark.debug_qemu

NUMPY = {"VIRTOPT_NATIVE": "0"}  # the numpy renderer, which must print the same bytes as the C one
PATHS = pytest.mark.parametrize("path_env", [{}, NUMPY], ids=["native", "numpy"])

# One capture per QEMU series, made by the first test that asks for it (the fixtures it needs
# are function-scoped and parametrised by conftest).
_QIO: dict[str, dict] = {}
_SYS: dict[str, dict] = {}


@pytest.fixture
def qio(debug_build, tmp_path_factory):
    """One qemu-io run of this series' debug build with both backends: a simpletrace file and the
    log text of the same events; simpletrace.py's text of it (that version's script and events).

    The workload writes (cluster allocation, L2 allocation), reads with a tiny L2 cache (misses,
    replacements) and so exercises string arguments (qcow2_add_task's action).
    """
    c = _QIO.get(debug_build.series)
    if c is None:
        d = tmp_path_factory.mktemp(f"qio{debug_build.series}")
        img = make_qcow2(d / "disk.qcow2", size="64M", io=["write -P 0x5a 0 2M", "write 40M 256k"], build=debug_build)
        rng = random.Random(5)
        cmds = [f"read {rng.randrange(0, 63 * 16) * 64 * 1024} 64k" for _ in range(300)]
        cmds += ["write 8M 128k", "read 8M 128k", "flush"]
        trace = d / "trace.bin"
        log = capture_qemu_io(debug_build, img, trace, cmds,
                              image_opts=f"driver=qcow2,file.filename={img},l2-cache-size=16k,l2-cache-entry-size=4k")
        ref = simpletrace_py(debug_build, trace).stdout
        c = _QIO[debug_build.series] = {"dir": d, "trace": trace, "log": log, "ref": ref, "image": img,
                                        "build": debug_build, "events": events_file(debug_build)}
    return c


@pytest.fixture
def sysq(debug_build, debug_qemu_factory, tmp_path_factory):
    """This series' debug qemu-system-x86_64 with -msg timestamp=on: a multi-threaded writer, log
    lines with pid@sec.usec:, and events without arguments (bmdma_reset on reset,
    qemu_system_powerdown_request), whose lines 10.0's simpletrace.py ends with a space."""
    c = _SYS.get(debug_build.series)
    if c is None:
        d = tmp_path_factory.mktemp(f"sysq{debug_build.series}")
        img = make_qcow2(d / "disk.qcow2", size="16M", io=["write -P 0x11 0 1M"], build=debug_build)
        trace = d / "sys.bin"
        qp = debug_qemu_factory(
            name="virtopt-trace-test",
            # the simple backend's file comes with the last -trace option (a later one without
            # file= would set the default name again)
            extra_args=["-msg", "timestamp=on", "-trace", "qemu_system_powerdown_request", "-trace", "bmdma_reset",
                        "-trace", f"qcow2_*,file={trace}"],
        )
        try:
            t0 = time.time()
            cl = qp.qmp()
            cl.cmd("blockdev-add", driver="qcow2", **{"node-name": "d0", "file": {"driver": "file", "filename": str(img)}})
            for cmd in ["read 0 64k", "read 512k 128k", "write 2M 64k", "read 2M 64k"]:
                qp.hmp(f'qemu-io d0 "{cmd}"')
            for cmd in ["system_powerdown", "system_reset", "system_powerdown"]:
                qp.hmp(cmd)
            qp.hmp("trace-file flush")
            tids = {int(p.name) for p in Path(f"/proc/{qp.pid}/task").iterdir()}
            t1 = time.time()
            pid = qp.pid
            log = qp.stderr_text()
        finally:
            qp.stop()
        c = _SYS[debug_build.series] = {"trace": trace, "tids": tids, "pid": pid, "t0": t0, "t1": t1, "stderr": log,
                                        "ref": simpletrace_py(debug_build, trace).stdout, "build": debug_build}
    return c


def _decode(*args: str, env: dict | None = None):
    return virtopt("trace", "decode", *args, text=False, env=env or {})


# --- simpletrace files, against each version's simpletrace.py --------------------------------------


@PATHS
def test_decode_is_byte_identical_to_simpletrace_py(qio, path_env):
    before = sha256(qio["trace"])
    cp = _decode(str(qio["trace"]), "--events", str(qio["events"]), env=path_env)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == qio["ref"]
    assert b"action=b'" in cp.stdout  # string arguments were in it
    assert sha256(qio["trace"]) == before  # the trace is only read


@PATHS
def test_events_without_arguments_print_as_each_version_does(sysq, path_env):
    """A system emulator trace (events of several threads; bmdma_reset and qemu_system_powerdown_request
    have no arguments): 7.2 ends their lines after pid=N, 10.0 with a space after it."""
    ref = sysq["ref"]
    noargs = [ln for ln in ref.splitlines() if ln.startswith((b"bmdma_reset ", b"qemu_system_powerdown_request "))]
    assert len(noargs) >= 3 and ref.count(b"\n") > len(noargs) + 5
    if sysq["build"].series == "7.2":
        assert all(re.fullmatch(rb"\S+ \d+\.\d{3} pid=\d+", ln) for ln in noargs)
    else:
        assert all(re.fullmatch(rb"\S+ \d+\.\d{3} pid=\d+ ", ln) for ln in noargs)
    cp = _decode(str(sysq["trace"]), "--events", str(events_file(sysq["build"])), env=path_env)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == ref


def test_the_events_file_tells_the_version_and_compat_overrides_it(sysq, tmp_path):
    """Without --events the installed trace-events-all that declares the trace's events is found;
    --qemu-compat prints as the other version's simpletrace.py, checked against that script."""
    import conftest

    from qemu_ext.trace.events import load_events, qemu_series

    build = sysq["build"]
    other = conftest._require("10.0" if build.series == "7.2" else "7.2", debug=True)
    cp = _decode(str(sysq["trace"]))  # no --events: the file of the QEMU that wrote the trace
    assert cp.returncode == 0 and cp.stdout == sysq["ref"]
    own = events_file(build)
    assert qemu_series(load_events(own)) == build.series
    assert qemu_series(load_events(events_file(other))) == other.series
    if build.series == "10.0":
        # 7.2's simpletrace.py reads 10.0's trace-events-all
        ref = simpletrace_py(other, sysq["trace"], events=own).stdout
        assert ref != sysq["ref"]
        cp = _decode(str(sysq["trace"]), "--events", str(own), "--qemu-compat", "7.2")
    else:
        # 10.0's tracetool refuses 7.2's file (vcpu events, formats with \n): without those lines
        # it reads it, and the file no longer looks like 7.2's
        text = own.read_text()
        kept = [ln for ln in text.splitlines(keepends=True)
                if not re.match(r"\s*(disable\s+)?vcpu\s", ln) and "\\n" not in ln]
        trimmed = tmp_path / "trace-events-trimmed"
        trimmed.write_text("".join(kept))
        assert qemu_series(load_events(trimmed)) == "10.0"
        ref = simpletrace_py(other, sysq["trace"], events=trimmed).stdout
        assert ref != sysq["ref"]
        cp = _decode(str(sysq["trace"]), "--events", str(trimmed))
        assert cp.returncode == 0 and cp.stdout == ref
        cp = _decode(str(sysq["trace"]), "--events", str(own), "--qemu-compat", "10.0")
    assert cp.returncode == 0 and cp.stdout == ref


def test_records_match_simpletrace_py_fields(qio):
    ref = parse_simpletrace_text(qio["ref"].decode())
    recs = list(read_trace(qio["trace"], qio["events"]))
    assert len(recs) == len(ref)
    t0 = recs[0].timestamp_ns
    for r, (name, t, pid, args) in zip(recs, ref):
        assert r.name == name and r.pid == pid and r.timestamp_ns - t0 == t
        for k, v in args.items():
            got = r.args[k]
            if isinstance(got, str):
                assert v == repr(got.encode())
            else:
                assert v == f"0x{got & (2**64 - 1):x}"


def test_columns_feed_the_l2_cache_simulator(qio):
    ref = [x for x in parse_simpletrace_text(qio["ref"].decode()) if x[0] == "qcow2_cache_get"]
    cols = read_columns(qio["trace"], qio["events"], names={"qcow2_cache_get", "qcow2_cache_get_done"})
    get = cols["qcow2_cache_get"]
    assert set(get) >= {"index", "timestamp_ns", "pid", "co", "c", "offset", "read_from_disk"}
    assert len(get["offset"]) == len(ref) > 100
    assert get["offset"].tolist() == [int(a["offset"], 16) for _, _, _, a in ref]
    assert get["c"].tolist() == [int(a["c"], 16) for _, _, _, a in ref]
    assert all(b > a for a, b in zip(get["index"].tolist(), get["index"].tolist()[1:]))
    # misses: a tiny L2 cache must have made QEMU read tables from disk
    assert get["read_from_disk"].sum() > 0


def test_binary_and_log_backends_give_the_same_records(qio):
    binrecs = list(read_trace(qio["trace"], qio["events"]))
    logrecs = list(parse_log_lines(qio["log"].splitlines(), qio["events"]))
    assert len(logrecs) == len(binrecs)
    # with stdout and stderr on one terminal, qemu-io's prompt can precede an event
    first = qio["log"].splitlines()[0]
    assert list(parse_log_lines(["qemu-io> " + first], qio["events"])) == logrecs[:1]
    for b, lg in zip(binrecs, logrecs):
        assert lg.name == b.name
        assert lg.args == b.args  # hex stays int, %s stays str, %d signed
        assert lg.timestamp_ns is None and lg.pid is None


def test_log_lines_with_pid_and_wall_clock_prefix(sysq):
    ev = events_file(sysq["build"])
    log = sysq["stderr"]
    assert "@" in log
    recs = list(parse_log_lines(log.splitlines(), ev))
    binrecs = list(read_trace(sysq["trace"], ev))
    assert [r.name for r in recs] == [r.name for r in binrecs]
    assert [r.args for r in recs] == [r.args for r in binrecs]
    for r in recs:
        assert r.pid in sysq["tids"]  # the log prefix is the thread id
        assert sysq["t0"] - 1 <= r.timestamp_ns / 1e9 <= sysq["t1"] + 1
    # the simpletrace pid is the process id
    assert {r.pid for r in binrecs} == {sysq["pid"]}


def test_read_trace_autodetects_log_files(qio, tmp_path):
    p = tmp_path / "stderr.log"
    p.write_text(qio["log"])
    recs = list(read_trace(p, qio["events"]))
    assert recs == [TraceRecord(r.name, r.args, None, None) for r in read_trace(qio["trace"], qio["events"])]
    cols = read_columns(p, qio["events"], names={"qcow2_cache_get"})
    assert cols["qcow2_cache_get"]["offset"].tolist() == \
        read_columns(qio["trace"], qio["events"])["qcow2_cache_get"]["offset"].tolist()


@PATHS
def test_truncated_tail_decodes_every_complete_record(qio, tmp_path, path_env):
    data = qio["trace"].read_bytes()
    ref_lines = qio["ref"].splitlines(keepends=True)
    st = decode_simple(qio["trace"], qio["events"])
    offs = st.offsets.tolist()
    for cut in [int(offs[len(offs) // 2]) + 13, int(offs[-1]) + 8, len(data) - 1]:
        t = tmp_path / f"cut{cut}.bin"
        t.write_bytes(data[:cut])
        complete = sum(1 for i, o in enumerate(offs) if o + 8 + int(st.lengths[i]) <= cut)
        cp = _decode(str(t), "--events", str(qio["events"]), env=path_env)
        assert cp.returncode == 0
        assert cp.stdout == b"".join(ref_lines[:complete])
        err = cp.stderr.decode()
        assert "truncated" in err and str(cut - int(offs[complete])) in err and "Traceback" not in err


def _one_line_error(cp, code: int = 1) -> str:
    err = cp.stderr if isinstance(cp.stderr, str) else cp.stderr.decode()
    assert cp.returncode == code, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("virtopt: ")
    return err.strip()


@PATHS
def test_bad_files_give_one_clear_line(qio, tmp_path, path_env):
    data = qio["trace"].read_bytes()
    ev = str(qio["events"])
    v3 = tmp_path / "v3.bin"
    v3.write_bytes(data[:16] + struct.pack("<Q", 3) + data[24:])
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(data[:24] + bytes(range(256)) * 4)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def err(path) -> str:
        return _one_line_error(virtopt("trace", "decode", str(path), "--events", ev, env=path_env))

    # CONTRIBUTING.md's wording for each condition
    assert err(tmp_path / "missing.bin") == f"virtopt: cannot open {tmp_path / 'missing.bin'}: No such file or directory"
    assert err(tmp_path) == f"virtopt: cannot open {tmp_path}: Is a directory"
    assert err(fifo) == f"virtopt: {fifo}: not a regular file or block device"
    assert err(empty) == f"virtopt: {empty}: empty file"
    assert err(qio["image"]) == f"virtopt: {qio['image']}: not a trace file (binary data)"
    assert "version 3" in err(v3)
    assert "corrupt" in err(garbage)
    # an event id that no mapping record names
    st = decode_simple(qio["trace"], ev)
    off = int(st.offsets[3])
    bad = bytearray(data)
    bad[off + 8 : off + 16] = struct.pack("<Q", 99999)
    unk = tmp_path / "unknown-id.bin"
    unk.write_bytes(bytes(bad))
    assert "event id 99999" in err(unk)
    # a record whose arguments do not fill its length as declared
    bad = bytearray(data)
    bad[off + 24 : off + 28] = struct.pack("<I", int(st.lengths[3]) + 8)
    bad[off + 8 + int(st.lengths[3]) : off + 8 + int(st.lengths[3])] = bytes(8)
    mis = tmp_path / "mismatch.bin"
    mis.write_bytes(bytes(bad))
    e = err(mis)
    assert f"record at offset {off}" in e and "wrong trace-events file" in e
    # a trace-events file that does not declare the traced events
    other = qio["build"].src / "hw" / "usb" / "trace-events"
    e = _one_line_error(virtopt("trace", "decode", str(qio["trace"]), "--events", str(other), env=path_env))
    assert "not in" in e and "qcow2_" in e
    e = _one_line_error(virtopt("trace", "summary", str(qio["image"]), env=path_env))
    assert "not a trace file" in e
    if not path_env:  # the events file is read by the same code on both paths
        for bad_events, words in [(tmp_path / "missing-events", "cannot open {}: No such file or directory"),
                                  (tmp_path, "cannot open {}: Is a directory"), (empty, "{}: empty file"),
                                  (qio["trace"], "{}: not a trace-events file (binary data)")]:
            cp = virtopt("trace", "decode", str(qio["trace"]), "--events", str(bad_events))
            assert _one_line_error(cp) == "virtopt: " + words.format(bad_events)


@PATHS
def test_dropped_records_read_as_simpletrace_py_reads_them(qio, tmp_path, path_env):
    """A dropped-events record (as trace/simple.c writes it) spliced into a real trace."""
    data = qio["trace"].read_bytes()
    st = decode_simple(qio["trace"], qio["events"])
    at = int(st.offsets[10])
    ts = int(st.timestamps[10]) - 1
    rec = DroppedRecord.build(
        {"type": 1, "event": DROPPED_EVENT_ID, "timestamp_ns": ts, "length": 32, "pid": int(st.pids[0]), "num_events_dropped": 42}
    )
    t = tmp_path / "dropped.bin"
    t.write_bytes(data[:at] + rec + data[at:])
    ref = simpletrace_py(qio["build"], t).stdout
    assert b"Dropped_Event" in ref
    cp = _decode(str(t), "--events", str(qio["events"]), env=path_env)
    assert cp.returncode == 0 and cp.stdout == ref
    cp = virtopt("trace", "summary", str(t), "--events", str(qio["events"]), "--output=json")
    res = json.loads(cp.stdout)
    assert res["dropped"] == {"records": 1, "events": 42}
    recs = list(read_trace(t, qio["events"]))
    assert recs[10].name == "dropped" and recs[10].args == {"num_events_dropped": 42}


def _keys(obj, path="") -> list[str]:
    """Every key of a JSON document, except those that are QEMU's names (event and argument names)."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append(k)
            if k not in ("by-event", "args"):
                out += _keys(v)
    elif isinstance(obj, list):
        for v in obj:
            out += _keys(v)
    return out


def test_summary_counts_and_latencies_agree_with_simpletrace_py(qio, tmp_path):
    ref = parse_simpletrace_text(qio["ref"].decode())
    png = tmp_path / "summary.png"
    ev = str(qio["events"])
    cp = virtopt("trace", "summary", str(qio["trace"]), "--events", ev, "--output=json")
    assert cp.returncode == 0, cp.stderr
    res = json.loads(cp.stdout)
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", k) for k in _keys(res)), _keys(res)
    counts: dict[str, int] = {}
    for name, *_ in ref:
        counts[name] = counts.get(name, 0) + 1
    assert {c["event"]: c["count"] for c in res["counts"]} == counts
    assert sum(c["fraction"] for c in res["counts"]) == pytest.approx(1.0)
    assert res["events"] == len(ref)
    assert res["duration-ns"] == ref[-1][1] - ref[0][1]
    assert sum(res["rate"]["counts"]) == len(ref)
    # cache_get -> cache_get_done latencies, from simpletrace.py's own text
    lat = []
    open_by_co: dict[str, int] = {}
    for name, t, _, args in ref:
        if name == "qcow2_cache_get":
            open_by_co[args["co"]] = t
        elif name == "qcow2_cache_get_done" and args["co"] in open_by_co:
            lat.append(t - open_by_co.pop(args["co"]))
    pair = next(p for p in res["latency"] if p["begin"] == "qcow2_cache_get" and p["end"] == "qcow2_cache_get_done")
    assert pair["key"] == "co"
    assert pair["pairs"] == len(lat) > 100
    assert pair["max-ns"] == max(lat) and pair["min-ns"] == min(lat)
    srt = sorted(lat)  # nearest-rank percentiles
    for q in (50, 90, 99):
        assert pair[f"p{q}-ns"] == srt[-(-q * len(srt) // 100) - 1]
    assert sum(h["count"] for h in pair["histogram"]) == len(lat)
    # human output: the product's units (output.duration, output.count, output.percent)
    from qemu_ext.output import count, duration, percent

    human = virtopt("trace", "summary", str(qio["trace"]), "--events", ev, "--plot", str(png))
    assert human.returncode == 0
    out = human.stdout
    assert "qcow2_cache_get -> qcow2_cache_get_done" in out
    assert f"duration: {duration(res['duration-ns'] / 1e9)}" in out
    assert f"p50 {duration(pair['p50-ns'] / 1e9)}" in out
    top = res["counts"][0]
    assert re.search(rf"{top['event']}\s+{re.escape(count(top['count']))}\s+{re.escape(percent(top['fraction']))}", out)
    assert not re.search(r"\d\.\d+e[+-]\d+|\d us\b|0\.000\d+s", out)  # no raw floats, no "us"
    assert out.rstrip().endswith(f"plot written to {png}")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_names_are_checked_before_the_work(qio, tmp_path):
    ev = str(qio["events"])
    missing = tmp_path / "no-such-dir" / "p.png"
    e = _one_line_error(virtopt("trace", "summary", str(qio["trace"]), "--events", ev, "--plot", str(missing)))
    assert e == f"virtopt: cannot open {missing}: No such file or directory"
    e = _one_line_error(virtopt("trace", "summary", str(qio["trace"]), "--events", ev, "--plot", str(tmp_path / "p.txt")), 2)
    assert "p.txt" in e and ".png" in e
    assert not (tmp_path / "p.txt").exists() and not (tmp_path / "p.txt.png").exists()


def test_summary_of_log_text(qio, tmp_path):
    p = tmp_path / "stderr.log"
    p.write_text(qio["log"])
    ev = str(qio["events"])
    res = json.loads(virtopt("trace", "summary", str(p), "--events", ev, "--output=json").stdout)
    binres = json.loads(virtopt("trace", "summary", str(qio["trace"]), "--events", ev, "--output=json").stdout)
    assert res["format"] == "log" and res["duration-ns"] is None
    assert all("p50-ns" not in p for p in res["latency"])  # no timestamps, no latencies
    assert res["counts"] == [dict(c, **{"per-second": None}) for c in binres["counts"]]
    assert [(p["begin"], p["end"], p["pairs"]) for p in res["latency"]] == [
        (p["begin"], p["end"], p["pairs"]) for p in binres["latency"]
    ]


def test_json_and_csv_outputs(qio):
    ev = str(qio["events"])
    recs = list(read_trace(qio["trace"], ev))
    js = json.loads(virtopt("trace", "decode", str(qio["trace"]), "--events", ev, "--output=json").stdout)
    assert len(js) == len(recs)
    assert {k for j in js for k in j} == {"event", "timestamp-ns", "pid", "args"}
    # the args keep QEMU's own argument names (data, not our keys)
    assert [(j["event"], j["timestamp-ns"], j["pid"], j["args"]) for j in js] == [
        (r.name, r.timestamp_ns, r.pid, r.args) for r in recs
    ]
    assert any("read_from_disk" in j["args"] for j in js)
    rows = list(csv.DictReader(io.StringIO(virtopt("trace", "decode", str(qio["trace"]), "--events", ev,
                                                   "--output=csv").stdout)))
    assert len(rows) == len(recs)
    assert rows[5]["event"] == recs[5].name and int(rows[5]["timestamp-ns"]) == recs[5].timestamp_ns


def test_help_has_examples_and_names_the_verified_versions():
    for sub in ("decode", "summary"):
        cp = virtopt("trace", sub, "--help")
        assert cp.returncode == 0 and "examples:" in cp.stdout
    cp = virtopt("trace", "decode", "--help")
    assert "--qemu-compat" in cp.stdout and "7.2 and 10.0" in cp.stdout
    cp = virtopt("trace", "decode")
    assert cp.returncode == 2
    cp = virtopt("trace", "decode", "x.bin", "--qemu-compat", "9.9")
    assert cp.returncode == 2 and "Traceback" not in cp.stderr


def _mutations(data: bytes, n: int, seed: int):
    rng = random.Random(seed)
    for _ in range(n):
        b = bytearray(data[: rng.randrange(24, len(data) + 1)])
        for _ in range(rng.randrange(1, 6)):
            i = rng.randrange(len(b))
            b[i] = rng.randrange(256)
        yield bytes(b)


def test_mutated_traces_never_crash(qio, tmp_path):
    """Random corruption of a real trace: either it decodes or one BadInputError, never anything else;
    where both renderers decode it, the C one and the numpy one print the same text."""
    from qemu_ext.trace import decode as dec
    from qemu_ext.trace import native
    from qemu_ext.trace.events import load_events

    assert native.library() is not None, "no C compiler: the native renderer is not tested here"
    events = load_events(qio["events"])
    outcomes = {"ok": 0, "bad": 0}
    t = tmp_path / "mutated.bin"
    for i, b in enumerate(_mutations(qio["trace"].read_bytes(), 120, 1234)):
        t.write_bytes(b)
        got: list[bytes] = []
        native_ok: bool | None
        try:
            res = native.decode_text(t, lambda _names: events, None, lambda v, got=got: got.append(bytes(v)))
            native_ok = None if res is None else True  # None: left to the numpy path (an event id > 65535)
        except BadInputError as exc:
            assert "\n" not in str(exc)
            native_ok = False
        try:
            c_index = decode_simple("mutated", events, data=b)  # records found by the C scanner
        except BadInputError as exc:
            c_index = exc
        try:
            st = decode_simple("mutated", events, data=b, use_native=False)  # by numpy's
            assert not isinstance(c_index, BadInputError), f"mutation {i}: {c_index}"
            assert c_index.offsets.tolist() == st.offsets.tolist() and c_index.mapping == st.mapping
            assert (c_index.end_offset, c_index.truncated_bytes) == (st.end_offset, st.truncated_bytes)
            text = b"".join(dec.iter_simpletrace_text(st, qemu10=qio["build"].series != "7.2"))
            for _ in st.records():
                pass
            outcomes["ok"] += 1
            assert native_ok is not False, f"mutation {i}: the C renderer refused what numpy took"
            assert native_ok is None or b"".join(got) == text, f"mutation {i}"
        except BadInputError as exc:
            assert "\n" not in str(exc)
            assert not native_ok, f"mutation {i}: the C renderer took what numpy refused: {exc}"
            assert isinstance(c_index, BadInputError) and str(c_index) == str(exc), f"mutation {i}"
            outcomes["bad"] += 1
    assert outcomes["ok"] and outcomes["bad"]


def test_copied_trace_file_decodes_the_same(qio, tmp_path):
    # a trace copied elsewhere and given a .log-like name is still recognised by its header
    t = tmp_path / "trace.log"
    shutil.copy(qio["trace"], t)
    assert _decode(str(t), "--events", str(qio["events"])).stdout == qio["ref"]


def _edit_timestamps(src_path: Path, events: Path, dst: Path, edits: dict[int, int]) -> None:
    """Copy a real trace, replacing the timestamps of some records (record index -> new timestamp)."""
    st = decode_simple(src_path, events)
    b = bytearray(src_path.read_bytes())
    for i, ts in edits.items():
        off = int(st.offsets[i]) + 16
        b[off : off + 8] = struct.pack("<Q", ts & (2**64 - 1))
    dst.write_bytes(bytes(b))


@PATHS
def test_backwards_and_huge_time_steps_print_like_simpletrace_py(qio, tmp_path, monkeypatch, path_env):
    """Deltas below zero and beyond float exactness (simpletrace.py prints '%0.3f' % (ns / 1000.0))."""
    from qemu_ext.trace import decode as dec

    st = decode_simple(qio["trace"], qio["events"])
    ts = [int(x) for x in st.timestamps]
    edits = {5: ts[4] - 7, 6: ts[4] - 1_234_567}
    for i in range(20, len(ts)):
        edits[i] = ts[i] + 2**53 + 12345  # one step far beyond 2**52 ns, then normal steps again
    edits[40] = ts[40] + 2**63 + 999  # wraps around in u64 differences
    edits[60] = ts[59] + (1000 << 42) + 1  # just past the exact range
    t = tmp_path / "edited.bin"
    _edit_timestamps(qio["trace"], qio["events"], t, edits)
    ref = simpletrace_py(qio["build"], t).stdout
    assert b" -0.007 " in ref or b" -1234.567 " in ref
    cp = _decode(str(t), "--events", str(qio["events"]), env=path_env)
    assert cp.returncode == 0 and cp.stdout == ref
    if path_env:
        # the block renderer (used when lines have too many different layouts) prints the same
        monkeypatch.setattr(dec, "MAX_GROUPS", 0)
        v10 = qio["build"].series != "7.2"
        assert b"".join(dec.iter_simpletrace_text(decode_simple(t, qio["events"]), qemu10=v10)) == ref
        assert b"".join(dec.iter_simpletrace_text(decode_simple(qio["trace"], qio["events"]), qemu10=v10)) == qio["ref"]


def test_summary_pair_option_and_group_entry_point(qio):
    ev = str(qio["events"])
    cp = virtopt("trace", "summary", str(qio["trace"]), "--events", ev, "--output=json", "--pair",
                 "qcow2_cache_get:qcow2_add_task:co")
    res = json.loads(cp.stdout)
    pair = next(p for p in res["latency"] if p["end"] == "qcow2_add_task")
    assert pair["begin"] == "qcow2_cache_get" and pair["key"] == "co" and pair["pairs"] > 0
    err = _one_line_error(virtopt("trace", "summary", str(qio["trace"]), "--events", ev, "--pair",
                                  "qcow2_cache_get:no_such_event"))
    assert "no_such_event" in err
    cp = virtopt("trace", "summary", str(qio["trace"]), "--pair", "justone")
    assert cp.returncode == 2 and "Traceback" not in cp.stderr
    # the group's own entry point gives the same bytes
    out = subprocess.run([sys.executable, "-m", "qemu_ext.trace", "decode", str(qio["trace"]), "--events", ev],
                         capture_output=True)
    assert out.returncode == 0 and out.stdout == qio["ref"]


def test_arg_labels_name_the_words_of_the_log_text(qio):
    from qemu_ext.trace import arg_labels

    labels = arg_labels("qcow2_cache_get", qio["events"])
    assert list(labels) == ["co", "c", "offset", "read_from_disk"]
    line = next(ln for ln in qio["log"].splitlines() if ln.startswith("qcow2_cache_get "))
    words = line.split()
    rec = next(iter(parse_log_lines([line], qio["events"])))
    for arg, label in labels.items():
        value = words[words.index(label) + 1]
        assert int(value, 0) == rec.args[arg]


def test_two_process_rendering_writes_in_order(qio, tmp_path, monkeypatch):
    """The numpy renderer's forked helper that renders every other window: same bytes, in order,
    no process left."""
    from qemu_ext.trace import decode as dec

    monkeypatch.setattr(dec, "WINDOW_BYTES", 4096)  # many small windows
    st = decode_simple(qio["trace"], qio["events"])
    before = _children()
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}.txt"
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            dec.write_simpletrace_fd(st, fd, jobs=jobs, qemu10=qio["build"].series != "7.2")
        finally:
            os.close(fd)
        assert out.read_bytes() == qio["ref"]
    assert _children() <= before  # the helper was reaped


def _children() -> set[int]:
    out = set()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == os.getpid():
                out.add(int(p.name))
    return out


# --- log-backend text of each stock QEMU ---------------------------------------------------------


def test_log_backend_of_the_stock_qemu(qemu_factory, qemu_build, tmp_path):
    """Debian's 7.2 and the current 10.0 have only the log backend: their stderr lines, decoded with
    their own trace-events-all, give back what the lines say; summary counts them."""
    assert qemu_build.trace_events is not None
    img = make_qcow2(tmp_path / "d.qcow2", size="16M", io=["write -P 0x22 0 1M"], build=qemu_build)
    qp = qemu_factory(name="virtopt-trace-log", extra_args=["-msg", "timestamp=on", "-trace", "qcow2_cache_get*"])
    cl = qp.qmp()
    cl.cmd("blockdev-add", driver="qcow2", **{"node-name": "d0", "file": {"driver": "file", "filename": str(img)}})
    for cmd in ["read 0 64k", "read 512k 64k", "write 4M 64k"]:
        qp.hmp(f'qemu-io d0 "{cmd}"')
    tids = {int(p.name) for p in Path(f"/proc/{qp.pid}/task").iterdir()}
    log = tmp_path / "stderr.log"
    log.write_text(qp.stderr_text())
    qp.stop()
    lines = [ln for ln in log.read_text().splitlines() if re.match(r"\d+@\d+\.\d+:qcow2_cache_get", ln)]
    assert len(lines) >= 3
    ev = str(qemu_build.trace_events)
    js = json.loads(virtopt("trace", "decode", str(log), "--events", ev, "--output=json").stdout)
    assert len(js) == len(lines)
    for j, ln in zip(js, lines):
        m = re.match(r"(\d+)@(\d+)\.(\d+):(\w+) (.*)", ln)
        assert m is not None
        assert j["event"] == m.group(4) and j["pid"] == int(m.group(1)) and j["pid"] in tids
        assert j["timestamp-ns"] == int(m.group(2)) * 10**9 + int(m.group(3)) * 1000
        words = m.group(5).split()
        if j["event"] == "qcow2_cache_get":  # "co 0x... is_l2_cache 1 offset 0x... read_from_disk 0"
            assert j["args"]["offset"] == int(words[words.index("offset") + 1], 16)
            assert j["args"]["c"] == int(words[words.index("is_l2_cache") + 1])
    res = json.loads(virtopt("trace", "summary", str(log), "--events", ev, "--output=json").stdout)
    want: dict[str, int] = {}
    for ln in lines:
        name = ln.split(":", 1)[1].split(" ", 1)[0]
        want[name] = want.get(name, 0) + 1
    assert res["format"] == "log" and {c["event"]: c["count"] for c in res["counts"]} == want
    # simpletrace-style text of log lines: one line per event, the stock QEMU's form
    txt = virtopt("trace", "decode", str(log), "--events", ev).stdout.splitlines()
    assert [t.split(" ", 1)[0] for t in txt] == [j["event"] for j in js]


@PATHS
def test_a_reader_that_goes_away_ends_the_decode_quietly(qio, path_env):
    """`virtopt trace decode FILE | head -1`: exit 0, nothing on stderr, no helper left behind."""
    big = qio["dir"] / "big.bin"
    if not big.exists():  # the trace's records ten times over: more text than a pipe holds
        data = qio["trace"].read_bytes()
        st = decode_simple(qio["trace"], qio["events"])
        first = int(st.offsets[0])
        big.write_bytes(data + data[first:] * 9)
    p = subprocess.Popen([sys.executable, "-m", "qemu_ext", "trace", "decode", str(big), "--events", str(qio["events"])],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **path_env})
    assert p.stdout is not None and p.stderr is not None
    line = p.stdout.readline()
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=60) == 0 and err == b""
    assert line == qio["ref"].splitlines(keepends=True)[0]
