"""`trace list|enable|disable PATTERN`: QEMU's trace-event states through memory only.

Works without debug info: the events come from the executable's symbol table
(``_TRACE_<NAME>_DSTATE``, ``_TRACE_<NAME>_EVENT``) and each event's own name string (so
mixed-case names such as ``scsi_disk_dma_command_READ`` stay as QEMU spells them). Toggling does
what QEMU's trace_event_set_state_dynamic() does (trace/control.c, 7.2 and 10.0) — set
``*ev->dstate`` and adjust ``trace_events_enabled_count`` — by writing memory, never by calling QEMU.
struct TraceEvent is read by the running QEMU's layout (layouts.trace_event).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import struct
from typing import Any, Optional

from . import common, layouts
from .target import IntrospectError, NotAvailable, Target

LOG_TRACE = 1 << 15  # include/qemu/log-for-trace.h
TRACE_VCPU_EVENT_NONE = 0xFFFFFFFF
MAX_SPAN = 8 << 20


def _check_symbols(t: Target, view: str) -> Optional[str]:
    if t.symbol_address("trace_events_enabled_count") is None:
        return f"virtopt {view} needs the symbol trace_events_enabled_count, which this QEMU does not export"
    return None


def _check_layout(t: Target, view: str) -> Optional[str]:
    """struct TraceEvent by DWARF, or a hand-made layout the binary confirms (layouts.trace_event)."""
    if t.symbol_address("trace_events_enabled_count") is None:
        return None  # _check_symbols says it
    try:
        layouts.trace_event(t)
    except NotAvailable as exc:
        return f"virtopt {view}: {exc}"
    return None


common.register("trace list", "Trace events and their state (enabled/disabled/unavailable), as QMP "
                "trace-event-get-state", [_check_symbols, _check_layout])
common.register("trace enable", "Enable trace events (what QMP trace-event-set-state does), by writing QEMU's memory",
                [_check_symbols, _check_layout, common.needs_write("virtopt trace enable PATTERN")], writes=True)
common.register("trace disable", "Disable trace events, by writing QEMU's memory",
                [_check_symbols, _check_layout, common.needs_write("virtopt trace disable PATTERN")], writes=True)


@dataclasses.dataclass
class Event:
    name: str
    dstate_addr: int
    event_addr: Optional[int]


def events(t: Target) -> list[Event]:
    """Every trace event compiled into this QEMU, named as QEMU names it: with debug info from the
    groups QEMU registered (trace_event_register_group, trace/control.c 7.2 and 10.0: every event
    of the executable registers at start-up), else from the symbol table."""
    evs = t.memo.get("trace-events")
    if evs is not None:
        return evs
    evs = _registered_events(t) if t.has_debug_info() else None
    if evs is None:
        evs = _symbol_events(t)
    evs.sort(key=lambda e: e.name)
    t.memo["trace-events"] = evs
    return evs


MAX_GROUPS = 4096
MAX_GROUP_EVENTS = 1 << 16


def event_count(t: Target) -> int:
    """How many trace events this QEMU has (``info``): the registered groups' pointers with debug
    info (no event read), else the symbol table's events."""
    evs = t.memo.get("trace-events")
    if evs is not None:
        return len(evs)
    addrs = _registered_addrs(t) if t.has_debug_info() else None
    return len(addrs) if addrs is not None else len(events(t))


def _registered_addrs(t: Target) -> Optional[list[int]]:
    """static TraceEventGroup *event_groups (nevent_groups of them), each a NULL-terminated array of
    TraceEvent pointers: the events' addresses."""
    groups, n = t.find_var("event_groups"), t.find_var("nevent_groups")
    if groups is None or n is None or t.find_type("TraceEvent") is None or groups.is_null():
        return None
    count = int(n)
    if not 0 < count <= MAX_GROUPS:
        return None
    group_t = groups.type.target
    arrays = [t.value(groups.ptr() + i * group_t.size, group_t)["events"].ptr() for i in range(count)]
    addrs: list[int] = []
    for arr in arrays:
        pos = arr
        while arr and pos < arr + 8 * MAX_GROUP_EVENTS:
            chunk = t.read(pos, 4096 - pos % 4096)
            ptrs = struct.unpack(f"<{len(chunk) // 8}Q", chunk[:len(chunk) // 8 * 8])
            end = ptrs.index(0) if 0 in ptrs else len(ptrs)
            addrs += ptrs[:end]
            if end < len(ptrs):
                break
            pos += len(ptrs) * 8
    return addrs


def _registered_events(t: Target) -> Optional[list[Event]]:
    """The registered events (_registered_addrs), each with its name and dstate: no symbol table read."""
    addrs = _registered_addrs(t)
    ty = t.find_type("TraceEvent")
    if addrs is None or ty is None:
        return None
    name_off, dstate_off = ty.offset("name"), ty.offset("dstate")
    at = _span_reader(t, addrs, ty.size)
    u64 = struct.Struct("<Q").unpack_from
    ptrs = []
    for a in addrs:
        blob, i = at(a)
        ptrs.append((a, u64(blob, i + name_off)[0], u64(blob, i + dstate_off)[0]))
    names = _cstrings(t, [p for _a, p, _d in ptrs], 128)
    return [Event(names[p], dstate, a) for a, p, dstate in ptrs]


def _cstrings(t: Target, addrs: list[int], limit: int) -> dict[int, str]:
    """Many C strings (the events' names, all in .rodata): one read of the span when it is small."""
    if not addrs:
        return {}
    lo, hi = min(addrs), max(addrs) + limit
    if not all(addrs) or hi - lo > MAX_SPAN:
        return {a: t.read_cstring(a, limit) for a in addrs}
    try:
        blob = t.read(lo, hi - lo)
    except IntrospectError:  # the span crosses unmapped memory: one by one
        return {a: t.read_cstring(a, limit) for a in addrs}
    out = {}
    for a in addrs:
        i = a - lo
        end = blob.find(b"\0", i, i + limit)
        out[a] = blob[i:end if end >= 0 else i + limit].decode("utf-8", "replace")
    return out


def _symbol_events(t: Target) -> list[Event]:
    """The events by their symbols (_TRACE_<NAME>_DSTATE, _TRACE_<NAME>_EVENT): a stripped QEMU."""
    syms = t.elf_symbols()
    bias = t.load_bias()
    found = []
    for name, sym in syms.items():
        if name.startswith("_TRACE_") and name.endswith("_DSTATE"):
            upper = name[len("_TRACE_"):-len("_DSTATE")]
            ev_sym = syms.get(f"_TRACE_{upper}_EVENT")
            found.append((upper, sym.value + bias, None if ev_sym is None else ev_sym.value + bias))
    if not found:
        raise NotAvailable("this QEMU has no trace events in its symbol table (_TRACE_*_DSTATE)")
    evs = []
    ty = None
    try:
        ty = layouts.trace_event(t)
    except NotAvailable:
        ty = None  # names then come from the symbols (upper-cased by QEMU's tracetool: lower them)
    name_off = ty.offset("name") if ty is not None else None
    for upper, dstate, ev in found:
        name = upper.lower()
        if ev is not None and name_off is not None:
            real = t.read_cstring(t.read_u64(ev + name_off), 128)
            if real.upper() == upper:
                name = real
        evs.append(Event(name, dstate, ev))
    return evs


def _span_reader(t: Target, addrs: list[int], width: int) -> Any:
    """``at(addr) -> (blob, offset)`` for many small objects: one memory read when they sit close
    together (no copy per object), else one read each."""
    if addrs:
        lo, hi = min(addrs), max(addrs) + width
        if hi - lo <= MAX_SPAN:
            blob = t.read(lo, hi - lo)
            return lambda a: (blob, a - lo)
    return lambda a: (t.read(a, width), 0)


def backends(t: Target) -> list[str]:
    """The trace backends compiled in (from the symbols) and, for log, switched on (qemu_loglevel)."""
    built = t.memo.get("trace-backends")
    if built is None:
        from . import elf

        try:  # ust's generated tracepoints: a search of the symbol names, not a parse of the table
            ust = elf.has_prefix(t.exe(), (b"lttng_ust_tracepoint", b"__tracepoint_qemu"))
        except Exception:  # BadInputError, a vanished file
            ust = False
        built = t.memo["trace-backends"] = {
            "simple": t.elf_symbol("st_set_trace_file") is not None or t.elf_symbol("st_init") is not None,
            "ftrace": t.elf_symbol("ftrace_init") is not None,
            "ust": ust,
        }
    out = ["simple"] if built["simple"] else []
    lvl = t.symbol_address("qemu_loglevel")
    if lvl is not None and t.read_s32(lvl) & LOG_TRACE:
        out.append("log")
    if built["ftrace"]:
        out.append("ftrace")
    if built["ust"]:
        out.append("ust")
    return out


def _count_addr(t: Target) -> int:
    a = t.symbol_address("trace_events_enabled_count")
    if a is None:
        raise NotAvailable("this QEMU has no trace_events_enabled_count symbol")
    return a


def _match(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def states(t: Target, patterns: list[str]) -> dict[str, Any]:
    """The state of the events matching any of patterns, as QMP trace-event-get-state reports it."""
    evs = events(t) if "*" in patterns else [e for e in events(t) if _match(e.name, patterns)]
    count = t.read_u32(_count_addr(t))
    dstate = _span_reader(t, [e.dstate_addr for e in evs], 2)
    ty = layouts.trace_event(t)
    size = ty.size
    sstate_off = ty.offset("sstate")
    vcpu_off = ty.offset("vcpu_id") if ty.has("vcpu_id") else None
    event = _span_reader(t, [e.event_addr for e in evs if e.event_addr is not None], size)
    lvl = t.symbol_address("qemu_loglevel")
    rows = []
    u16, u32 = struct.Struct("<H").unpack_from, struct.Struct("<I").unpack_from
    for e in evs:
        blob, at = dstate(e.dstate_addr)
        d = u16(blob, at)[0]
        sstate, vcpu = True, False
        if e.event_addr is not None:
            blob, at = event(e.event_addr)
            sstate = bool(blob[at + sstate_off])
            if vcpu_off is not None:
                vcpu = u32(blob, at + vcpu_off)[0] != TRACE_VCPU_EVENT_NONE
        state = "unavailable" if not sstate else "enabled" if (count and d) else "disabled"
        rows.append({"name": e.name, "state": state, "dstate": d, "vcpu": vcpu})
    return {
        "enabled-count": count,
        "log-trace": None if lvl is None else bool(t.read_s32(lvl) & LOG_TRACE),
        "backends": backends(t),
        "events": rows,
    }


def collect_list(t: Target, patterns: Optional[list[str]] = None, enabled_only: bool = False) -> dict[str, Any]:
    data = states(t, patterns or ["*"])
    if patterns and not data["events"]:
        raise IntrospectError(f"no trace event matches {' '.join(patterns)}")
    if enabled_only:
        data["events"] = [e for e in data["events"] if e["state"] == "enabled"]
    return data


def set_state(t: Target, patterns: list[str], enable: bool) -> dict[str, Any]:
    """Enable or disable the matching events the way trace_event_set_state_dynamic() does."""
    cur = states(t, patterns)
    if not cur["events"]:
        raise IntrospectError(f"no trace event matches {' '.join(patterns)}")
    by_name = {e.name: e for e in events(t)}
    count_addr = _count_addr(t)
    count = cur["enabled-count"]
    changed, unchanged, unavailable, vcpu = [], [], [], []
    for row in cur["events"]:
        if row["state"] == "unavailable":
            unavailable.append(row["name"])
            continue
        if row["vcpu"]:
            vcpu.append(row["name"])  # per-vCPU dstate bitmaps (7.2): leave them to QMP
            continue
        on = row["dstate"] != 0
        if on == enable:
            unchanged.append(row["name"])
            continue
        t.write(by_name[row["name"]].dstate_addr, struct.pack("<H", 1 if enable else 0))
        count = count + 1 if enable else max(count - 1, 0)
        changed.append(row["name"])
    before = cur["enabled-count"]
    if count != before:
        t.write(count_addr, struct.pack("<I", count))
    if not changed and not unchanged and (vcpu or unavailable):
        why = "per-vCPU events (use QMP trace-event-set-state)" if vcpu else "disabled at build time"
        raise IntrospectError(f"{' '.join(patterns)}: only {why} match")
    return {
        "action": "enable" if enable else "disable",
        "changed": changed, "unchanged": unchanged, "skipped-vcpu": vcpu, "unavailable": unavailable,
        "enabled-count-before": before, "enabled-count": t.read_u32(count_addr),
        "log-trace": cur["log-trace"], "backends": cur["backends"],
    }
