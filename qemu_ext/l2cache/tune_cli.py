"""`virtopt l2cache tune SOCKET --node NODE`: render what qemu_ext.l2cache.tune returns (also used
by the shell's ``/l2cache tune``)."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional

from qemu_ext.errors import VirtoptError

TUNE_EPILOG = """\
examples:
  virtopt l2cache tune /run/vm.qmp --node disk0 --seconds 5
  virtopt l2cache tune /run/vm.qmp --node disk0 --seconds 5 --target 0.95 --apply --output=json
  virtopt l2cache tune /run/vm.qmp --node drive0 --seconds 5 --apply
  virtopt l2cache recommend --watch --qmp /run/vm.qmp --node disk0 --seconds 60 --max-memory 64M
  virtopt l2cache tune --domain vm1 --node vda --seconds 5 --apply --output=json
  virtopt l2cache tune libvirt:vm1 --node virtio-disk0 --seconds 5
  virtopt l2cache recommend --watch --domain vm1 --node vda --seconds 60

It captures QEMU's qcow2_cache_get* events (the log backend's -D file or stderr file, or the
simple backend's trace file), turns off again whatever it turned on (also on Ctrl-C or when QEMU
goes away), and measures what tracing costs the guest (the I/O rate of the node's device with the
events off, then on). --apply changes the running VM with blockdev-reopen (the node's other
options kept) and captures again to show before -> after beside the prediction. A node that
cannot be reopened (e.g. an automatic -drive node) is not changed: the option text to use
instead is printed (-blockdev, -drive, libvirt's <metadata_cache><max_size>), exit 1.
On a libvirt domain (--domain NAME, or libvirt:NAME / qemu+libvirt:///system?domain=NAME as the
address) the monitor is reached through libvirt (libvirt marks the domain tainted, custom-monitor,
and the report says so), the node is also named by the disk's target (vda), its device (virtio-disk0)
or libvirt's libvirt-N-format/-storage, and the trace lines come from the domain's log
(/var/log/libvirt/qemu/NAME.log). The recommendation is one the domain XML can keep: libvirt sets only
QEMU's cache-size (<metadata_cache><max_size>), so QEMU picks 4 KiB entries below full coverage.
The report prints that XML change with the virsh edit / virt-xml line; --apply reopens libvirt's
node live with exactly that cache-size, and the change is lost at the next start unless the XML is
changed.
--watch captures window after window (each window's file deleted once read), keeps the curve
over the whole time in --max-memory, and prints the final answer on Ctrl-C. With the simple trace
backend each window has its own trace file; with the log backend the events also go to QEMU's own
log (its -D file or stderr file), which grows by about 3 lines per L2 lookup while watching.
exit codes: 0 ok, 1 failed (dead socket, not applied), 2 usage.
"""


def _fmt() -> Any:
    from qemu_ext import output

    return output


def render_node(n: dict[str, Any]) -> str:
    o = _fmt()
    return (f"node {n['node-name']}: {n['filename']} ({o.human_size(n['virtual-size'])}, cluster "
            f"{o.human_size(n['cluster-size'])}{', extended L2' if n['extended-l2'] else ''}), l2-cache-size "
            f"{o.human_size(n['l2-cache-size'])} in {o.count(n['l2-cache-entries'])} entries of "
            f"{o.human_size(n['l2-cache-entry-size'])} [{n['settings-source']}]")


def _io(rate: Optional[dict[str, Any]]) -> str:
    o = _fmt()
    if not rate:
        return "-"
    return f"{o.count(rate['operations-per-second'])} I/O/s ({o.human_size(rate['bytes-per-second'])}/s)"


def render_measured(label: str, m: dict[str, Any]) -> str:
    o = _fmt()
    if not m["lookups"]:
        return f"{label} ({o.duration(m['seconds'])}): no L2 lookup"
    return (f"{label} ({o.duration(m['seconds'])}): {o.count(m['lookups'])} L2 lookups "
            f"({o.count(m['lookups-per-second'])}/s), {o.count(m['misses'])} misses "
            f"({o.count(m['misses-per-second'])}/s), hit ratio {o.percent(m['hit-ratio'])}, "
            f"warm {o.percent(m['warm-hit-ratio'])}")


def render_options(opts: dict[str, Any], entry: Optional[int] = None, libvirt: bool = True) -> list[str]:
    """The option text; ``libvirt``: with libvirt's general form (a domain's own advice replaces it)."""
    o = _fmt()
    out = [f"  {opts['blockdev']}", f"  {opts['drive']}"]
    if "libvirt" in opts and libvirt:
        out.append(f"  libvirt: {opts['libvirt']}")
        if entry is not None and opts.get("libvirt-entry-size") not in (None, entry):
            got = opts.get("libvirt-warm-hit-ratio")
            out.append(f"    (libvirt sets QEMU's cache-size, the total of both caches; it cannot set "
                       f"l2-cache-entry-size: QEMU then uses {o.human_size(opts['libvirt-entry-size'])} entries"
                       + (f", warm hit ratio {o.percent(got)})" if got is not None else ")"))
        else:
            out.append("    (libvirt's max_size is QEMU's cache-size, the total of both caches: "
                       "the L2 cache gets all but the refcount cache's 4 clusters)")
    return out


def render_domain(lv: dict[str, Any]) -> str:
    """The domain and disk a report is about, and where the trace lines came from."""
    disk = lv["target"] or "?"
    alias = f" ({lv['alias']})" if lv.get("alias") and lv["alias"] != disk else ""
    line = f"libvirt domain {lv['domain']} ({lv['uri']}), disk {disk}{alias} = node {lv['node-name']}"
    if lv.get("trace-read-from"):
        line += f"; trace lines read from the domain's log {lv['trace-read-from']} (QEMU's stderr through virtlogd)"
    return line


def render_domain_advice(rec: dict[str, Any]) -> list[str]:
    """The domain XML change that keeps a recommendation, with the lines that make it."""
    o = _fmt()
    a = rec.get("libvirt")
    if not a:
        return []
    out = [f"  domain {a['domain']}, disk {a['target']}: {a['xml']} in its <driver name='qemu' type='qcow2'>",
           f"    (libvirt passes it as QEMU's cache-size {o.human_size(a['max-size'])}, which QEMU splits into "
           f"l2-cache-size {o.human_size(a['l2-cache-size'])} in entries of {o.human_size(a['l2-cache-entry-size'])} "
           f"and refcount-cache-size {o.human_size(a['refcount-cache-size'])}: read_cache_sizes)",
           f"    {a['virsh']}",
           f"    {a['virt-xml']}"]
    u = rec.get("without-libvirt")
    if u:
        out.append(f"    (QEMU alone could use l2-cache-size {o.human_size(u['l2-cache-size'])} in entries of "
                   f"{o.human_size(u['l2-cache-entry-size'])}, memory {o.human_size(u['memory'])}, warm hit ratio "
                   f"{o.percent(u['warm-hit-ratio'])}; libvirt cannot set l2-cache-entry-size, so the domain would "
                   "lose it at its next start)")
    return out


def render_tune(r: dict[str, Any]) -> str:
    o = _fmt()
    lv = r.get("libvirt")
    out = [render_node(r["node"])]
    if lv:
        out.append(render_domain(lv))
    c = r["tracing-cost"]
    if c.get("change") is not None:
        ch = c["change"]
        out.append(f"tracing cost: the guest did {_io(c['events-off'])} with the events off, {_io(c['events-on'])} "
                   f"with them on ({'+' if ch >= 0 else ''}{ch * 100:.1f}%)")
    elif c.get("seconds-per-lookup") is not None:
        probe = (f"{c['method']}: {o.duration(c['probe-seconds-per-read-off'])} per read off, "
                 f"{o.duration(c['probe-seconds-per-read-on'])} on")
        if c.get("resolved"):
            out.append(f"tracing cost: {o.duration(c['seconds-per-lookup'])} per L2 lookup ({probe}); at the rate "
                       f"captured, {o.percent(c['cpu-share'])} of a CPU")
        else:
            out.append(f"tracing cost: below what the probe resolves ({probe})")
    elif c.get("note"):
        out.append(f"tracing cost: {c['note']}")
    out.append(render_measured("before", r["before"]))
    p = r["predicted"]
    cur = r["current"]
    if p:
        verdict = ("equal: the simulator reproduces QEMU" if r["prediction-exact"]
                   else "NOT equal (see the notes)")
        src = "as the trace shows" if cur.get("source") == "trace" else cur.get("source", "")
        out.append(f"predicted at the current setting ({o.human_size(p['l2-cache-size'])}, {src}): "
                   f"{o.count(p['warm-misses'])} misses after the cold start; QEMU had "
                   f"{o.count(p['measured-warm-misses'])}: {verdict}")
    rec = r["recommended"]
    if rec:
        out.append(f"recommended for a warm hit ratio of {o.percent(r['target-warm-hit-ratio'])}: l2-cache-size "
                   f"{o.human_size(rec['l2-cache-size'])} with {o.human_size(rec['l2-cache-entry-size'])} entries "
                   f"(memory {o.human_size(rec['memory'])}; predicted warm hit ratio {o.percent(rec['warm-hit-ratio'])})")
        out += render_options(rec["options"], rec["l2-cache-entry-size"], libvirt="libvirt" not in rec)
        out += render_domain_advice(rec)
    a = r["applied"]
    if a is not None:
        if a.get("done") and "cache-size" in a["options"]:
            opts = a["options"]
            out.append(f"applied live: blockdev-reopen {opts['node-name']} cache-size={opts['cache-size']}, as libvirt "
                       f"passes <max_size> (QEMU's split: l2-cache-size {o.human_size(a['l2-cache-size'])} in entries "
                       f"of {o.human_size(a['l2-cache-entry-size'])}, refcount-cache-size "
                       f"{o.human_size(a['refcount-cache-size'])}); the node's other options kept")
        elif a.get("done"):
            opts = a["options"]
            out.append(f"applied: blockdev-reopen {opts['node-name']} l2-cache-size={opts['l2-cache-size']}"
                       + (f" l2-cache-entry-size={opts['l2-cache-entry-size']}" if "l2-cache-entry-size" in opts else ""))
        else:
            out.append(f"not applied: {a['reason']}")
        if a.get("done") and lv:
            had = (f"<max_size> of {o.human_size(lv['metadata-cache-max-size'])}"
                   if lv.get("metadata-cache-max-size") is not None else "no <metadata_cache>")
            keep = rec["libvirt"]["xml"] if rec and rec.get("libvirt") else "the <metadata_cache> above"
            out.append(f"NOT PERSISTENT: libvirt does not know of this change (domain {lv['domain']}'s XML still has "
                       f"{had} for {lv['target']}): it is lost when the domain restarts unless the XML is changed to "
                       f"{keep} (the virsh edit / virt-xml line above)")
    if r["after"]:
        af = r["after"]
        out.append(render_measured("after", af) + f" (predicted warm {o.percent(af['predicted-warm-hit-ratio'])})")
        b = r["before"]
        out.append(f"before -> after: warm hit ratio {o.percent(b['warm-hit-ratio'])} -> "
                   f"{o.percent(af['warm-hit-ratio'])} (predicted {o.percent(af['predicted-warm-hit-ratio'])}), "
                   f"misses {o.count(b['misses-per-second'])}/s -> {o.count(af['misses-per-second'])}/s")
    for n in r["not-evaluated"][:1]:
        sizes = ", ".join(o.human_size(x["l2-cache-entry-size"]) for x in r["not-evaluated"])
        out.append(f"not evaluated: entry sizes {sizes}: {n['reason']}")
    said = f"read QEMU's log file {lv['trace-read-from']}" if lv and lv.get("trace-read-from") else None
    out += [f"note: {n}" for n in r["notes"] if n != said]  # the domain line says where
    if lv:
        out += [f"note: {n}" for n in lv.get("tainted-by-virtopt", [])]
    if r.get("events-left-enabled"):
        out.append(f"WARNING: events still enabled: {', '.join(r['events-left-enabled'])}")
    return "\n".join(out)


def render_watch(w: dict[str, Any], final: bool = False) -> str:
    o = _fmt()
    win = w["window"]
    head = (f"{'final: ' if final else ''}node {w['node']}: {win['windows']} windows, "
            f"{o.duration(win['covered-seconds'])} covered ({o.duration(win['captured-seconds'])} captured), "
            f"{o.count(w['measured']['lookups'])} L2 lookups, measured hit ratio {o.percent(w['measured']['hit-ratio'])}")
    out = [head]
    if final and w.get("libvirt"):
        out.append("  " + render_domain(w["libvirt"]))
    lw = w.get("last-window")
    if lw and not final:
        out.append("  " + render_measured("last window", lw))
    rec = w.get("recommended")
    if rec:
        est = "" if rec["exact"] else " (estimated from a sample)"
        out.append(f"  recommended: l2-cache-size {o.human_size(rec['l2-cache-size'])} with "
                   f"{o.human_size(rec['l2-cache-entry-size'])} entries (memory {o.human_size(rec['memory'])}, warm hit "
                   f"ratio {o.percent(rec['warm-hit-ratio'])}){est}")
        if final:
            out += render_options(rec["options"], rec["l2-cache-entry-size"], libvirt="libvirt" not in rec)
            out += render_domain_advice(rec)
            out += [f"  note: {n}" for n in w.get("notes", [])]
    elif w["measured"]["lookups"]:
        out.append("  no cache size reaches the target on what was captured")
    if w.get("backend") == "log" and final:
        out.append(f"  note: log backend: QEMU's own log grew by the events of {w['window']['windows']} windows "
                   "(the simple backend rotates its trace file instead)")
    for s in w.get("curves", []):
        if not s["exact"]:
            out.append(f"  entries of {o.human_size(s['l2-cache-entry-size'])}: sampled, rate {s['sampling-rate']:.4g} "
                       f"({o.count(s['sampled-slices'])} slices kept)")
    return "\n".join(out)


def address(socket: Optional[str], domain: Optional[str], what: str) -> str:
    """The QMP address of a running QEMU: a socket, or ``--domain NAME`` (a libvirt domain, the same
    as the address ``libvirt:NAME``)."""
    from qemu_ext.errors import UsageError

    if socket and domain:
        raise UsageError(f"give {what} or --domain NAME, not both")
    if domain:
        return domain if domain.startswith(("libvirt:", "qemu+libvirt:")) else f"libvirt:{domain}"
    if not socket:
        raise UsageError(f"give {what} (a QMP socket, libvirt:NAME) or --domain NAME")
    return socket


def _cmd_tune(args: argparse.Namespace) -> int:
    from qemu_ext.l2cache import tune as T
    from qemu_ext.output import print_json, tune_bulk_numpy
    from qemu_ext.qmp.client import connect_sync

    tune_bulk_numpy()
    T.check_args(args.seconds, args.target)
    if args.plot:
        from qemu_ext.output import check_plot_path

        check_plot_path(args.plot)
    tty = sys.stderr.isatty()
    notify = (lambda t: print(t + " ...", file=sys.stderr)) if tty and args.output != "json" else None
    with connect_sync(address(args.socket, args.domain, "SOCKET"), timeout=10) as s:
        if args.watch:
            return _watch(s, args)
        r = s.call(T.tune, args.node, seconds=args.seconds, target=args.target, apply=args.apply,
                   baseline=args.baseline, max_memory=args.max_memory, notify=notify)
    if args.plot and r["_sizing"].curves is not None:
        from qemu_ext.l2cache.cli import write_curve_plot

        write_curve_plot(r["_sizing"].curves, args.plot)
    if args.output == "json":
        from qemu_ext.l2cache.sim import strip_private

        print_json(strip_private(r))
    else:
        print(render_tune(r))
        if args.plot:
            print(f"plot written to {args.plot}")
    a = r["applied"]
    if a is not None and not a.get("done"):
        raise VirtoptError(f"not applied: {a['reason']}")
    return 0


def _watch(s: Any, args: argparse.Namespace, kind: str = "tune") -> int:
    """--watch: window after window until Ctrl-C, then the final answer (curve, recommend or tune's)."""
    from qemu_ext.l2cache import node as N
    from qemu_ext.l2cache import tune as T
    from qemu_ext.l2cache.sim import recommendation, strip_private
    from qemu_ext.output import dumps_json

    infos = s.call(N.node_caches, args.node)
    target = args.target if args.target is not None else 0.99
    wt = T.Watcher(infos[0], target, args.max_memory)

    def update(rep: dict[str, Any]) -> None:
        if args.output == "json":
            print(dumps_json(strip_private(rep)).replace("\n", " "), flush=True)
        else:
            print(render_watch(rep), flush=True)

    try:
        s.call(T.watch, args.node, seconds=args.seconds, target=target, max_memory=args.max_memory,
               on_update=update, watcher=wt)
    except KeyboardInterrupt:
        pass
    rep = wt.report()
    if args.output == "json":
        print(dumps_json(strip_private(rep)))
        return 0
    print(render_watch(rep, final=True))
    if kind != "tune" and "_curves" in rep:
        from qemu_ext.l2cache.cli import render_curve, render_recommend, write_curve_plot

        res = rep["_curves"]
        if kind == "curve":
            if getattr(args, "plot", None):
                write_curve_plot(res, args.plot)
            print(render_curve(res, getattr(args, "plot", None)))
        else:
            print(render_recommend(recommendation(res, wt.info.qemu_version, target, wt.info.filename,
                                                  wt.info.node_name)))
    return 0


def watch_command(args: argparse.Namespace, kind: str) -> int:
    """curve/recommend --watch --qmp SOCKET --node NODE."""
    from qemu_ext.errors import UsageError
    from qemu_ext.l2cache import tune as T
    from qemu_ext.output import tune_bulk_numpy
    from qemu_ext.qmp.client import connect_sync

    if not (args.qmp or args.domain) or not args.node:
        raise UsageError("--watch captures from a running QEMU: give --qmp SOCKET (or --domain NAME) and --node NODE")
    if args.image or args.virtual_size is not None or args.qemu_io or args.trace or args.pattern:
        raise UsageError("--watch takes its lookups from QEMU: no image, --virtual-size, --qemu-io, --trace "
                         "or --pattern")
    T.check_args(args.seconds, args.target if args.target is not None else 0.99)
    tune_bulk_numpy()
    with connect_sync(address(args.qmp, args.domain, "--qmp SOCKET"), timeout=10) as s:
        return _watch(s, args, kind)


def add_watch_options(p: argparse.ArgumentParser, number: Any) -> None:
    g = p.add_argument_group("watching a running QEMU (instead of an image and a workload)")
    g.add_argument("--watch", action="store_true",
                   help="capture from QEMU window after window, print updates; Ctrl-C prints the final answer")
    g.add_argument("--qmp", metavar="SOCKET", help="QEMU's QMP socket, or libvirt:NAME (with --watch)")
    g.add_argument("--domain", metavar="NAME", help="a libvirt domain, the same as --qmp libvirt:NAME (with --watch)")
    g.add_argument("--node", help="the qcow2 node: node-name, drive or device id, or a domain's disk (vda) "
                                  "(with --watch)")
    g.add_argument("--seconds", type=number(float, 0.1, 3600), default=10.0, metavar="S",
                   help="length of each window, 0.1 to 3600 (default 10)")


def register(sub: argparse._SubParsersAction, fmt: Any, number: Any, size: Any) -> None:
    from qemu_ext.output import add_output_option

    p = sub.add_parser("tune", help="measure a running QEMU's L2 cache, recommend, apply (--apply), verify",
                       description="measure a node's L2 cache in a running QEMU, recommend l2-cache-size, apply it "
                                   "live and verify", epilog=TUNE_EPILOG, formatter_class=fmt)
    p.add_argument("socket", metavar="SOCKET", nargs="?",
                   help="QEMU's QMP socket (unix path or HOST:PORT), or a libvirt domain: libvirt:NAME, "
                        "qemu+libvirt:///system?domain=NAME")
    p.add_argument("--domain", metavar="NAME", help="a libvirt domain (the same as SOCKET libvirt:NAME)")
    p.add_argument("--node", required=True,
                   help="the qcow2 node: node-name, drive or device id; on a domain also its disk (vda), "
                        "libvirt-N-format/-storage")
    p.add_argument("--seconds", type=number(float, 0.1, 3600), default=10.0, metavar="S",
                   help="length of each capture, 0.1 to 3600 (default 10)")
    p.add_argument("--baseline", type=number(float, 0, 3600), metavar="S",
                   help="seconds of I/O rate with the events off, to measure the tracing cost; 0 to 3600 "
                        "(default: --seconds; 0 skips it)")
    p.add_argument("--target", type=number(float, 0, 1, lo_open=True), default=0.99, metavar="R",
                   help="target warm hit ratio, above 0 and at most 1 (default 0.99)")
    p.add_argument("--apply", action="store_true", help="set the recommendation live (blockdev-reopen), measure again")
    p.add_argument("--watch", action="store_true", help="keep capturing; print updates; Ctrl-C prints the final answer")
    p.add_argument("--max-memory", type=size, metavar="SIZE",
                   help="memory for the curve's state (--watch): exact while it fits, sampled beyond "
                        "(default: no limit)")
    p.add_argument("--plot", metavar="FILE.png", help="write the curve of the first capture as a PNG")
    add_output_option(p)
    p.set_defaults(func=_cmd_tune)
