"""`timers`: QEMU's timer lists per clock (main loop and AioContexts) and their armed timers.

QEMU's own `qemu timers` fails on 7.2. Each clock's timer lists are reached from the exported
main_loop_tlg (util/qemu-timer.c, 7.2 and 10.0): main_loop_tlg.tl[type]->clock->timerlists, so
the walk is the same with DWARF and with the confirmed hand-made layouts of a stripped build.

"expires in" of a realtime timer is counted from QEMU_CLOCK_REALTIME now (CLOCK_MONOTONIC) on a
live QEMU; on a core, from the time QEMU last stored (the newest realtime timer-list deadline
is not kept, so a core reports expire times only, and say so).
"""

from __future__ import annotations

import time
from typing import Any, Optional

from . import common, layouts
from .target import NotAvailable, Target, Value, qlist, walk

CLOCKS = ["realtime", "virtual", "host", "virtual_rt"]  # QEMUClockType order (include/qemu/timer.h)
MAX_TIMERS = 100000

def _check_layout(t: Target, view: str) -> Optional[str]:
    if t.has_debug_info() or t.symbol_address("main_loop_tlg") is None:
        return None
    try:
        layouts.timer_type(t, "QEMUTimer")
    except NotAvailable as exc:
        return f"virtopt {view}: {exc}"
    return None


common.register("timers", "QEMU's armed timers per clock and timer list (main loop and AioContexts)",
                [common.needs_symbols("main_loop_tlg"), _check_layout])


def collect(t: Target) -> dict[str, Any]:
    """Every timer list of every clock, with the armed timers."""
    tlg = t.symbol_address("main_loop_tlg")
    if tlg is None:
        raise common.NotAvailable("this QEMU exports no main_loop_tlg")
    group = t.value(tlg, layouts.timer_type(t, "QEMUTimerListGroup"))
    timer_t = layouts.timer_type(t, "QEMUTimer")
    main_lists = {group["tl"].index(i).ptr() for i in range(len(CLOCKS))}
    live = t.kind == "live"
    now_rt = time.clock_gettime_ns(time.CLOCK_MONOTONIC) if live else None  # QEMU_CLOCK_REALTIME
    out = []
    for i, cname in enumerate(CLOCKS):
        main_tl = group["tl"].index(i)
        lists = []
        enabled = False
        if not main_tl.is_null():
            clock = main_tl.deref()["clock"].deref()
            enabled = clock["enabled"].bool()
            for tlp in qlist(clock["timerlists"], "list", limit=10000):
                tl = tlp.deref()
                timers = []
                t_ptr: Value = tl["active_timers"]
                seen: set[int] = set()
                while not t_ptr.is_null() and len(timers) < MAX_TIMERS:
                    if t_ptr.ptr() in seen:
                        from .target import TornRead

                        raise TornRead(f"the timer list at {tlp.ptr():#x} loops")
                    seen.add(t_ptr.ptr())
                    tv = t_ptr.as_pointer_to(timer_t)
                    cb = tv["cb"].ptr()
                    exp = int(tv["expire_time"])
                    entry = {
                        "expire-time": exp, "scale": int(tv["scale"]), "cb": t.symbolize(cb) or f"{cb:#x}",
                        "cb-address": cb, "opaque": tv["opaque"].ptr(), "attributes": int(tv["attributes"]),
                    }
                    if cname == "realtime":
                        entry["expires-in-ns"] = exp - now_rt if now_rt is not None else None
                    timers.append(entry)
                    t_ptr = tv["next"]
                owner = "main-loop" if tlp.ptr() in main_lists else "aio-context"
                lists.append({"address": tlp.ptr(), "owner": owner,
                              "notify": t.symbolize(tl["notify_cb"].ptr()), "timers": timers})
        out.append({"clock": cname, "enabled": enabled, "timer-lists": lists})
    return {"source": "debug-info" if t.has_debug_info() else "symbols", "clocks": out}


_ = walk
