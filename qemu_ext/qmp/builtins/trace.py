"""``/trace list|on|off|capture`` and ``/trace-file``: trace events of the running QEMU
(library: :mod:`qemu_ext.qmp.capture`)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any, Optional

from qemu_ext.output import count, duration, number, table
from qemu_ext.qmp import capture as cap
from qemu_ext.qmp.builtins.registry import BuiltinParser, Context, Result, UsageError, builtin


def _events(data: Any) -> list[str]:
    return list(data.trace_events)


def _trace_args(p: BuiltinParser) -> None:
    sub = p.add_subparsers(dest="op", metavar="list|on|off|capture", required=True)
    lst = sub.add_parser("list", help="trace events matching PATTERN and their state")
    lst.add_argument("pattern", nargs="?", default="*", help="a glob (default *)").completer = _events  # type: ignore[attr-defined]
    for op, what in (("on", "enable"), ("off", "disable")):
        q = sub.add_parser(op, help=f"{what} the trace events matching PATTERN")
        q.add_argument("pattern", help="an event name or a glob (qcow2_cache_*)").completer = _events  # type: ignore[attr-defined]
    c = sub.add_parser("capture", help="enable, wait, disable, decode (simple or log backend)",
                       description="Enable the events matching PATTERN for SECONDS, disable them again (also on "
                       "Ctrl-C), decode what QEMU wrote; qcow2_cache_get events are replayed in the L2-cache "
                       "simulator.")
    c.add_argument("pattern", help="an event name or a glob").completer = _events  # type: ignore[attr-defined]
    c.add_argument("seconds", type=number(float, 0, cap.MAX_SECONDS),
                   help=f"how long the events stay on, 0 to {cap.MAX_SECONDS}")
    c.add_argument("file", nargs="?", help="where the trace goes (default: a new file in the temp directory)")
    c.add_argument("--node", help="qcow2 node whose cache geometry the L2 replay uses").completer = (  # type: ignore[attr-defined]
        lambda d: list(d.qcow2_nodes))


def render_states(events: list[cap.TraceEventState]) -> str:
    return table(["EVENT", "STATE"], [[e.name, e.state] for e in events])


@builtin("trace", "trace events: list, on, off, capture", _trace_args,
         examples=["/trace list qcow2_cache_*", "/trace on qcow2_cache_get", "/trace capture qcow2_cache_* 5",
                   "/trace capture qcow2_cache_* 5 /tmp/cap.log --node disk0"])
async def trace(ctx: Context, a: argparse.Namespace) -> Optional[Result]:
    s = ctx.session
    if a.op == "list":
        evs = await cap.trace_list(s, a.pattern)
    elif a.op in ("on", "off"):
        evs = await cap.trace_set(s, a.pattern, a.op == "on")
    else:
        return await _capture(ctx, a.pattern, a.seconds, a.file, a.node)
    return Result([e.to_dict() for e in evs], render_states(evs))


async def _capture(ctx: Context, pattern: str, seconds: float, file: Optional[str], node: Optional[str]) -> Result:
    from qemu_ext.qmp.builtins import l2cache

    geos = await l2cache.l2cache_info(ctx.session, node, ctx.blockdev_options) if node else None  # fail early
    if ctx.interactive and seconds >= 2:
        ctx.err(f"capturing {pattern} for {duration(seconds)} (Ctrl-C stops early; the events are turned off)")
    res = await _with_progress(cap.capture(ctx.session, pattern, seconds, file=file), seconds,
                               f"capture {pattern}", ctx.interactive and seconds >= 2)
    data = res.to_dict()
    lines = [f"captured {count(res.total)} events in {duration(res.seconds)} ({res.backend} backend) -> {res.file}"]
    if res.counts:
        lines.append(table(["EVENT", "COUNT"], [[k, count(v)] for k, v in res.counts.items()], right=(1,)))
    if res.counts.get("qcow2_cache_get"):
        if geos is None:
            geos = await l2cache.l2cache_info(ctx.session, None, ctx.blockdev_options)
        sim = l2cache.simulate_capture(res.records, geos[0] if len(geos) == 1 else None, res.notes)
        if sim:
            data["l2cache"] = sim
            data["notes"] = res.notes
            lines.append(l2cache.render_simulation(sim))
    lines += [f"note: {n}" for n in res.notes]
    return Result(data, "\n".join(lines))


async def _with_progress(coro: Any, seconds: float, desc: str, show: bool) -> Any:
    """Await ``coro`` with a progress bar of its ``seconds`` on a terminal (tqdm, output.progress)."""
    if not show:
        return await coro
    from qemu_ext.output import progress

    bar = progress(total=round(seconds), desc=desc, unit="s")

    async def tick() -> None:
        t0 = time.monotonic()
        while True:
            await asyncio.sleep(0.25)
            bar.update(round(min(seconds, time.monotonic() - t0)) - bar.n)

    shown = not bar.disable
    ticker = asyncio.ensure_future(tick())
    try:
        return await coro
    finally:
        ticker.cancel()
        bar.close()
        if shown:  # a bar as wide as the terminal leaves the cursor past its end: clear the line
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def _trace_file_args(p: BuiltinParser) -> None:
    p.add_argument("op", nargs="?", choices=["on", "off", "flush", "set"], metavar="on|off|flush|set",
                   help="without one: the status")
    p.add_argument("file", nargs="?", metavar="FILE", help="the new trace file (with set)")


@builtin("trace-file", "the simple backend's trace file (HMP trace-file)", _trace_file_args,
         examples=["/trace-file", "/trace-file set /tmp/t.simpletrace", "/trace-file on", "/trace-file flush"])
async def trace_file(ctx: Context, a: argparse.Namespace) -> Result:
    if (a.op == "set") != (a.file is not None):
        raise UsageError("usage: /trace-file [on|off|flush|set FILE]")
    st = await cap.trace_file(ctx.session, a.op or "", a.file)
    return Result(st.to_dict(), f'trace file "{st.file}" {"on" if st.enabled else "off"}')
