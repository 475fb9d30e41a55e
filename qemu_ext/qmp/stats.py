"""KVM statistics of a running QEMU through QMP query-stats, as rates (like the kernel's kvm_stat).

``await stats(session, target, interval) -> StatsReport``: two query-stats samples ``interval``
seconds apart; cumulative statistics become deltas and rates per second, units come from
query-stats-schemas (unit, base, exponent). Rows are in a stable order (provider, name), so that
a refreshing view does not reorder them. Needs KVM (QEMU 7.1 and later; checked on 7.2 and 10.0).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Optional

from qemu_ext.errors import BadInputError, NotAvailableError
from qemu_ext.qmp.client import QmpSession
from qemu_ext.qmp.errors import QmpCommandError

TARGETS = ("vm", "vcpu")


@dataclass
class StatRow:
    name: str
    provider: str
    type: str  # cumulative | instant | peak | linear-histogram | log2-histogram
    unit: str  # human unit ("", "ns", "bytes", "boolean", ...)
    value: Any  # value at the second sample (sum over vCPUs for target vcpu)
    delta: Optional[float] = None  # cumulative: the difference between the two samples
    rate: Optional[float] = None  # delta per second, in ``unit``
    per_vcpu: Optional[dict[str, Any]] = None  # vcpu target: cpu-index -> rate (cumulative) or value

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "provider": self.provider, "type": self.type, "unit": self.unit,
                "value": self.value, "delta": self.delta, "rate": self.rate, "per-vcpu": self.per_vcpu}


@dataclass
class StatsReport:
    target: str
    interval: float  # seconds between the two samples, as measured
    rows: list[StatRow]
    vcpus: list[str]  # cpu-index of each vCPU (vcpu target), in order

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "interval-seconds": self.interval, "vcpus": self.vcpus,
                "rows": [r.to_dict() for r in self.rows]}


def unit_label(schema: dict[str, Any]) -> str:
    """query-stats-schemas unit/base/exponent -> a short label: seconds 10^-9 -> ns, bytes 2^10 -> KiB."""
    unit = schema.get("unit", "")
    base = schema.get("base", 10)
    exp = int(schema.get("exponent", 0))
    if not exp:
        return unit
    if unit == "seconds" and base == 10:
        return {-9: "ns", -6: "µs", -3: "ms"}.get(exp, f"10^{exp} s")
    if unit == "bytes" and base == 2:
        return {10: "KiB", 20: "MiB", 30: "GiB"}.get(exp, f"2^{exp} bytes")
    return f"{base}^{exp} {unit}".strip()


def _flatten(results: list[dict[str, Any]], cpu_of: dict[str, int]) -> dict[tuple[str, str], dict[str, Any]]:
    """(provider, name) -> {"total": v, "per": {cpu: v}} ."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for res in results:
        who = str(cpu_of.get(res.get("qom-path", ""), res.get("qom-path", "")))
        for st in res.get("stats", []):
            key = (res["provider"], st["name"])
            slot = out.setdefault(key, {"total": None, "per": {}})
            v = st["value"]
            slot["per"][who] = v
            if isinstance(v, bool):
                slot["total"] = bool(slot["total"]) or v
            elif isinstance(v, (int, float)):
                slot["total"] = (slot["total"] or 0) + v
            elif isinstance(v, list):
                slot["total"] = sum(v) + (slot["total"] or 0)
    return out


async def stats(s: QmpSession, target: str = "vm", interval: float = 1.0) -> StatsReport:
    """Two query-stats samples ``interval`` seconds apart; cumulative stats as deltas per second."""
    if target not in TARGETS:
        raise BadInputError(f"stats target must be vm or vcpu, not {target!r}")
    if not 0 < interval <= 3600:
        raise BadInputError("stats interval must be between 0 and 3600 seconds")
    try:
        schemas = await s.execute("query-stats-schemas")
    except QmpCommandError as exc:
        raise NotAvailableError(f"this QEMU has no query-stats: {exc.desc}") from exc
    meta: dict[tuple[str, str], dict[str, Any]] = {}
    for prov in schemas:
        if prov.get("target") != target:
            continue
        for st in prov.get("stats", []):
            meta[(prov["provider"], st["name"])] = st
    if not meta:
        raise NotAvailableError(f"QEMU offers no {target} statistics (query-stats needs KVM)")
    cpu_of: dict[str, int] = {}
    if target == "vcpu":
        for c in await s.execute("query-cpus-fast"):
            cpu_of[c["qom-path"]] = c["cpu-index"]
    t0 = time.monotonic()
    first = _flatten(await s.execute("query-stats", {"target": target}), cpu_of)
    await asyncio.sleep(interval)
    second = _flatten(await s.execute("query-stats", {"target": target}), cpu_of)
    dt = time.monotonic() - t0
    rows = []
    for key, now in second.items():
        m = meta.get(key, {})
        kind = m.get("type", "instant")
        row = StatRow(key[1], key[0], kind, unit_label(m), now["total"])
        prev = first.get(key)
        total = now["total"]
        if kind == "cumulative" and prev and isinstance(total, (int, float)) and not isinstance(total, bool):
            row.delta = total - (prev["total"] or 0)
            row.rate = row.delta / dt
            if target == "vcpu":
                row.per_vcpu = {k: (v - prev["per"].get(k, 0)) / dt for k, v in now["per"].items()
                                if isinstance(v, (int, float))}
        elif target == "vcpu":
            row.per_vcpu = dict(now["per"])
        rows.append(row)
    rows.sort(key=lambda r: (r.provider, r.name))
    vcpus = [str(i) for i in sorted(cpu_of.values())]
    return StatsReport(target, round(dt, 3), rows, vcpus)
