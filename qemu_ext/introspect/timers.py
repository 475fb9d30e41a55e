"""`timers`: QEMU's timer lists per clock (main loop and AioContexts), their armed timers, and how
far ahead each one is.

QEMU's own `qemu timers` fails on 7.2. Each clock's timer lists are reached from the exported
main_loop_tlg (util/qemu-timer.c, 7.2 and 10.0): main_loop_tlg.tl[type]->clock->timerlists, so
the walk is the same with DWARF and with the confirmed hand-made layouts of a stripped build.

"Expires in" needs each clock's "now" (qemu_clock_get_ns, util/qemu-timer.c 7.2 and 10.0):
QEMU_CLOCK_REALTIME is CLOCK_MONOTONIC (get_clock), QEMU_CLOCK_HOST is CLOCK_REALTIME,
QEMU_CLOCK_VIRTUAL and VIRTUAL_RT are cpu_get_clock_locked(): timers_state.cpu_clock_offset, plus
CLOCK_MONOTONIC while the VM runs (cpu_ticks_enabled; softmmu/cpu-timers.c 7.2, system/ 10.0),
unless icount drives the virtual clock (use_icount: then it is not stored anywhere).

QEMU stores no "now". A live QEMU shares this host's clocks: they are read beside the timers. A
core file is read later, so the reference is the time of the dump, and the sources were weighed:

- (a) the core file's own time: its birth time (statx STATX_BTIME) is when the dump began (gdb's
  gcore and the kernel create the file first, then write it); converted to CLOCK_MONOTONIC by this
  host's present offset between CLOCK_REALTIME and CLOCK_MONOTONIC. Valid when the core was made
  on this host in this boot (checked: the file is younger than the boot) and the file is the dump
  itself, not a copy; off by the file system's timestamp granularity (one kernel tick, at most
  10 ms) and by any time the host spent suspended since it booted (CLOCK_BOOTTIME minus
  CLOCK_MONOTONIC, 0 on a host never suspended), unless the clock was set (stepped) since the
  dump. Without a birth time (a file system that keeps none) the modification time, the end of
  the dump, is used and the bound is unknown.
- (b) the main loop's last poll: a main thread blocked in ppoll() holds its timeout (the struct
  timespec qemu_poll_ns passed, on its stack) computed from the soonest deadline at the poll's
  entry, but QEMU does not record which deadline (a timer of any clock, or a GLib source) set it,
  so alone it only says the dump fell in [entry, entry + timeout]: on an idle QEMU the timeout is
  the next timer, minutes away (305 s on a debug 7.2 measured here, against 10 ms for (a)). What it
  does prove: a main loop waiting in ppoll() had not yet reached any timer of its own lists. A
  file time later than such a timer means QEMU froze before the dump began (gdb stopped it, then
  ran generate-core-file; or the file is a copy): then the reference is the latest moment QEMU can
  have frozen, that timer's due time, and the bound the poll's timeout (tight on a busy guest:
  5 ms with TCG's PIT, under 1 s with the RTC's update timer, measured here).
- (c) a stopped VM's frozen virtual clock: with cpu_ticks_enabled 0, QEMU_CLOCK_VIRTUAL stands at
  timers_state.cpu_clock_offset: exact, on a core as on a live QEMU, whatever the file's time.
"""

from __future__ import annotations

import struct
import time
from typing import Any, Optional

from . import common, layouts
from .target import IntrospectError, NotAvailable, Target, TornRead, Value, qlist

CLOCKS = ["realtime", "virtual", "host", "virtual_rt"]  # QEMUClockType order (include/qemu/timer.h)
MAX_TIMERS = 100000
TIMESTAMP_GRANULARITY = 0.010  # a file's times come from the coarse clock: one tick, 10 ms at HZ=100
POLL_SLACK = 0.002  # GLib rounds AioContext deadlines up to whole ms (qemu_timeout_ns_to_ms)
SYS_PPOLL = 271  # x86-64


def _check_layout(t: Target, view: str) -> Optional[str]:
    if t.has_debug_info() or t.symbol_address("main_loop_tlg") is None:
        return None
    try:
        layouts.timer_type(t, "QEMUTimer")
    except NotAvailable as exc:
        return f"virtopt {view}: {exc}"
    return None


common.register("timers", "QEMU's armed timers per clock and timer list (main loop and AioContexts), and how "
                "far ahead each is", [common.needs_symbols("main_loop_tlg"), _check_layout])


# ---------------------------------------------------------------- "now"


def _host_offsets() -> tuple[int, int]:
    """(CLOCK_REALTIME - CLOCK_MONOTONIC, CLOCK_BOOTTIME - CLOCK_MONOTONIC) of this host, in ns."""
    m0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    r = time.clock_gettime_ns(time.CLOCK_REALTIME)
    b = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    m1 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    m = (m0 + m1) // 2
    return r - m, b - m


def reference(t: Target) -> dict[str, Any]:
    """The moment the timers are counted from: this host's clocks (live), or the dump's (a core)."""
    if t.kind == "live":
        return {"kind": "host-clock", "realtime-ns": time.clock_gettime_ns(time.CLOCK_REALTIME),
                "monotonic-ns": time.clock_gettime_ns(time.CLOCK_MONOTONIC), "error-bound-seconds": 0.0,
                "description": "this host's CLOCK_MONOTONIC and CLOCK_REALTIME, read beside the timers "
                               "(QEMU runs on the same clocks)", "notes": []}
    none = {"kind": None, "realtime-ns": None, "monotonic-ns": None, "error-bound-seconds": None, "notes": []}
    core = t.core_path()
    if core is None:
        return {**none, "description": "the core file is not known to this reader: expire times only"}
    from . import corefile

    try:
        birth, mtime = corefile.file_times(core)
    except OSError as exc:
        return {**none, "description": f"cannot read the times of {core}: {exc.strerror}: expire times only"}
    offset, suspended = _host_offsets()
    suspended = suspended if suspended > 1_000_000 else 0  # below 1 ms: the reads' own spread
    booted = time.clock_gettime_ns(time.CLOCK_REALTIME) - time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    when = birth if birth is not None else mtime
    if when < booted:
        return {**none, "description": "the core file is older than this host's last boot: its clocks cannot be "
                                       "related to this host's; expire times only"}
    bound = None if birth is None else round(TIMESTAMP_GRANULARITY + suspended / 1e9, 6)
    if birth is not None:
        desc = ("the core file's creation (statx birth time: the dump began), on this host's CLOCK_MONOTONIC; "
                "valid for a core made on this host since its last boot, when this file is the dump itself "
                "(not a copy)")
    else:
        desc = ("the core file's modification time (its file system keeps no birth time): the end of the dump, "
                "later than its start by the time the dump took to write")
    notes = []
    if suspended > 0:
        notes.append(f"this host was suspended for {suspended / 1e9:.3f} s since it booted: CLOCK_MONOTONIC "
                     "stopped meanwhile, the bound includes it")
    return {"kind": "core-file-creation" if birth is not None else "core-file-modification",
            "realtime-ns": when, "monotonic-ns": when - offset, "error-bound-seconds": bound,
            "description": desc, "notes": notes}


def clock_nows(t: Target, ref: dict[str, Any]) -> dict[str, tuple[Optional[int], str, Optional[float]]]:
    """clock name -> (QEMU's "now" of that clock in ns or None, where it comes from, error bound in s)."""
    bound = ref["error-bound-seconds"]
    mono, real = ref["monotonic-ns"], ref["realtime-ns"]
    out: dict[str, tuple[Optional[int], str, Optional[float]]] = {
        "realtime": (mono, "CLOCK_MONOTONIC (get_clock)", bound),
        "host": (real, "CLOCK_REALTIME (get_clock_realtime)", bound),
    }
    try:
        ts = layouts.timers_state(t)
        icount_sym = t.symbol_address("use_icount")
        icount = t.read_s32(icount_sym) if icount_sym is not None else 0
    except IntrospectError:
        ts, icount = None, 0
    for name in ("virtual", "virtual_rt"):
        if ts is None:
            out[name] = (None, "timers_state not readable in this QEMU", None)
        elif name == "virtual" and icount:
            out[name] = (None, "icount drives the virtual clock (use_icount): its time is not stored", None)
        elif not int(ts["cpu_ticks_enabled"]):
            out[name] = (int(ts["cpu_clock_offset"]), FROZEN, 0.0)
        elif mono is None:
            out[name] = (None, "CLOCK_MONOTONIC + timers_state.cpu_clock_offset, and the dump's time is unknown",
                         None)
        else:
            out[name] = (mono + int(ts["cpu_clock_offset"]), "CLOCK_MONOTONIC + timers_state.cpu_clock_offset",
                         bound)
    return out


# ---------------------------------------------------------------- the timer lists


def _timers(t: Target, tlp: Value, timer_t: Any) -> list[dict[str, Any]]:
    timers: list[dict[str, Any]] = []
    t_ptr: Value = tlp.deref()["active_timers"]
    seen: set[int] = set()
    while not t_ptr.is_null() and len(timers) < MAX_TIMERS:
        if t_ptr.ptr() in seen:
            raise TornRead(f"the timer list at {tlp.ptr():#x} loops")
        seen.add(t_ptr.ptr())
        tv = t_ptr.as_pointer_to(timer_t)
        cb = tv["cb"].ptr()
        timers.append({"expire-time": int(tv["expire_time"]), "scale": int(tv["scale"]),
                       "cb": None, "cb-address": cb, "opaque": tv["opaque"].ptr(),
                       "attributes": int(tv["attributes"])})  # cb named once "now" is read
        t_ptr = tv["next"]
    return timers


def _main_thread_lists(t: Target, main_lists: set[int]) -> set[int]:
    """The timer lists the main thread runs: main_loop_tlg's and those of the main loop's AioContexts
    (qemu_aio_context, iohandler_ctx: their tlg, util/async.c)."""
    out = set(main_lists)
    if t.has_debug_info():
        for name in ("qemu_aio_context", "iohandler_ctx"):
            try:
                ctx = t.find_var(name)
                if ctx is not None and not ctx.is_null():
                    tl = ctx.deref()["tlg"]["tl"]
                    out |= {tl.index(i).ptr() for i in range(len(CLOCKS))}
            except IntrospectError:
                continue
    return out


def _poll_timeout(t: Target, tid: int) -> Optional[int]:
    """The timeout (ns) of the ppoll() thread tid sits in: the struct timespec its third argument
    points to (qemu_poll_ns builds it on the stack; glibc's ppoll passes its own copy)."""
    try:
        tsp = t.register(tid, "rdx")
        if not tsp:
            return None
        sec, nsec = struct.unpack("<qq", t.read(tsp, 16))
    except (IntrospectError, struct.error):
        return None
    return sec * 1_000_000_000 + nsec if sec >= 0 and 0 <= nsec < 1_000_000_000 else None


def _main_loop_window(t: Target, ref: dict[str, Any], clocks: list[dict[str, Any]], mine: set[int]) -> None:
    """(b): a main thread blocked in ppoll() had reached none of its own timers. If the file's time
    is past one of them, QEMU froze before the dump began (a debugger stopped it first) or the file
    is a copy: the reference moves back to the latest moment QEMU can have frozen (that timer's
    due time), and the bound becomes the poll's timeout."""
    if ref["kind"] not in ("core-file-creation", "core-file-modification") or t.pid is None:
        return
    try:
        nr = t.register(t.pid, "orig_rax")
    except IntrospectError:
        nr = None
    if nr != SYS_PPOLL:
        return
    soonest = None
    for c in clocks:
        if c["now-ns"] is None or _frozen(c):  # a stopped VM's virtual timers are not overdue
            continue
        for tl in c["timer-lists"]:
            if tl["address"] in mine:
                for tm in tl["timers"]:
                    if soonest is None or tm["expires-in-ns"] < soonest[0]:
                        soonest = (tm["expires-in-ns"], tm["cb"], c["clock"])
    if soonest is None or soonest[0] >= -(TIMESTAMP_GRANULARITY + POLL_SLACK) * 1e9:
        return  # consistent: the file's time stands
    late = -soonest[0]
    timeout = _poll_timeout(t, t.pid)
    bound = None if timeout is None else round(timeout / 1e9 + POLL_SLACK, 6)
    when = "at most the poll's timeout" + (f" ({timeout / 1e9:.3f} s)" if timeout is not None else "")
    ref["notes"].append(f"the core file was made {late / 1e9:.3f} s after QEMU's main loop, waiting in ppoll, "
                        f"should have run {soonest[1]} ({soonest[2]}): QEMU froze before the dump began (a debugger "
                        "stopped it), or this file is a copy; its time is not used")
    ref.update({"kind": "main-loop-poll", "realtime-ns": ref["realtime-ns"] - late,
                "monotonic-ns": ref["monotonic-ns"] - late, "error-bound-seconds": bound,
                "description": f"the latest moment QEMU can have frozen: when {soonest[1]} ({soonest[2]}) was due, "
                               f"which its main loop was waiting for in ppoll; it froze {when} earlier, if that "
                               "timer set the poll's timeout (QEMU does not record which deadline did)"})
    for c in clocks:
        if c["now-ns"] is not None and not _frozen(c):
            c["now-ns"] -= late
            c["error-bound-seconds"] = bound
            for tl in c["timer-lists"]:
                for tm in tl["timers"]:
                    tm["expires-in-ns"] += late


FROZEN = "frozen: the VM is stopped, the clock stands at timers_state.cpu_clock_offset"


def _frozen(clock: dict[str, Any]) -> bool:
    return clock["now-from"] == FROZEN


def collect(t: Target) -> dict[str, Any]:
    """Every timer list of every clock, with the armed timers and how far ahead each is."""
    tlg = t.symbol_address("main_loop_tlg")
    if tlg is None:
        raise common.NotAvailable("this QEMU exports no main_loop_tlg")
    group = t.value(tlg, layouts.timer_type(t, "QEMUTimerListGroup"))
    timer_t = layouts.timer_type(t, "QEMUTimer")
    main_lists = {group["tl"].index(i).ptr() for i in range(len(CLOCKS))}
    started = time.monotonic()
    out = []
    for i, cname in enumerate(CLOCKS):
        main_tl = group["tl"].index(i)
        lists = []
        enabled = False
        if not main_tl.is_null():
            clock = main_tl.deref()["clock"].deref()
            enabled = clock["enabled"].bool()
            for tlp in qlist(clock["timerlists"], "list", limit=10000):
                owner = "main-loop" if tlp.ptr() in main_lists else "aio-context"
                lists.append({"address": tlp.ptr(), "owner": owner, "notify": tlp.deref()["notify_cb"].ptr(),
                              "timers": _timers(t, tlp, timer_t)})
        out.append({"clock": cname, "enabled": enabled, "timer-lists": lists})
    ref = reference(t)  # live: right after the walk, which took `span`
    span = round(time.monotonic() - started, 6)
    nows = clock_nows(t, ref)
    if ref["kind"] == "host-clock":
        ref["error-bound-seconds"] = span
    for c in out:
        now, how, bound = nows[c["clock"]]
        if ref["kind"] == "host-clock" and now is not None and how != FROZEN:
            bound = span
        c.update({"now-ns": now, "now-from": how, "error-bound-seconds": bound})
        c["timer-lists"] = c.pop("timer-lists")  # after the clock's own keys
        for tl in c["timer-lists"]:
            tl["notify"] = t.symbolize(tl["notify"])
            for tm in tl["timers"]:
                tm["cb"] = t.symbolize(tm["cb-address"]) or f"{tm['cb-address']:#x}"
                tm["expires-in-ns"] = tm["expire-time"] - now if now is not None else None
    _main_loop_window(t, ref, out, _main_thread_lists(t, main_lists))
    return {"source": "debug-info" if t.has_debug_info() else "symbols", "reference": ref, "clocks": out}
