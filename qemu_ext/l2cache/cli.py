"""`virtopt l2cache simulate|curve|recommend|tune`: render what qemu_ext.l2cache returns."""

from __future__ import annotations

import argparse
import math
from typing import Any, Callable, Optional

from qemu_ext.errors import BadInputError, UsageError

EPILOG = """\
examples:
  virtopt l2cache recommend disk.qcow2 --trace qemu-stderr.log
  virtopt l2cache curve disk.qcow2 --trace qemu-stderr.log --plot l2.png
  virtopt l2cache simulate disk.qcow2 --qemu-io cmds.txt --l2-cache-size 1M --l2-cache-entry-size 4k
  virtopt l2cache simulate --virtual-size 1T --pattern uniform --count 100000 --output=json
  virtopt l2cache curve --virtual-size 256G --pattern zipf --read-ratio 0.7
  virtopt l2cache curve --virtual-size 64T --pattern uniform --count 5000000 --entry-sizes 4k --max-memory 8M
  virtopt l2cache recommend disk.qcow2 --pattern hotset --hot-fraction 0.05 --target 0.99
  virtopt l2cache tune /run/vm.qmp --node disk0 --seconds 5 --target 0.95 --apply --output=json
  virtopt l2cache recommend --watch --qmp /run/vm.qmp --node disk0 --seconds 60 --max-memory 64M

Without an image give --virtual-size (and --cluster-size, --extended-l2); --allocation says
whether that bare disk is fully written (default) or fresh. Workload: --qemu-io FILE (qemu-io
commands), --trace FILE (QEMU log-backend text or simpletrace file with qcow2_cache_get* events,
or request events qcow2_writev_start_req / qcow2_add_task), or synthetic (--pattern ...).
A trace shows the L2 slices QEMU's cache used: entry sizes smaller than those cannot be
evaluated from it (the output says which), and with no cache option the current setting is
what the trace shows QEMU used. Sizes accept QEMU's suffixes (64k, 1M, 2G).
exit codes: 0 ok, 1 bad input or failed job, 2 usage error.
"""

SYNTH_DEFAULTS = {"pattern": "uniform", "count": 20000, "request_size": 4096, "read_ratio": 1.0, "seed": 0,
                  "zipf_s": 1.1, "hot_fraction": 0.1}


def _size(text: str) -> int:
    from qemu_ext.l2cache.options import parse_size

    try:
        return parse_size(text)
    except BadInputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _sizes(text: str) -> list[int]:
    return [_size(t) for t in text.split(",") if t.strip()]


def _number(kind: type, lo: float, hi: float, lo_open: bool = False, what: str = "") -> Callable[[str], Any]:
    """An argparse type: a finite number in [lo, hi] (or (lo, hi]); the range is in the message."""

    def conv(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        bad = not math.isfinite(v) or v > hi or (v <= lo if lo_open else v < lo)
        if bad:
            f = (lambda x: str(int(x))) if kind is int else (lambda x: f"{x:g}")
            rng = what or f"{'above' if lo_open else 'from'} {f(lo)} {'to' if not lo_open else 'and at most'} {f(hi)}"
            raise argparse.ArgumentTypeError(f"{text} is out of range ({rng})")
        return v

    return conv


def _common(p: argparse.ArgumentParser, workload: bool = True) -> None:
    from qemu_ext.l2cache.options import VERSIONS
    from qemu_ext.output import add_output_option

    p.add_argument("image", nargs="?", help="qcow2 image (opened read-only); omit to use --virtual-size")
    g = p.add_argument_group("bare geometry (no image)")
    g.add_argument("--virtual-size", type=_size, metavar="SIZE",
                   help="disk size, 512 bytes to what qcow2 allows for the cluster size (2P at 64k clusters)")
    g.add_argument("--cluster-size", type=_size, default=65536, metavar="SIZE",
                   help="cluster size, a power of two from 512 to 2M (default 64k)")
    g.add_argument("--extended-l2", action="store_true", help="extended L2 entries (subclusters; clusters of 16k or more)")
    g.add_argument("--allocation", choices=["full", "empty"], default="full",
                   help="bare disk fully written (default) or fresh from qemu-img create")
    o = p.add_argument_group("QEMU cache options (as -drive/-blockdev take them; default: none given)")
    o.add_argument("--l2-cache-size", type=_size, metavar="SIZE", help="l2-cache-size (default: QEMU's, or what a trace shows)")
    o.add_argument("--l2-cache-entry-size", type=_size, metavar="SIZE",
                   help="l2-cache-entry-size, a power of two from 512 to the cluster size")
    o.add_argument("--refcount-cache-size", type=_size, metavar="SIZE", help="refcount-cache-size")
    o.add_argument("--cache-size", type=_size, metavar="SIZE", help="cache-size (both caches together)")
    o.add_argument("--cache-clean-interval", type=_number(int, 0, 2**32 - 1), metavar="SECONDS",
                   help="seconds, 0 to 4294967295 (default QEMU's: 600 on Linux; applied when the workload has times)")
    o.add_argument("--qemu-version", choices=list(VERSIONS), default="7.2",
                   help="whose option rules apply (default 7.2; 'current' is 10.0; 7.2 and current are verified "
                        "against the real QEMUs, 2.12/3.1/4.0 are read from QEMU's sources)")
    if workload:
        w = p.add_argument_group("workload: a file, or synthetic requests")
        w.add_argument("--qemu-io", metavar="FILE", help="qemu-io commands (read/write OFF LEN ...)")
        w.add_argument("--trace", metavar="FILE", help="captured QEMU trace (log text or simpletrace)")
        w.add_argument("--pattern", choices=["sequential", "uniform", "zipf", "hotset", "hotset-scan"],
                       help="synthetic pattern (default uniform)")
        w.add_argument("--count", type=_number(int, 1, 10**12), help="synthetic requests, 1 to 10^12 (default 20000)")
        w.add_argument("--request-size", type=_size, metavar="SIZE",
                       help="bytes per request, a multiple of 512 up to 1G (default 4k)")
        w.add_argument("--working-set", type=_size, metavar="SIZE",
                       help="bytes of the disk the requests touch, one request to the disk size (default all)")
        w.add_argument("--read-ratio", type=_number(float, 0, 1), metavar="R",
                       help="share of reads, 0 to 1 (default 1: reads only)")
        w.add_argument("--seed", type=_number(int, 0, 2**63 - 1), help="random seed, 0 or more (default 0)")
        w.add_argument("--zipf-s", type=_number(float, 0, 10, lo_open=True), metavar="S",
                       help="zipf exponent, above 0 and at most 10 (default 1.1)")
        w.add_argument("--hot-fraction", type=_number(float, 0, 1, lo_open=True), metavar="F",
                       help="hotset: share of the blocks that are hot, above 0 and at most 1 (default 0.1)")
    add_output_option(p)


def _objects(args: argparse.Namespace):
    from qemu_ext.l2cache import sim

    if args.image and args.virtual_size is not None:
        raise UsageError("give an image or --virtual-size, not both (the image has its own size)")
    if not args.image and args.virtual_size is None:
        raise UsageError("give an image or --virtual-size")
    if args.qemu_io and args.trace:
        raise UsageError("give either --qemu-io or --trace, not both")
    given = {k: getattr(args, k) for k in SYNTH_DEFAULTS if getattr(args, k) is not None}
    if args.working_set is not None:
        given["working_set"] = args.working_set
    if (args.qemu_io or args.trace) and given:
        opts = ", ".join("--" + k.replace("_", "-") for k in given)
        raise UsageError(f"{opts}: synthetic workload options do not apply to --qemu-io/--trace")
    if args.image and (args.cluster_size != 65536 or args.extended_l2 or args.allocation != "full"):
        raise UsageError("--cluster-size, --extended-l2 and --allocation describe a bare disk: the image has its own")
    disk = sim.Disk(
        image=args.image,
        virtual_size=args.virtual_size,
        cluster_size=args.cluster_size,
        extended_l2=args.extended_l2,
        allocation=args.allocation,
    )
    settings = sim.Settings(
        l2_cache_size=args.l2_cache_size,
        l2_cache_entry_size=args.l2_cache_entry_size,
        refcount_cache_size=args.refcount_cache_size,
        cache_size=args.cache_size,
        cache_clean_interval=args.cache_clean_interval,
        qemu_version=args.qemu_version,
    )
    vsize = args.virtual_size
    if args.image and not (args.qemu_io or args.trace):
        import os

        from qemu_ext.errors import open_error
        from qemu_ext.qcow2 import open_image

        try:
            os.stat(args.image)
        except OSError as exc:
            raise open_error(args.image, exc) from None
        with open_image(args.image) as img:
            vsize = img.virtual_size
    synth = {**SYNTH_DEFAULTS, **given}
    if vsize is not None and not (args.qemu_io or args.trace):
        from qemu_ext.l2cache.options import check_virtual_size

        check_virtual_size(vsize, args.cluster_size, args.extended_l2)
    wl = sim.load_workload(qemu_io=args.qemu_io, trace=args.trace, synthetic=synth, virtual_size=vsize)
    return disk, settings, wl


def _hs(n: Any) -> str:
    from qemu_ext.output import human_size

    return human_size(n) if isinstance(n, (int, float)) else str(n)


def _pct(f: Optional[float]) -> str:
    from qemu_ext.output import percent

    return percent(f)


def _cnt(n: Any) -> str:
    from qemu_ext.output import count

    return count(n)


def _setup() -> Any:
    from qemu_ext.output import progress, tune_bulk_numpy

    tune_bulk_numpy()
    return progress


def _current_line(cur: dict, cache: dict) -> str:
    src = cur.get("source", "")
    size = f"{_hs(cache['l2-memory'])} ({_cnt(cache['l2-cache-entries'])} entries of {_hs(cache['l2-cache-entry-size'])})"
    if src == "trace":
        return f"current setting: {'at least ' if cur.get('at-least') else ''}{size}, as the trace shows ({cur['evidence']})"
    if src == "options":
        return f"current setting: {size}, from the options given"
    return f"current setting: {size}: {src}"


def _cmd_simulate(args: argparse.Namespace) -> int:
    from qemu_ext.l2cache import sim
    from qemu_ext.output import print_json

    progress = _setup()
    disk, settings, wl = _objects(args)
    res = sim.simulate(disk, settings, wl, detailed=args.detailed, progress=progress)
    if args.output == "json":
        print_json(res)
        return 0
    c = res["cache"]
    print(f"disk: {_hs(res['disk']['virtual-size'])}, cluster {_hs(c['cluster-size'])}"
          f"{', extended L2' if c['extended-l2'] else ''}  workload: {res['workload'].get('source', '')}")
    print(f"QEMU {c['qemu-version']} L2 cache: {_cnt(c['l2-cache-entries'])} entries of {_hs(c['l2-cache-entry-size'])}"
          f" = {_hs(c['l2-memory'])} (covers {_hs(min(c['covered-bytes'], c['virtual-size']))}; "
          f"full coverage needs {_hs(c['max-l2-cache'])})")
    if res["current-setting"]["source"] == "trace":
        print(_current_line(res["current-setting"], c))
    print(f"lookups:             {_cnt(res['lookups'])}")
    print(f"hits:                {_cnt(res['hits'])}")
    print(f"misses:              {_cnt(res['misses'])} ({_cnt(res['misses-reading-disk'])} read from disk)")
    print(f"hit ratio:           {_pct(res['hit-ratio'])}")
    print(f"metadata read:       {_hs(res['metadata-bytes-read'])}")
    print(f"evictions:           {_cnt(res['evictions'])}")
    if "refcount-cache" in res:
        r = res["refcount-cache"]
        print(f"refcount cache:      {_cnt(r['lookups'])} lookups, {_cnt(r['misses'])} misses")
    if args.detailed:
        for e in res.get("events", []):
            print(f"  {'hit ' if e['hit'] else 'miss'} offset {e['offset']:#x} entry {e['index']}"
                  f"{'' if e['read-from-disk'] else ' (empty, no read)'}")
    return 0


MARK_NAMES = {"knee": "knee", "maximum": "maximum: every slice fits", "current": "current setting",
              "recommended": "recommended"}


def curve_rows(s: dict) -> list[tuple[dict, str]]:
    """The table of one entry size: a power-of-two ladder of sizes up to the maximum, and the
    marked sizes (knees, maximum, current, recommended) in their place, labelled."""
    marks = s["marks"]
    labelled: dict[int, list[str]] = {}
    pts: dict[int, dict] = {}
    for k in marks["knees"]:
        labelled.setdefault(k["entries"], []).append("knee")
        pts[k["entries"]] = k
    for name in ("maximum", "current", "recommended"):
        m = marks.get(name)
        if m:
            labelled.setdefault(m["entries"], []).append(name)
            pts[m["entries"]] = m
    top = marks["maximum"]["entries"]
    for p in s["points"]:
        n = p["entries"]
        if n & (n - 1) == 0 and n <= top:
            pts.setdefault(n, p)
    rows = []
    for n in sorted(pts):
        rows.append((pts[n], ", ".join(MARK_NAMES[x] for x in labelled.get(n, []))))
    return rows


def _not_evaluated(res: dict) -> list[str]:
    by: dict[str, list[int]] = {}
    for n in res.get("not-evaluated", []):
        by.setdefault(n["reason"], []).append(n["l2-cache-entry-size"])
    return [f"not evaluated: entry size{'s' if len(v) > 1 else ''} {', '.join(_hs(e) for e in v)}: {why}"
            for why, v in by.items()]


def render_curve(res: dict, plot: Optional[str]) -> str:
    from qemu_ext.output import ascii_plot, table

    out = []
    for s in res["curves"]:
        how = "exact" if s["exact"] else (f"sampled: {_cnt(s['sampled-slices'])} slices at rate "
                                          f"{s['sampling-rate']:.4g} (SHARDS), estimated")
        out.append(f"entry size {_hs(s['l2-cache-entry-size'])}: {_cnt(s['lookups'])} lookups, "
                   f"{_cnt(s['distinct-slices'])} distinct slices ({how})")
        rows = [[_hs(p["l2-cache-size"]), _cnt(p["entries"]), _pct(p["hit-ratio"]), _pct(p["warm-hit-ratio"]),
                 _cnt(p["misses"]), label] for p, label in curve_rows(s)]
        out.append(table(["l2-cache-size", "entries", "hit ratio", "warm", "misses", ""], rows, right=(0, 1, 2, 3, 4)))
        if not s["marks"]["knees"]:
            out.append("  no knee: the hit ratio grows steadily with the size")
    out += _not_evaluated(res)
    out.append(_current_line(res["current-setting"], res["cache"]))
    if not plot and res["curves"] and len(res["curves"][0]["points"]) > 2:
        s = next((c for c in res["curves"] if c["marks"]["current"]), res["curves"][0])
        pts = s["points"]
        out.append(f"hit ratio by l2-cache-size, entries of {_hs(s['l2-cache-entry-size'])}:")
        out.append(ascii_plot([p["l2-cache-size"] for p in pts], [p["hit-ratio"] * 100 for p in pts], logx=True,
                              xlabel="l2-cache-size", ylabel="hit ratio (%)", xfmt=_hs,
                              yfmt=lambda v: f"{v:.1f}%"))
    return "\n".join(out)


def write_curve_plot(res: dict, path: str) -> str:
    from qemu_ext.output import save_plot

    series = [(f"entries of {_hs(s['l2-cache-entry-size'])}", [p["l2-cache-size"] for p in s["points"]],
               [p["hit-ratio"] * 100 for p in s["points"]]) for s in res["curves"]]
    marks = []
    for s in res["curves"]:
        for p, label in curve_rows(s):
            if label:
                marks.append((f"{label.replace(': every slice fits', '')} {_hs(p['l2-cache-size'])} ({_hs(s['l2-cache-entry-size'])})",
                              p["l2-cache-size"], p["hit-ratio"] * 100))
    return save_plot(path, series, xlabel="l2-cache-size", ylabel="hit ratio (%)",
                     title="qcow2 L2 cache hit ratio", logx=True, xfmt=_hs, yfmt=lambda v: f"{v:.0f}%", marks=marks)


def _cmd_curve(args: argparse.Namespace) -> int:
    from qemu_ext.l2cache import sim
    from qemu_ext.output import check_plot_path, print_json

    if args.plot:
        check_plot_path(args.plot)
    if args.watch:
        from qemu_ext.l2cache.tune_cli import watch_command

        return watch_command(args, "curve")
    progress = _setup()
    disk, settings, wl = _objects(args)
    res = sim.curve(disk, settings, wl, entry_sizes=args.entry_sizes, max_memory=args.max_memory,
                    target=args.target, progress=progress)
    written = write_curve_plot(res, args.plot) if args.plot else None
    if args.output == "json":
        print_json(sim.strip_private(res))
        return 0
    print(render_curve(res, args.plot))
    if written:
        print(f"plot written to {written}")
    return 0


def render_recommend(res: dict) -> str:
    out = []
    cur = res["current"]
    out.append(f"QEMU {res['qemu-version']}, workload: {res['workload'].get('source', '')}")
    if cur["hit-ratio"] is not None:
        src = cur.get("source", "")
        how = ("as the trace shows" if src == "trace" else "from the options given" if src == "options"
               else "QEMU's default")
        out.append(f"current: l2-cache-size {_hs(cur['l2-cache-size'])} (entries of {_hs(cur['l2-cache-entry-size'])}, "
                   f"{how}) -> hit ratio {_pct(cur['hit-ratio'])} (warm {_pct(cur['warm-hit-ratio'])}), "
                   f"{_cnt(cur['misses'])} of {_cnt(cur['lookups'])} lookups miss")
    best = res["recommended"]
    if best:
        est = "" if best["exact"] else " (estimated from a sample)"
        out.append(f"smallest for a warm hit ratio of {_pct(res['target-hit-ratio'])}: l2-cache-size "
                   f"{_hs(best['l2-cache-size'])} with {_hs(best['l2-cache-entry-size'])} entries (memory "
                   f"{_hs(best['memory'])}, warm hit ratio {_pct(best['warm-hit-ratio'])}, overall "
                   f"{_pct(best['hit-ratio'])}){est}")
        out.append(f"  {best['options']['drive']}")
        out.append(f"  {best['options']['blockdev']}")
        if "libvirt" in best["options"]:
            o = best["options"]
            out.append(f"  libvirt: {o['libvirt']}")
            if o.get("libvirt-entry-size") != best["l2-cache-entry-size"]:
                out.append(f"    (libvirt cannot set l2-cache-entry-size: QEMU then uses "
                           f"{_hs(o.get('libvirt-entry-size', 0))} entries)")
    else:
        out.append(f"no cache size reaches a warm hit ratio of {_pct(res['target-hit-ratio'])} on this workload")
    f = res["full-coverage"]
    out.append(f"full coverage: l2-cache-size {_hs(f['l2-cache-size'])} (memory {_hs(f['memory'])})")
    out.append(f"  {f['options']['drive']}")
    out.append(f"  {f['options']['blockdev']}")
    if "libvirt" in f["options"]:
        out.append(f"  libvirt: {f['options']['libvirt']}")
    out += _not_evaluated(res)
    return "\n".join(out)


def _cmd_recommend(args: argparse.Namespace) -> int:
    from qemu_ext.l2cache import sim
    from qemu_ext.output import print_json

    if args.watch:
        from qemu_ext.l2cache.tune_cli import watch_command

        return watch_command(args, "recommend")
    progress = _setup()
    disk, settings, wl = _objects(args)
    res = sim.recommend(disk, settings, wl, target=args.target, max_memory=args.max_memory, progress=progress)
    if args.output == "json":
        print_json(sim.strip_private(res))
        return 0
    print(render_recommend(res))
    return 0


def _target_option(p: argparse.ArgumentParser, default: Optional[float]) -> None:
    p.add_argument("--target", type=_number(float, 0, 1, lo_open=True), default=default, metavar="R",
                   help="target warm hit ratio (lookups after the first of each slice), above 0 and at most 1"
                        + (f" (default {default})" if default is not None else "; marks the recommended size"))


def _memory_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-memory", type=_size, metavar="SIZE",
                   help="memory for the curve's state: exact while the distinct slices fit, sampled (SHARDS) "
                        "beyond, saying so and the rate (default: no limit, always exact)")


def register(sub: argparse._SubParsersAction, name: str, summary: str) -> None:
    p = sub.add_parser(name, help=summary, description=summary, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s = p.add_subparsers(dest="l2cache_cmd", metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    ps = s.add_parser("simulate", help="lookups, hits, misses, hit ratio for given settings", epilog=EPILOG,
                      formatter_class=fmt)
    _common(ps)
    ps.add_argument("--detailed", action="store_true", help="list every lookup (slice offset, entry, hit/miss)")
    ps.set_defaults(func=_cmd_simulate)

    pc = s.add_parser("curve", help="hit ratio over all cache sizes and entry sizes", epilog=EPILOG,
                      formatter_class=fmt)
    _common(pc)
    pc.add_argument("--entry-sizes", type=_sizes, metavar="LIST",
                    help="comma-separated l2-cache-entry-size values (default 4k up to the cluster size)")
    pc.add_argument("--plot", metavar="FILE.png", help="write a PNG (else a terminal plot)")
    _target_option(pc, None)
    _memory_option(pc)
    from qemu_ext.l2cache.tune_cli import add_watch_options

    add_watch_options(pc, _number)
    pc.set_defaults(func=_cmd_curve)

    pr = s.add_parser("recommend", help="smallest l2-cache-size for a target hit ratio, and full coverage",
                      epilog=EPILOG, formatter_class=fmt)
    _common(pr)
    _target_option(pr, 0.99)
    _memory_option(pr)
    add_watch_options(pr, _number)
    pr.set_defaults(func=_cmd_recommend)

    from qemu_ext.l2cache import tune_cli

    tune_cli.register(s, fmt, _number, _size)

    def _help(args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=_help)
