"""L2-cache advice for a libvirt domain: the disk behind a node, and the recommendation the domain
XML can keep.

libvirt has one knob for the qcow2 caches, a disk's ``<driver><metadata_cache><max_size>``, which
it passes to QEMU as ``cache-size`` (qemu_ext.libvirt.cache; libvirt 9.0). With cache-size alone
QEMU chooses the L2 cache's entry size itself (read_cache_sizes, block/qcow2.c, 7.2 and 10.0):
``MIN(cluster_size, 4 KiB)`` while the L2 cache does not cover the whole disk, the cluster size
when it does. So on a domain the recommendation is the smallest L2 cache *with those entries*
that reaches the target: the recommended size of the 4 KiB curve while it is below full
coverage, else full coverage. A smaller cache with other entries (l2-cache-entry-size) could be
set live with blockdev-reopen but would be lost at the next start, since libvirt cannot write
it: it is reported beside, never applied. ``tune --apply`` on a domain reopens the node with
exactly the ``cache-size`` the XML advice holds, so what runs live is what the domain gets
after the XML change and a restart.

Nothing here sends a monitor command (no taint): the disks come from libvirt's live domain XML
through a read-only connection.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from qemu_ext.l2cache import options as O

ENTRY_CAP = 4096  # read_cache_sizes: "If the L2 cache is not enough to cover the whole disk then default to 4KB entries"


def session_monitor(s: Any) -> Any:
    """The qemu_ext.libvirt.monitor.DomainMonitor behind a QMP session on a ``libvirt:NAME`` address
    (None for a socket). No import of the libvirt code for sockets: a LibvirtTransport exists only
    once its module was loaded."""
    mod = sys.modules.get("qemu_ext.libvirt.transport")
    t = getattr(s, "transport", None)
    if mod is None or not isinstance(t, mod.LibvirtTransport):
        return None
    return t.monitor


@dataclass
class DomainDisk:
    """One disk of a running domain, as its live XML gives it."""

    domain: str
    uri: str
    target: Optional[str]  # "vda"
    alias: Optional[str]  # "virtio-disk0"
    source: Optional[str]
    max_size: Optional[int]  # bytes of <metadata_cache><max_size> it runs with (None: no element)
    log: str  # /var/log/libvirt/qemu/NAME.log: QEMU's stderr through virtlogd

    def to_dict(self) -> dict[str, Any]:
        return {"domain": self.domain, "uri": self.uri, "target": self.target, "alias": self.alias,
                "source": self.source, "metadata-cache-max-size": self.max_size, "log": self.log}


def _disks(uri: str, name: str) -> list[Any]:
    from qemu_ext.libvirt import conn as lvconn
    from qemu_ext.libvirt import xml as lvxml

    c, dom = lvconn.open_domain(name, uri, read_only=True)
    try:
        return lvxml.parse(dom.XMLDesc(0)).disks
    finally:
        c.close()


async def domain_disks(s: Any) -> list[Any]:
    """The disks (qemu_ext.libvirt.xml.Disk) of the domain behind session ``s``; [] for a socket."""
    m = session_monitor(s)
    if m is None:
        return []
    return await asyncio.get_running_loop().run_in_executor(None, _disks, m.uri, m.domain_name)


def disk_of(monitor: Any, disks: Sequence[Any], query_block: Sequence[dict[str, Any]], node_name: str,
            filename: str) -> DomainDisk:
    """The domain disk whose format node is ``node_name`` (by query-block's qdev and libvirt's
    <alias>, else by its image file)."""
    from qemu_ext.libvirt import domain as lvdomain
    from qemu_ext.libvirt import nodes as lvnodes

    found = None
    for bn in lvnodes.block_nodes(query_block, disks):
        if bn.node_name == node_name:
            found = next((d for d in disks if d.target == bn.target), None)
    if found is None:
        found = next((d for d in disks if d.source == filename), None)
    return DomainDisk(monitor.domain_name, monitor.uri, getattr(found, "target", None), getattr(found, "alias", None),
                      getattr(found, "source", None) or filename, getattr(found, "metadata_cache_max_size", None),
                      str(lvdomain.log_path(monitor.domain_name)))


def libvirt_entry_size(cluster_size: int, l2_cache_size: int, max_l2_cache: int) -> int:
    """The entry size QEMU picks when only cache-size is given (read_cache_sizes, 7.2 and 10.0)."""
    return cluster_size if l2_cache_size >= max_l2_cache else min(cluster_size, ENTRY_CAP)


def recommendation(curves: dict[str, Any], info: Any, target: float, disk: DomainDisk,
                   unconstrained: Optional[dict[str, Any]] = None) -> tuple[Optional[dict[str, Any]], list[str]]:
    """The recommendation for a domain (see the module docstring) from a curve() result of the
    node's lookups, with its <metadata_cache> advice (qemu_ext.libvirt.cache.metadata_cache_for)
    under ``"libvirt"``, and notes. ``unconstrained``: the recommendation without libvirt's limit; kept
    as ``"without-libvirt"`` when it needs less memory. None when the curves hold no lookup."""
    from qemu_ext.libvirt.cache import metadata_cache_for

    cs, vsize, ext, ver = info.cluster_size, info.virtual_size, info.extended_l2, info.qemu_version
    full = O.full_coverage_size(cs, vsize, ext)
    by_entry = {s["l2-cache-entry-size"]: s for s in curves.get("curves", [])}
    if not by_entry:
        return None, []
    notes: list[str] = []
    small = min(cs, ENTRY_CAP)
    size = None
    s_small = by_entry.get(small)
    if s_small is not None:
        m = s_small["marks"]["recommended"]
        if m is not None and m["l2-cache-size"] < full:
            size = int(m["l2-cache-size"])
        elif m is None:
            notes.append(f"no L2 cache of {small}-byte entries below full coverage reaches a warm hit ratio of "
                         f"{target}: the recommendation for the domain is full coverage")
    else:
        why = next((n["reason"] for n in curves.get("not-evaluated", []) if n["l2-cache-entry-size"] == small), "")
        notes.append(f"below full coverage, the cache-size libvirt sets gives {small}-byte L2 cache entries, and "
                     f"this capture cannot evaluate those{' (' + why + ')' if why else ''}: the recommendation for the "
                     "domain is full coverage")
    if size is None:
        size = full
    adv = metadata_cache_for(size, cs, vsize, target=disk.target or "vda", domain=disk.domain, extended_l2=ext,
                             qemu_version=ver)
    cfg = O.resolve(cs, vsize, ext, cache_size=adv.max_size, qemu_version=ver)
    series = by_entry.get(cfg.l2_cache_entry_size)
    cv = series["_curve"] if series is not None else None
    rec = {
        "l2-cache-entry-size": cfg.l2_cache_entry_size,
        "l2-cache-size": cfg.l2_cache_size,
        "entries": cfg.l2_cache_entries,
        "hit-ratio": round(cv.hit_ratio(cfg.l2_cache_entries), 6) if cv is not None else None,
        "warm-hit-ratio": round(cv.warm_hit_ratio(cfg.l2_cache_entries), 6) if cv is not None else None,
        "memory": cfg.l2_memory,
        "exact": bool(cv.exact) if cv is not None else None,
        "cache-size": adv.max_size,
        "refcount-cache-size": cfg.refcount_memory,
        "options": O.option_text(cfg.l2_cache_size, None, info.filename, info.node_name, cs, vsize, ext, ver),
        "libvirt": adv.to_dict(),
    }
    u = unconstrained
    if u is not None and u["memory"] < rec["memory"]:
        # what QEMU alone could do (with l2-cache-entry-size, which the domain would lose at its next start)
        rec["without-libvirt"] = {k: u[k] for k in ("l2-cache-size", "l2-cache-entry-size", "entries", "memory",
                                                    "warm-hit-ratio", "hit-ratio")}
    return rec, notes


async def disk_for(s: Any, info: Any) -> Optional[DomainDisk]:
    """The domain disk of node ``info`` (a NodeCache) when session ``s`` reaches a libvirt domain; None
    for a socket."""
    m = session_monitor(s)
    if m is None:
        return None
    disks = await domain_disks(s)
    return disk_of(m, disks, await s.execute("query-block"), info.node_name, info.filename)
