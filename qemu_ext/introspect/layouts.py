"""Structure layouts of QEMU builds without debug info: by what the binary tells, never by a guess.

With DWARF every view reads by type. Without it, a few views (trace, timers) read structures by
hand-made layouts, used only when the binary confirms them: its version string
("QEMU emulator version X.Y.Z") names a series whose layout was checked against that series'
DWARF (tests/test_gdb_layouts.py does it on both debug builds), and the symbol sizes the binary
exports agree (sizeof(TraceEvent) from _TRACE_*_EVENT, sizeof(QEMUTimerListGroup) from
main_loop_tlg). Any other build is refused with one line.
"""

from __future__ import annotations

import re
from typing import Optional

from qemu_ext.gdbmi import elfsyms

from .target import (
    BOOL,
    CHARP,
    S32,
    S64,
    U16,
    U32,
    U64T,
    VOIDP,
    IntrospectError,
    NotAvailable,
    Target,
    TypeInfo,
    Value,
    pointer_to,
    scalar,
    struct_type,
)

VERSION_PREFIX = b"QEMU emulator version "
VERIFIED = ("7.2", "10.0")  # series whose hand-made layouts were checked against their DWARF


def version(t: Target) -> Optional[str]:
    """QEMU_FULL_VERSION as `qemu-system-x86_64 --version` prints it, from the executable."""
    if "version" not in t.memo:
        try:
            s = elfsyms.find_string(t.exe(), VERSION_PREFIX)
        except IntrospectError:
            s = None
        t.memo["version"] = s[len(VERSION_PREFIX):].strip() if s else None
    return t.memo["version"]


def series(t: Target) -> Optional[str]:
    v = version(t)
    m = re.match(r"(\d+)\.(\d+)", v or "")
    return f"{m.group(1)}.{m.group(2)}" if m else None


def _trace_event(ser: str) -> TypeInfo:
    """struct TraceEvent, trace/event-internal.h: 7.2 has uint32_t vcpu_id after id; 10.0 does not
    (removed with the per-vCPU trace events in 8.1)."""
    u16p = pointer_to(U16)
    if ser == "7.2":
        return struct_type("TraceEvent", 32, {"id": (0, U32), "vcpu_id": (4, U32), "name": (8, CHARP),
                                              "sstate": (16, BOOL), "dstate": (24, u16p)})
    return struct_type("TraceEvent", 32, {"id": (0, U32), "name": (8, CHARP), "sstate": (16, BOOL),
                                          "dstate": (24, u16p)})


def _timer_types() -> dict[str, TypeInfo]:
    """util/qemu-timer.c and include/qemu/timer.h, identical in 7.2 and 10.0 on x86-64 (QemuMutex
    without CONFIG_DEBUG_MUTEX, as distributions build it: pthread_mutex_t + bool = 48 bytes)."""
    timer = struct_type("QEMUTimer", 48, {})
    clock = struct_type("QEMUClock", 16, {})
    tl = struct_type("QEMUTimerList", 0, {})
    tl_entry = struct_type("QEMUTimerList-list", 16, {"le_next": (0, pointer_to(tl)), "le_prev": (8, VOIDP)})
    tl.fields.update(struct_type("", 0, {
        "clock": (0, pointer_to(clock)), "active_timers": (56, pointer_to(timer)), "list": (64, tl_entry),
        "notify_cb": (80, VOIDP), "notify_opaque": (88, VOIDP)}).fields)
    clock.fields.update(struct_type("", 0, {
        "timerlists": (0, struct_type("QEMUClock-timerlists", 8, {"lh_first": (0, pointer_to(tl))})),
        "type": (8, U32), "enabled": (12, BOOL)}).fields)
    timer.fields.update(struct_type("", 0, {
        "expire_time": (0, S64), "timer_list": (8, pointer_to(tl)), "cb": (16, VOIDP), "opaque": (24, VOIDP),
        "next": (32, pointer_to(timer)), "attributes": (40, S32), "scale": (44, S32)}).fields)
    tlp = pointer_to(tl)
    tlg = struct_type("QEMUTimerListGroup", 32, {"tl": (0, TypeInfo("QEMUTimerList *[4]", "array", 32, length=4,
                                                                     target=tlp))})
    return {"QEMUTimer": timer, "QEMUClock": clock, "QEMUTimerList": tl, "QEMUTimerListGroup": tlg}


def _timers_state() -> TypeInfo:
    """TimersState (include/sysemu/cpu-timers-internal.h 7.2, include/system/ 10.0): the two fields
    that give QEMU_CLOCK_VIRTUAL's time (cpu_get_clock_locked, softmmu|system/cpu-timers.c)."""
    return struct_type("TimersState", 96, {"cpu_ticks_enabled": (24, scalar("int16_t", 2, True)),
                                           "cpu_clock_offset": (56, S64)})


def timers_state(t: Target) -> Optional[Value]:
    """QEMU's timers_state (exported by stripped builds too) by DWARF, else by the confirmed layout;
    None when this QEMU has none or the layout cannot be confirmed."""
    if t.has_debug_info():
        return t.find_var("timers_state")
    sym = t.symbol("timers_state")
    if sym is None or series(t) not in VERIFIED:
        return None
    ty = _timers_state()
    if sym.size not in (0, ty.size):
        return None
    return t.value(sym.address, ty)


def _refuse(t: Target, what: str, why: str) -> NotAvailable:
    v = version(t)
    return NotAvailable(f"{what} without debug info needs a layout this QEMU ({v or 'version unknown'}) "
                        f"cannot confirm: {why}; verified layouts: QEMU {', '.join(VERIFIED)}")


def _confirmed_series(t: Target, what: str) -> str:
    ser = series(t)
    if ser is None:
        raise _refuse(t, what, "no version string in the executable")
    if ser not in VERIFIED:
        raise _refuse(t, what, f"QEMU {ser} was never checked")
    return ser


def trace_event(t: Target) -> TypeInfo:
    """struct TraceEvent of this QEMU: by DWARF, else by its version confirmed by the symbol size."""
    if t.has_debug_info():
        ty = t.find_type("TraceEvent")
        if ty is not None:
            return ty
    ser = _confirmed_series(t, "reading trace events")
    ty = _trace_event(ser)
    syms = t.elf_symbols()
    sizes = {s.size for n, s in syms.items() if n.startswith("_TRACE_") and n.endswith("_EVENT")}
    if sizes and sizes != {ty.size}:
        raise _refuse(t, "reading trace events", f"its TraceEvent symbols are {sorted(sizes)} bytes, not {ty.size}")
    return ty


def timer_type(t: Target, name: str) -> TypeInfo:
    """QEMUTimer, QEMUClock, QEMUTimerList or QEMUTimerListGroup: DWARF, else the confirmed layout."""
    if t.has_debug_info():
        return t.type(name)
    _confirmed_series(t, "reading timers")
    types = t.memo.get("timer-types")
    if types is None:
        tlg = t.symbol("main_loop_tlg")
        if tlg is not None and tlg.size not in (0, 32):
            raise _refuse(t, "reading timers", f"main_loop_tlg is {tlg.size} bytes, not 32")
        types = t.memo["timer-types"] = _timer_types()
    return types[name]


def hand_made(ser: str) -> dict[str, TypeInfo]:
    """Every hand-made layout of a series (the tests compare them with that series' DWARF)."""
    return {"TraceEvent": _trace_event(ser), **_timer_types(), "TimersState": _timers_state()}


_ = U64T
