"""`virtopt timers`: QEMU's timer lists per clock; works on 7.2 (QEMU's `qemu timers` does not)."""

from __future__ import annotations

import argparse
import struct
import time
from typing import Any

import gdb

from . import core

CLOCKS = ["realtime", "virtual", "host", "virtual_rt"]  # QEMUClockType order
MAX_TIMERS = 100000


# QEMU 7.2 x86-64 layouts when there is no DWARF (QemuMutex without CONFIG_DEBUG_MUTEX, as Debian
# builds it); the tests check them against the debug build's DWARF.
TL_CLOCK, TL_ACTIVE_TIMERS, TL_LIST_NEXT, TL_NOTIFY_CB = 0, 56, 64, 80
CLOCK_TIMERLISTS, CLOCK_ENABLED = 0, 12
T_EXPIRE, T_CB, T_OPAQUE, T_NEXT, T_ATTRIBUTES, T_SCALE = 0, 16, 24, 32, 40, 44


def _timer_entry(cname: str, exp: int, scale: int, cb: int, opaque: int, attributes: int, now_rt: int) -> dict:
    entry = {
        "expire-time": exp,
        "scale": scale,
        "cb": core.symbolize(cb) or f"{cb:#x}",
        "cb-address": cb,
        "opaque": opaque,
        "attributes": attributes,
    }
    if cname == "realtime":
        entry["expires-in-ns"] = exp - now_rt
    return entry


def collect_timers() -> dict[str, Any]:
    """Every timer list of every clock (main loop and AioContexts), with the armed timers."""
    if core.has_debug_info():
        data = _timers_dwarf()
        data["source"] = "debug-info"
    else:
        data = _timers_raw()
        data["source"] = "symbols"
    return data


def _timers_raw() -> dict[str, Any]:
    """The same walk from the exported main_loop_tlg with hand-cast 7.2 layouts (no DWARF needed)."""
    tlg = core.symbol_address("main_loop_tlg")
    if tlg is None:
        raise core.NotAvailable("this QEMU exports no main_loop_tlg")
    main_lists = {core.read_u64(tlg + 8 * i): CLOCKS[i] for i in range(len(CLOCKS))}
    now_rt = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    out = []
    for i, cname in enumerate(CLOCKS):
        main_tl = core.read_u64(tlg + 8 * i)
        clock = core.read_u64(main_tl + TL_CLOCK) if main_tl else 0
        lists = []
        tl = core.read_u64(clock + CLOCK_TIMERLISTS) if clock else 0
        seen: set[int] = set()
        while tl and tl not in seen and len(seen) < 10000:
            seen.add(tl)
            timers = []
            t = core.read_u64(tl + TL_ACTIVE_TIMERS)
            while t and len(timers) < MAX_TIMERS:
                raw = core.read(t, 48)
                exp, cb, opaque, nxt = (struct.unpack_from("<q", raw, T_EXPIRE)[0],
                                        *struct.unpack_from("<QQQ", raw, T_CB))
                attributes, scale = struct.unpack_from("<ii", raw, T_ATTRIBUTES)
                timers.append(_timer_entry(cname, exp, scale, cb, opaque, attributes, now_rt))
                t = nxt
            lists.append({"address": tl, "owner": "main-loop" if tl in main_lists else "aio-context",
                          "notify": core.symbolize(core.read_u64(tl + TL_NOTIFY_CB)), "timers": timers})
            tl = core.read_u64(tl + TL_LIST_NEXT)
        enabled = bool(core.read_u8(clock + CLOCK_ENABLED)) if clock else False
        out.append({"clock": cname, "enabled": enabled, "timer-lists": lists})
    return {"clocks": out}


def _timers_dwarf() -> dict[str, Any]:
    main_tlg = core.value_of("main_loop_tlg")
    main_lists = {core.ptr(main_tlg["tl"][i]): CLOCKS[i] for i in range(len(CLOCKS))}
    clocks = core.value_of("qemu_clocks")
    now_rt = time.clock_gettime_ns(time.CLOCK_MONOTONIC)  # QEMU_CLOCK_REALTIME is CLOCK_MONOTONIC
    out = []
    for i, cname in enumerate(CLOCKS):
        clock = clocks[i]
        lists = []
        for tl in core.qtailq(clock["timerlists"], "list"):
            timers = []
            t = tl["active_timers"]
            while core.ptr(t) and len(timers) < MAX_TIMERS:
                tv = t.dereference()
                timers.append(_timer_entry(cname, int(tv["expire_time"]), int(tv["scale"]), core.ptr(tv["cb"]),
                                           core.ptr(tv["opaque"]), int(tv["attributes"]), now_rt))
                t = tv["next"]
            owner = "main-loop" if core.ptr(tl) in main_lists else "aio-context"
            lists.append({"address": core.ptr(tl), "owner": owner,
                          "notify": core.symbolize(core.ptr(tl["notify_cb"])), "timers": timers})
        out.append({"clock": cname, "enabled": bool(clock["enabled"]), "timer-lists": lists})
    return {"clocks": out}


@core.needs_symbols("main_loop_tlg")
class TimersCommand(core.VirtoptCommand):
    name = "timers"
    summary = "QEMU's armed timers per clock and timer list (main loop and AioContexts)."
    epilog = ("examples:\n  virtopt timers\n  virtopt timers --json\n\n"
              "Without debug info it walks the exported main_loop_tlg with QEMU 7.2's layouts;\n"
              "callbacks then show as addresses unless QEMU exports their names.")

    def collect(self, args: argparse.Namespace) -> Any:
        return collect_timers()

    def render(self, d: Any, args: argparse.Namespace) -> None:
        for c in d["clocks"]:
            n = sum(len(tl["timers"]) for tl in c["timer-lists"])
            gdb.write(f"clock {c['clock']} ({'enabled' if c['enabled'] else 'disabled'}): "
                      f"{len(c['timer-lists'])} list(s), {n} timer(s)\n")
            for tl in c["timer-lists"]:
                gdb.write(f"  list {tl['address']:#x} ({tl['owner']}, notify {tl['notify'] or '?'})\n")
                for t in tl["timers"]:
                    extra = f" (in {t['expires-in-ns'] / 1e6:.1f} ms)" if "expires-in-ns" in t else ""
                    gdb.write(f"    expire {t['expire-time']}{extra} scale {t['scale']} cb {t['cb']} "
                              f"opaque {t['opaque']:#x}\n")


def register() -> None:
    TimersCommand()
