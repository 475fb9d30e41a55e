"""virtopt trace: real traces from the debug QEMU (simple + log backends), checked against QEMU's simpletrace.py."""

from __future__ import annotations

import json
import random
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import make_qcow2, sha256, virtopt
from trace_util import capture_qemu_io, events_file, parse_simpletrace_text, simpletrace_py

from qemu_ext import vm
from qemu_ext.trace import TraceRecord, decode_simple, parse_log_lines, read_columns, read_trace
from qemu_ext.trace.simple import DROPPED_EVENT_ID, DroppedRecord

pytestmark = pytest.mark.debug_qemu


@pytest.fixture(scope="module")
def src() -> Path:
    d = vm.debug_qemu_dir()
    if d is None:
        pytest.skip("the debug QEMU is not built: run tests/qemu/build-debug-qemu (make test does)")
    return d


@pytest.fixture(scope="module")
def qio(src, tmp_path_factory):
    """One qemu-io run with both backends: a simpletrace file and the log text of the same events.

    The workload writes (cluster allocation, L2 allocation), reads with a tiny L2 cache (misses,
    replacements) and so exercises string arguments (qcow2_add_task's action).
    """
    d = tmp_path_factory.mktemp("qio")
    img = make_qcow2(d / "disk.qcow2", size="64M", io=["write -P 0x5a 0 2M", "write 40M 256k"])
    rng = random.Random(5)
    cmds = [f"read {rng.randrange(0, 63 * 16) * 64 * 1024} 64k" for _ in range(300)]
    cmds += ["write 8M 128k", "read 8M 128k", "flush"]
    trace = d / "trace.bin"
    log = capture_qemu_io(
        src, img, trace, cmds, image_opts=f"driver=qcow2,file.filename={img},l2-cache-size=16k,l2-cache-entry-size=4k"
    )
    ref = simpletrace_py(src, trace).stdout
    return {"dir": d, "trace": trace, "log": log, "ref": ref, "image": img}


@pytest.fixture(scope="module")
def sysq(src, tmp_path_factory):
    """The debug qemu-system-x86_64 with -msg timestamp=on: a multi-threaded writer, log lines with pid@sec.usec:."""
    d = tmp_path_factory.mktemp("sysq")
    img = make_qcow2(d / "disk.qcow2", size="16M", io=["write -P 0x11 0 1M"])
    trace = d / "sys.bin"
    qp = vm.start_qemu(
        binary=str(src / "build" / "qemu-system-x86_64"),
        name="virtopt-trace-test",
        extra_args=["-msg", "timestamp=on", "-trace", f"qcow2_*,file={trace}"],
    )
    try:
        t0 = time.time()
        c = qp.qmp()
        c.cmd("blockdev-add", driver="qcow2", **{"node-name": "d0", "file": {"driver": "file", "filename": str(img)}})
        for cmd in ["read 0 64k", "read 512k 128k", "write 2M 64k", "read 2M 64k"]:
            qp.hmp(f'qemu-io d0 "{cmd}"')
        qp.hmp("trace-file flush")
        tids = {int(p.name) for p in Path(f"/proc/{qp.pid}/task").iterdir()}
        t1 = time.time()
        pid = qp.pid
        log = qp.stderr_text()
    finally:
        qp.stop()
    return {"trace": trace, "tids": tids, "pid": pid, "t0": t0, "t1": t1, "stderr": log}


# --- simpletrace files ---------------------------------------------------------------------------


def test_decode_is_byte_identical_to_simpletrace_py(qio):
    before = sha256(qio["trace"])
    cp = virtopt("trace", "decode", str(qio["trace"]), text=False)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == qio["ref"]
    assert b"action=b'" in cp.stdout  # string arguments were in it
    assert sha256(qio["trace"]) == before


def test_decode_of_a_system_emulator_trace_is_identical_too(src, sysq):
    ref = simpletrace_py(src, sysq["trace"]).stdout
    assert ref.count(b"\n") > 5
    cp = virtopt("trace", "decode", str(sysq["trace"]), "--events", str(events_file(src)), text=False)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == ref


def test_records_match_simpletrace_py_fields(qio):
    ref = parse_simpletrace_text(qio["ref"].decode())
    recs = list(read_trace(qio["trace"]))
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
    cols = read_columns(qio["trace"], names={"qcow2_cache_get", "qcow2_cache_get_done"})
    get = cols["qcow2_cache_get"]
    assert set(get) >= {"index", "timestamp_ns", "pid", "co", "c", "offset", "read_from_disk"}
    assert len(get["offset"]) == len(ref) > 100
    assert get["offset"].tolist() == [int(a["offset"], 16) for _, _, _, a in ref]
    assert get["c"].tolist() == [int(a["c"], 16) for _, _, _, a in ref]
    assert np.all(np.diff(get["index"]) > 0)
    # misses: a tiny L2 cache must have made QEMU read tables from disk
    assert get["read_from_disk"].sum() > 0


def test_binary_and_log_backends_give_the_same_records(qio):
    binrecs = list(read_trace(qio["trace"]))
    logrecs = list(parse_log_lines(qio["log"].splitlines()))
    assert len(logrecs) == len(binrecs)
    # with stdout and stderr on one terminal, qemu-io's prompt can precede an event
    first = qio["log"].splitlines()[0]
    assert list(parse_log_lines(["qemu-io> " + first])) == logrecs[:1]
    for b, lg in zip(binrecs, logrecs):
        assert lg.name == b.name
        assert lg.args == b.args  # hex stays int, %s stays str, %d signed
        assert lg.timestamp_ns is None and lg.pid is None


def test_log_lines_with_pid_and_wall_clock_prefix(sysq):
    log = sysq["stderr"]
    assert log is not None and "@" in log
    recs = list(parse_log_lines(log.splitlines()))
    binrecs = list(read_trace(sysq["trace"]))
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
    recs = list(read_trace(p))
    assert recs == [TraceRecord(r.name, r.args, None, None) for r in read_trace(qio["trace"])]
    cols = read_columns(p, names={"qcow2_cache_get"})
    assert cols["qcow2_cache_get"]["offset"].tolist() == read_columns(qio["trace"])["qcow2_cache_get"]["offset"].tolist()


def test_truncated_tail_decodes_every_complete_record(qio, tmp_path):
    data = qio["trace"].read_bytes()
    ref_lines = qio["ref"].splitlines(keepends=True)
    st = decode_simple(qio["trace"])
    offs = st.offsets.tolist()
    for cut in [int(offs[len(offs) // 2]) + 13, int(offs[-1]) + 8, len(data) - 1]:
        t = tmp_path / f"cut{cut}.bin"
        t.write_bytes(data[:cut])
        complete = sum(1 for i, o in enumerate(offs) if o + 8 + int(st.lengths[i]) <= cut)
        cp = virtopt("trace", "decode", str(t), text=False)
        assert cp.returncode == 0
        assert cp.stdout == b"".join(ref_lines[:complete])
        err = cp.stderr.decode()
        assert "truncated" in err and str(cut - int(offs[complete])) in err and "Traceback" not in err


def _one_line_error(cp) -> str:
    err = cp.stderr if isinstance(cp.stderr, str) else cp.stderr.decode()
    assert cp.returncode != 0
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_bad_files_give_one_clear_line(qio, tmp_path, src):
    data = qio["trace"].read_bytes()
    cases = {}
    cases["image"] = qio["image"]
    v3 = tmp_path / "v3.bin"
    v3.write_bytes(data[:16] + struct.pack("<Q", 3) + data[24:])
    cases["v3"] = v3
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    cases["empty"] = empty
    cases["dir"] = tmp_path
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(data[:24] + bytes(range(256)) * 4)
    cases["garbage"] = garbage
    errs = {k: _one_line_error(virtopt("trace", "decode", str(p))) for k, p in cases.items()}
    assert "version 3" in errs["v3"]
    assert "not a trace" in errs["image"]
    assert "corrupt" in errs["garbage"]
    # an event id that no mapping record names
    st = decode_simple(qio["trace"])
    off = int(st.offsets[3])
    bad = bytearray(data)
    bad[off + 8 : off + 16] = struct.pack("<Q", 99999)
    unk = tmp_path / "unknown-id.bin"
    unk.write_bytes(bytes(bad))
    assert "event id 99999" in _one_line_error(virtopt("trace", "decode", str(unk)))
    # a trace-events file that does not declare the traced events
    other = src / "hw" / "usb" / "trace-events"
    err = _one_line_error(virtopt("trace", "decode", str(qio["trace"]), "--events", str(other)))
    assert "not in" in err and "qcow2_" in err
    err = _one_line_error(virtopt("trace", "summary", str(qio["image"])))
    assert "not a trace" in err


def test_dropped_records_read_as_simpletrace_py_reads_them(qio, src, tmp_path):
    """A dropped-events record (as trace/simple.c writes it) spliced into a real trace."""
    data = qio["trace"].read_bytes()
    st = decode_simple(qio["trace"])
    at = int(st.offsets[10])
    ts = int(st.timestamps[10]) - 1
    rec = DroppedRecord.build(
        {"type": 1, "event": DROPPED_EVENT_ID, "timestamp_ns": ts, "length": 32, "pid": int(st.pids[0]), "num_events_dropped": 42}
    )
    t = tmp_path / "dropped.bin"
    t.write_bytes(data[:at] + rec + data[at:])
    ref = simpletrace_py(src, t).stdout
    assert b"Dropped_Event" in ref
    cp = virtopt("trace", "decode", str(t), text=False)
    assert cp.returncode == 0 and cp.stdout == ref
    cp = virtopt("trace", "summary", str(t), "--output=json")
    res = json.loads(cp.stdout)
    assert res["dropped"] == {"records": 1, "events": 42}
    recs = list(read_trace(t))
    assert recs[10].name == "dropped" and recs[10].args == {"num_events_dropped": 42}


def test_summary_counts_and_latencies_agree_with_simpletrace_py(qio, tmp_path):
    ref = parse_simpletrace_text(qio["ref"].decode())
    png = tmp_path / "summary.png"
    cp = virtopt("trace", "summary", str(qio["trace"]), "--output=json", "--plot", str(png))
    assert cp.returncode == 0, cp.stderr
    res = json.loads(cp.stdout)
    counts = {}
    for name, *_ in ref:
        counts[name] = counts.get(name, 0) + 1
    assert {c["event"]: c["count"] for c in res["counts"]} == counts
    assert res["events"] == len(ref)
    assert res["duration_ns"] == ref[-1][1] - ref[0][1]
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
    assert pair["max_ns"] == max(lat) and pair["min_ns"] == min(lat)
    srt = sorted(lat)  # nearest-rank percentiles
    for q in (50, 90, 99):
        assert pair[f"p{q}_ns"] == srt[-(-q * len(srt) // 100) - 1]
    assert sum(h["count"] for h in pair["histogram"]) == len(lat)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    human = virtopt("trace", "summary", str(qio["trace"]))
    assert human.returncode == 0
    assert "qcow2_cache_get -> qcow2_cache_get_done" in human.stdout
    assert f"{counts['qcow2_cache_get']:>10}" in human.stdout


def test_summary_of_log_text(qio, tmp_path):
    p = tmp_path / "stderr.log"
    p.write_text(qio["log"])
    res = json.loads(virtopt("trace", "summary", str(p), "--output=json").stdout)
    binres = json.loads(virtopt("trace", "summary", str(qio["trace"]), "--output=json").stdout)
    assert res["format"] == "log" and res["duration_ns"] is None
    assert all("p50_ns" not in p for p in res["latency"])  # no timestamps, no latencies
    assert res["counts"] == [dict(c, per_s=None) for c in binres["counts"]]
    assert [(p["begin"], p["end"], p["pairs"]) for p in res["latency"]] == [
        (p["begin"], p["end"], p["pairs"]) for p in binres["latency"]
    ]


def test_json_and_csv_outputs(qio):
    recs = list(read_trace(qio["trace"]))
    js = json.loads(virtopt("trace", "decode", str(qio["trace"]), "--output=json").stdout)
    assert len(js) == len(recs)
    assert [(j["event"], j["timestamp_ns"], j["pid"], j["args"]) for j in js] == [
        (r.name, r.timestamp_ns, r.pid, r.args) for r in recs
    ]
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(virtopt("trace", "decode", str(qio["trace"]), "--output=csv").stdout)))
    assert len(rows) == len(recs)
    assert rows[5]["event"] == recs[5].name and int(rows[5]["timestamp_ns"]) == recs[5].timestamp_ns


def test_help_has_examples():
    for sub in ("decode", "summary"):
        cp = virtopt("trace", sub, "--help")
        assert cp.returncode == 0 and "examples:" in cp.stdout
    cp = virtopt("trace", "decode")
    assert cp.returncode == 2


def test_mutated_traces_never_crash(qio, tmp_path):
    """Random corruption of a real trace: either it decodes or one BadInputError, never anything else."""
    from qemu_ext.errors import BadInputError

    data = qio["trace"].read_bytes()
    rng = random.Random(1234)
    outcomes = {"ok": 0, "bad": 0}
    for _ in range(150):
        b = bytearray(data[: rng.randrange(24, len(data) + 1)])
        for _ in range(rng.randrange(1, 6)):
            i = rng.randrange(len(b))
            b[i] = rng.randrange(256)
        try:
            st = decode_simple("mutated", data=bytes(b))
            for _ in st.records():
                pass
            outcomes["ok"] += 1
        except BadInputError as exc:
            assert "\n" not in str(exc)
            outcomes["bad"] += 1
    assert outcomes["ok"] and outcomes["bad"]


def test_copied_trace_file_decodes_the_same(qio, tmp_path):
    # a trace copied elsewhere and given a .log-like name is still recognised by its header
    t = tmp_path / "trace.log"
    shutil.copy(qio["trace"], t)
    assert virtopt("trace", "decode", str(t), text=False).stdout == qio["ref"]


def _edit_timestamps(src_path: Path, dst: Path, edits: dict[int, int]) -> None:
    """Copy a real trace, replacing the timestamps of some records (record index -> new timestamp)."""
    st = decode_simple(src_path)
    b = bytearray(src_path.read_bytes())
    for i, ts in edits.items():
        off = int(st.offsets[i]) + 16
        b[off : off + 8] = struct.pack("<Q", ts & (2**64 - 1))
    dst.write_bytes(bytes(b))


def test_backwards_and_huge_time_steps_print_like_simpletrace_py(qio, src, tmp_path, monkeypatch):
    """Deltas below zero and beyond float exactness (simpletrace.py prints '%0.3f' % (ns / 1000.0))."""
    from qemu_ext.trace import decode as dec

    st = decode_simple(qio["trace"])
    ts = [int(x) for x in st.timestamps]
    edits = {5: ts[4] - 7, 6: ts[4] - 1_234_567}
    for i in range(20, len(ts)):
        edits[i] = ts[i] + 2**53 + 12345  # one step far beyond 2**52 ns, then normal steps again
    edits[40] = ts[40] + 2**63 + 999  # wraps around in u64 differences
    t = tmp_path / "edited.bin"
    _edit_timestamps(qio["trace"], t, edits)
    ref = simpletrace_py(src, t).stdout
    assert b" -0.007 " in ref or b" -1234.567 " in ref
    cp = virtopt("trace", "decode", str(t), text=False)
    assert cp.returncode == 0 and cp.stdout == ref
    # the block renderer (used when lines have too many different layouts) prints the same
    monkeypatch.setattr(dec, "MAX_GROUPS", 0)
    assert b"".join(dec.iter_simpletrace_text(decode_simple(t))) == ref
    assert b"".join(dec.iter_simpletrace_text(decode_simple(qio["trace"]))) == qio["ref"]


def test_summary_pair_option_and_group_entry_point(qio):
    cp = virtopt("trace", "summary", str(qio["trace"]), "--output=json", "--pair", "qcow2_cache_get:qcow2_add_task:co")
    res = json.loads(cp.stdout)
    pair = next(p for p in res["latency"] if p["end"] == "qcow2_add_task")
    assert pair["begin"] == "qcow2_cache_get" and pair["key"] == "co" and pair["pairs"] > 0
    err = _one_line_error(virtopt("trace", "summary", str(qio["trace"]), "--pair", "qcow2_cache_get:no_such_event"))
    assert "no_such_event" in err
    cp = virtopt("trace", "summary", str(qio["trace"]), "--pair", "justone")
    assert cp.returncode == 2 and "Traceback" not in cp.stderr
    # the group's own entry point gives the same bytes
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "qemu_ext.trace", "decode", str(qio["trace"])], capture_output=True)
    assert out.returncode == 0 and out.stdout == qio["ref"]


def test_arg_labels_name_the_words_of_the_log_text(qio):
    from qemu_ext.trace import arg_labels

    labels = arg_labels("qcow2_cache_get")
    assert list(labels) == ["co", "c", "offset", "read_from_disk"]
    line = next(ln for ln in qio["log"].splitlines() if ln.startswith("qcow2_cache_get "))
    words = line.split()
    rec = next(iter(parse_log_lines([line])))
    for arg, label in labels.items():
        value = words[words.index(label) + 1]
        assert int(value, 0) == rec.args[arg]


def test_two_process_rendering_writes_in_order(qio, tmp_path, monkeypatch):
    """The forked helper that renders every other window: same bytes, in order, no process left."""
    import os

    from qemu_ext.trace import decode as dec

    monkeypatch.setattr(dec, "WINDOW_BYTES", 4096)  # many small windows
    st = decode_simple(qio["trace"])
    before = _children()
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}.txt"
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            dec.write_simpletrace_fd(st, fd, jobs=jobs)
        finally:
            os.close(fd)
        assert out.read_bytes() == qio["ref"]
    assert _children() <= before  # the helper was reaped


def _children() -> set[int]:
    import os

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
