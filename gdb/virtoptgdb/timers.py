"""`virtopt timers`: QEMU's timer lists per clock; works on 7.2 (QEMU's `qemu timers` does not)."""

from __future__ import annotations

import argparse
import time
from typing import Any

import gdb

from . import core

CLOCKS = ["realtime", "virtual", "host", "virtual_rt"]  # QEMUClockType order
MAX_TIMERS = 100000


def collect_timers() -> dict[str, Any]:
    """Every timer list of every clock (main loop and AioContexts), with the armed timers."""
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
                exp = int(tv["expire_time"])
                cb = core.ptr(tv["cb"])
                entry = {
                    "expire-time": exp,
                    "scale": int(tv["scale"]),
                    "cb": core.symbolize(cb) or f"{cb:#x}",
                    "cb-address": cb,
                    "opaque": core.ptr(tv["opaque"]),
                    "attributes": int(tv["attributes"]),
                }
                if cname == "realtime":
                    entry["expires-in-ns"] = exp - now_rt
                timers.append(entry)
                t = tv["next"]
            owner = "main-loop" if core.ptr(tl) in main_lists else "aio-context"
            lists.append({"address": core.ptr(tl), "owner": owner,
                          "notify": core.symbolize(core.ptr(tl["notify_cb"])), "timers": timers})
        out.append({"clock": cname, "enabled": bool(clock["enabled"]), "timer-lists": lists})
    return {"clocks": out}


@core.needs_debug_info
class TimersCommand(core.VirtoptCommand):
    name = "timers"
    summary = "QEMU's armed timers per clock and timer list (main loop and AioContexts)."
    epilog = "examples:\n  virtopt timers\n  virtopt timers --json"

    def collect(self, args: argparse.Namespace) -> Any:
        return collect_timers()

    def render(self, d: Any, args: argparse.Namespace) -> None:
        for c in d["clocks"]:
            n = sum(len(tl["timers"]) for tl in c["timer-lists"])
            gdb.write(f"clock {c['clock']} ({'enabled' if c['enabled'] else 'disabled'}): "
                      f"{len(c['timer-lists'])} list(s), {n} timer(s)\n")
            for tl in c["timer-lists"]:
                gdb.write(f"  list {tl['address']:#x} ({tl['owner']}, notify {tl['notify']})\n")
                for t in tl["timers"]:
                    extra = f" (in {t['expires-in-ns'] / 1e6:.1f} ms)" if "expires-in-ns" in t else ""
                    gdb.write(f"    expire {t['expire-time']}{extra} scale {t['scale']} cb {t['cb']} "
                              f"opaque {t['opaque']:#x}\n")


def register() -> None:
    TimersCommand()
