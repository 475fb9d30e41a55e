"""One voice, error side: the bad-input matrix of issue 13 as one parametrised test per kind of input.

For every command that takes that kind of input, each condition gives exactly one line on stderr,
`virtopt: ` then the one wording CONTRIBUTING.md (qemu_ext.errors) gives that condition, and the
documented exit code; never a traceback, never a hang (every run is bounded in time).

- files (images, traces, qemu-io command files, trace-events files, cores): missing, directory,
  empty, binary, FIFO, and "unreadable". Tests run as root, which reads any mode, so the file that
  cannot be opened is a symbolic link to itself: open() fails with ELOOP ("Too many levels of
  symbolic links"), the OS's own reason, like EACCES for a user.
- a QEMU by PID: a process that is not QEMU (a `sleep` the test starts), PID 1, a PID that does not
  exist; `threads --pin` on the non-QEMU process changes nothing (its affinity is read back).
- a QMP address: a dead socket (bound, never listened on), a regular file, a directory, a FIFO, a
  missing path.
- numbers and sizes: every option or argument of every command whose value is a number or a size,
  given `abc` (read from the argparse tree: a new option is covered without a line here), and `-1`
  where -1 is refused: `argument OPT: not a number: 'abc'` / `-1 is out of range (...)` /
  `invalid size 'abc' (expected e.g. 65536, 64k, 2M)`, exit 2 (the usage line above is argparse's).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from helpers import virtopt
from voice_util import in_process

# -- the wordings (CONTRIBUTING.md "Errors and exit codes") -------------------------------------------

FILE_WORDING = {
    "missing": "cannot open {p}: No such file or directory",
    "directory": "cannot open {p}: Is a directory",
    "empty": "{p}: empty file",
    "fifo": "{p}: not a regular file or block device",
    "unopenable": "cannot open {p}: Too many levels of symbolic links",
}
QCOW2_BINARY = "{p}: Image is not in qcow2 format"  # qemu-img's words for a file that is not qcow2
CORE_BINARY = "{p}: not a core file (not an ELF file)"

# (command, argv with {p} for the bad file, what a binary file of random bytes is for it)
FILE_COMMANDS = [
    ("qcow2 info", ["qcow2", "info", "{p}"], QCOW2_BINARY),
    ("qcow2 map", ["qcow2", "map", "{p}"], QCOW2_BINARY),
    ("qcow2 check", ["qcow2", "check", "{p}"], QCOW2_BINARY),
    ("qcow2 dump", ["qcow2", "dump", "{p}", "header"], QCOW2_BINARY),
    ("qcow2 read", ["qcow2", "read", "{p}", "0", "512"], QCOW2_BINARY),
    ("qcow2 convert", ["qcow2", "convert", "{p}", "{out}"], QCOW2_BINARY),
    ("l2cache image", ["l2cache", "simulate", "{p}"], QCOW2_BINARY),
    ("l2cache --qemu-io", ["l2cache", "simulate", "--virtual-size", "1G", "--qemu-io", "{p}"],
     "{p}: not a qemu-io command file (binary data)"),
    ("l2cache --trace", ["l2cache", "recommend", "--virtual-size", "1G", "--trace", "{p}"],
     "{p}: not a trace file (binary data)"),
    ("trace decode", ["trace", "decode", "{p}"], "{p}: not a trace file (binary data)"),
    ("trace summary", ["trace", "summary", "{p}"], "{p}: not a trace file (binary data)"),
    ("trace --events", ["trace", "decode", "{log}", "--events", "{p}"], "{p}: not a trace-events file (binary data)"),
    ("gdb --core", ["gdb", "--core", "{p}"], CORE_BINARY),
    ("inspect --core", ["inspect", "--core", "{p}", "info"], CORE_BINARY),
]

def _known(params: list[tuple[Any, ...]], key: Any) -> list[Any]:
    """The cases as pytest params, each named by its key (command and condition)."""
    return [pytest.param(*p, id="-".join(str(x) for x in key(p))) for p in params]


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("badinput")
    (d / "directory").mkdir()
    (d / "empty").write_bytes(b"")
    (d / "binary").write_bytes(bytes(range(256)) * 16)
    os.mkfifo(d / "fifo")
    os.symlink("unopenable", d / "unopenable")  # itself: ELOOP
    (d / "regular").write_text("not a socket\n")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(d / "dead.sock"))  # a socket file nobody listens on (what a killed QEMU leaves)
    s.close()
    log = d / "qemu.log"
    log.write_text("qcow2_cache_get co 0x1 is_l2_cache 1 offset 0x40000 read_from_disk 0\n")
    return {"dir": d, "missing": d / "missing", "log": log, "out": d / "out.raw",
            **{n: d / n for n in ("directory", "empty", "binary", "fifo", "unopenable", "regular", "dead.sock")}}


def one_line(rc: int, stderr: str, want: str, code: int = 1) -> None:
    """Exactly `virtopt: WANT` on stderr (WANT ending in ", " is the line's start), exit ``code``."""
    assert "Traceback" not in stderr
    if want.endswith(", "):
        assert stderr.startswith(f"virtopt: {want}") and stderr.endswith(")\n") and stderr.count("\n") == 1, stderr
    else:
        assert stderr == f"virtopt: {want}\n", stderr
    assert rc == code


@pytest.mark.parametrize("command, argv, binary, condition", _known(
    [(c, a, b, cond) for c, a, b in FILE_COMMANDS for cond in (*FILE_WORDING, "binary")], lambda p: (p[0], p[3])))
def test_bad_files(command: str, argv: list[str], binary: str, condition: str, bad: dict[str, Path]):
    p = bad[condition]
    args = [a.format(p=p, out=bad["out"], log=bad["log"]) for a in argv]
    want = (binary if condition == "binary" else FILE_WORDING[condition]).format(p=p)
    if condition == "fifo" or command.startswith("gdb"):
        # a FIFO blocks whoever opens it before looking: a real process with a time limit
        cp = virtopt(*args, timeout=60)
        rc, err = cp.returncode, cp.stderr
    else:
        rc, _out, err = in_process(args)
    one_line(rc, err, want)
    assert not bad["out"].exists()


# -- a QEMU by PID --------------------------------------------------------------------------------------

PID_COMMANDS = [
    ("threads", ["threads", "{pid}"]),
    ("threads --pin", ["threads", "{pid}", "--pin", "main=0"]),
    ("doctor --vm", ["doctor", "--vm", "{pid}", "--interval", "0"]),
    ("gdb", ["gdb", "{pid}"]),
    ("inspect", ["inspect", "{pid}", "info"]),
]


@pytest.fixture(scope="module")
def sleeper() -> Iterator[subprocess.Popen]:
    p = subprocess.Popen(["sleep", "600"])
    while _comm(p.pid) != "sleep":  # until the fork has become sleep
        time.sleep(0.01)
    try:
        yield p
    finally:
        p.kill()
        p.wait()


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def _affinity(pid: int) -> str:
    return next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
                if ln.startswith("Cpus_allowed_list"))


@pytest.mark.parametrize("command, argv, condition", _known(
    [(c, a, cond) for c, a in PID_COMMANDS for cond in ("not-qemu", "pid-1", "no-process")], lambda p: (p[0], p[2])))
def test_bad_pids(command: str, argv: list[str], condition: str, sleeper: subprocess.Popen):
    if condition == "not-qemu":
        pid = sleeper.pid
        want = f"process {pid} is not QEMU ({_comm(pid)}, {os.path.realpath(f'/proc/{pid}/exe')})"
    elif condition == "pid-1":
        pid = 1
        want = f"process 1 is not QEMU ({_comm(1)}, "  # then its executable (a sandbox may hide /proc/1/exe)
    else:
        pid = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # above any PID the kernel gives
        want = f"no process {pid}"
    before = _affinity(pid) if condition != "no-process" else None
    args = [a.format(pid=pid) for a in argv]
    if command == "gdb":
        cp = virtopt(*args, timeout=60)
        rc, err = cp.returncode, cp.stderr
    else:
        rc, _out, err = in_process(args)
    one_line(rc, err, want)
    if before is not None:
        assert _affinity(pid) == before  # --pin changed nothing


# -- a QMP address -----------------------------------------------------------------------------------

SOCKET_COMMANDS = [
    ("shell", ["shell", "{a}", "-c", "query-status"]),
    ("threads", ["threads", "{a}"]),
    ("threads --qmp", ["threads", "--qmp", "{a}"]),
    ("doctor --vm", ["doctor", "--vm", "{a}", "--interval", "0"]),
    ("doctor --qmp", ["doctor", "--qmp", "{a}", "--interval", "0"]),
    ("l2cache tune", ["l2cache", "tune", "{a}", "--node", "disk0"]),
    ("l2cache curve --watch", ["l2cache", "curve", "--watch", "--qmp", "{a}", "--node", "disk0"]),
    ("gdb", ["gdb", "{a}"]),
]
SOCKET_REASON = {
    "dead.sock": "Connection refused (a socket file nobody listens on: QEMU exited?)",
    "regular": "not a socket (a regular file)",
    "directory": "Is a directory",
    "fifo": "not a socket (a FIFO)",
    "missing": "No such file or directory (is QEMU running with -qmp unix:{a},server=on?)",
}


@pytest.mark.parametrize("command, argv, condition", _known(
    [(c, a, cond) for c, a in SOCKET_COMMANDS for cond in SOCKET_REASON], lambda p: (p[0], p[2])))
def test_bad_qmp_addresses(command: str, argv: list[str], condition: str, bad: dict[str, Path]):
    a = bad[condition]
    args = [x.format(a=a) for x in argv]
    want = f"cannot connect to QMP at {a}: {SOCKET_REASON[condition].format(a=a)}"
    if command == "gdb" or condition == "fifo":
        cp = virtopt(*args, timeout=60)
        rc, err = cp.returncode, cp.stderr
    else:
        rc, _out, err = in_process(args)
    one_line(rc, err, want)


# -- numbers -------------------------------------------------------------------------------------------

# a command line that parses, per command: the bad value replaces one option's or argument's value
BASES = {
    "qcow2 info": ["{img}"], "qcow2 map": ["{img}"], "qcow2 check": ["{img}"], "qcow2 dump": ["{img}", "l2"],
    "qcow2 read": ["{img}", "0", "512"], "qcow2 convert": ["{img}", "{out}"],
    "l2cache simulate": ["--virtual-size", "1G"], "l2cache curve": ["--virtual-size", "1G"],
    "l2cache recommend": ["--virtual-size", "1G"], "l2cache tune": ["{sock}", "--node", "disk0"],
    "trace decode": ["{log}"], "trace summary": ["{log}"], "shell": ["{sock}"], "threads": ["1"], "gdb": ["1"],
    "inspect": ["1"], "doctor": [], "demo": [],
}


def _leaves() -> Iterator[tuple[str, argparse.ArgumentParser]]:
    from qemu_ext.cli import build_parser

    def walk(p: argparse.ArgumentParser, path: list[str]) -> Iterator[tuple[str, argparse.ArgumentParser]]:
        subs = next((a.choices for a in p._actions if isinstance(a, argparse._SubParsersAction)), None)
        if not subs:
            yield " ".join(path), p
            return
        for name, sp in subs.items():
            yield from walk(sp, [*path, name])

    yield from walk(build_parser(), [])


def _rejects(conv: Any, text: str) -> bool:
    try:
        conv(text)
    except (argparse.ArgumentTypeError, ValueError, TypeError):
        return True
    return False


def _kind(conv: Any) -> str:
    """"size" (takes QEMU's suffixes: 64k, 1M), "number" (takes a plain number), or "" (neither)."""
    try:
        conv("abc")
        return ""
    except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
        if "version" in str(exc):  # --qemu-compat takes a QEMU version, not a number
            return ""
    if not _rejects(conv, "64k") or not _rejects(conv, "1M"):
        return "size"
    if any(not _rejects(conv, v) for v in ("5", "0.5", "1", "0")):
        return "number"
    return ""


def value_options(kind: str) -> list[tuple[str, str, Any]]:
    """(command, option or positional dest, the action) of every value of that kind, from the tree."""
    out = []
    for cmd, p in _leaves():
        for a in p._actions:
            if a.type is None or a.choices is not None:
                continue
            if _kind(a.type) == kind:
                out.append((cmd, a.option_strings[0] if a.option_strings else a.dest, a))
    return out


def _argv(cmd: str, opt: str, action: Any, value: str, w: dict[str, Path]) -> list[str]:
    base = [x.format(img=w["binary"], out=w["out"], sock=w["dead.sock"], log=w["log"]) for x in BASES[cmd]]
    if action.option_strings:
        return [*cmd.split(), *base, opt, value]
    # a positional: the value in its place (positionals come in the parser's order)
    positionals = [a.dest for a in dict(_leaves())[cmd]._actions if not a.option_strings]
    i = positionals.index(action.dest)
    return [*cmd.split(), *base[:i], value, *base[i + 1:]]


NUMERIC = value_options("number")
SIZES = value_options("size")


def _numbers(only_ranged: bool = False, of: Any = None) -> list[Any]:
    return [pytest.param(c, o, a, id=f"{c} {o}")
            for c, o, a in (NUMERIC if of is None else of) if not only_ranged or _rejects(a.type, "-1")]


def test_every_command_with_numbers_has_a_base_line():
    assert {c for c, _o, _a in NUMERIC + SIZES} <= set(BASES)
    assert len(NUMERIC) >= 20 and len(SIZES) >= 20  # the tree has them: an import mistake would find none


@pytest.mark.parametrize("command, option, action", _numbers())
def test_a_number_that_is_not_one(command: str, option: str, action: Any, bad: dict[str, Path]):
    rc, out, err = in_process(_argv(command, option, action, "abc", bad))
    assert rc == 2 and out == ""
    assert "Traceback" not in err
    assert err.splitlines()[-1].endswith(f"argument {'/'.join(action.option_strings) or action.dest}: "
                                         "not a number: 'abc'"), err


@pytest.mark.parametrize("command, option, action", _numbers(only_ranged=True))
def test_a_number_out_of_range(command: str, option: str, action: Any, bad: dict[str, Path]):
    rc, out, err = in_process(_argv(command, option, action, "-1", bad))
    assert rc == 2 and out == ""
    assert "Traceback" not in err
    assert f"argument {'/'.join(action.option_strings) or action.dest}: -1 is out of range (" in \
        err.splitlines()[-1], err


@pytest.mark.parametrize("command, option, action", _numbers(of=SIZES))
def test_a_size_that_is_not_one(command: str, option: str, action: Any, bad: dict[str, Path]):
    rc, out, err = in_process(_argv(command, option, action, "abc", bad))
    assert rc == 2 and out == ""
    assert "Traceback" not in err
    assert err.splitlines()[-1].endswith(f"argument {'/'.join(action.option_strings) or action.dest}: "
                                         "invalid size 'abc' (expected e.g. 65536, 64k, 2M)"), err


def test_the_bad_files_are_what_they_say(bad: dict[str, Path]):
    """The matrix's inputs, checked against the OS: each open fails (or reads) as named."""
    import errno
    import stat

    assert stat.S_ISFIFO(os.stat(bad["fifo"]).st_mode) and stat.S_ISSOCK(os.stat(bad["dead.sock"]).st_mode)
    with pytest.raises(OSError) as e:
        open(bad["unopenable"], "rb")
    assert e.value.errno == errno.ELOOP
    s = socket.socket(socket.AF_UNIX)
    with pytest.raises(ConnectionRefusedError):
        s.connect(str(bad["dead.sock"]))
    s.close()


# -- usage errors: what is missing or does not go together is exit 2, one line ------------------------

USAGE = [
    (["l2cache", "simulate"], "give an image or --virtual-size"),
    (["l2cache", "simulate", "--virtual-size", "1G", "--qemu-io", "{log}", "--trace", "{log}"],
     "give either --qemu-io or --trace, not both"),
    (["l2cache", "curve", "--watch"], "--watch captures from a running QEMU"),
    (["qcow2", "dump", "{img}", "l2"], "needs --l1-index"),
    (["threads"], "give the QEMU"),
    (["gdb"], "give the QEMU"),
    (["gdb", "1", "--core", "{log}"], "not both"),
    (["inspect"], "say which QEMU"),
    (["shell"], "give a QMP address"),
    (["doctor", "--check", "no-such-check"], "unknown check no-such-check"),
    (["doctor", "--root", "{missing}"], "not a directory"),
]


@pytest.mark.parametrize("argv, words", [
    pytest.param(a, w, id=" ".join(a[:2])) for a, w in USAGE])
def test_usage_errors_exit_2(argv: list[str], words: str, bad: dict[str, Path], tmp_path: Path):
    img = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M"], check=True)
    rc, out, err = in_process([a.format(log=bad["log"], img=img, missing=bad["missing"]) for a in argv])
    assert rc == 2 and out == ""
    assert "Traceback" not in err
    assert err.startswith("virtopt: ") and err.count("\n") == 1 and words in err, err


# -- --plot: one helper, one wording --------------------------------------------------------------------

PLOTS = [(cmd, a) for cmd, p in _leaves() for a in p._actions if a.dest == "plot"]
PLOT_CASES = {
    "missing-directory": ("{d}/no-such-dir/l2.png", 1, "cannot open {p}: No such file or directory"),
    "not-png": ("{d}/l2.txt", 2, "--plot {p}: the plot is a PNG image: give a file name ending in .png"),
    "directory": ("{d}", 2, "--plot {p}: the plot is a PNG image: give a file name ending in .png"),
}


@pytest.mark.parametrize("command, case", [(c, k) for c, _a in PLOTS for k in PLOT_CASES])
def test_bad_plot_paths(command: str, case: str, bad: dict[str, Path]):
    assert len(PLOTS) >= 3  # l2cache curve and tune, trace summary: read from the tree
    path, code, words = PLOT_CASES[case]
    p = path.format(d=bad["dir"])
    base = [x.format(img=bad["binary"], out=bad["out"], sock=bad["dead.sock"], log=bad["log"]) for x in BASES[command]]
    rc, _out, err = in_process([*command.split(), *base, "--plot", p])
    one_line(rc, err, words.format(p=p), code)
