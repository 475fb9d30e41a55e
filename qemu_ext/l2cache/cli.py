"""`virtopt l2cache simulate|curve|recommend`: render what qemu_ext.l2cache.sim returns."""

from __future__ import annotations

import argparse
from typing import Any

from qemu_ext.errors import BadInputError

EPILOG = """\
examples:
  virtopt l2cache simulate disk.qcow2 --qemu-io cmds.txt --l2-cache-size 1M --l2-cache-entry-size 4k
  virtopt l2cache simulate --virtual-size 1T --pattern uniform --count 100000 --output=json
  virtopt l2cache curve disk.qcow2 --trace qemu-stderr.log --plot l2.png
  virtopt l2cache curve --virtual-size 256G --pattern zipf --read-ratio 0.7
  virtopt l2cache recommend disk.qcow2 --pattern hotset --working-set 20G --target 0.99

Without an image give --virtual-size (and --cluster-size, --extended-l2); --allocation says
whether that bare disk is fully written (default) or fresh. Workload: --qemu-io FILE (qemu-io
commands), --trace FILE (QEMU log-backend text or simpletrace file with qcow2_cache_get* events,
or request events qcow2_writev_start_req / qcow2_add_task), or synthetic (--pattern ...).
Sizes accept QEMU's suffixes (64k, 1M, 2G). exit codes: 0 ok, 1 bad input, 2 usage.
"""


def _size(text: str) -> int:
    from qemu_ext.l2cache.options import parse_size

    try:
        return parse_size(text)
    except BadInputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _sizes(text: str) -> list[int]:
    return [_size(t) for t in text.split(",") if t.strip()]


def _common(p: argparse.ArgumentParser) -> None:
    from qemu_ext.l2cache.options import VERSIONS
    from qemu_ext.output import add_output_option

    p.add_argument("image", nargs="?", help="qcow2 image (opened read-only); omit to use --virtual-size")
    g = p.add_argument_group("bare geometry (no image)")
    g.add_argument("--virtual-size", type=_size, help="disk size, e.g. 1T")
    g.add_argument("--cluster-size", type=_size, default=65536, help="cluster size (default 64k)")
    g.add_argument("--extended-l2", action="store_true", help="extended L2 entries (subclusters)")
    g.add_argument("--allocation", choices=["full", "empty"], default="full", help="bare disk fully written (default) or fresh")
    o = p.add_argument_group("QEMU cache options")
    o.add_argument("--l2-cache-size", type=_size)
    o.add_argument("--l2-cache-entry-size", type=_size)
    o.add_argument("--refcount-cache-size", type=_size)
    o.add_argument("--cache-size", type=_size)
    o.add_argument("--cache-clean-interval", type=int, help="seconds (applied when the workload has timestamps)")
    o.add_argument("--qemu-version", choices=list(VERSIONS), default="7.2", help="whose option defaults apply (default 7.2)")
    w = p.add_argument_group("workload")
    w.add_argument("--qemu-io", metavar="FILE", help="qemu-io commands (read/write OFF LEN ...)")
    w.add_argument("--trace", metavar="FILE", help="captured QEMU trace (log text or simpletrace)")
    w.add_argument("--pattern", choices=["sequential", "uniform", "zipf", "hotset"], default="uniform")
    w.add_argument("--count", type=int, default=20000, help="synthetic requests (default 20000)")
    w.add_argument("--request-size", type=_size, default=4096)
    w.add_argument("--working-set", type=_size, help="bytes of the disk the requests touch (default all)")
    w.add_argument("--read-ratio", type=float, default=1.0)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--zipf-s", type=float, default=1.1)
    w.add_argument("--hot-fraction", type=float, default=0.1)
    add_output_option(p)


def _objects(args: argparse.Namespace):
    from qemu_ext.l2cache import sim
    from qemu_ext.l2cache.curve import tune_malloc

    tune_malloc()
    if not args.image and not args.virtual_size:
        raise BadInputError("give an image or --virtual-size")
    if args.qemu_io and args.trace:
        raise BadInputError("give either --qemu-io or --trace, not both")
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
        from qemu_ext.qcow2 import open_image

        with open_image(args.image) as img:
            vsize = img.virtual_size
    synth = None
    if not (args.qemu_io or args.trace):
        synth = {
            "pattern": args.pattern,
            "count": args.count,
            "request_size": args.request_size,
            "working_set": args.working_set,
            "read_ratio": args.read_ratio,
            "seed": args.seed,
            "zipf_s": args.zipf_s,
            "hot_fraction": args.hot_fraction,
        }
    wl = sim.load_workload(qemu_io=args.qemu_io, trace=args.trace, synthetic=synth, virtual_size=vsize)
    return disk, settings, wl


def _hs(n: Any) -> str:
    from qemu_ext.output import human_size

    return human_size(n) if isinstance(n, (int, float)) else str(n)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from qemu_ext.l2cache import sim
    from qemu_ext.output import print_json

    disk, settings, wl = _objects(args)
    res = sim.simulate(disk, settings, wl, detailed=args.detailed)
    if args.output == "json":
        print_json(res)
        return 0
    c = res["cache"]
    print(f"disk: {_hs(res['disk']['virtual-size'])}, cluster {_hs(c['cluster_size'])}"
          f"{', extended L2' if c['extended_l2'] else ''}  workload: {res['workload'].get('source', '')}")
    print(f"QEMU {c['qemu_version']} L2 cache: {c['l2_cache_entries']} entries of {_hs(c['l2_cache_entry_size'])}"
          f" = {_hs(c['l2_memory'])} (covers {_hs(c['covered_bytes'])}; full coverage needs {_hs(c['max_l2_cache'])})")
    print(f"lookups:             {res['lookups']}")
    print(f"hits:                {res['hits']}")
    print(f"misses:              {res['misses']} ({res['misses-reading-disk']} read from disk)")
    print(f"hit ratio:           {res['hit-ratio']:.4f}")
    print(f"metadata bytes read: {res['metadata-bytes-read']} ({_hs(res['metadata-bytes-read'])})")
    print(f"evictions:           {res['evictions']}")
    if "refcount-cache" in res:
        r = res["refcount-cache"]
        print(f"refcount cache:      {r['lookups']} lookups, {r['misses']} misses")
    if args.detailed:
        for e in res.get("events", []):
            print(f"  {'hit ' if e['hit'] else 'miss'} offset {e['offset']:#x} entry {e['index']}"
                  f"{'' if e['read_from_disk'] else ' (empty, no read)'}")
    return 0


def _cmd_curve(args: argparse.Namespace) -> int:
    from qemu_ext.l2cache import sim
    from qemu_ext.output import ascii_plot, print_json, save_plot

    disk, settings, wl = _objects(args)
    res = sim.curve(disk, settings, wl, entry_sizes=args.entry_sizes)
    if args.plot:
        save_plot(
            args.plot,
            [(f"entry {_hs(s['l2-cache-entry-size'])}", [p["l2-cache-size"] for p in s["points"]],
              [p["hit-ratio"] for p in s["points"]]) for s in res["curves"]],
            xlabel="l2-cache-size (bytes)",
            ylabel="hit ratio",
            title="qcow2 L2 cache hit ratio",
            logx=True,
        )
    if args.output == "json":
        print_json(sim.strip_private(res))
        return 0
    for s in res["curves"]:
        print(f"entry size {_hs(s['l2-cache-entry-size'])}: {s['lookups']} lookups, {s['distinct-slices']} distinct slices")
        pts = s["points"]
        shown = [p for p in pts if p["entries"] & (p["entries"] - 1) == 0] or pts
        print(f"  {'l2-cache-size':>14} {'entries':>8} {'hit ratio':>10} {'misses':>10}")
        for p in shown:
            print(f"  {_hs(p['l2-cache-size']):>14} {p['entries']:>8} {p['hit-ratio']:>10.4f} {p['misses']:>10}")
        if s["current"]:
            cur = s["current"]
            print(f"  current setting: {_hs(cur['l2-cache-size'])} -> hit ratio {cur['hit-ratio']:.4f}, {cur['misses']} misses")
        if not args.plot:
            print(ascii_plot([p["l2-cache-size"] for p in pts], [p["hit-ratio"] for p in pts], logx=True,
                             xlabel="l2-cache-size", ylabel="hit ratio", xfmt=_hs))
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0


def _cmd_recommend(args: argparse.Namespace) -> int:
    from qemu_ext.l2cache import sim
    from qemu_ext.output import print_json

    disk, settings, wl = _objects(args)
    res = sim.recommend(disk, settings, wl, target=args.target)
    if args.output == "json":
        print_json(res)
        return 0
    cur = res["current"]
    print(f"QEMU {res['qemu-version']}, workload: {res['workload'].get('source', '')}")
    if cur["hit-ratio"] is not None:
        print(f"current: l2-cache-size {_hs(cur['l2-cache-size'])} (entries of {_hs(cur['l2-cache-entry-size'])})"
              f" -> hit ratio {cur['hit-ratio']:.4f} (warm {cur['warm-hit-ratio']:.4f}),"
              f" {cur['misses']} of {cur['lookups']} lookups miss")
    best = res["recommended"]
    if best:
        print(f"smallest for warm hit ratio {res['target-hit-ratio']}: l2-cache-size {_hs(best['l2-cache-size'])}"
              f" with {_hs(best['l2-cache-entry-size'])} entries (memory {_hs(best['memory'])},"
              f" warm hit ratio {best['warm-hit-ratio']:.4f}, overall {best['hit-ratio']:.4f})")
        print(f"  {best['options']['drive']}")
        print(f"  {best['options']['blockdev']}")
    else:
        print(f"no cache size reaches hit ratio {res['target-hit-ratio']}")
    f = res["full-coverage"]
    print(f"full coverage: l2-cache-size {_hs(f['l2-cache-size'])} (memory {_hs(f['memory'])})")
    print(f"  {f['options']['drive']}")
    print(f"  {f['options']['blockdev']}")
    return 0


def register(sub: argparse._SubParsersAction, name: str, summary: str) -> None:
    p = sub.add_parser(name, help=summary, description=summary, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s = p.add_subparsers(dest="l2cache_cmd", metavar="COMMAND")

    ps = s.add_parser("simulate", help="lookups, hits, misses, hit ratio for given settings", epilog=EPILOG,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(ps)
    ps.add_argument("--detailed", action="store_true", help="list every lookup (slice offset, entry, hit/miss)")
    ps.set_defaults(func=_cmd_simulate)

    pc = s.add_parser("curve", help="hit ratio over all cache sizes and entry sizes", epilog=EPILOG,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(pc)
    pc.add_argument("--entry-sizes", type=_sizes, help="comma-separated l2-cache-entry-size values (default 4k..cluster)")
    pc.add_argument("--plot", metavar="FILE.png", help="write a PNG (else a terminal plot)")
    pc.set_defaults(func=_cmd_curve)

    pr = s.add_parser("recommend", help="smallest l2-cache-size for a target hit ratio, and full coverage", epilog=EPILOG,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(pr)
    pr.add_argument("--target", type=float, default=0.99,
                    help="target warm hit ratio, i.e. excluding the first lookup of each slice (default 0.99)")
    pr.set_defaults(func=_cmd_recommend)

    def _help(args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=_help)
