"""`virtopt qcow2 [NODE]`: the live L2-table and refcount-block caches of each qcow2 node.

Reads BDRVQcow2State (bs->opaque) of every qcow2 BlockDriverState on all_bdrv_states
and its two Qcow2Cache objects (block/qcow2-cache.c): size, entry size, entries in use,
dirty entries, the LRU counter, the cached slice offsets, and how much they cover.
"""

from __future__ import annotations

import argparse
import struct
from typing import Any, Optional

import gdb

from . import block, core

MAX_CACHE_ENTRIES = 1 << 24


def _field_offsets(t: gdb.Type) -> dict[str, int]:
    return {f.name: f.bitpos // 8 for f in t.strip_typedefs().fields()}


def read_cache(cache: gdb.Value, covers_per_entry: int) -> Optional[dict[str, Any]]:
    """One Qcow2Cache: its settings and every cached table, read in one memory read."""
    if not core.ptr(cache):
        return None
    c = cache.cast(core.CachedType("Qcow2Cache").pointer()).dereference()
    size = int(c["size"])
    table_size = int(c["table_size"])
    if not 0 <= size <= MAX_CACHE_ENTRIES:
        raise core.VirtoptGdbError(f"Qcow2Cache at {core.ptr(cache):#x} claims {size} entries: corrupt")
    et = core.CachedType("Qcow2CachedTable").get()
    off = _field_offsets(et)
    esz = et.sizeof
    raw = core.read(core.ptr(c["entries"]), size * esz) if size else b""
    slices = []
    dirty = referenced = 0
    for i in range(size):
        base = i * esz
        offset = struct.unpack_from("<q", raw, base + off["offset"])[0]
        lru = struct.unpack_from("<Q", raw, base + off["lru_counter"])[0]
        ref = struct.unpack_from("<i", raw, base + off["ref"])[0]
        is_dirty = raw[base + off["dirty"]] != 0
        dirty += is_dirty
        referenced += ref > 0
        if offset:
            slices.append({"index": i, "offset": offset, "lru-counter": lru, "ref": ref, "dirty": is_dirty})
    slices.sort(key=lambda s: -s["lru-counter"])
    return {
        "entries": size,
        "entry-size": table_size,
        "cache-size": size * table_size,
        "entries-in-use": len(slices),
        "dirty-entries": dirty,
        "referenced-entries": referenced,
        "lru-counter": int(c["lru_counter"]),
        "cache-clean-lru-counter": int(c["cache_clean_lru_counter"]),
        "depends-on": core.ptr(c["depends"]) or None,
        "depends-on-flush": bool(c["depends_on_flush"]),
        "covers-per-entry": covers_per_entry,
        "covers-in-use": covers_per_entry * len(slices),
        "covers-at-most": covers_per_entry * size,
        "slices": slices,
    }


def qcow2_nodes(node: Optional[str] = None) -> list[dict[str, Any]]:
    """The qcow2 nodes (all, or the one named by node name, -drive id or file name) and their caches."""
    names = block.backends()
    out = []
    seen_any = []
    for bsp in block.bdrv_states():
        bs = bsp.dereference()
        fmt = block.format_name(bs)
        node_name = core.cstr(bs["node_name"])
        device = names.get(core.ptr(bsp))
        filename = core.cstr(bs["filename"], 4096)
        seen_any.append(f"{node_name}({fmt})")
        if fmt != "qcow2":
            continue
        if node is not None and node not in (node_name, device, filename):
            continue
        s = bs["opaque"].cast(core.CachedType("BDRVQcow2State").pointer()).dereference()
        cluster_size = int(s["cluster_size"])
        l2_slice_size = int(s["l2_slice_size"])
        refcount_block_size = int(s["refcount_block_size"])
        virtual_size = int(bs["total_sectors"]) * 512
        l2 = read_cache(s["l2_table_cache"], l2_slice_size * cluster_size)
        rc = read_cache(s["refcount_block_cache"], refcount_block_size * cluster_size)
        if l2 is not None:
            l2["l2-entry-size"] = l2["entry-size"] // l2_slice_size if l2_slice_size else None
            l2["coverage"] = min(1.0, l2["covers-in-use"] / virtual_size) if virtual_size else None
            l2["max-coverage"] = min(1.0, l2["covers-at-most"] / virtual_size) if virtual_size else None
        out.append({
            "node-name": node_name,
            "device": device,
            "filename": filename,
            "virtual-size": virtual_size,
            "cluster-size": cluster_size,
            "refcount-bits": int(s["refcount_bits"]),
            "l2-slice-size": l2_slice_size,
            "l1-size": int(s["l1_size"]),
            "cache-clean-interval": int(s["cache_clean_interval"]),
            "l2-cache": l2,
            "refcount-cache": rc,
        })
    if node is not None and not out:
        raise core.VirtoptGdbError(
            f"no qcow2 node named {node!r} (nodes: {', '.join(seen_any) or 'none'})")
    return out


def _size(n: int) -> str:
    from qemu_ext.output import human_size

    return human_size(n)


@core.needs_debug_info
class Qcow2Command(core.VirtoptCommand):
    name = "qcow2"
    summary = "Live L2-table and refcount-block cache state of each qcow2 node (size, use, dirty, coverage)."
    epilog = "examples:\n  virtopt qcow2\n  virtopt qcow2 drive0 --slices\n  virtopt qcow2 --json"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("node", nargs="?", metavar="NODE", help="node name, -drive id, or image file name")
        p.add_argument("--slices", action="store_true", help="list every cached slice (offset, LRU, ref, dirty)")

    def collect(self, args: argparse.Namespace) -> Any:
        return {"nodes": qcow2_nodes(args.node)}

    def render(self, d: Any, args: argparse.Namespace) -> None:
        if not d["nodes"]:
            gdb.write("no qcow2 node in this QEMU\n")
        for n in d["nodes"]:
            dev = f" (device {n['device']})" if n["device"] else ""
            gdb.write(f"{n['node-name']}{dev}: {n['filename']}\n")
            gdb.write(f"  virtual size {_size(n['virtual-size'])}, cluster {_size(n['cluster-size'])}, "
                      f"refcount bits {n['refcount-bits']}, cache-clean-interval {n['cache-clean-interval']} s\n")
            for label, c in (("L2 cache", n["l2-cache"]), ("refcount cache", n["refcount-cache"])):
                if c is None:
                    gdb.write(f"  {label}: none\n")
                    continue
                cov = ""
                if "coverage" in c and c["coverage"] is not None:
                    cov = f", {c['coverage'] * 100:.2f}% of the disk now (max {c['max-coverage'] * 100:.2f}%)"
                gdb.write(f"  {label}: {c['entries']} x {_size(c['entry-size'])} = {_size(c['cache-size'])}; "
                          f"{c['entries-in-use']} in use, {c['dirty-entries']} dirty, lru counter {c['lru-counter']}; "
                          f"covers {_size(c['covers-in-use'])} of {_size(c['covers-at-most'])}{cov}\n")
                if args.slices:
                    for s in c["slices"]:
                        gdb.write(f"    [{s['index']:>4}] offset {s['offset']:#x} lru {s['lru-counter']} "
                                  f"ref {s['ref']}{' dirty' if s['dirty'] else ''}\n")


def register() -> None:
    Qcow2Command()
