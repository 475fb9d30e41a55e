"""`virtopt trace`: decode and summarise QEMU traces (simpletrace files, log-backend text)."""

from __future__ import annotations

import argparse
import os
import sys

DECODE_EPILOG = """\
examples:
  virtopt trace decode trace-12345                       # same text as QEMU's scripts/simpletrace.py
  virtopt trace decode trace-12345 --events /usr/share/qemu/trace-events-all
  virtopt trace decode trace-12345 --output=json > events.json
  virtopt trace decode qemu-stderr.log --output=csv       # log-backend text (with or without pid@sec.usec:)

The trace-events file defaults to $VIRTOPT_TRACE_EVENTS, /usr/share/qemu/trace-events-all,
or the debug build's trace-events-all. A truncated tail is reported on stderr; every complete
record before it is printed. Exit codes: 0 ok, 1 bad or unreadable trace, 2 usage / no events file.
"""

SUMMARY_EPILOG = """\
examples:
  virtopt trace summary trace-12345
  virtopt trace summary trace-12345 --plot events.png
  virtopt trace summary trace-12345 --output=json
  virtopt trace summary trace-12345 --pair qcow2_cache_get:qcow2_cache_get_done:co

Counts per event, the event rate over time, latency histograms for begin/end pairs found by
name (X -> X_done/X_end/..., X_start -> X_done, X_start_req -> X_done_req; an end goes with the
latest begin that has the same key argument, e.g. the coroutine `co`), dropped events.
"""


def register(sub: argparse._SubParsersAction, name: str, summary: str) -> None:
    p = sub.add_parser(
        name,
        help=summary,
        description=summary,
        epilog="examples:\n  virtopt trace decode FILE\n  virtopt trace summary FILE --plot rate.png\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tsub = p.add_subparsers(dest="trace_cmd", metavar="SUBCOMMAND")

    d = tsub.add_parser(
        "decode",
        help="print every event (simpletrace.py's text, JSON or CSV)",
        description="Decode a simpletrace file or log-backend text.",
        epilog=DECODE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument("file", help="simpletrace binary file or log-backend text")
    d.add_argument("--events", metavar="FILE", help="trace-events(-all) file of the QEMU that wrote the trace")
    d.add_argument(
        "--output", choices=["simpletrace", "json", "csv"], default="simpletrace", help="output format (default simpletrace)"
    )
    d.set_defaults(func=cmd_decode)

    s = tsub.add_parser(
        "summary",
        help="counts, rate over time, begin/end latencies, dropped events",
        description="Summarise a simpletrace file or log-backend text.",
        epilog=SUMMARY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("file", help="simpletrace binary file or log-backend text")
    s.add_argument("--events", metavar="FILE", help="trace-events(-all) file of the QEMU that wrote the trace")
    s.add_argument("--output", choices=["human", "json"], default="human", help="output format (default human)")
    s.add_argument("--plot", metavar="FILE.png", help="write the rate over time and latency histograms as a PNG")
    s.add_argument("--bins", type=int, default=60, help="time bins for the rate over time (default 60)")
    s.add_argument(
        "--pair",
        action="append",
        default=[],
        metavar="BEGIN:END[:KEY]",
        help="a begin/end event pair to time (repeatable), KEY the argument that ties them",
    )
    s.set_defaults(func=cmd_summary)

    def no_sub(args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=no_sub)


def _tune_runtime() -> None:
    """Before numpy is imported: no OpenBLAS thread pool (virtopt does no linear algebra; starting
    the pool costs more than a tenth of a second on 2 cores), and malloc tuning."""
    import os

    if "numpy" not in sys.modules:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
            os.environ.setdefault(var, "1")
    _tune_malloc()


def _tune_malloc() -> None:
    """Keep freed big arrays for reuse instead of returning them to the kernel.

    Bulk decoding allocates and frees many arrays of tens of MB; with glibc's defaults each
    one is a fresh mmap whose pages fault in again (a third of the run time on a VM).
    """
    if os.environ.get("VIRTOPT_MALLOPT") == "0":
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt(M_MMAP_THRESHOLD, 1 << 30)
    mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)


def _write(chunks) -> None:
    out = sys.stdout.buffer
    for c in chunks:
        out.write(c)
    out.flush()


def cmd_decode(args: argparse.Namespace) -> int:
    _tune_runtime()
    from qemu_ext.trace import decode as dec
    from qemu_ext.trace.api import _log_lines, detect_format
    from qemu_ext.trace.log import parse_log_lines
    from qemu_ext.trace.simple import decode_simple

    fmt = detect_format(args.file)
    if fmt == "simple":
        st = decode_simple(args.file, args.events)
        if args.output == "simpletrace":
            sys.stdout.flush()
            jobs = os.environ.get("VIRTOPT_JOBS", "")
            try:
                fd = sys.stdout.fileno()
            except (OSError, ValueError, AttributeError):  # not a real file: no fork, no fd
                dec.write_simpletrace_text(st, sys.stdout.buffer)
            else:
                # VIRTOPT_JOBS=2: a forked helper renders half of the text (faster on an idle
                # machine, slower on a busy one: copy-on-write faults), hence not the default
                dec.write_simpletrace_fd(st, fd, int(jobs) if jobs.isdigit() else 1)
        elif args.output == "json":
            _write(dec.iter_json(st.records()))
        else:
            _write(dec.iter_csv(st.records()))
        if st.truncated_bytes:
            print(
                f"virtopt: {args.file}: truncated: the last {st.truncated_bytes} bytes (from offset {st.end_offset}) "
                f"are not a complete record; {len(st)} records decoded",
                file=sys.stderr,
            )
        return 0
    recs = list(parse_log_lines(_log_lines(args.file), args.events))
    if not recs:
        from qemu_ext.errors import BadInputError

        raise BadInputError(f"{args.file}: no trace events in it (neither a simpletrace file nor log-backend lines)")
    if args.output == "simpletrace":
        _write(dec.iter_simpletrace_text_records(recs))
    elif args.output == "json":
        _write(dec.iter_json(recs))
    else:
        _write(dec.iter_csv(recs))
    return 0


def _parse_pairs(specs: list[str]):
    from qemu_ext.errors import VirtoptError
    from qemu_ext.trace.summary import Pair

    out = []
    for spec in specs:
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise VirtoptError(f"--pair {spec!r}: expected BEGIN:END or BEGIN:END:KEY", exit_code=2)
        out.append(Pair(parts[0], parts[1], parts[2] if len(parts) == 3 else None))
    return out


def _fmt_ns(v) -> str:
    if v is None:
        return "-"
    v = float(v)
    if v >= 1e9:
        return f"{v / 1e9:.3g} s"
    if v >= 1e6:
        return f"{v / 1e6:.3g} ms"
    if v >= 1e3:
        return f"{v / 1e3:.3g} us"
    return f"{v:.0f} ns"


def render_summary(res: dict) -> str:
    from qemu_ext.output import ascii_plot

    lines = [f"file: {res['file']} ({res['format']}{' v' + str(res['version']) if res.get('version') else ''})"]
    lines.append(f"events: {res['events']}   duration: {_fmt_ns(res['duration_ns'])}")
    dr = res["dropped"]
    lines.append(f"dropped: {dr['events']} events in {dr['records']} dropped records")
    if res.get("truncated_bytes"):
        lines.append(f"truncated: {res['truncated_bytes']} bytes at the end are not a complete record")
    lines.append("")
    w = max([len(c["event"]) for c in res["counts"]] + [5])
    lines.append(f"{'event':<{w}}  {'count':>10}  {'per second':>12}")
    for c in res["counts"]:
        ps = "-" if c["per_s"] is None else f"{c['per_s']:.1f}"
        lines.append(f"{c['event']:<{w}}  {c['count']:>10}  {ps:>12}")
    rate = res.get("rate")
    if rate:
        lines.append("")
        lines.append(f"rate over time (events/s, {_fmt_ns(rate['bin_ns'])} bins):")
        xs = [i * rate["bin_ns"] / 1e9 for i in range(len(rate["counts"]))]
        lines.append(ascii_plot(xs, rate["events_per_s"], height=8, xlabel="s", ylabel="events/s", xfmt=lambda v: f"{v:.3g}s"))
    for lat in res["latency"]:
        lines.append("")
        key = f" (key {lat['key']})" if lat["key"] else ""
        lines.append(f"latency {lat['begin']} -> {lat['end']}{key}: {lat['pairs']} pairs, "
                     f"{lat['unmatched_begin']} begins and {lat['unmatched_end']} ends unmatched")
        if lat["pairs"] and "min_ns" not in lat:
            lines.append("  (no timestamps in this trace: log lines without the pid@sec.usec: prefix)")
        elif lat["pairs"]:
            lines.append(
                f"  min {_fmt_ns(lat['min_ns'])}  p50 {_fmt_ns(lat['p50_ns'])}  p90 {_fmt_ns(lat['p90_ns'])}  "
                f"p99 {_fmt_ns(lat['p99_ns'])}  max {_fmt_ns(lat['max_ns'])}  mean {_fmt_ns(lat['mean_ns'])}"
            )
            top = max(h["count"] for h in lat["histogram"])
            for h in lat["histogram"]:
                bar = "#" * max(1, round(40 * h["count"] / top))
                lines.append(f"  < {_fmt_ns(h['lt_ns']):>8}  {h['count']:>9}  {bar}")
    return "\n".join(lines)


def save_summary_plot(res: dict, path: str) -> None:
    from qemu_ext.errors import BadInputError, NotAvailableError

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise NotAvailableError("--plot needs matplotlib: pip install 'virtopt[plot]'") from exc
    rate = res.get("rate")
    lats = [lat for lat in res["latency"] if lat["pairs"] and "histogram" in lat]
    nplots = 1 + (1 if lats else 0)
    fig, axes = plt.subplots(nplots, 1, figsize=(9, 4 * nplots), dpi=100, squeeze=False)
    try:
        ax = axes[0][0]
        if rate:
            xs = [i * rate["bin_ns"] / 1e9 for i in range(len(rate["counts"]))]
            ax.plot(xs, rate["events_per_s"], label="all events", linewidth=2)
            for n, cnts in rate["by_event"].items():
                ax.plot(xs, [c * 1e9 / rate["bin_ns"] for c in cnts], label=n, linewidth=1)
            ax.set_xlabel("seconds since the first event")
            ax.set_ylabel("events/s")
            ax.set_title(f"rate over time: {res['file']}")
            ax.legend(loc="best", fontsize="small")
        else:
            names = [c["event"] for c in res["counts"]][:20]
            ax.barh(names, [c["count"] for c in res["counts"]][:20])
            ax.set_xlabel("events (no timestamps in this trace)")
        ax.grid(True, alpha=0.3)
        if lats:
            ax = axes[1][0]
            for lat in lats[:6]:
                xs = [h["lt_ns"] for h in lat["histogram"]]
                ax.step(xs, [h["count"] for h in lat["histogram"]], where="post", label=f"{lat['begin']} -> {lat['end']}")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("latency (ns, log2 buckets)")
            ax.set_ylabel("pairs")
            ax.set_title("begin/end latency")
            ax.legend(loc="best", fontsize="small")
            ax.grid(True, alpha=0.3)
        fig.tight_layout()
        try:
            fig.savefig(path)
        except OSError as exc:
            raise BadInputError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)


def cmd_summary(args: argparse.Namespace) -> int:
    _tune_runtime()
    from qemu_ext.output import print_json
    from qemu_ext.trace.summary import summarize

    res = summarize(args.file, args.events, bins=args.bins, pairs=_parse_pairs(args.pair))
    if args.plot:
        save_summary_plot(res, args.plot)
    if args.output == "json":
        print_json(res)
    else:
        print(render_summary(res))
        if args.plot:
            print(f"\nplot written to {args.plot}")
    return 0
