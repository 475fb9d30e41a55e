"""The shell's built-in commands as library functions that return data.

Every function takes a connected :class:`qemu_ext.qmp.client.QmpSession` and
returns dataclasses / dicts (``to_dict()`` gives JSON-ready data); the shell
and any other front door only render them. From synchronous code use
``qemu_ext.qmp.client.run_sync(address, trace_list, "qcow2_*")``.

- ``trace_list`` / ``trace_set``: trace-event-get-state / trace-event-set-state
- ``trace_file``: HMP ``trace-file`` (simple backend only; else NotAvailableError with how to capture)
- ``trace_capture``: enable, wait, disable, flush; decode with qemu_ext.trace.read_trace
- ``stats``: query-stats deltas per second with units from query-stats-schemas
- ``threads``: qemu_ext.host.threads.thread_map for the QEMU behind the socket
- ``mtree_lookup``: which region/device owns an I/O port or a memory address
- ``l2cache``: qcow2 cache settings per node and the full-coverage recommendation
"""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from qemu_ext.errors import BadInputError, NotAvailableError, VirtoptError
from qemu_ext.qmp import protocol
from qemu_ext.qmp.client import QmpSession
from qemu_ext.qmp.errors import HmpError, QmpCommandError, QmpGoneError

NO_SIMPLE_BACKEND = (
    "this QEMU has no simple trace backend (HMP answers \"unknown command: 'trace-file'\"); "
    "its trace events go to the log backend instead: start QEMU with -D FILE (or keep its stderr) "
    "and use '/trace on PATTERN', or '/trace capture PATTERN SECONDS' which reads that log"
)


class _Data:
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]


# ---------------------------------------------------------------------------------------------------
# trace events


@dataclass
class TraceEventState(_Data):
    name: str
    state: str  # enabled | disabled | unavailable
    vcpu: bool = False


async def trace_list(s: QmpSession, pattern: str = "*") -> list[TraceEventState]:
    """Trace events matching the glob ``pattern`` with their state (trace-event-get-state)."""
    try:
        evs = await s.execute("trace-event-get-state", {"name": pattern})
    except QmpCommandError as exc:
        if exc.error_class == "GenericError" and "No trace events found" in exc.desc:
            return []
        raise
    return sorted((TraceEventState(e["name"], e["state"], bool(e.get("vcpu"))) for e in evs),
                  key=lambda e: e.name)


async def trace_set(s: QmpSession, pattern: str, enable: bool) -> list[TraceEventState]:
    """Enable/disable the events matching ``pattern``; return their states afterwards.

    A pattern that matches no event is an error (BadInputError), as in QEMU.
    """
    if not await trace_list(s, pattern):
        raise BadInputError(f"no trace event matches {pattern!r}")
    await s.execute("trace-event-set-state", {"name": pattern, "enable": enable})
    return await trace_list(s, pattern)


# ---------------------------------------------------------------------------------------------------
# trace file (simple backend)


@dataclass
class TraceFileStatus(_Data):
    file: str
    enabled: bool
    message: str = ""


_TF_STATUS = re.compile(r'Trace file "(?P<file>.*)" (?P<state>on|off)\.')


async def _trace_file_hmp(s: QmpSession, args: str = "") -> str:
    text = await s.hmp(f"trace-file {args}".strip())
    if "unknown command" in text and "trace-file" in text:
        raise NotAvailableError(NO_SIMPLE_BACKEND)
    return text


async def trace_file_status(s: QmpSession) -> TraceFileStatus:
    text = await _trace_file_hmp(s)
    m = _TF_STATUS.search(text)
    if not m:
        raise HmpError(f"unexpected answer to HMP trace-file: {text.strip()!r}")
    return TraceFileStatus(m["file"], m["state"] == "on")


async def has_simple_backend(s: QmpSession) -> bool:
    try:
        await trace_file_status(s)
    except NotAvailableError:
        return False
    return True


async def trace_file(s: QmpSession, op: str = "", path: Optional[str] = None) -> TraceFileStatus:
    """HMP ``trace-file on|off|flush|set FILE`` (or status with no op); returns the status after it.

    ``set`` with a relative path is made absolute here (QEMU would resolve it in its own cwd).
    """
    if op not in ("", "status", "on", "off", "flush", "set"):
        raise BadInputError(f"trace-file: unknown operation {op!r} (on|off|flush|set FILE)")
    if op == "set":
        if not path:
            raise BadInputError("trace-file set needs a FILE")
        path = os.path.abspath(path)
        if any(c in path for c in "\"\n"):
            raise BadInputError("trace-file: the file name may not contain quotes or newlines")
    if op in ("", "status"):
        return await trace_file_status(s)
    text = await _trace_file_hmp(s, f'{op} "{path}"' if op == "set" else op)
    st = await trace_file_status(s)
    if text.strip():
        st.message = text.strip()
    if op == "on" and not st.enabled:
        raise HmpError(f"QEMU could not open trace file {st.file} for writing")
    return st


# ---------------------------------------------------------------------------------------------------
# trace capture


@dataclass
class CaptureResult(_Data):
    pattern: str
    seconds: float
    backend: str  # simple | log
    file: str
    events: list[str]  # the events enabled for the capture
    counts: dict[str, int]
    total: int
    decoder: str = ""
    l2cache: Optional[dict[str, Any]] = None
    notes: list[str] = field(default_factory=list)


def _decode(path: str) -> tuple[list[Any], str]:
    """Decode with the trace area's read_trace; returns (records, decoder name)."""
    try:
        from qemu_ext.trace import read_trace  # type: ignore[attr-defined]
    except ImportError as exc:
        raise NotAvailableError("the trace decoder (qemu_ext.trace.read_trace) is not available in this build") from exc
    records = read_trace(path)
    return list(records), "qemu_ext.trace.read_trace"


def _record_name(rec: Any) -> str:
    if isinstance(rec, dict):
        return str(rec.get("name") or rec.get("event"))
    for attr in ("name", "event"):
        v = getattr(rec, attr, None)
        if isinstance(v, str):
            return v
        if v is not None and isinstance(getattr(v, "name", None), str):
            return v.name
    return str(rec)


def log_destination(pid: int) -> Path:
    """Where QEMU's log backend writes: the ``-D FILE`` of its command line, else its stderr when that is a file."""
    argv = protocol.proc_cmdline(pid)
    cwd = f"/proc/{pid}/cwd"
    for i, a in enumerate(argv):
        if a == "-D" and i + 1 < len(argv):
            p = argv[i + 1]
            return Path(p) if os.path.isabs(p) else Path(os.path.realpath(cwd)) / p
        if a.startswith("-D") and len(a) > 2:
            p = a[2:]
            return Path(p) if os.path.isabs(p) else Path(os.path.realpath(cwd)) / p
    fd2 = Path(f"/proc/{pid}/fd/2")
    try:
        import stat

        if stat.S_ISREG(os.stat(fd2).st_mode):
            return fd2
        target = os.readlink(fd2)
    except OSError as exc:
        raise NotAvailableError(f"cannot see where QEMU (pid {pid}) logs: {exc.strerror}") from exc
    raise NotAvailableError(
        f"QEMU's log backend writes to its stderr ({target}), which is not a file virtopt can read: "
        "start QEMU with -D FILE to capture trace events"
    )


async def _set_events(s: QmpSession, names: list[str], enable: bool) -> None:
    for n in names:
        await s.execute("trace-event-set-state", {"name": n, "enable": enable})


async def _window(s: QmpSession, names: list[str], seconds: float, during: Optional[Any]) -> None:
    """The capture window: the events on, ``during`` run (or ``seconds`` waited), the events off
    again whatever happened meanwhile."""
    await _set_events(s, names, True)
    try:
        await _during(s, seconds, during)
    finally:
        await _set_events(s, names, False)


async def trace_capture(s: QmpSession, pattern: str, seconds: float, file: Optional[str] = None,
                        during: Optional[Any] = None, node: Optional[str] = None,
                        known_options: Optional[dict[str, dict[str, Any]]] = None) -> CaptureResult:
    """Enable the events matching ``pattern`` for ``seconds``, then disable and flush; decode the result.

    Simple backend (HMP trace-file works): records into ``file`` (default: a new file in the temp dir)
    through trace-file set/on/flush/off, then restores the previous trace file name. When the trace
    file is already on, the capture goes into it (reopening it would truncate it) and only the records
    added during the capture are counted.
    Log backend: reads what QEMU appended to its -D log (or stderr file) meanwhile, saved to ``file``
    when given. Events already enabled before stay enabled. ``during`` is an optional coroutine
    function ``during(session)`` run while the events are on (tests drive block I/O with it).
    For qcow2_cache_get events the L2 lookups are replayed in the L2-cache simulator with the cache
    geometry of ``node`` (default: the only qcow2 node) and with full coverage.
    """
    if seconds < 0 or seconds > 24 * 3600:
        raise BadInputError("capture time must be between 0 and 86400 seconds")
    before = await trace_list(s, pattern)
    if not before:
        raise BadInputError(f"no trace event matches {pattern!r}")
    to_enable = [e.name for e in before if e.state == "disabled"]
    notes: list[str] = []
    geos = await l2cache(s, node, known_options) if node else None  # a bad node name fails before capturing
    simple = await has_simple_backend(s)
    skip = 0  # records of the file that were there before the capture
    if simple:
        prev = await trace_file_status(s)
        if prev.enabled:
            # Switching files would make QEMU truncate the user's trace file when it is reopened:
            # capture into it instead and count only the records added meanwhile.
            if file:
                raise BadInputError(f'the trace file "{prev.file}" is on and the capture goes there; '
                                    "turn it off (/trace-file off) to capture into another FILE")
            if not os.path.isabs(prev.file) and s.pid is None:
                raise NotAvailableError(f'cannot locate the relative trace file "{prev.file}" of a QEMU on '
                                        "another host")
            out = prev.file if os.path.isabs(prev.file) else os.path.join(os.path.realpath(f"/proc/{s.pid}/cwd"),
                                                                            prev.file)
            await trace_file(s, "flush")
            skip = len(_decode(out)[0])
            notes.append(f"the trace file {out} was on: captured into it, counting only the new records")
            await _window(s, to_enable, seconds, during)
            await trace_file(s, "flush")
        else:
            if file:
                out = os.path.abspath(file)
            else:  # QEMU (same host) truncates and writes it
                fd, out = tempfile.mkstemp(prefix=f"virtopt-capture-{s.pid or 'qemu'}-", suffix=".simpletrace")
                os.close(fd)
            await trace_file(s, "set", out)
            await trace_file(s, "on")
            try:
                await _window(s, to_enable, seconds, during)
                await trace_file(s, "flush")
            finally:
                await trace_file(s, "off")
                await _trace_file_hmp(s, f'set "{prev.file}"')
        backend = "simple"
    else:
        if s.pid is None:
            raise NotAvailableError(
                "this QEMU uses the log backend and virtopt cannot tell its process (TCP to another host?), so "
                "it cannot read its log: connect through its unix socket on the QEMU host, or read its -D file "
                "with 'virtopt trace'"
            )
        log = log_destination(s.pid)
        with open(log, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            start = fh.tell()
            await _window(s, to_enable, seconds, during)
            await asyncio.sleep(0.05)  # let the last lines reach the file
            fh.seek(start)
            data = fh.read()
        names = {e.name for e in before}
        lines = [ln for ln in data.decode(errors="replace").splitlines(keepends=True)
                 if ln.split(" ", 1)[0].split(":")[0] in names or _is_pid_prefixed(ln, names)]
        if file:
            out = os.path.abspath(file)
        else:
            fd, out = tempfile.mkstemp(prefix=f"virtopt-capture-{s.pid}-", suffix=".log")
            os.close(fd)
        Path(out).write_text("".join(lines))
        if str(log).startswith("/proc/"):
            notes.append(f"read QEMU's stderr ({os.readlink(log)})")
        else:
            notes.append(f"read QEMU's log file {log}")
        backend = "log"
    if backend == "log" and not Path(out).stat().st_size:
        records, decoder = [], "qemu_ext.trace.read_trace"  # nothing fired: nothing to decode
        notes.append("no event fired during the capture")
    else:
        records, decoder = _decode(out)
        # only what the capture asked for: not older records, not other events the user had enabled
        wanted = {e.name for e in before}
        records = [r for r in records[skip:] if _record_name(r) in wanted]
    counts: dict[str, int] = {}
    for rec in records:
        n = _record_name(rec)
        counts[n] = counts.get(n, 0) + 1
    result = CaptureResult(pattern, seconds, backend, out, [e.name for e in before], dict(sorted(counts.items())),
                           sum(counts.values()), decoder, None, notes)
    if counts.get("qcow2_cache_get"):
        if geos is None:
            geos = await l2cache(s, None, known_options)
        result.l2cache = _l2_simulate(records, geos[0] if len(geos) == 1 else None, notes)
    return result


def _is_pid_prefixed(line: str, names: set[str]) -> bool:
    # log lines with -d trace:... may be "PID@TIME:name args" when QEMU logs timestamps
    m = re.match(r"^\d+@[\d.]+:(\S+)", line)
    return bool(m and m.group(1) in names)


async def _during(s: QmpSession, seconds: float, during: Optional[Any]) -> None:
    """Wait ``seconds`` (running ``during`` first); return early with QmpGoneError if QEMU goes away."""
    t0 = time.monotonic()
    if during is not None:
        await during(s)
    left = seconds - (time.monotonic() - t0)
    if left <= 0:
        return
    gone = asyncio.ensure_future(s.wait_disconnected())
    try:
        done, _ = await asyncio.wait({gone}, timeout=left)
    finally:
        gone.cancel()
    if done:
        raise QmpGoneError(f"QEMU at {s.where} went away during the capture")


def _sim_stats(st: Any) -> dict[str, Any]:
    return {"lookups": st.lookups, "hits": st.hits, "misses": st.misses, "hit_ratio": round(st.hit_ratio, 4)}


_ARG_NAMES = {"c": "is_l2_cache", "i": "index"}  # trace-events argument names -> the names in the format string


def _cache_records(records: list[Any]) -> list[tuple[str, dict[str, str], Optional[int]]]:
    """Decoded qcow2_cache_get* records as (name, {format-string key: text}, timestamp) for the L2 area."""
    out = []
    for r in records:
        name = _record_name(r)
        if not name.startswith("qcow2_cache_get"):
            continue
        args = dict(getattr(r, "args", {}) or {})
        norm = {}
        for k, v in args.items():
            key = _ARG_NAMES.get(k, k)
            if isinstance(v, bool):
                v = int(v)
            norm[key] = hex(v) if key in ("offset", "co") and isinstance(v, int) else str(v)
        out.append((name, norm, getattr(r, "timestamp_ns", None)))
    return out


def _l2_simulate(records: list[Any], geometry: Optional[L2CacheInfo], notes: list[str]) -> Optional[dict[str, Any]]:
    """Hand the captured qcow2_cache events to the L2-cache area: the lookups QEMU made, replayed
    through its Qcow2Cache model with the node's cache geometry and with full coverage."""
    try:
        from qemu_ext.l2cache.model import replay
        from qemu_ext.l2cache.options import resolve
        from qemu_ext.l2cache.workloads import parse_cache_trace
    except ImportError:
        notes.append("L2-cache simulator not available in this build: only the decoded counts are given")
        return None
    try:
        lookups = [t for t in parse_cache_trace(_cache_records(records)) if t.is_l2]
    except VirtoptError as exc:
        notes.append(f"the L2-cache simulator could not read the captured events: {exc}")
        return None
    if not lookups:
        return None
    hits = sum(1 for t in lookups if t.hit)
    out: dict[str, Any] = {
        "observed": {"lookups": len(lookups), "hits": hits, "misses": len(lookups) - hits,
                     "hit_ratio": round(hits / len(lookups), 4)},
    }
    if geometry is None:
        notes.append("several qcow2 nodes: give the node (--node NODE) to replay the lookups in the L2-cache simulator")
        return out
    rfd = [t.read_from_disk for t in lookups]
    full = resolve(geometry.cluster_size, geometry.virtual_size, geometry.extended_l2,
                   l2_cache_size=geometry.full_coverage_l2_cache_size)

    def sim(entries: int, entry_size: int) -> dict[str, Any]:
        # a lookup of the slice at offset o uses the cache entry that holds o's table piece of entry_size bytes
        offsets = [t.offset - t.offset % entry_size for t in lookups]
        return {"l2_cache_entries": entries, "l2_cache_entry_size": entry_size,
                **_sim_stats(replay(offsets, entries, entry_size, rfd))}

    try:
        current = sim(geometry.l2_cache_entries, geometry.l2_cache_entry_size)
        full_cov = sim(full.l2_cache_entries, full.l2_cache_entry_size)
    except ValueError as exc:  # lookups that do not fit the node's geometry: events from another node
        notes.append(f"the captured lookups do not fit node {geometry.node_name}'s cache ({exc}): not simulated")
        return out
    out.update(node=geometry.node_name, simulated_current=current,
               simulated_full_coverage={"l2_cache_size": geometry.full_coverage_l2_cache_size, **full_cov})
    notes.append("the simulation starts from an empty cache; QEMU's cache may have held tables before the capture")
    return out


# ---------------------------------------------------------------------------------------------------
# stats


@dataclass
class StatRow(_Data):
    name: str
    provider: str
    type: str  # cumulative | instant | peak | histogram types
    unit: str  # human unit ("", "ns", "bytes", "boolean", ...)
    value: Any  # value at the second sample (sum over vCPUs for target vcpu)
    delta: Optional[float] = None  # for cumulative: difference between the two samples
    rate: Optional[float] = None  # delta per second, in ``unit``
    per_vcpu: Optional[dict[str, Any]] = None  # vcpu target: cpu-index -> rate (cumulative) or value


@dataclass
class StatsReport(_Data):
    target: str
    interval: float
    rows: list[StatRow]


def unit_label(schema: dict[str, Any]) -> str:
    """query-stats-schemas unit/base/exponent -> a short label: seconds 10^-9 -> ns, bytes 2^10 -> KiB."""
    unit = schema.get("unit", "")
    base = schema.get("base", 10)
    exp = int(schema.get("exponent", 0))
    if not exp:
        return unit
    if unit == "seconds" and base == 10:
        return {-9: "ns", -6: "us", -3: "ms"}.get(exp, f"10^{exp} s")
    if unit == "bytes" and base == 2:
        return {10: "KiB", 20: "MiB", 30: "GiB"}.get(exp, f"2^{exp} bytes")
    return f"{base}^{exp} {unit}".strip()


def _flatten(results: list[dict[str, Any]], cpu_of: dict[str, int]) -> dict[tuple[str, str], dict[str, Any]]:
    """(provider, name) -> {"total": v, "per": {cpu: v}} ."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for res in results:
        who = str(cpu_of.get(res.get("qom-path", ""), res.get("qom-path", "")))
        for st in res.get("stats", []):
            key = (res["provider"], st["name"])
            slot = out.setdefault(key, {"total": None, "per": {}})
            v = st["value"]
            slot["per"][who] = v
            if isinstance(v, bool):
                slot["total"] = bool(slot["total"]) or v
            elif isinstance(v, (int, float)):
                slot["total"] = (slot["total"] or 0) + v
            elif isinstance(v, list):
                slot["total"] = sum(v) + (slot["total"] or 0)
    return out


async def stats(s: QmpSession, target: str = "vm", interval: float = 1.0) -> StatsReport:
    """Two query-stats samples ``interval`` seconds apart; cumulative stats as deltas per second."""
    if target not in ("vm", "vcpu"):
        raise BadInputError(f"stats target must be vm or vcpu, not {target!r}")
    if not 0 < interval <= 3600:
        raise BadInputError("stats interval must be between 0 and 3600 seconds")
    try:
        schemas = await s.execute("query-stats-schemas")
    except QmpCommandError as exc:
        raise NotAvailableError(f"this QEMU has no query-stats: {exc.desc}") from exc
    meta: dict[tuple[str, str], dict[str, Any]] = {}
    for prov in schemas:
        if prov.get("target") != target:
            continue
        for st in prov.get("stats", []):
            meta[(prov["provider"], st["name"])] = st
    if not meta:
        raise NotAvailableError(f"QEMU offers no {target} statistics (query-stats needs KVM)")
    cpu_of: dict[str, int] = {}
    if target == "vcpu":
        for c in await s.execute("query-cpus-fast"):
            cpu_of[c["qom-path"]] = c["cpu-index"]
    t0 = time.monotonic()
    first = _flatten(await s.execute("query-stats", {"target": target}), cpu_of)
    await asyncio.sleep(interval)
    second = _flatten(await s.execute("query-stats", {"target": target}), cpu_of)
    dt = time.monotonic() - t0
    rows = []
    for key, now in second.items():
        m = meta.get(key, {})
        kind = m.get("type", "instant")
        row = StatRow(key[1], key[0], kind, unit_label(m), now["total"])
        prev = first.get(key)
        if kind == "cumulative" and prev and isinstance(now["total"], (int, float)) and not isinstance(now["total"], bool):
            row.delta = now["total"] - (prev["total"] or 0)
            row.rate = row.delta / dt
            if target == "vcpu":
                row.per_vcpu = {k: (v - prev["per"].get(k, 0)) / dt for k, v in now["per"].items()
                                if isinstance(v, (int, float))}
        elif target == "vcpu":
            row.per_vcpu = dict(now["per"])
        rows.append(row)
    rows.sort(key=lambda r: (-(r.rate or 0), r.name))
    return StatsReport(target, round(dt, 3), rows)


# ---------------------------------------------------------------------------------------------------
# threads


async def threads(s: QmpSession) -> list[dict[str, Any]]:
    """Every thread of the QEMU behind the socket, with its role (host area's thread_map)."""
    try:
        from qemu_ext.host.threads import thread_map  # type: ignore[import-not-found]
    except ImportError as exc:
        raise NotAvailableError("the thread map (qemu_ext.host.threads) is not available in this build") from exc
    if s.pid is None:
        raise NotAvailableError("cannot tell which process QEMU is (TCP to another host?): its threads cannot be read; "
                                "connect through its unix socket on the QEMU host")
    vcpus = await s.execute("query-cpus-fast")
    iothreads = await s.execute("query-iothreads")
    return [t.to_dict() for t in thread_map(s.pid, vcpus=vcpus, iothreads=iothreads)]


# ---------------------------------------------------------------------------------------------------
# mtree


@dataclass
class Region(_Data):
    start: int
    end: int
    priority: int
    kind: str  # i/o, ram, rom, romd, ...
    name: str
    depth: int
    owner: str = ""  # QOM path of the owning device/object
    alias_of: str = ""
    enabled: bool = True


@dataclass
class MtreeMatch(_Data):
    address: int
    space: str  # io | memory
    address_space: str  # "I/O" | "memory"
    region: str  # the outermost region of the owning device that contains the address (port 0x70 -> rtc)
    leaf: str  # the innermost region (rtc-index)
    chain: list[str]  # root ... leaf
    start: int
    end: int
    owner: str  # QOM path
    device_type: str  # QOM type of the owner (mc146818rtc)
    device_id: str  # the device's id= when it has one
    flat_region: str  # what the flat view dispatches the address to
    claimed: bool = True  # False when only the address space's root container covers the address


_MTREE_LINE = re.compile(
    r"^(?P<indent>\s*)(?P<start>[0-9a-f]+)-(?P<end>[0-9a-f]+) \(prio (?P<prio>-?\d+), (?P<kind>[^)]+)\): "
    r"(?P<rest>.*)$"
)
# mtree_expand_owner(): " owner:{dev id=ID}" (devices with id=, at /machine/peripheral/ID),
# " owner:{dev path=QOM-PATH}", " owner:{obj type=TYPE}"; " parent:{...}" when the owner differs
_OWNER = re.compile(r"\s(?:owner|parent):\{(?:dev|obj)(?: id=(?P<id>[^}\s]+))?(?: path=(?P<path>[^}]+))?"
                    r"(?: type=(?P<type>[^}\s]+))?\}")


def _owner_path(m: re.Match[str]) -> str:
    if m["path"]:
        return m["path"]
    if m["id"]:
        return f"/machine/peripheral/{m['id']}"
    return ""


def _split_owner(rest: str) -> tuple[str, str]:
    """An `info mtree -o` line's tail -> (region text, owner path or "")."""
    om = _OWNER.search(rest)
    if not om:
        return rest, ""
    return rest[: om.start()], _owner_path(om)


def parse_mtree(text: str) -> dict[str, list[Region]]:
    """``info mtree -o`` -> {address-space name: regions in print order (with depth)}."""
    spaces: dict[str, list[Region]] = {}
    cur: Optional[list[Region]] = None
    for line in text.splitlines():
        if line.startswith("address-space: "):
            cur = spaces.setdefault(line[len("address-space: "):].strip(), [])
            continue
        if line.startswith(("memory-region: ", "FlatView")):
            cur = None
            continue
        m = _MTREE_LINE.match(line)
        if not m or cur is None:
            continue
        rest, owner = _split_owner(m["rest"])
        enabled = "[disabled]" not in rest
        rest = rest.replace("[disabled]", "").strip()
        alias_of = ""
        if rest.startswith("alias "):
            parts = rest.split()
            rest = parts[1]
            alias_of = parts[2].lstrip("@") if len(parts) > 2 else ""
        # "name KVM" style suffixes are not part of the name
        name = rest.split(" ")[0] if rest else ""
        cur.append(Region(int(m["start"], 16), int(m["end"], 16), int(m["prio"]), m["kind"].strip(), name,
                          len(m["indent"]) // 2, owner, alias_of, enabled))
    return spaces


def parse_flatview(text: str) -> dict[str, list[Region]]:
    """``info mtree -f -o`` -> {address-space name: flat ranges}; each AS listed under its FlatView."""
    out: dict[str, list[Region]] = {}
    names: list[str] = []
    ranges: list[Region] = []
    for line in text.splitlines():
        if line.startswith("FlatView"):
            names, ranges = [], []
            continue
        m = re.match(r'^\s*AS "(?P<name>[^"]+)"', line)
        if m:
            names.append(m["name"])
            out[m["name"]] = ranges
            continue
        m = _MTREE_LINE.match(line)
        if m and names:
            rest, owner = _split_owner(m["rest"])
            name = rest.strip().split(" ")[0] if rest.strip() else ""
            ranges.append(Region(int(m["start"], 16), int(m["end"], 16), int(m["prio"]), m["kind"].strip(),
                                 name, 0, owner))
    return out


def _lookup_chain(regions: list[Region], addr: int) -> list[Region]:
    """Containment chain root -> leaf, as QEMU dispatches: among sibling regions containing the
    address the highest priority wins (``info mtree`` prints siblings by address, not priority)."""
    children: dict[int, list[int]] = {-1: []}
    stack: list[int] = []
    for i, r in enumerate(regions):
        while stack and regions[stack[-1]].depth >= r.depth:
            stack.pop()
        children.setdefault(stack[-1] if stack else -1, []).append(i)
        children.setdefault(i, [])
        stack.append(i)
    chain: list[Region] = []
    cur = -1
    while True:
        best: Optional[int] = None
        for i in children.get(cur, []):
            r = regions[i]
            if r.enabled and r.start <= addr <= r.end and (best is None or r.priority > regions[best].priority):
                best = i
        if best is None:
            return chain
        chain.append(regions[best])
        cur = best


def parse_address_arg(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        try:
            v = int(text, 16)
        except ValueError:
            raise BadInputError(f"not an address: {text!r} (use 0x70 or 112)") from None
    if v < 0 or v >= 1 << 64:
        raise BadInputError(f"address out of range: {text}")
    return v


async def mtree_lookup(s: QmpSession, address: int | str, space: str = "io") -> MtreeMatch:
    """Name the memory region and device that own an I/O port (space io) or a guest-physical address."""
    addr = parse_address_arg(address) if isinstance(address, str) else int(address)
    as_name = {"io": "I/O", "memory": "memory"}.get(space)
    if as_name is None:
        raise BadInputError(f"space must be io or memory, not {space!r}")
    tree = parse_mtree(await s.hmp("info mtree -o"))
    regions = tree.get(as_name)
    if not regions:
        raise HmpError(f"'info mtree' shows no address space {as_name!r}")
    chain = _lookup_chain(regions, addr)
    if not chain:
        raise BadInputError(f"{space} address {addr:#x} is outside the {as_name} address space")
    flat = parse_flatview(await s.hmp("info mtree -f -o")).get(as_name, [])
    flat_name = next((r.name for r in flat if r.start <= addr <= r.end), "")
    leaf = chain[-1]
    if len(chain) == 1:  # nothing below the root: no device claims this address
        return MtreeMatch(addr, space, as_name, leaf.name, leaf.name, [leaf.name], leaf.start, leaf.end, "", "", "",
                          flat_name, claimed=False)
    owner = leaf.owner
    # the owning region: outermost region in the chain owned by the same device as the leaf
    region = leaf
    if owner:
        for r in chain[1:]:
            if r.owner == owner:
                region = r
                break
    elif len(chain) > 1:
        region = chain[1]
    dev_type = dev_id = ""
    if owner.startswith("/"):
        try:
            dev_type = str(await s.execute("qom-get", {"path": owner, "property": "type"}))
        except QmpCommandError:
            dev_type = ""
        if owner.startswith("/machine/peripheral/"):
            dev_id = owner.rsplit("/", 1)[1]
    names = [f"{r.name}@{r.alias_of}" if r.alias_of else r.name for r in chain]
    return MtreeMatch(addr, space, as_name, region.name, leaf.name, names, region.start,
                      region.end, owner, dev_type, dev_id, flat_name)


# ---------------------------------------------------------------------------------------------------
# l2cache


@dataclass
class L2CacheInfo(_Data):
    node_name: str
    filename: str
    virtual_size: int
    cluster_size: int
    extended_l2: bool
    l2_cache_size: int  # effective bytes of L2 cache (QEMU's read_cache_sizes())
    l2_cache_entry_size: int
    l2_cache_entries: int
    refcount_cache_size: int
    cache_clean_interval: int
    settings_source: str  # "command line" | "blockdev-add options" | "QEMU defaults (...)"
    options: dict[str, Any]  # the cache options as given
    coverage: int  # bytes of guest disk the L2 cache maps when full
    full_coverage_l2_cache_size: int
    full_coverage: bool
    recommendation: str


_CACHE_KEYS = ("cache-size", "l2-cache-size", "refcount-cache-size", "l2-cache-entry-size", "cache-clean-interval")


def _cmdline_cache_options(pid: Optional[int]) -> dict[str, dict[str, str]]:
    """node-name / drive id -> cache options given on QEMU's command line (-drive / -blockdev key=value)."""
    out: dict[str, dict[str, str]] = {}
    if pid is None:
        return out
    argv = protocol.proc_cmdline(pid)
    for i, a in enumerate(argv[:-1]):
        if a not in ("-drive", "-blockdev"):
            continue
        val = argv[i + 1]
        if val.startswith("{"):
            import json

            try:
                obj = json.loads(val)
            except ValueError:
                continue
            opts = {k: str(v) for k, v in obj.items() if not isinstance(v, dict)}
        else:
            opts = dict(p.split("=", 1) for p in val.split(",") if "=" in p)
        found = {k: v for k, v in opts.items() if k in _CACHE_KEYS}
        for key in ("node-name", "id"):
            if opts.get(key):
                out[opts[key]] = found
    return out


async def l2cache(s: QmpSession, node: Optional[str] = None,
                  known_options: Optional[dict[str, dict[str, Any]]] = None) -> list[L2CacheInfo]:
    """Cache settings of every qcow2 node (or of ``node``) and the l2-cache-size for full coverage.

    Cache options are not reported by QMP; they are taken from ``known_options`` (node -> options,
    e.g. what the shell itself sent with blockdev-add), else from QEMU's command line, else QEMU's
    defaults are assumed (and said so in ``settings_source``).
    """
    from qemu_ext.l2cache.options import full_coverage_size, parse_size, resolve
    from qemu_ext.output import human_size

    def _opt_size(opts: dict[str, Any], key: str) -> Optional[int]:
        return parse_size(opts[key]) if key in opts else None

    nodes = await s.execute("query-named-block-nodes", {"flat": True})
    blocks = await s.execute("query-block")
    drive_of = {b.get("inserted", {}).get("node-name"): b.get("device") for b in blocks if b.get("inserted")}
    cmdline = _cmdline_cache_options(s.pid)
    out = []
    for n in nodes:
        if n.get("drv") != "qcow2":
            continue
        name = n.get("node-name", "")
        if node is not None and node not in (name, drive_of.get(name)):
            continue
        img = n.get("image", {})
        vsize = int(img.get("virtual-size", 0))
        csize = int(img.get("cluster-size", 65536))
        ext = bool(img.get("format-specific", {}).get("data", {}).get("extended-l2", False))
        opts: dict[str, Any] = {}
        source = "QEMU defaults (cache options are not visible over QMP)"
        if known_options and name in known_options:
            opts = {k: v for k, v in known_options[name].items() if k in _CACHE_KEYS}
            source = "blockdev-add options"
        elif name in cmdline or drive_of.get(name) in cmdline:
            opts = cmdline.get(name) or cmdline.get(drive_of.get(name) or "", {})
            source = "command line"
        cfg = resolve(
            csize, vsize, ext,
            l2_cache_size=_opt_size(opts, "l2-cache-size"),
            refcount_cache_size=_opt_size(opts, "refcount-cache-size"),
            cache_size=_opt_size(opts, "cache-size"),
            l2_cache_entry_size=_opt_size(opts, "l2-cache-entry-size"),
            cache_clean_interval=int(opts["cache-clean-interval"]) if "cache-clean-interval" in opts else None,
        )
        full = full_coverage_size(csize, vsize, ext)
        coverage = min(vsize, cfg.covered_bytes)
        is_full = cfg.l2_cache_size >= full
        if is_full:
            rec = f"the L2 cache ({human_size(cfg.l2_memory)}) already covers the whole disk ({human_size(vsize)})"
        else:
            rec = (f"l2-cache-size={full} ({human_size(full)}) covers the whole disk ({human_size(vsize)}); "
                   f"now {human_size(cfg.l2_memory)} covers {human_size(coverage)}")
        out.append(L2CacheInfo(name, str(img.get("filename", n.get("file", ""))), vsize, csize, ext,
                               cfg.l2_memory, cfg.l2_cache_entry_size, cfg.l2_cache_entries,
                               cfg.refcount_memory, cfg.cache_clean_interval, source, opts, coverage, full,
                               is_full, rec))
    if node is not None and not out:
        raise BadInputError(f"no qcow2 node named {node!r}")
    return out
