"""Text rendering of QMP replies, events and built-in results (the shell and `virtopt shell -c` use it)."""

from __future__ import annotations

import json
from typing import Any, Sequence

from qemu_ext.output import human_size


def dumps(obj: Any, pretty: bool = False) -> str:
    """qmp-shell's printing: compact JSON, or indented and key-sorted with -p."""
    return json.dumps(obj, indent=4 if pretty else None, sort_keys=pretty)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = []
    for r in cells:
        parts = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(r)]
        out.append("  ".join(parts).rstrip())
    return "\n".join(out)


def trace_states(events: Sequence[Any]) -> str:
    if not events:
        return "(no trace event matches)"
    return table(["EVENT", "STATE"], [[e.name, e.state] for e in events])


def trace_file_status(st: Any) -> str:
    text = f'trace file "{st.file}" {"on" if st.enabled else "off"}'
    return text


def capture(res: Any) -> str:
    lines = [f"captured {res.total} events in {res.seconds:g} s ({res.backend} backend) -> {res.file}"]
    if res.counts:
        lines.append(table(["EVENT", "COUNT"], [[k, v] for k, v in res.counts.items()], right=(1,)))
    if res.l2cache:
        sim = res.l2cache
        o = sim["observed"]
        lines.append(f"L2 lookups seen: {o['lookups']} ({o['hits']} hits, {o['misses']} misses, "
                     f"hit ratio {o['hit_ratio']:.1%})")
        cur, full = sim.get("simulated_current"), sim.get("simulated_full_coverage")
        if cur and full:
            lines.append(f"simulated for {sim['node']}: current cache ({cur['l2_cache_entries']} x "
                         f"{human_size(cur['l2_cache_entry_size'])}) {cur['misses']} misses, hit ratio "
                         f"{cur['hit_ratio']:.1%}; full coverage (l2-cache-size={full['l2_cache_size']}) "
                         f"{full['misses']} misses, hit ratio {full['hit_ratio']:.1%}")
    for n in res.notes:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def _rate(v: Any) -> str:
    if v is None:
        return ""
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def stats(rep: Any, all_rows: bool = False) -> str:
    rows = rep.rows if all_rows else [r for r in rep.rows if r.rate or (r.rate is None and r.value)]
    head = f"{rep.target} stats over {rep.interval:g} s"
    if not rows:
        return head + ": nothing changed"
    body = []
    for r in rows:
        unit = r.unit if r.unit and r.unit != "boolean" else ""
        if r.type.endswith("histogram"):
            unit = f"samples ({r.unit} buckets)" if r.unit else "samples"
        per = ""
        if r.per_vcpu and r.rate is not None:
            per = " ".join(f"{k}:{_rate(v)}" for k, v in sorted(r.per_vcpu.items(), key=lambda kv: str(kv[0])))
        val = r.value if not isinstance(r.value, list) else f"hist({sum(r.value)})"
        body.append([r.name, _rate(r.rate) if r.rate is not None else "", val, unit, per])
    headers = ["STAT", "PER SECOND", "TOTAL", "UNIT", "PER VCPU /s" if rep.target == "vcpu" else ""]
    return head + "\n" + table(headers, body, right=(1, 2))


def threads(items: Sequence[dict[str, Any]]) -> str:
    return table(
        ["TID", "NAME", "ROLE", "LAST CPU", "AFFINITY"],
        [[t.get("tid"), t.get("name"), t.get("label", t.get("role")), t.get("last-cpu"), t.get("affinity")]
         for t in items],
        right=(0, 3),
    )


def mtree(m: Any) -> str:
    width = 4 if m.space == "io" else 16
    what = "port" if m.space == "io" else "address"
    if not m.claimed:
        return (f"{what} {m.address:#x}: no device claims it (only the root container '{m.region}' of "
                f"address space {m.address_space} covers it; accesses are unassigned)")
    dev = m.device_type or "?"
    if m.device_id:
        dev += f" id={m.device_id}"
    lines = [
        f"{what} {m.address:#x} -> {m.region} ({m.start:0{width}x}-{m.end:0{width}x}), device {dev}"
        + (f" at {m.owner}" if m.owner else ""),
        f"  chain: {' > '.join(m.chain)}",
    ]
    if m.flat_region and m.flat_region != m.leaf:
        lines.append(f"  flat view dispatches to: {m.flat_region}")
    return "\n".join(lines)


def l2cache(items: Sequence[Any]) -> str:
    if not items:
        return "(no qcow2 node)"
    out = []
    for i in items:
        out.append(
            f"{i.node_name}: {i.filename} ({human_size(i.virtual_size)}, cluster {human_size(i.cluster_size)}"
            f"{', extended L2' if i.extended_l2 else ''})\n"
            f"  l2-cache-size {human_size(i.l2_cache_size)} in {i.l2_cache_entries} entries of "
            f"{human_size(i.l2_cache_entry_size)}, refcount-cache-size {human_size(i.refcount_cache_size)}, "
            f"cache-clean-interval {i.cache_clean_interval} s  [{i.settings_source}]\n"
            f"  covers {human_size(i.coverage)} of {human_size(i.virtual_size)}; "
            f"full coverage needs l2-cache-size={i.full_coverage_l2_cache_size}\n"
            f"  {i.recommendation}"
        )
    return "\n".join(out)
