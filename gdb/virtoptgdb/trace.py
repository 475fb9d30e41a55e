"""`virtopt trace list|enable|disable PATTERN`: QEMU's trace-event states through memory only.

Works without debug info: the event list comes from the executable's symbol table
(``_TRACE_<NAME>_DSTATE``, ``_TRACE_<NAME>_EVENT``), and toggling does exactly what
QEMU's trace_event_set_state_dynamic() does — set ``*ev->dstate`` and adjust
``trace_events_enabled_count`` — by writing memory, never by calling QEMU.
"""

from __future__ import annotations

import argparse
import fnmatch
import struct
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import gdb

from . import core

LOG_TRACE = 1 << 15  # include/qemu/log-for-trace.h
TRACE_VCPU_EVENT_NONE = 0xFFFFFFFF
# struct TraceEvent { uint32_t id; uint32_t vcpu_id; const char *name; const bool sstate; uint16_t *dstate; }
EV_VCPU_ID, EV_SSTATE, EV_DSTATE_PTR, EV_SIZE = 4, 16, 24, 32
MAX_SPAN = 8 << 20

_cache = core.per_objfile_cache()


@dataclass
class Event:
    name: str
    dstate_addr: int
    event_addr: Optional[int]


def events() -> list[Event]:
    """Every trace event compiled into this QEMU, from its symbol table."""
    evs = _cache.get("events")
    if evs is None:
        syms = core.elf_symbols()
        bias = core.load_bias()
        evs = []
        for name, sym in syms.items():
            if name.startswith("_TRACE_") and name.endswith("_DSTATE"):
                upper = name[len("_TRACE_"):-len("_DSTATE")]
                ev_sym = syms.get(f"_TRACE_{upper}_EVENT")
                evs.append(Event(upper.lower(), sym.value + bias, None if ev_sym is None else ev_sym.value + bias))
        evs.sort(key=lambda e: e.name)
        if not evs:
            raise core.NotAvailable("this QEMU has no trace events in its symbol table (_TRACE_*_DSTATE)")
        _cache["events"] = evs
    return evs


def _read_span(addrs: list[int], width: int) -> dict[int, bytes]:
    """Read many small objects: one memory read when they sit close together."""
    if not addrs:
        return {}
    lo, hi = min(addrs), max(addrs) + width
    if hi - lo <= MAX_SPAN:
        blob = core.read(lo, hi - lo)
        return {a: blob[a - lo:a - lo + width] for a in addrs}
    return {a: core.read(a, width) for a in addrs}


def backends() -> list[str]:
    syms = core.elf_symbols()
    out = []
    if "st_set_trace_file" in syms or "st_init" in syms:
        out.append("simple")
    lvl = core.symbol_address("qemu_loglevel")
    if lvl is not None and core.read_s32(lvl) & LOG_TRACE:
        out.append("log")
    if "ftrace_init" in syms:
        out.append("ftrace")
    if any(n.startswith("lttng_ust_tracepoint") or n.startswith("__tracepoint_qemu") for n in syms):
        out.append("ust")
    return out


def _count_addr() -> int:
    a = core.symbol_address("trace_events_enabled_count")
    if a is None:
        raise core.NotAvailable("this QEMU has no trace_events_enabled_count symbol")
    return a


def states(patterns: list[str]) -> dict[str, Any]:
    """The state of the events matching any of patterns, as QMP trace-event-get-state reports it."""
    evs = [e for e in events() if _match(e.name, patterns)]
    count = core.read_u32(_count_addr())
    dst = _read_span([e.dstate_addr for e in evs], 2)
    evb = _read_span([e.event_addr for e in evs if e.event_addr is not None], EV_SIZE)
    lvl = core.symbol_address("qemu_loglevel")
    rows = []
    for e in evs:
        d = struct.unpack("<H", dst[e.dstate_addr])[0]
        sstate, vcpu = True, False
        if e.event_addr is not None:
            raw = evb[e.event_addr]
            sstate = bool(raw[EV_SSTATE])
            vcpu = struct.unpack_from("<I", raw, EV_VCPU_ID)[0] != TRACE_VCPU_EVENT_NONE
        state = "unavailable" if not sstate else "enabled" if (count and d) else "disabled"
        rows.append({"name": e.name, "state": state, "dstate": d, "vcpu": vcpu})
    return {
        "enabled-count": count,
        "log-trace": None if lvl is None else bool(core.read_s32(lvl) & LOG_TRACE),
        "backends": backends(),
        "events": rows,
    }


def _match(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def set_state(patterns: list[str], enable: bool) -> dict[str, Any]:
    """Enable or disable the matching events the way trace_event_set_state_dynamic() does."""
    cur = states(patterns)
    if not cur["events"]:
        raise core.VirtoptGdbError(f"no trace event matches {' '.join(patterns)}")
    by_name = {e.name: e for e in events()}
    count_addr = _count_addr()
    count = cur["enabled-count"]
    changed, unchanged, unavailable, vcpu = [], [], [], []
    for row in cur["events"]:
        if row["state"] == "unavailable":
            unavailable.append(row["name"])
            continue
        if row["vcpu"]:
            vcpu.append(row["name"])  # per-vCPU dstate bitmaps: leave them to QMP
            continue
        on = row["dstate"] != 0
        if on == enable:
            unchanged.append(row["name"])
            continue
        core.write(by_name[row["name"]].dstate_addr, struct.pack("<H", 1 if enable else 0))
        count = count + 1 if enable else max(count - 1, 0)
        changed.append(row["name"])
    before = cur["enabled-count"]
    if count != before:
        core.write(count_addr, struct.pack("<I", count))
    if not changed and not unchanged and (vcpu or unavailable):
        why = "per-vCPU events (use QMP trace-event-set-state)" if vcpu else "disabled at build time"
        raise core.VirtoptGdbError(f"{' '.join(patterns)}: only {why} match")
    return {
        "action": "enable" if enable else "disable",
        "changed": changed,
        "unchanged": unchanged,
        "skipped-vcpu": vcpu,
        "unavailable": unavailable,
        "enabled-count-before": before,
        "enabled-count": core.read_u32(count_addr),
        "log-trace": cur["log-trace"],
        "backends": cur["backends"],
    }


def _check_symbols(cmd: str) -> Optional[str]:
    if core.symbol_address("trace_events_enabled_count") is None:
        return f"virtopt {cmd} needs the symbol trace_events_enabled_count, which this QEMU does not export"
    return None


class TracePrefix(core.VirtoptCommand):
    name = "trace"
    summary = "List, enable and disable QEMU trace events by writing memory (no debug info needed)."
    epilog = ("examples:\n  virtopt trace list 'qcow2_cache_*'\n  virtopt trace enable qcow2_cache_get\n"
              "  virtopt trace disable 'qcow2_*'\n  virtopt trace list --enabled --json")
    prefix = True
    json_option = False

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("rest", nargs="*", help="list | enable | disable, then patterns")

    def collect(self, args: argparse.Namespace) -> Any:
        what = " ".join(args.rest)
        raise core.VirtoptGdbError(f"unknown trace sub-command {what!r}: use virtopt trace list|enable|disable PATTERN"
                                   if what else "say what to do: virtopt trace list|enable|disable PATTERN")


class _TraceSub(core.VirtoptCommand):
    requires: ClassVar[list] = [("symbols", _check_symbols)]

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("patterns", nargs=self.nargs, metavar="PATTERN",
                       help="event name or glob (*, ?), as QMP trace-event-set-state takes")


class TraceList(_TraceSub):
    name = "trace list"
    summary = "Trace events and their state (enabled/disabled/unavailable), as QMP trace-event-get-state."
    epilog = "examples:\n  virtopt trace list 'qcow2_cache_*'\n  virtopt trace list --enabled"
    nargs = "*"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        super().add_arguments(p)
        p.add_argument("--enabled", action="store_true", help="only the enabled events")

    def collect(self, args: argparse.Namespace) -> Any:
        data = states(args.patterns or ["*"])
        if args.patterns and not data["events"]:
            raise core.VirtoptGdbError(f"no trace event matches {' '.join(args.patterns)}")
        if args.enabled:
            data["events"] = [e for e in data["events"] if e["state"] == "enabled"]
        return data

    def render(self, data: Any, args: argparse.Namespace) -> None:
        gdb.write(f"backends: {', '.join(data['backends']) or 'none found'}   "
                  f"trace_events_enabled_count: {data['enabled-count']}   "
                  f"log LOG_TRACE: {data['log-trace']}\n")
        for e in data["events"]:
            gdb.write(f"{e['name']} : state {1 if e['state'] == 'enabled' else 0}"
                      f"{'  (unavailable)' if e['state'] == 'unavailable' else ''}{'  (vcpu)' if e['vcpu'] else ''}\n")
        gdb.write(f"{len(data['events'])} event(s)\n")


class _TraceToggle(_TraceSub):
    nargs = "+"
    enable = True

    def collect(self, args: argparse.Namespace) -> Any:
        return set_state(args.patterns, self.enable)

    def render(self, data: Any, args: argparse.Namespace) -> None:
        verb = "enabled" if self.enable else "disabled"
        gdb.write(f"{verb} {len(data['changed'])} event(s), {len(data['unchanged'])} already {verb}; "
                  f"trace_events_enabled_count {data['enabled-count-before']} -> {data['enabled-count']}\n")
        for n in data["changed"]:
            gdb.write(f"  {n}\n")
        if data["skipped-vcpu"]:
            gdb.write(f"skipped {len(data['skipped-vcpu'])} per-vCPU event(s): use QMP trace-event-set-state\n")
        if data["unavailable"]:
            gdb.write(f"{len(data['unavailable'])} event(s) disabled at build time\n")
        if self.enable and "log" not in data["backends"] and data["backends"] == []:
            gdb.write("note: no trace backend found that prints these events\n")


class TraceEnable(_TraceToggle):
    name = "trace enable"
    summary = "Enable trace events (what QMP trace-event-set-state does), by writing QEMU's memory."
    epilog = "examples:\n  virtopt trace enable qcow2_cache_get\n  virtopt trace enable 'qcow2_cache_*' --json"
    enable = True


class TraceDisable(_TraceToggle):
    name = "trace disable"
    summary = "Disable trace events, by writing QEMU's memory."
    epilog = "examples:\n  virtopt trace disable 'qcow2_*'"
    enable = False


def register() -> None:
    TracePrefix()
    TraceList()
    TraceEnable()
    TraceDisable()
