"""One voice, JSON side: every report's `--output=json` (gdb and inspect views: `--json`) uses
kebab-case keys, as qemu-img and QMP write them, also inside nested objects and lists.

The commands are enumerated from the argparse tree (every group and sub-command), the structures
of `qcow2 dump`, the views of `virtopt gdb` and `virtopt inspect`, and the shell's built-in
registry: a new one without a case below fails test_every_report_has_a_json_case. Each case runs the
real CLI on real inputs: a qcow2 image made by qemu-img/qemu-io (snapshot, bitmap, compressed and
zero clusters, a backing chain, a leaked cluster), QEMU's own traces (qemu-io's log-backend text,
the debug build's simpletrace file), a stock QEMU (`module_qemu_factory`: threads, doctor, the
shell, l2cache tune) and a debug QEMU (`module_debug_qemu_factory`: gdb, inspect, the simple
backend's /trace-file), each on 7.2 and 10.0.

Keys that are not ours to name are listed in QEMU_KEYS with the reason (QEMU's QMP replies,
trace event and argument names, QEMU's address-space names, ids read from /sys).
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from helpers import gdb_batch, make_qcow2, qemu_tool, run, virtopt
from qcow2_util import corrupt_leak
from voice_util import in_process

KEBAB = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")

# (case id prefix, regex on the key's path, why the key is not ours to name). A path is the keys
# from the top joined by ".", "[]" for a list item: "checks[].found.cores.0/0".
QEMU_KEYS: list[tuple[str, str, str]] = [
    ("trace decode", r"^\[\]\.args\.[^.]+$",
     "trace event arguments by the names QEMU's trace-events file declares (is_l2_cache, read_from_disk)"),
    ("trace summary", r"^(rate\.by-event|counts|events|latency|pairs)(\[\])?\.[A-Za-z0-9_]+$",
     "keyed by trace event name, as QEMU spells it (qcow2_cache_get)"),
    ("shell QMP", r"^return\b.*",
     "a QMP command's reply, as QEMU gives it (query-blockstats has rd_bytes)"),
    ("shell /mtree", r"^[^.\[]+$", "the tree keyed by QEMU's own address-space names (memory, I/O, cpu-memory-0)"),
    ("doctor", r"^checks\[\]\.found\.cores\.[0-9]+/[0-9]+$",
     "CPU cores keyed by package/core id as /sys/devices/system/cpu names them"),
    ("gdb info", r"^commands\.[a-z]+ [a-z]+$",
     "the commands' names as typed (`mtree lookup`, `trace list`), which are the keys of `commands`"),
    ("inspect info", r"^commands\.[a-z]+ [a-z]+$",
     "the commands' names as typed (`mtree lookup`, `trace list`), which are the keys of `commands`"),
]


def bad_keys(case: str, doc: Any) -> list[str]:
    """Paths of keys that are not kebab-case and not in QEMU_KEYS for this case."""
    allowed = [re.compile(rx) for prefix, rx, _why in QEMU_KEYS if case.startswith(prefix)]
    out: list[str] = []

    def walk(o: Any, path: str) -> None:
        if isinstance(o, dict):
            for k, v in o.items():
                p = f"{path}.{k}" if path else str(k)
                if not KEBAB.match(str(k)) and not any(rx.search(p) for rx in allowed):
                    out.append(p)
                walk(v, p)
        elif isinstance(o, list):
            for v in o:
                walk(v, path + "[]")

    walk(doc, "")
    return sorted(set(out))


def json_docs(text: str) -> list[Any]:
    """One JSON document, or one per line (the shell with several -c, gdb's command --json)."""
    text = text.strip()
    assert text, "no JSON on stdout"
    try:
        return [json.loads(text)]
    except json.JSONDecodeError:
        return [json.loads(ln) for ln in text.splitlines() if ln.strip()]


def check(case: str, argv: list[str], ok: tuple[int, ...] = (0,)) -> list[Any]:
    rc, stdout, stderr = in_process(argv)
    assert rc in ok, f"{case}: exit {rc}: {stderr.strip()}"
    assert "Traceback" not in stderr
    docs = json_docs(stdout)
    bad = [b for d in docs for b in bad_keys(case, d)]
    assert not bad, f"{case}: keys not in kebab-case: {bad}"
    return docs


# -- which reports exist -------------------------------------------------------------------------------

# Commands (and sub-structures) without a JSON report, and why.
NO_JSON = {
    "demo": "a guided tour for people: each step's data is another command's JSON",
    "shell /quit": "leaves the shell; no data",
    "shell /json": "prints another built-in's result as JSON: covered by each built-in's --output=json",
    "inspect bt": "refuses in one line (a backtrace needs the threads' registers: virtopt gdb PID -c bt)",
}


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def every_report() -> set[str]:
    """Every command a user can ask for a report: argparse leaves, qcow2 dump's structures, the gdb and
    inspect views, the shell's built-ins."""
    from qemu_ext.cli import build_parser
    from qemu_ext.introspect import cli as icli
    from qemu_ext.introspect.views import NAMES
    from qemu_ext.qmp.builtins import commands

    out: set[str] = set()

    def leaves(p: argparse.ArgumentParser, path: list[str]) -> None:
        subs = _subparsers(p)
        if not subs:
            out.add(" ".join(path))
        for name, sp in subs.items():
            leaves(sp, [*path, name])

    top = build_parser()
    leaves(top, [])
    dump = _subparsers(_subparsers(top)["qcow2"])["dump"]
    what = next(a for a in dump._actions if a.dest == "what")
    out |= {f"qcow2 dump {w}" for w in what.choices}
    out |= {f"gdb {n}" for n in NAMES}
    out |= {f"inspect {v}" for v in _subparsers(icli._view_parser())}
    out |= {f"shell /{b.name}" for b in commands()}
    return out


@dataclass
class Case:
    id: str
    argv: Callable[[Any], list[str]]  # world -> argv
    ok: tuple[int, ...] = (0,)


def _c(id_: str, *argv: str, ok: tuple[int, ...] = (0,)) -> Case:
    return Case(id_, lambda w: [a.format(w=w) for a in argv], ok)


OFFLINE = [
    _c("qcow2 info", "qcow2", "info", "{w.img}", "--output=json"),
    _c("qcow2 info chain", "qcow2", "info", "{w.top}", "--backing-chain", "--output=json"),
    _c("qcow2 map", "qcow2", "map", "{w.top}", "--output=json"),
    _c("qcow2 check", "qcow2", "check", "{w.img}", "--output=json"),
    _c("qcow2 check leaks", "qcow2", "check", "{w.leaky}", "--output=json", ok=(3,)),
    *[_c(f"qcow2 dump {what}", "qcow2", "dump", "{w.img}", what, *extra, "--output=json")
      for what, extra in (("header", ()), ("extensions", ()), ("l1", ()), ("l2", ("--l1-index", "0")),
                          ("refcounts", ()), ("snapshots", ()), ("bitmaps", ()))],
    _c("qcow2 read", "qcow2", "read", "{w.img}", "0", "512", "--output=json"),
    _c("qcow2 convert", "qcow2", "convert", "{w.img}", "{w.raw}", "--output=json"),
    _c("l2cache simulate", "l2cache", "simulate", "{w.img}", "--trace", "{w.log}", "--output=json", "--detailed"),
    _c("l2cache simulate synthetic", "l2cache", "simulate", "--virtual-size", "1G", "--count", "2000", "--output=json"),
    _c("l2cache curve", "l2cache", "curve", "{w.img}", "--trace", "{w.log}", "--output=json"),
    _c("l2cache recommend", "l2cache", "recommend", "{w.img}", "--qemu-io", "{w.cmds}", "--output=json"),
    _c("trace decode log", "trace", "decode", "{w.log}", "--output=json"),
    _c("trace summary log", "trace", "summary", "{w.log}", "--output=json"),
    _c("doctor", "doctor", "--interval", "0.2", "--output=json"),
]

STOCK = [
    _c("threads", "threads", "{w.pid}", "--output=json"),
    _c("threads qmp", "threads", "{w.sock}", "--output=json"),
    _c("doctor vm", "doctor", "--vm", "{w.pid}", "--interval", "0", "--output=json"),
    _c("l2cache tune", "l2cache", "tune", "{w.sock}", "--node", "disk0", "--seconds", "0.3", "--baseline", "0",
       "--output=json"),
]

# the shell: one process runs every built-in (one JSON document per line, in order): (report, line)
SHELL = [("shell QMP", "query-blockstats"), ("shell /help", "/help"), ("shell /help QMP", "/help query-status"),
         ("shell /hmp", "/hmp info status"), ("shell /threads", "/threads"),
         ("shell /mtree lookup", "/mtree lookup 0x70 io"), ("shell /mtree", "/mtree"), ("shell /l2cache", "/l2cache"),
         ("shell /l2cache tune", "/l2cache tune disk0 --seconds 0.3 --baseline 0"),
         ("shell /trace list", "/trace list qcow2_cache_get*"), ("shell /trace on", "/trace on qcow2_cache_get"),
         ("shell /trace off", "/trace off qcow2_cache_get"),
         ("shell /trace capture", "/trace capture qcow2_cache_get* 0.3 --node disk0"),
         ("shell /stats vm", "/stats vm"), ("shell /stats vcpu", "/stats vcpu")]

# gdb: one attach runs every view (`VIEW --json` puts the view's data in the wrapper's JSON):
# (the view as `virtopt info` lists it, the command line)
GDB_VIEWS = [("info", "info"), ("threads", "threads"), ("vcpus", "vcpus"), ("mtree", "mtree"),
             ("mtree lookup", "mtree lookup 0x70"), ("timers", "timers"),
             ("trace list", "trace list qcow2_cache_get*"), ("trace enable", "trace enable qcow2_cache_get"),
             ("trace disable", "trace disable qcow2_cache_get"), ("qcow2", "qcow2"), ("coroutines", "coroutines"),
             ("block", "block"), ("waiters", "waiters"), ("locks", "locks"), ("bt", "bt"), ("cpustate", "cpustate")]

DEBUG = [
    _c("inspect info", "inspect", "{w.pid}", "info", "--json"),
    _c("inspect threads", "inspect", "{w.pid}", "threads", "--json"),
    _c("inspect vcpus", "inspect", "{w.pid}", "vcpus", "--json"),
    _c("inspect mtree", "inspect", "{w.pid}", "mtree", "--flat", "--json"),
    _c("inspect mtree lookup", "inspect", "{w.pid}", "mtree", "lookup", "0x70", "--as", "I/O", "--json"),
    _c("inspect timers", "inspect", "{w.pid}", "timers", "--json"),
    _c("inspect trace", "inspect", "{w.pid}", "trace", "list", "qcow2_cache_*", "--json"),
    _c("inspect qcow2", "inspect", "{w.pid}", "qcow2", "--json"),
    _c("inspect coroutines", "inspect", "{w.pid}", "coroutines", "--pools", "--json"),
    _c("inspect block", "inspect", "{w.pid}", "block", "--json"),
    _c("inspect waiters", "inspect", "{w.pid}", "waiters", "--json"),
    _c("inspect locks", "inspect", "{w.pid}", "locks", "--json"),
    _c("inspect cpustate", "inspect", "{w.pid}", "cpustate", "--json"),
    _c("shell /trace-file", "shell", "{w.sock}", "--output=json", "-c", "/trace-file"),  # the simple backend
    _c("inspect info core", "inspect", "--core", "{w.core}", "info", "--json"),
    _c("inspect threads core", "inspect", "--core", "{w.core}", "threads", "--json"),
    _c("inspect vcpus core", "inspect", "--core", "{w.core}", "vcpus", "--json"),
    _c("trace decode simpletrace", "trace", "decode", "{w.simple}", "--output=json"),
    _c("trace summary simpletrace", "trace", "summary", "{w.simple}", "--output=json"),
]


def _covered() -> set[str]:
    """The reports the cases run: a case id is its report, or the report followed by what varies."""
    ids = {c.id for c in OFFLINE + STOCK + DEBUG} | {f"gdb {view}" for view, _line in GDB_VIEWS} | \
        {rep for rep, _line in SHELL}
    return {rep for rep in every_report() if any(i == rep or i.startswith(rep + " ") for i in ids)}


def test_every_report_has_a_json_case():
    missing = every_report() - _covered() - set(NO_JSON)
    assert not missing, f"commands with no JSON case here (add one, or to NO_JSON with the reason): {sorted(missing)}"
    stale = set(NO_JSON) - every_report()
    assert not stale, f"NO_JSON names commands that do not exist: {sorted(stale)}"


def test_the_walker_flags_what_a_user_would_see():
    """The check itself: snake_case and camelCase keys are found at any depth, QEMU's keys only where listed."""
    doc = {"cluster-size": 1, "a": [{"l2_offset": 2, "ok-key": {"hitRatio": 3}}]}
    assert bad_keys("qcow2 dump l2", doc) == ["a[].l2_offset", "a[].ok-key.hitRatio"]
    assert bad_keys("trace decode log", [{"args": {"is_l2_cache": 1}}]) == []
    assert bad_keys("trace summary log", [{"args": {"is_l2_cache": 1}}]) == ["[].args.is_l2_cache"]


def test_json_is_written_as_qemu_img_writes_it():
    """Every report's JSON comes from output.dumps_json: the bytes of json.dumps(indent=4) (qemu-img's
    layout) for any document, odd strings, numbers and nesting included."""
    import random

    from qemu_ext.output import dumps_json

    rng = random.Random(7)
    leaves = [0, -1, 2**70, 1.5, -0.0, 1e-7, 1e300, float("nan"), float("inf"), -float("inf"), True, False, None,
              "", "plain", "é ü \u2028 \x00 \t \" \\ \U0001F600", (1, "t")]

    def doc(depth: int) -> Any:
        r = rng.random()
        if depth > 4 or r < 0.4:
            return rng.choice(leaves)
        if r < 0.7:
            return {rng.choice(["a", "cluster-size", "é", '"q']) + str(i): doc(depth + 1) for i in range(rng.randint(0, 5))}
        return [doc(depth + 1) for _ in range(rng.randint(0, 5))]

    for _ in range(3000):
        d = doc(0)
        assert dumps_json(d) == json.dumps(d, indent=4), d
    odd = {1: "int key", "set": sorted({3, 1})}  # a non-string key: json.dumps's own conversion
    assert dumps_json(odd) == json.dumps(odd, indent=4)


# -- inputs --------------------------------------------------------------------------------------------


@dataclass
class Offline:
    img: Path
    top: Path
    leaky: Path
    raw: Path
    log: Path
    cmds: Path


@pytest.fixture(scope="module")
def offline(tmp_path_factory: pytest.TempPathFactory) -> Offline:
    d = tmp_path_factory.mktemp("voicejson")
    img = make_qcow2(d / "img.qcow2", size="64M",
                     io=["write -P 1 0 1M", "write -c 2M 64k", "write -z 3M 64k", "write -P 2 40M 64k"])
    run(["qemu-img", "snapshot", "-c", "snap1", str(img)])
    run(["qemu-img", "bitmap", "--add", str(img), "bm0"])
    top = make_qcow2(d / "top.qcow2", size=None, backing=str(img), io=["write -P 3 1M 64k"])
    leaky = make_qcow2(d / "leaky.qcow2", size="16M", io=["write 0 64k"])
    corrupt_leak(leaky)
    log = d / "qemu-io.log"  # QEMU's log backend text: qemu-io -T prints the events on stderr
    cp = run(["qemu-io", "-T", "qcow2_cache_*", "-c", "read 0 1M", "-c", "read 40M 64k", "-c", "write 2M 4k",
              str(img)])
    log.write_text(cp.stderr)
    assert "qcow2_cache_get " in cp.stderr
    cmds = d / "cmds.txt"
    cmds.write_text("read 0 64k\nread 40M 64k\nread 0 64k\n")
    run(["qemu-img", "snapshot", "-l", str(img)])
    return Offline(img, top, leaky, d / "out.raw", log, cmds)


def batch(cases: list[Case], world: Any) -> dict[str, Optional[str]]:
    """Run every case once (each case's error, or None), so that the parametrised tests below only read."""
    out: dict[str, Optional[str]] = {}
    for c in cases:
        try:
            check(c.id, c.argv(world), c.ok)
            out[c.id] = None
        except AssertionError as exc:
            out[c.id] = str(exc)
    return out


@pytest.fixture(scope="module")
def offline_results(offline: Offline) -> dict[str, Optional[str]]:
    return batch(OFFLINE, offline)


@pytest.mark.parametrize("case", [c.id for c in OFFLINE])
def test_offline_report_keys(case: str, offline_results: dict[str, Any]):
    err = offline_results[case]
    assert err is None, err


@dataclass
class Live:
    pid: int
    sock: Path
    simple: Optional[Path] = None
    core: Optional[Path] = None


def _live(factory: Callable[..., Any], tmp: Path, build: Any) -> Live:
    img = make_qcow2(tmp / "disk.qcow2", size="1G", build=build)
    sock = tmp / "cli.sock"
    qp = factory(name="voice-json", smp=2, extra_args=[
        "-blockdev", f"driver=qcow2,node-name=disk0,l2-cache-size=65536,file.driver=file,file.filename={img}",
        "-D", str(tmp / "qemu.log"), "-qmp", f"unix:{sock},server=on,wait=off"])
    c = qp.qmp()
    for i in range(16):  # allocated clusters in 16 L2 slices: L2 lookups for the captures to see
        c.cmd("human-monitor-command", **{"command-line": f'qemu-io disk0 "write {i << 26} 64k"'})
    c.close()
    return Live(qp.pid, sock)


@pytest.fixture(scope="module")
def stock(module_qemu_factory, qemu_build, tmp_path_factory) -> Live:
    return _live(module_qemu_factory, tmp_path_factory.mktemp("voicestock"), qemu_build)


@pytest.fixture(scope="module")
def debug(module_debug_qemu_factory, debug_build, tmp_path_factory) -> Live:
    tmp = tmp_path_factory.mktemp("voicedebug")
    w = _live(module_debug_qemu_factory, tmp, debug_build)
    # the debug build's simple backend: a simpletrace file written by its qemu-io
    img = make_qcow2(tmp / "t.qcow2", size="64M", io=["write 0 1M"], build=debug_build)
    w.simple = tmp / "trace.bin"
    qemu_tool(debug_build, "io", "--trace", f"enable=qcow2_cache_*,file={w.simple}", "-c", "read 0 1M", str(img))
    w.core = tmp / "qemu.core"  # post-mortem reports read a core of it
    gdb_batch(w.pid, [f"generate-core-file {w.core}"], timeout=120)
    assert w.core.exists()
    return w


@pytest.fixture(scope="module")
def stock_results(stock: Live) -> dict[str, Optional[str]]:
    return batch(STOCK, stock)


@pytest.mark.parametrize("case", [c.id for c in STOCK])
def test_live_report_keys(case: str, stock_results: dict[str, Optional[str]]):
    err = stock_results[case]
    assert err is None, err


@pytest.fixture(scope="module")
def shell_run(stock: Live) -> dict[str, Any]:
    argv = ["shell", str(stock.sock), "--output=json", "--keep-going"]
    for _rep, line in SHELL:
        argv += ["-c", line]
    cp = virtopt(*argv, timeout=120)
    assert cp.returncode == 0 and "Traceback" not in cp.stderr, cp.stderr
    lines = cp.stdout.splitlines()
    assert len(lines) == len(SHELL), cp.stdout
    return {rep: json.loads(ln) for (rep, _line), ln in zip(SHELL, lines)}


@pytest.mark.parametrize("report", [rep for rep, _line in SHELL])
def test_shell_builtin_keys(report: str, shell_run: dict[str, Any]):
    bad = bad_keys(report, shell_run[report])
    assert not bad, f"{report}: keys not in kebab-case: {bad}"


@pytest.fixture(scope="module")
def debug_results(debug: Live) -> dict[str, Optional[str]]:
    return batch(DEBUG, debug)


@pytest.mark.parametrize("case", [c.id for c in DEBUG])
def test_debug_report_keys(case: str, debug_results: dict[str, Optional[str]]):
    err = debug_results[case]
    assert err is None, err


@pytest.fixture(scope="module")
def gdb_run(debug: Live) -> dict[str, Any]:
    argv = ["gdb", str(debug.pid), "--output=json"]
    for _view, line in GDB_VIEWS:
        argv += ["-c", f"{line} --json"]
    cp = virtopt(*argv, timeout=300)
    assert "Traceback" not in cp.stderr
    doc = json.loads(cp.stdout)
    return {"doc": doc, "by": dict(zip([v for v, _line in GDB_VIEWS], doc["commands"]))}


@pytest.fixture(scope="module")
def gdb_core_run(debug: Live) -> dict[str, Any]:
    """A core's views through gdb (post-mortem): one gdb runs them all."""
    views = ["info", "threads", "vcpus", "timers", "mtree", "qcow2"]
    argv = ["gdb", "--core", str(debug.core), "--output=json"]
    for v in views:
        argv += ["-c", f"{v} --json"]
    cp = virtopt(*argv, timeout=300)
    assert cp.returncode == 0 and "Traceback" not in cp.stderr, cp.stderr
    doc = json.loads(cp.stdout)
    return {"doc": doc, "by": dict(zip(views, doc["commands"]))}


def _gdb_view_bad_keys(run: dict[str, Any], view: str) -> list[str]:
    """Keys not in kebab-case in one view's report of a `virtopt gdb --output=json` run and in the wrapper around it."""
    c = run["by"][view]
    assert c["ok"], f"gdb {view}: {c['error']}"
    wrapper = {**{k: v for k, v in run["doc"].items() if k != "commands"},
               "commands": [{k: v for k, v in c.items() if k != "data"}]}
    return bad_keys(f"gdb {view}", c["data"]) + bad_keys("gdb", wrapper)


@pytest.mark.parametrize("view", ["info", "threads", "vcpus", "timers", "mtree", "qcow2"])
def test_gdb_core_view_keys(view: str, gdb_core_run: dict[str, Any]):
    bad = _gdb_view_bad_keys(gdb_core_run, view)
    assert not bad, f"gdb --core {view}: keys not in kebab-case: {bad}"


@pytest.mark.parametrize("view", [f"gdb {v}" for v, _line in GDB_VIEWS])
def test_gdb_view_keys(view: str, gdb_run: dict[str, Any]):
    view = view.removeprefix("gdb ")
    bad = _gdb_view_bad_keys(gdb_run, view)
    assert not bad, f"gdb {view}: keys not in kebab-case: {bad}"
