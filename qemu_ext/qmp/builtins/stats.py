"""``/stats [vm|vcpu]``: KVM statistics per second, like kvm_stat (library: :mod:`qemu_ext.qmp.stats`).

``--watch S`` refreshes the table in place on a terminal (stable row order, rows once shown stay),
and prints one table (or one JSON object) per sample otherwise. Columns fit the terminal: the
per-vCPU columns go first when it is too narrow (``--output=json`` always has them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any, Optional

from qemu_ext.output import count, duration, human_size, number, table
from qemu_ext.qmp import stats as st
from qemu_ext.qmp.builtins.registry import BuiltinParser, Context, Result, builtin

_positive = number(float, 0, 3600, lo_open=True)  # seconds: above 0 and at most 3600


def _count(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return v


def _args(p: BuiltinParser) -> None:
    p.add_argument("target", nargs="?", choices=st.TARGETS, default="vm", metavar="vm|vcpu",
                   help="vm (default) or vcpu")
    p.add_argument("--interval", type=_positive, default=1.0, metavar="S",
                   help="seconds between the two samples of a rate (default 1)")
    p.add_argument("--watch", type=_positive, metavar="S", help="repeat every S seconds (Ctrl-C stops)")
    p.add_argument("--count", type=_count, metavar="K", help="stop after K samples (with --watch)")
    p.add_argument("--all", action="store_true", help="also the statistics that are zero")


def _fmt(v: Any, unit: str, per_second: bool = False) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, list):  # a histogram: its number of samples
        return count(sum(v))
    scale = {"ns": 1e-9, "µs": 1e-6, "ms": 1e-3, "seconds": 1.0}.get(unit)
    tail = "/s" if per_second else ""
    if scale is not None:
        return duration(v * scale) + tail
    if unit in ("bytes", "KiB", "MiB", "GiB"):
        return human_size(v * {"bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[unit]) + tail
    return count(round(v, 1) if isinstance(v, float) else v)


def _shown(rep: st.StatsReport, all_rows: bool, keep: Optional[set[str]] = None) -> list[st.StatRow]:
    out = []
    for r in rep.rows:
        nonzero = bool(r.rate) or (r.value not in (None, 0, False, []) and not (isinstance(r.value, list)
                                                                              and not sum(r.value)))
        if all_rows or nonzero or (keep is not None and r.name in keep):
            out.append(r)
    return out


def render(rep: st.StatsReport, all_rows: bool = False, width: int = 0, keep: Optional[set[str]] = None) -> str:
    """The table, fitted to ``width`` columns (0: no limit): per-vCPU columns go first, then UNIT."""
    rows = _shown(rep, all_rows, keep)
    if keep is not None:
        keep.update(r.name for r in rows)
    head = f"{rep.target} stats over {duration(rep.interval)}"
    if rep.target == "vcpu":
        head += f" ({len(rep.vcpus)} vCPUs)"
    if not rows:
        return head + ": every statistic is zero (--all shows them)"
    cpus = rep.vcpus if rep.target == "vcpu" else []

    def build(with_cpus: bool, with_unit: bool) -> str:
        headers = ["STAT", "TOTAL", "PER SECOND"] + (["UNIT"] if with_unit else [])
        if with_cpus:
            headers += [f"vCPU {c} /s" for c in cpus]
        body = []
        for r in rows:
            unit = "" if r.unit in ("", "boolean") else r.unit
            if r.type.endswith("histogram"):
                unit = "samples"
            line = [r.name, _fmt(r.value, r.unit), _fmt(r.rate, r.unit, True) if r.rate is not None else ""]
            if with_unit:
                line.append(unit)
            if with_cpus:
                line += [_fmt((r.per_vcpu or {}).get(c), r.unit) if r.rate is not None else "" for c in cpus]
            body.append(line)
        right = [1, 2, *range(3 + with_unit, 3 + with_unit + (len(cpus) if with_cpus else 0))]
        return table(headers, body, right=right)

    note = ""
    for with_cpus, with_unit in ((True, True), (False, True), (False, False)):
        if with_cpus and not cpus:
            continue
        text = build(with_cpus, with_unit)
        if not width or max(len(ln) for ln in text.splitlines()) <= width:
            break
    if cpus and not with_cpus:
        note = f"\n(per-vCPU columns left out: {width} columns are too narrow; /json stats vcpu has them)"
    return head + "\n" + text + note


@builtin("stats", "KVM statistics per second (query-stats), like kvm_stat", _args,
         examples=["/stats", "/stats vcpu --interval 0.5", "/stats vcpu --watch 1", "/stats vm --watch 2 --count 5"])
async def stats(ctx: Context, a: argparse.Namespace) -> Optional[Result]:
    if a.count is not None and a.watch is None:
        a.watch = a.interval
    if a.watch is None:
        rep = await st.stats(ctx.session, a.target, a.interval)
        return Result(rep.to_dict(), render(rep, a.all, ctx.width()))
    keep: set[str] = set()
    n = 0
    prev_lines = 0
    try:
        while a.count is None or n < a.count:
            rep = await st.stats(ctx.session, a.target, a.watch)
            n += 1
            if ctx.as_json:
                ctx.out(json.dumps(rep.to_dict()))
                continue
            text = time.strftime("%H:%M:%S ") + render(rep, a.all, ctx.width(), keep)
            if ctx.interactive and prev_lines:
                # kvm_stat's way: back to the first line of the previous table, clear it, draw again
                ctx.out(f"\x1b[{prev_lines}F\x1b[J" + text)
            else:
                ctx.out(text)
            prev_lines = text.count("\n") + 1
    except asyncio.CancelledError:
        if a.count is not None:
            raise
    return None
