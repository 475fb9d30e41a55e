"""`qcow2 [NODE]`: the live L2-table and refcount-block caches of each qcow2 node.

Reads BDRVQcow2State (bs->opaque) of every qcow2 BlockDriverState on all_bdrv_states and its two
Qcow2Cache objects (block/qcow2-cache.c, 7.2 and 10.0): size, entry size, entries in use, dirty
entries, the LRU counter, the cached slice offsets, and how much they cover.
"""

from __future__ import annotations

import os
import struct
from typing import Any, Optional

from qemu_ext.host import procfs

from . import block, common
from .target import CachedType, IntrospectError, Target, Value

QCOW2_CACHE = CachedType("Qcow2Cache")
QCOW2_CACHED_TABLE = CachedType("Qcow2CachedTable")
BDRV_QCOW2_STATE = CachedType("BDRVQcow2State")

MAX_CACHE_ENTRIES = 1 << 24

common.register("qcow2", "Live L2-table and refcount-block cache state of each qcow2 node",
                [common.needs_debug_info])


def read_cache(t: Target, cache: Value, covers_per_entry: int) -> Optional[dict[str, Any]]:
    """One Qcow2Cache: its settings and every cached table, read in one memory read."""
    if cache.is_null():
        return None
    c = cache.as_pointer_to(QCOW2_CACHE.get(t))
    size = int(c["size"])
    table_size = int(c["table_size"])
    if not 0 <= size <= MAX_CACHE_ENTRIES:
        raise IntrospectError(f"Qcow2Cache at {cache.ptr():#x} claims {size} entries: corrupt")
    et = QCOW2_CACHED_TABLE.get(t)
    off = {n: et.offset(n) for n in ("offset", "lru_counter", "ref", "dirty")}
    esz = et.size
    raw = t.read(c["entries"].ptr(), size * esz) if size else b""
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
        "entries": size, "entry-size": table_size, "cache-size": size * table_size, "entries-in-use": len(slices),
        "dirty-entries": dirty, "referenced-entries": referenced, "lru-counter": int(c["lru_counter"]),
        "cache-clean-lru-counter": int(c["cache_clean_lru_counter"]),
        "depends-on": c["depends"].ptr() or None, "depends-on-flush": c["depends_on_flush"].bool(),
        "covers-per-entry": covers_per_entry, "covers-in-use": covers_per_entry * len(slices),
        "covers-at-most": covers_per_entry * size, "slices": slices,
    }


def _matches(t: Target, node: str, node_name: str, device: Optional[str], filename: str) -> bool:
    """A node named by node name, -drive id, or file name: as given to QEMU, or the same file by
    another path (QEMU opened "d0.qcow2" relative to its own working directory)."""
    if node in (node_name, device) or node == filename:
        return True
    if not filename:
        return False
    path = filename
    if not os.path.isabs(path) and t.kind == "live" and t.pid is not None:
        try:
            path = os.path.join(procfs.cwd(t.pid), path)
        except OSError:
            return False
    try:
        return os.path.realpath(node) == os.path.realpath(path)
    except (OSError, ValueError):
        return False


def collect(t: Target, node: Optional[str] = None) -> dict[str, Any]:
    """The qcow2 nodes (all, or the one named) and their caches."""
    names = block.backends(t)
    out = []
    seen_any = []
    for bsp in block.bdrv_states(t):
        bs = bsp.deref()
        fmt = block.format_name(bs)
        node_name = bs["node_name"].cstring()
        device = names.get(bsp.ptr())
        filename = bs["filename"].cstring(4096)
        seen_any.append(f"{node_name}({fmt})")
        if fmt != "qcow2":
            continue
        if node is not None and not _matches(t, node, node_name, device, filename):
            continue
        s = bs["opaque"].as_pointer_to(BDRV_QCOW2_STATE.get(t))
        cluster_size = int(s["cluster_size"])
        l2_slice_size = int(s["l2_slice_size"])
        refcount_block_size = int(s["refcount_block_size"])
        virtual_size = int(bs["total_sectors"]) * 512
        l2 = read_cache(t, s["l2_table_cache"], l2_slice_size * cluster_size)
        rc = read_cache(t, s["refcount_block_cache"], refcount_block_size * cluster_size)
        if l2 is not None:
            l2["l2-entry-size"] = l2["entry-size"] // l2_slice_size if l2_slice_size else None
            l2["coverage"] = min(1.0, l2["covers-in-use"] / virtual_size) if virtual_size else None
            l2["max-coverage"] = min(1.0, l2["covers-at-most"] / virtual_size) if virtual_size else None
        out.append({
            "node-name": node_name, "device": device, "filename": filename, "virtual-size": virtual_size,
            "cluster-size": cluster_size, "refcount-bits": int(s["refcount_bits"]), "l2-slice-size": l2_slice_size,
            "l1-size": int(s["l1_size"]), "cache-clean-interval": int(s["cache_clean_interval"]),
            "l2-cache": l2, "refcount-cache": rc,
        })
    if node is not None and not out:
        raise IntrospectError(f"no qcow2 node named {node!r} (nodes: {', '.join(seen_any) or 'none'})")
    return {"nodes": out}
