"""`virtopt trace`: decode and summarise QEMU traces (simpletrace files, log-backend text)."""

from __future__ import annotations

import argparse
import os
import sys

DECODE_EPILOG = """\
examples:
  virtopt trace decode trace-12345                       # same text as QEMU's scripts/simpletrace.py
  virtopt trace decode trace-12345 --events /usr/share/qemu/trace-events-all
  virtopt trace decode trace-12345 --qemu-compat 7.2     # 7.2's simpletrace.py, whatever the events file
  virtopt trace decode trace-12345 --output=json > events.json
  virtopt trace decode qemu-stderr.log --output=csv       # log-backend text (with or without pid@sec.usec:)

The text is byte for byte what the trace's own QEMU's simpletrace.py prints; verified against
QEMU 7.2 and 10.0 (10.0 ends the line of an event without arguments with a space after pid=N).
The version is told from the events file (7.2's has `vcpu` events and formats with \\n, which
10.0 rejects), or given with --qemu-compat. Versions between (8.x, 9.x) are not verified.

The trace-events file defaults to $VIRTOPT_TRACE_EVENTS or /usr/share/qemu/trace-events-all, or
the trace-events-all of virtopt's QEMU builds: the first that declares every event the trace maps.
A truncated tail is reported on stderr; every complete record before it is printed.
Exit codes: 0 ok, 1 bad or unreadable trace, 2 usage / no events file.
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

COMPAT = ("7.2", "10.0")  # the versions whose simpletrace.py output is verified (tests, bench)


def _bins(text: str) -> int:
    """--bins: output.number's wording (imported when the option is given: decode starts without it)."""
    from qemu_ext.output import number

    return number(int, 1, 10000)(text)


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
    d.add_argument(
        "--qemu-compat",
        choices=COMPAT,
        metavar="VERSION",
        help=f"print as this QEMU's simpletrace.py ({' or '.join(COMPAT)}; default: the events file's QEMU)",
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
    s.add_argument("--plot", metavar="FILE.png", help="write the rate over time and latency histograms to a PNG")
    s.add_argument("--bins", type=_bins, default=60, help="time bins for the rate over time (1 to 10000, default 60)")
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


def _write(chunks) -> None:
    out = sys.stdout.buffer
    for c in chunks:
        out.write(c)
    out.flush()


def _writer():
    """Where the text goes: the stdout file descriptor (no Python buffering), else sys.stdout.buffer."""
    sys.stdout.flush()
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError, AttributeError):  # not a real file (an embedding, a test's capture)
        out = sys.stdout.buffer
        return out.write

    def write(view: memoryview) -> None:
        while len(view):
            n = os.write(fd, view)
            view = view[n:]

    return write


def _truncated_note(file: str, truncated: int, end: int, records: int) -> None:
    if truncated:
        print(
            f"virtopt: {file}: truncated: the last {truncated} bytes (from offset {end}) "
            f"are not a complete record; {records} records decoded",
            file=sys.stderr,
        )


def cmd_decode(args: argparse.Namespace) -> int:
    from qemu_ext.trace.header import detect_format

    fmt = detect_format(args.file)
    if fmt == "simple" and args.output == "simpletrace":
        # the C renderer: no numpy, no per-record Python (None where it cannot be had here)
        from qemu_ext.trace import native
        from qemu_ext.trace.events import events_for_trace

        res = native.decode_text(args.file, lambda names: events_for_trace(args.events, names), args.qemu_compat,
                                 _writer())
        if res is not None:
            _truncated_note(args.file, res.truncated_bytes, res.end_offset, res.records)
            return 0
    from qemu_ext.output import tune_bulk_numpy

    tune_bulk_numpy()
    from qemu_ext.trace import decode as dec
    from qemu_ext.trace.api import _log_lines
    from qemu_ext.trace.events import qemu_series
    from qemu_ext.trace.log import optional_events, parse_log_lines
    from qemu_ext.trace.simple import decode_simple

    if fmt == "simple":
        st = decode_simple(args.file, args.events)
        if args.output == "simpletrace":
            qemu10 = (args.qemu_compat or qemu_series(st.events)) != "7.2"
            sys.stdout.flush()
            jobs = os.environ.get("VIRTOPT_JOBS", "")
            try:
                fd = sys.stdout.fileno()
            except (OSError, ValueError, AttributeError):  # not a real file: no fork, no fd
                dec.write_simpletrace_text(st, sys.stdout.buffer, qemu10)
            else:
                # VIRTOPT_JOBS=2: a forked helper renders half of the text (faster on an idle
                # machine, slower on a busy one: copy-on-write faults), hence not the default
                dec.write_simpletrace_fd(st, fd, int(jobs) if jobs.isdigit() else 1, qemu10)
        elif args.output == "json":
            _write(dec.iter_json(st.records()))
        else:
            _write(dec.iter_csv(st.records()))
        _truncated_note(args.file, st.truncated_bytes, st.end_offset, len(st))
        return 0
    events = optional_events(args.events)
    recs = list(parse_log_lines(_log_lines(args.file), events))
    if not recs:
        from qemu_ext.errors import BadInputError

        raise BadInputError(f"{args.file}: no trace events in it (neither a simpletrace file nor log-backend lines)")
    if args.output == "simpletrace":
        series = args.qemu_compat or (qemu_series(events) if events is not None else "7.2")
        _write(dec.iter_simpletrace_text_records(recs, series != "7.2"))
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


def _ns(v) -> str:
    """Nanoseconds for people: output.duration ("234 µs", "1.2 ms")."""
    from qemu_ext.output import duration

    return duration(None if v is None else v / 1e9)


def _time_unit(span_ns: float) -> tuple[float, str]:
    """(ns per unit, unit) for a time axis spanning span_ns: the unit output.duration would use."""
    if span_ns < 1e3:
        return 1.0, "ns"
    if span_ns < 1e6:
        return 1e3, "µs"
    if span_ns < 1e9:
        return 1e6, "ms"
    return 1e9, "s"


def render_summary(res: dict) -> str:
    from qemu_ext.output import ascii_plot, count, percent, table

    lines = [f"file: {res['file']} ({res['format']}{' v' + str(res['version']) if res.get('version') else ''})"]
    lines.append(f"events: {count(res['events'])}   duration: {_ns(res['duration-ns'])}")
    dr = res["dropped"]
    lines.append(f"dropped: {count(dr['events'])} events in {count(dr['records'])} dropped records")
    if res.get("truncated-bytes"):
        lines.append(f"truncated: {count(res['truncated-bytes'])} bytes at the end are not a complete record")
    lines.append("")
    rows = [(c["event"], count(c["count"]), percent(c["fraction"]), count(c["per-second"])) for c in res["counts"]]
    lines.append(table(["event", "count", "share", "per second"], rows, right=(1, 2, 3)))
    rate = res.get("rate")
    if rate:
        lines.append("")
        lines.append(f"rate over time (events per second, {_ns(rate['bin-ns'])} bins):")
        xs = [i * rate["bin-ns"] for i in range(len(rate["counts"]))]
        lines.append(ascii_plot(xs, rate["events-per-second"], height=8, xlabel="time since the first event",
                                ylabel="events per second", xfmt=_ns, yfmt=lambda v: count(round(v))))
    for lat in res["latency"]:
        lines.append("")
        key = f" (key {lat['key']})" if lat["key"] else ""
        lines.append(f"latency {lat['begin']} -> {lat['end']}{key}: {count(lat['pairs'])} pairs, "
                     f"{count(lat['unmatched-begin'])} begins and {count(lat['unmatched-end'])} ends unmatched")
        if lat["pairs"] and "min-ns" not in lat:
            lines.append("  (no timestamps in this trace: log lines without the pid@sec.usec: prefix)")
        elif lat["pairs"]:
            lines.append(
                f"  min {_ns(lat['min-ns'])}  p50 {_ns(lat['p50-ns'])}  p90 {_ns(lat['p90-ns'])}  "
                f"p99 {_ns(lat['p99-ns'])}  max {_ns(lat['max-ns'])}  mean {_ns(lat['mean-ns'])}"
            )
            top = max(h["count"] for h in lat["histogram"])
            for h in lat["histogram"]:
                bar = "#" * max(1, round(40 * h["count"] / top))
                lines.append(f"  < {_ns(h['lt-ns']):>8}  {count(h['count']):>9}  {bar}")
    return "\n".join(lines)


def save_summary_plot(res: dict, path: str) -> str:
    """The rate over time (and the latency histograms) as a PNG, axes in the text's units."""
    from qemu_ext.output import count, save_plot

    rate = res.get("rate")
    lats = [lat for lat in res["latency"] if lat["pairs"] and "histogram" in lat]
    if rate:
        span = rate["bin-ns"] * len(rate["counts"])
        scale, unit = _time_unit(span)
        xs = [i * rate["bin-ns"] / scale for i in range(len(rate["counts"]))]
        series = [("all events", xs, rate["events-per-second"])]
        series += [(n, xs, [c * 1e9 / rate["bin-ns"] for c in cnts]) for n, cnts in rate["by-event"].items()]
        first = dict(series=series, xlabel=f"time since the first event ({unit})", ylabel="events per second",
                     title=f"rate over time: {res['file']}", yfmt=lambda v: count(round(v)))
    else:
        top = res["counts"][:20]
        first = dict(series=[("", [c["event"] for c in top], [c["count"] for c in top])], kind="barh",
                     xlabel="events (no timestamps in this trace)", ylabel="", xfmt=lambda v: count(round(v)))
    panels = []
    if lats:
        panels.append(dict(
            series=[(f"{lat['begin']} -> {lat['end']}", [h["lt-ns"] for h in lat["histogram"]],
                     [h["count"] for h in lat["histogram"]]) for lat in lats[:6]],
            kind="step", logx=True, xlabel="latency (log2 buckets)", ylabel="pairs", title="begin/end latency",
            xfmt=lambda v: _ns(v), yfmt=lambda v: count(round(v)),
        ))
    return save_plot(path, first["series"], first["xlabel"], first["ylabel"], first.get("title", ""),
                     kind=first.get("kind", "line"), xfmt=first.get("xfmt"), yfmt=first.get("yfmt"), panels=panels)


def cmd_summary(args: argparse.Namespace) -> int:
    from qemu_ext.output import check_plot_path, print_json, tune_bulk_numpy

    if args.plot:
        check_plot_path(args.plot)  # before the work
    tune_bulk_numpy()
    from qemu_ext.trace.summary import summarize

    res = summarize(args.file, args.events, bins=args.bins, pairs=_parse_pairs(args.pair))
    written = save_summary_plot(res, args.plot) if args.plot else None
    if args.output == "json":
        print_json(res)
    else:
        print(render_summary(res))
        if written:
            print(f"\nplot written to {written}")
    return 0
