"""Helpers for the gdb tests: QEMUs shared by a test module, ground truth read from QEMU itself."""

from __future__ import annotations

import os
import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from qemu_ext import vm
from qemu_ext.gdbmi import GdbSession

PACK = Path(__file__).resolve().parent.parent / "gdb" / "virtopt-gdb.py"


def hmp(qp: vm.QemuProcess, line: str) -> str:
    return qp.client.cmd("human-monitor-command", **{"command-line": line})  # type: ignore[attr-defined]


def start(binary: Optional[str], **kw: Any) -> vm.QemuProcess:
    """A QEMU shared by a test module (binary, or build=QemuBuild) with a connected QMP client; the
    caller stops it. Registered with conftest's end-of-session check for QEMUs left running."""
    from conftest import _STARTED

    qp = vm.start_qemu(binary=binary, **kw)
    _STARTED.append(qp)
    try:
        qp.client = qp.qmp()  # type: ignore[attr-defined]
    except BaseException:
        qp.stop()
        raise
    return qp


def gdb_json(pid: int, *commands: str) -> list[Any]:
    """Run each `virtopt ... --json` in one gdb session; every one must succeed."""
    with GdbSession(pid) as s:
        out = []
        for c in commands:
            r = s.run(c)
            assert r.ok, f"{c}: {r.error}"
            assert r.data is not None, f"{c}: no JSON: {r.output[:300]}"
            out.append(r.data)
    return out


def assert_alive(qp: vm.QemuProcess) -> None:
    """gdb detached and QEMU still runs: the process lives and QMP answers."""
    assert qp.alive()
    status = qp.client.cmd("query-status")  # type: ignore[attr-defined]
    assert status["status"] in ("running", "prelaunch", "paused")


def proc_threads(pid: int) -> dict[int, str]:
    """tid -> comm, from /proc: the ground truth for `virtopt threads`."""
    out = {}
    for p in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(p.name)] = (p / "comm").read_text().strip()
        except OSError:
            pass
    return out


def flat_ranges(info_mtree_f: str, as_name: str) -> list[tuple[int, int, str, str]]:
    """(start, end, kind, region) of the FlatView that `info mtree -f` shows for as_name."""
    out: list[tuple[int, int, str, str]] = []
    mine = False
    pat = re.compile(r"^\s+([0-9a-f]{16})-([0-9a-f]{16}) \(prio -?\d+, ([^)]*)\): (\S*)")
    for line in info_mtree_f.splitlines():
        if line.startswith("FlatView"):
            mine = False
        elif line.startswith(" AS ") and f'AS "{as_name}",' in line:
            mine = True
        elif mine:
            mo = pat.match(line)
            if mo:
                out.append((int(mo.group(1), 16), int(mo.group(2), 16), mo.group(3), mo.group(4)))
    return out


def line_counts(text: str) -> Counter:
    """Non-empty lines of an mtree listing (QEMU appends the accelerator name to flat ranges)."""
    return Counter(re.sub(r" (KVM|TCG)$", "", ln.rstrip()) for ln in text.replace("\r", "").splitlines() if ln.strip())


READ_VIEWS = {"threads", "vcpus", "mtree", "mtree lookup", "timers", "trace list", "qcow2", "coroutines"}


def comparable(view: str, data: Any) -> Any:
    """A view's JSON without what differs between two reads of a running QEMU by different readers:
    the snapshot key, the writing commands' availability (gdb writes, inspect never does), the
    thread-pool workers (they exit after 10 s idle), the thread's last CPU, the vCPUs' halted flag and KVM exit (gdb's own stop kicks vCPUs out of
    KVM_RUN: exit INTR), timer deadlines re-armed in between."""
    import copy

    d = copy.deepcopy(data)
    d.pop("snapshot", None)
    if view == "info":  # the read-only views both readers serve (writes and register-based views: gdb only)
        d["commands"] = {k: v for k, v in d["commands"].items() if k in READ_VIEWS}
        d.pop("threads", None)  # thread-pool workers exit after 10 s idle: the count moves by itself
    elif view == "threads":
        d["threads"] = [t for t in d["threads"] if t["role"] != "worker"]  # they come and go by themselves
        for t in d["threads"]:
            t.pop("last-cpu", None)
    elif view == "vcpus":
        for v in d["vcpus"]:
            for k in ("halted", "kvm-exit-reason", "kvm-exit-reason-name"):
                v.pop(k, None)
    elif view == "timers":
        d.pop("reference", None)  # "now" is each reader's own moment
        for c in d["clocks"]:
            c.pop("now-ns", None)
            c.pop("error-bound-seconds", None)
            for tl in c["timer-lists"]:
                for t in tl["timers"]:
                    t.pop("expire-time", None)
                    t.pop("expires-in-ns", None)
    return d


def check_core_timers(live: dict, core: dict, stopped: tuple[int, int], dump: tuple[int, int]
                      ) -> list[tuple[str, int, int]]:
    """The timers view of a core against the live view read just before the dump. ``stopped``: the
    CLOCK_MONOTONIC ns before gdb attached and after its first command (QEMU froze in between);
    ``dump``: before and after generate-core-file. The core's reference ("now" of the dump) must lie
    where the view says within the bound it states: in the dump's window when it counts from the
    file's birth time, in the freeze's window when QEMU's main loop showed that it froze earlier.
    Every timer's expires-in must be its expire time less that reference, and a stopped VM's frozen
    virtual clock must give the live reading exactly. Returns (clock, live expires-in, core
    expires-in) of every timer of a running clock, for the caller's own checks."""
    ref = core["reference"]
    bound = ref["error-bound-seconds"]
    assert bound is not None, ref
    slack = int(0.012 * 1e9)  # file times: one tick of the coarse clock; glib's ms rounding
    if ref["kind"] == "core-file-creation":
        assert bound <= 0.05, ref
        lo, hi = dump
        assert lo - slack <= ref["monotonic-ns"] <= hi + slack, (dump, ref)
    else:  # the latest moment QEMU can have frozen, and it froze at most `bound` earlier
        assert ref["kind"] == "main-loop-poll", ref
        lo, hi = stopped
        assert lo - slack <= ref["monotonic-ns"] <= hi + int(bound * 1e9) + slack, (stopped, ref)
        assert ref["monotonic-ns"] < dump[0], (ref, dump)
    live_ref = live["reference"]
    out = []
    for lc, cc in zip(live["clocks"], core["clocks"]):
        assert lc["clock"] == cc["clock"] and lc["now-from"] == cc["now-from"]
        frozen = cc["error-bound-seconds"] == 0.0
        if lc["now-ns"] is not None:
            # both readers add the same offset to their own moment (virtual: timers_state.cpu_clock_offset)
            moved = 0 if frozen else (ref["monotonic-ns"] - live_ref["monotonic-ns"] if lc["clock"] != "host"
                                      else ref["realtime-ns"] - live_ref["realtime-ns"])
            assert cc["now-ns"] - lc["now-ns"] == moved, (lc["clock"], lc["now-ns"], cc["now-ns"], moved)
        for ltl, ctl in zip(lc["timer-lists"], cc["timer-lists"]):
            for lt, ct in zip(ltl["timers"], ctl["timers"]):
                if ct["expires-in-ns"] is None:
                    assert cc["now-ns"] is None
                    continue
                assert ct["expires-in-ns"] == ct["expire-time"] - cc["now-ns"]
                if lt["expire-time"] == ct["expire-time"]:
                    if frozen:
                        assert ct["expires-in-ns"] == lt["expires-in-ns"]
                    else:
                        out.append((cc["clock"], lt["expires-in-ns"], ct["expires-in-ns"]))
    return out


def differences(a: Any, b: Any, path: str = "", out: Optional[list] = None, limit: int = 10) -> list:
    """Where two JSON values differ (paths and both values), for readable assertion messages."""
    out = [] if out is None else out
    if len(out) >= limit:
        return out
    if type(a) is not type(b):
        out.append(f"{path}: {a!r:.80} != {b!r:.80}")
    elif isinstance(a, dict):
        for k in list(a) + [k for k in b if k not in a]:
            differences(a.get(k), b.get(k), f"{path}/{k}", out, limit)
    elif isinstance(a, list):
        if len(a) != len(b):
            out.append(f"{path}: {len(a)} items != {len(b)} items")
        for i, (x, y) in enumerate(zip(a, b)):
            differences(x, y, f"{path}[{i}]", out, limit)
    elif a != b:
        out.append(f"{path}: {a!r:.80} != {b!r:.80}")
    return out


GDB_RUN_ALL = """python
import gdb, json
res = []
for c in %r:
    try:
        res.append({"command": c, "ok": True, "output": gdb.execute(c, to_string=True)})
    except gdb.error as e:
        res.append({"command": c, "ok": False, "error": str(e)})
with open(%r, "w") as f:
    json.dump(res, f)
end
"""


def gdb_on_core(exe: str, core: Path, commands: list[str], workdir: Path) -> list[dict]:
    """`gdb EXE CORE`, source the pack, run each command: [{command, ok, output|error, data}]."""
    import json
    import subprocess

    out = workdir / "gdb-core-results.json"
    script = workdir / "gdb-core.gdb"
    script.write_text(f"source {PACK}\n" + GDB_RUN_ALL % (commands, str(out)))
    cp = subprocess.run(["gdb", "-q", "-nx", "-batch", exe, str(core), "-x", str(script)],
                        capture_output=True, text=True, timeout=120)
    assert out.is_file(), cp.stderr[-2000:]
    res = json.loads(out.read_text())
    for r in res:
        r["data"] = None
        if r["ok"]:
            try:
                r["data"] = json.loads(r["output"])
            except ValueError:
                pass
    return res


class PauseSampler:
    """The span during which QEMU's main thread was seen in ptrace stop (t), sampled every millisecond."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.first: Optional[float] = None
        self.last: Optional[float] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            fd = os.open(f"/proc/{self.pid}/stat", os.O_RDONLY)
        except OSError:
            return
        try:
            self._poll(fd)
        finally:
            os.close(fd)

    def _poll(self, fd: int) -> None:
        while not self._stop.is_set():
            try:
                state = os.pread(fd, 512, 0).rsplit(b")", 1)[1].split()[0]
            except (OSError, IndexError):
                return
            if state == b"t":
                now = time.monotonic()
                self.first = self.first or now
                self.last = now
            time.sleep(0.001)

    def __enter__(self) -> PauseSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def seconds(self) -> float:
        return 0.0 if self.first is None or self.last is None else self.last - self.first
