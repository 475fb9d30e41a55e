"""Human output of every view, shared by the two front doors that show them (the gdb pack's
commands and `virtopt inspect`): each function takes what a view returned and gives the text.

This is front-door code (it formats; the view modules only collect).
"""

from __future__ import annotations

import datetime
from typing import Any, Optional

from qemu_ext.host import roles
from qemu_ext.output import count, duration, human_size


def table(rows: list[list[Any]], headers: list[str] | tuple[str, ...]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines) + "\n"


def snapshot(s: Optional[dict[str, Any]]) -> str:
    """One line on how the data was read (inspect prints it; gdb sessions know they stopped QEMU)."""
    if not s:
        return ""
    when = datetime.datetime.fromtimestamp(s["time"]).strftime("%Y-%m-%d %H:%M:%S.%f")
    if s["target"] == "core":
        head = f"core file, read by {s['backend']} in {duration(s['read-seconds'])}"
    elif s["process-stopped"]:
        head = f"QEMU stopped by {s['backend']} while read ({duration(s['read-seconds'])})"
    else:
        head = (f"live snapshot at {when}, read in {duration(s['read-seconds'])} without stopping QEMU "
                "(values may be a few microseconds apart)")
    lines = [head]
    for lim in s.get("limits") or []:
        lines.append(f"note: {lim}")
    return "\n".join(lines) + "\n"


def info(d: dict[str, Any]) -> str:
    out = [f"QEMU {d['version'] or '(version string not found)'}  pid {d['pid']}  {d['binary']}"
           + ("  (core file)" if d.get("target") == "core" else ""),
           f"accelerator: {d['accelerator']}   debug info: {'yes' if d['debug-info'] else 'no'}   "
           f"symbols: {d['symbols']}   threads: {d['threads']}",
           f"trace backends: {', '.join(d['trace-backends']) or 'none found'} ({d['trace-events']} events)",
           "commands:"]
    for name, st in d["commands"].items():
        out.append(f"  {name:<14} {'ok' if st['available'] else 'no: ' + (st['reason'] or '')}")
    return "\n".join(out) + "\n"


def threads(d: dict[str, Any]) -> str:
    rows = [[t["tid"], t["name"] or "", t["label"], t["last-cpu"], t["affinity"], t["identified-by"] or "-",
             "BQL" if t["holds-bql"] else ""] for t in d["threads"]]
    text = table(rows, [*roles.COLUMNS, ""])
    b = d["bql"]
    if not b["known"]:
        text += "BQL holder: unknown (the BQL mutex is not visible without debug info)\n"
    else:
        text += f"BQL holder: {b['holder'] if b['holder'] else 'none'}\n"
    return text


def vcpus(d: dict[str, Any], names: Optional[dict[int, str]] = None) -> str:
    def yn(v: Optional[bool]) -> str:
        return "?" if v is None else "yes" if v else "no"

    names = names or {}
    rows = [[v["cpu-index"], v["thread-id"], names.get(v["thread-id"] or -1, "?"), yn(v["halted"]), yn(v["stopped"]),
             yn(v["running"]), v["kvm-exit-reason-name"] or "-", f"{v['address']:#x}" if v["address"] else "-"]
            for v in d["vcpus"]]
    text = table(rows, ["CPU", "TID", "THREAD", "HALTED", "STOPPED", "RUNNING", "KVM-EXIT", "CPUState"])
    if d["source"] == "kvm":
        text += "(no debug info: vCPUs read from KVM's kvm_run mappings; halted/stopped unknown)\n"
    if any(v["kvm-exit-reason-name"] == "unknown" for v in d["vcpus"]):
        text += "(KVM exit reason unknown: kvm_run is not in the core file)\n"
    return text


def _mtree_line(indent: str, n: dict[str, Any]) -> str:
    kind = ("nv-" if n["nonvolatile"] else "") + n["kind"]
    s = f"{indent}{n['start']:016x}-{n['end']:016x} (prio {n['priority']}, {kind}): "
    if "alias" in n:
        al = n["alias"]
        s += f"alias {n['name']} @{al['name']} {al['start']:016x}-{al['end']:016x}"
    else:
        s += n["name"]
    if not n["enabled"]:
        s += " [disabled]"
    return s


def _mtree_tree(n: dict[str, Any], level: int, lines: list[str], disabled: bool) -> None:
    if n["enabled"] or disabled:  # like info mtree: hidden when disabled, children still shown
        lines.append(_mtree_line("  " * (level + 1), n))
    for s in n["subregions"]:
        _mtree_tree(s, level + 1, lines, disabled)


def mtree(data: dict[str, Any], disabled: bool = False) -> str:
    lines: list[str] = []
    if "flat-views" in data:
        for i, v in enumerate(data["flat-views"]):
            lines.append(f"FlatView #{i}")
            for a in v["address-spaces"]:
                alias = f", alias {a['root-alias']}" if a["root-alias"] else ""
                lines.append(f' AS "{a["name"]}", root: {a["root"]}{alias}')
            lines.append(f" Root memory region: {v['root'] or '(none)'}")
            if not v["ranges"]:
                lines.append("  No rendered FlatView")
            for r in v["ranges"]:
                kind = ("nv-" if r["nonvolatile"] else "") + r["kind"]
                line = f"  {r['start']:016x}-{r['end']:016x} (prio {r['priority']}, {kind}): {r['region']}"
                if r["offset-in-region"]:
                    line += f" @{r['offset-in-region']:016x}"
                lines.append(line + "".join(f" {m}" for m in r["accelerator"]))
            lines.append("")
    else:
        for a in data["address-spaces"]:
            for name in a["address-spaces"]:
                lines.append(f"address-space: {name}")
            _mtree_tree(a["root"], 0, lines, disabled)
            lines.append("")
        for t in data["alias-targets"]:
            lines.append(f"memory-region: {t['name']}")
            _mtree_tree(t, 0, lines, disabled)
            lines.append("")
    return "\n".join(lines) + "\n"


def mtree_lookup(d: dict[str, Any]) -> str:
    if not d["found"]:
        return f"{d['address']:#x}: no region in address space {d['address-space']} (unassigned)\n"
    return (f"{d['address']:#x} in {d['address-space']}: {d['region']} ({d['kind']}, prio {d['priority']}) "
            f"offset {d['offset-in-region']:#x}; range {d['range-start']:016x}-{d['range-end']:016x}\n"
            f"  path: {' / '.join(d['path'])}\n")


def _bound(seconds: Optional[float]) -> str:
    if seconds is None:
        return "error unknown"
    return "exact" if seconds == 0 else f"± {duration(seconds)}"


def timers(d: dict[str, Any]) -> str:
    ref = d["reference"]
    if ref["kind"] is None:
        out = [f"expires in: not known: {ref['description']}"]
    else:
        out = [f"expires in: counted from {ref['description']} ({_bound(ref['error-bound-seconds'])})"]
    out += [f"note: {n}" for n in ref["notes"]]
    for c in d["clocks"]:
        n = sum(len(tl["timers"]) for tl in c["timer-lists"])
        now = "now unknown: " + c["now-from"] if c["now-ns"] is None else (
            f"now {c['now-ns']} from {c['now-from']}, {_bound(c['error-bound-seconds'])}")
        out.append(f"clock {c['clock']} ({'enabled' if c['enabled'] else 'disabled'}): "
                   f"{len(c['timer-lists'])} list(s), {n} timer(s); {now}")
        for tl in c["timer-lists"]:
            out.append(f"  list {tl['address']:#x} ({tl['owner']}, notify {tl['notify'] or '?'})")
            for t in tl["timers"]:
                extra = ""
                left = t.get("expires-in-ns")
                if left is not None:
                    extra = f" (in {duration(left / 1e9)})" if left >= 0 else f" (overdue by {duration(-left / 1e9)})"
                out.append(f"    expire {t['expire-time']}{extra} scale {t['scale']} cb {t['cb']} "
                           f"opaque {t['opaque']:#x}")
    return "\n".join(out) + "\n"


def trace_list(data: dict[str, Any]) -> str:
    log = "on" if data["log-trace"] else "off"  # qemu_loglevel's LOG_TRACE bit
    out = [f"backends: {', '.join(data['backends']) or 'none found'}; {count(data['enabled-count'])} event(s) "
           f"enabled in QEMU; log backend output {log if 'log' in data['backends'] else 'n/a'}"]
    for e in data["events"]:
        out.append(f"{e['name']} : state {1 if e['state'] == 'enabled' else 0}"
                   f"{'  (unavailable)' if e['state'] == 'unavailable' else ''}{'  (vcpu)' if e['vcpu'] else ''}")
    out.append(f"{len(data['events'])} event(s)")
    return "\n".join(out) + "\n"


def trace_toggle(data: dict[str, Any]) -> str:
    verb = "enabled" if data["action"] == "enable" else "disabled"
    out = [f"{verb} {len(data['changed'])} event(s), {len(data['unchanged'])} already {verb}; "
           f"trace_events_enabled_count {data['enabled-count-before']} -> {data['enabled-count']}"]
    out += [f"  {n}" for n in data["changed"]]
    if data["skipped-vcpu"]:
        out.append(f"skipped {len(data['skipped-vcpu'])} per-vCPU event(s): use QMP trace-event-set-state")
    if data["unavailable"]:
        out.append(f"{len(data['unavailable'])} event(s) disabled at build time")
    if data["action"] == "enable" and not data["backends"]:
        out.append("note: no trace backend found that prints these events")
    return "\n".join(out) + "\n"


def qcow2(d: dict[str, Any], slices: bool = False) -> str:
    if not d["nodes"]:
        return "no qcow2 node in this QEMU\n"
    out = []
    for n in d["nodes"]:
        dev = f" (device {n['device']})" if n["device"] else ""
        out.append(f"{n['node-name']}{dev}: {n['filename']}")
        out.append(f"  virtual size {human_size(n['virtual-size'])}, cluster {human_size(n['cluster-size'])}, "
                   f"refcount bits {n['refcount-bits']}, cache-clean-interval {n['cache-clean-interval']} s")
        for label, c in (("L2 cache", n["l2-cache"]), ("refcount cache", n["refcount-cache"])):
            if c is None:
                out.append(f"  {label}: none")
                continue
            cov = ""
            if c.get("coverage") is not None:
                cov = f", {c['coverage'] * 100:.1f}% of the disk now (max {c['max-coverage'] * 100:.1f}%)"
            out.append(f"  {label}: {c['entries']} x {human_size(c['entry-size'])} = {human_size(c['cache-size'])}; "
                       f"{c['entries-in-use']} in use, {c['dirty-entries']} dirty, lru counter {c['lru-counter']}; "
                       f"covers {human_size(c['covers-in-use'])} of {human_size(c['covers-at-most'])}{cov}")
            if slices:
                for s in c["slices"]:
                    out.append(f"    [{s['index']:>4}] offset {s['offset']:#x} lru {s['lru-counter']} "
                               f"ref {s['ref']}{' dirty' if s['dirty'] else ''}")
    return "\n".join(out) + "\n"


def coroutines(d: dict[str, Any], pools: bool = False) -> str:
    out = []
    if not d["coroutines"]:
        out.append("no coroutine in flight")
    for i, c in enumerate(d["coroutines"]):
        thr = f" thread {c['thread']}" if c["thread"] else ""
        waits = c.get("waits-on")
        waits = f" waits on {waits}" if waits and waits != c["source"] else ""
        out.append(f"[{i}] {c['address']:#x} {c['source']}{thr} entry {c['entry']} "
                   f"locks {c['locks-held']}{' caller ' + hex(c['caller']) if c['caller'] else ''}{waits}")
    if not pools and "backtrace" not in d:
        out.append(f"({d['pooled']} free coroutine(s) in the pools: --pools)")
    out += [f"note: {n}" for n in d["notes"]]
    bt = d.get("backtrace")
    if bt:
        out.append(f"coroutine {bt['coroutine']:#x}:")
        for f in bt["frames"]:
            loc = f" at {f['file']}:{f['line']}" if f["file"] else ""
            out.append(f"  #{f['level']:<2} {f['pc']:#018x} in {f['function'] or '??'}{loc}")
    return "\n".join(out) + "\n"
