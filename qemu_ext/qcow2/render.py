"""What qemu-img prints, rendered from the data the qcow2 library returns (the front-door side).

QEMU's JSON writer and QDict key order (qobject/json-writer.c, qobject/qdict.c), qemu-img info's
human text (block/qapi.c bdrv_image_info_dump / bdrv_node_info_dump), qemu-img check's summary
(qemu-img.c dump_human_image_check) and qemu-img map's two formats (qemu-img.c dump_map_entry),
each as QEMU 7.2 and 10.0 print them.
"""

from __future__ import annotations

import datetime
import re
from typing import Any, Iterator, Optional

from qemu_ext.output import count, human_size, percent


def _tdb_hash(name: str) -> int:
    """qobject/qdict.c tdb_hash(): QEMU's QDict bucket hash (unsigned 32-bit arithmetic)."""
    b = name.encode()
    value = (0x238F13AF * len(b)) & 0xFFFFFFFF
    for i, c in enumerate(b):
        value = (value + (c << (i * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


_ORDERS: dict[tuple[str, ...], list[str]] = {}


def qemu_key_order(obj: object) -> object:
    """Reorder dict keys the way QEMU prints a QDict: by hash bucket (of 512), and within a bucket
    the key inserted last first.  Dicts must be given in QAPI schema (insertion) order."""
    if isinstance(obj, dict):
        keys = tuple(obj)
        order = _ORDERS.get(keys)
        if order is None:
            idx = sorted(range(len(keys)), key=lambda i: (_tdb_hash(keys[i]) % 512, -i))
            order = _ORDERS[keys] = [keys[i] for i in idx]
        return {k: qemu_key_order(obj[k]) for k in order}
    if isinstance(obj, list):
        return [qemu_key_order(x) for x in obj]
    return obj


_PLAIN = re.compile(r'[ !#-\[\]-~]*\Z')  # printable ASCII without '"' and '\\': written as it is


def _qjson_str(s: str) -> str:
    """qobject/json-writer.c quoted_str(): escapes, and \\uXXXX (upper case) outside printable ASCII."""
    if _PLAIN.match(s):
        return '"' + s + '"'
    out = ['"']
    esc = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
    for ch in s:
        cp = ord(ch)
        if ch in esc:
            out.append(esc[ch])
        elif cp > 0xFFFF:
            out.append(f"\\u{0xD800 + ((cp - 0x10000) >> 10):04X}\\u{0xDC00 + ((cp - 0x10000) & 0x3FF):04X}")
        elif cp < 0x20 or cp >= 0x7F:
            out.append(f"\\u{cp:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _qjson(obj: object, depth: int, out: list[str]) -> None:
    if isinstance(obj, dict):
        pad = "\n" + " " * (4 * (depth + 1))
        out.append("{")
        first = True
        for k, v in obj.items():
            out.append(pad if first else "," + pad)
            first = False
            out.append(_qjson_str(str(k)))
            out.append(": ")
            _qjson(v, depth + 1, out)
        out.append("\n" + " " * (4 * depth) + "}")
    elif isinstance(obj, list):
        pad = "\n" + " " * (4 * (depth + 1))
        out.append("[")
        for i, v in enumerate(obj):
            out.append(pad if i == 0 else "," + pad)
            _qjson(v, depth + 1, out)
        out.append("\n" + " " * (4 * depth) + "]")
    elif isinstance(obj, bool):
        out.append("true" if obj else "false")
    elif obj is None:
        out.append("null")
    elif isinstance(obj, int):
        out.append(str(obj))
    elif isinstance(obj, float):
        out.append(repr(obj))
    else:
        out.append(_qjson_str(str(obj)))


def qemu_json_text(obj: object, depth: int = 0) -> str:
    """JSON exactly as QEMU's pretty JSON writer (qobject/json-writer.c) prints it."""
    out: list[str] = []
    _qjson(obj, depth, out)
    return "".join(out)


# ---------------------------------------------------------------- which QEMU's output to print
VERIFIED_COMPAT = ("7.2", "10.0")  # compared byte for byte with these qemu-img builds in the tests
# Where the output changed between them, from QEMU's sources (8.x and 9.x are not verified):
INFO_CHILDREN_SINCE = (8, 0)  # qemu-img info: BlockGraphInfo ("children", "Child node '/file':")
SNAPSHOT_LIST_2024_SINCE = (9, 1)  # bdrv_snapshot_dump(): "%-7s %-16s ..." columns, "--" icount
MAP_COMPRESSED_SINCE = (8, 2)  # qemu-img map --output=json: "compressed" after "data"
LUKS_DETACHED_HEADER_SINCE = (9, 0)  # QCryptoBlockInfoLUKS "detached-header"


def parse_compat(text: str) -> tuple[int, int]:
    """'7.2', '10.0', '9.2.1' -> (major, minor); ValueError for anything else."""
    parts = text.strip().split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts[:2]):
        raise ValueError(f"not a QEMU version: {text!r} (say e.g. 7.2 or 10.0)")
    return int(parts[0]), int(parts[1])


def qemu_img_on_path() -> Optional[tuple[int, int]]:
    """The version of the qemu-img the user would run (first on PATH), or None."""
    import re
    import shutil
    import subprocess

    exe = shutil.which("qemu-img")
    if exe is None:
        return None
    try:
        cp = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"version (\d+)\.(\d+)", cp.stdout)
    return (int(m.group(1)), int(m.group(2))) if m else None


# ---------------------------------------------------------------- qemu-img info
def info_for_compat(d: dict[str, Any], compat: tuple[int, int]) -> dict[str, Any]:
    """One image's qemu-img info fields as that QEMU prints them (QAPI order, then QDict order)."""
    d = dict(d)
    enc = d.get("format-specific", {}).get("data", {}).get("encrypt")
    if enc is not None and compat < LUKS_DETACHED_HEADER_SINCE and "detached-header" in enc:
        fs = dict(d["format-specific"], data=dict(d["format-specific"]["data"]))
        fs["data"]["encrypt"] = {k: v for k, v in enc.items() if k != "detached-header"}
        d["format-specific"] = fs
    children = d.pop("children", None)
    if compat >= INFO_CHILDREN_SINCE and children is not None:
        d["children"] = [{"name": c["name"], "info": {**c["info"], "children": []}} for c in children]
    o = qemu_key_order(d)
    assert isinstance(o, dict)
    return o


def _dump_qobject(indent: int, obj: Any, out: list[str]) -> None:
    """block/qapi.c dump_qobject(): the "Format specific information" rendering."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            comp = isinstance(v, (dict, list))
            out.append(f"{' ' * (indent * 4)}{k.replace('-', ' ')}:{chr(10) if comp else ' '}")
            _dump_qobject(indent + 1, v, out)
            if not comp:
                out.append("\n")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            comp = isinstance(v, (dict, list))
            out.append(f"{' ' * (indent * 4)}[{i}]:{chr(10) if comp else ' '}")
            _dump_qobject(indent + 1, v, out)
            if not comp:
                out.append("\n")
    elif isinstance(obj, bool):
        out.append("true" if obj else "false")
    else:
        out.append(str(obj))


def _snapshot_lines(snaps: list[dict[str, Any]], compat: tuple[int, int], ind: str) -> list[str]:
    """bdrv_snapshot_dump() header and rows (block/qapi.c; the 2024 layout since 9.1)."""
    new = compat >= SNAPSHOT_LIST_2024_SINCE
    if new:
        out = [f"{ind}{'ID':<7} {'TAG':<16} {'VM_SIZE':>8} {'DATE':>19} {'VM_CLOCK':>15} {'ICOUNT':>10}\n"]
    else:
        out = [f"{ind}{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}\n"]
    for sn in snaps:
        date = datetime.datetime.fromtimestamp(sn["date-sec"]).strftime("%Y-%m-%d %H:%M:%S")
        total_ns = sn["vm-clock-sec"] * 1_000_000_000 + sn["vm-clock-nsec"]
        secs = total_ns // 1_000_000_000
        ms = (total_ns // 1_000_000) % 1000
        hours = f"{secs // 3600:04d}" if new else f"{secs // 3600:02d}"
        clock = f"{hours}:{secs // 60 % 60:02d}:{secs % 60:02d}.{ms:03d}"
        icount = str(sn["icount"]) if "icount" in sn else ("--" if new else "")
        size = human_size(sn["vm-state-size"])
        if new:
            out.append(f"{ind}{sn['id']:<7} {sn['name']:<16} {size:>8} {date:>19} {clock:>15} {icount:>10}\n")
        else:
            out.append(f"{ind}{sn['id']:<9} {sn['name']:<16} {size:>8}{date:>20}{clock:>13}{icount:>11}\n")
    return out


def _node_info_lines(d: dict[str, Any], compat: tuple[int, int], indentation: int, protocol: bool) -> list[str]:
    """bdrv_image_info_dump() (7.2) / bdrv_node_info_dump() (10.0) for one node."""
    ind = " " * (4 * indentation)
    protocol = protocol and indentation > 0
    out = [
        f"{ind}{'filename' if protocol else 'image'}: {d['filename']}\n",
        f"{ind}{'protocol type' if protocol else 'file format'}: {d['format']}\n",
        f"{ind}{'file length' if protocol else 'virtual size'}: {human_size(d['virtual-size'])} "
        f"({d['virtual-size']} bytes)\n",
        f"{ind}disk size: {human_size(d['actual-size']) if 'actual-size' in d else 'unavailable'}\n",
    ]
    if d.get("encrypted"):
        out.append(f"{ind}encrypted: yes\n")
    if "cluster-size" in d:
        out.append(f"{ind}cluster_size: {d['cluster-size']}\n")
    if d.get("dirty-flag"):
        out.append(f"{ind}cleanly shut down: no\n")
    if "backing-filename" in d:
        bf = d["backing-filename"]
        full = d.get("full-backing-filename")
        line = f"{ind}backing file: {bf}"
        if full is None:
            line += " (cannot determine actual path)"
        elif full != bf:
            line += f" (actual path: {full})"
        out.append(line + "\n")
        if "backing-filename-format" in d:
            out.append(f"{ind}backing file format: {d['backing-filename-format']}\n")
    if d.get("snapshots"):
        out.append(f"{ind}Snapshot list:\n")
        out += _snapshot_lines(d["snapshots"], compat, ind)
    fs = d.get("format-specific")
    if fs:
        data = qemu_key_order(fs["data"])
        if compat < INFO_CHILDREN_SINCE:
            out.append("Format specific information:\n")
            _dump_qobject(1, data, out)
        elif data:  # bdrv_image_info_specific_dump(): nothing for an empty dump
            out.append(f"{ind}Format specific information:\n")
            _dump_qobject(indentation + 1, data, out)
    return out


def info_human(d: dict[str, Any], compat: tuple[int, int]) -> str:
    """qemu-img info's text for one image (qemu-img.c dump_human_image_info), without the final newline."""
    d = info_for_compat(d, compat)
    out = _node_info_lines(d, compat, 0, False)
    if compat >= INFO_CHILDREN_SINCE:
        for c in d.get("children", []):
            out.append(f"Child node '/{c['name']}':\n")
            out += _node_info_lines(c["info"], compat, 1, True)
    return "".join(out).rstrip("\n")


def info_extras_human(x: dict[str, Any]) -> list[str]:
    """virtopt's own lines after qemu-img's (what qemu-img info does not show)."""
    lines = ["virtopt (not shown by qemu-img):"]
    lines.append(f"    version {x['version']}, header length {x['header-length']}, L2 entry size {x['l2-entry-size']}")
    lines.append(f"    L2 tables allocated: {x['l2-tables-allocated']} (+{x['l2-tables-snapshots-only']} only in "
                 f"snapshots), refcount blocks: {x['refcount-blocks']}")
    lines.append(f"    metadata: {human_size(x['metadata-bytes'])} ({x['metadata-bytes']} bytes)")
    lines.append(f"    clusters: {x['data-clusters']} data, {x['compressed-clusters']} compressed "
                 f"({human_size(x['compressed-bytes'])}), {x['zero-clusters']} zero, "
                 f"{x['zero-clusters-preallocated']} preallocated zero")
    lines.append(f"    fragmentation: {percent(x['fragmentation'])} ({count(x['fragmented-clusters'])} of "
                 f"{count(x['allocated-clusters'])} allocated clusters)")
    feats = x["features"]
    lines.append("    features: " + "; ".join(f"{k}: {', '.join(v) or '-'}" for k, v in feats.items()))
    lines.append(f"    header extensions: {', '.join(x['extensions']) or '-'}")
    for s in x["snapshots"]:
        if "error" in s:
            lines.append(f"    snapshot {s['id']} {s['name']}: {s['error']}")
            continue
        lines.append(f"    snapshot {s['id']} {s['name']}: references {human_size(s['referenced-bytes'])}, "
                     f"{human_size(s['exclusive-data-bytes'])} of data only it holds, {s['l2-tables']} L2 tables")
    for b in x["bitmaps"]:
        lines.append(f"    bitmap {b['name']}: granularity {human_size(b['granularity'])}, "
                     f"flags {','.join(b['flags']) or '-'}, {b['data-clusters']} data clusters")
    return lines


# ---------------------------------------------------------------- qemu-img check
def check_human(res: Any) -> str:
    """qemu-img check's summary on stdout (qemu-img.c dump_human_image_check, 7.2 and 10.0)."""
    out = []
    if not (res.corruptions or res.leaks or res.check_errors):
        out.append("No errors were found on the image.\n")
    else:
        if res.corruptions:
            out.append(f"\n{res.corruptions} errors were found on the image.\n"
                       "Data may be corrupted, or further writes to the image may corrupt it.\n")
        if res.leaks:
            out.append(f"\n{res.leaks} leaked clusters were found on the image.\n"
                       "This means waste of disk space, but no harm to data.\n")
        if res.check_errors:
            out.append(f"\n{res.check_errors} internal errors have occurred during the check.\n")
    if res.total_clusters and res.allocated_clusters:
        a, t = res.allocated_clusters, res.total_clusters
        out.append(f"{a}/{t} = {a * 100.0 / t:0.2f}% allocated, {res.fragmented_clusters * 100.0 / a:0.2f}% "
                   f"fragmented, {res.compressed_clusters * 100.0 / a:0.2f}% compressed clusters\n")
    if res.image_end_offset:
        out.append(f"Image end offset: {res.image_end_offset}\n")
    return "".join(out)


# ---------------------------------------------------------------- qemu-img map
def map_json(entries: list[Any], compat: tuple[int, int]) -> str:
    """Byte for byte what `qemu-img map --output=json` prints (qemu-img.c dump_map_entry)."""
    return "".join(map_json_lines(entries, compat))


def map_json_lines(entries: list[Any], compat: tuple[int, int]) -> Iterator[str]:
    """map_json() piece by piece (for big maps: no second copy of the whole text)."""
    with_compressed = compat >= MAP_COMPRESSED_SINCE
    n = len(entries)
    yield "["
    for i, e in enumerate(entries):
        s = (f'{{ "start": {e.start}, "length": {e.length}, "depth": {e.depth}, '
             f'"present": {"true" if e.present else "false"}, "zero": {"true" if e.zero else "false"}, '
             f'"data": {"true" if e.data else "false"}')
        if with_compressed:
            s += f', "compressed": {"true" if e.compressed else "false"}'
        if e.offset is not None:
            s += f', "offset": {e.offset}'
        yield s + ("},\n" if i < n - 1 else "}")
    yield "]\n"


def _hex(v: int) -> str:
    return f"{v:#x}" if v else "0"


def map_human(entries: list[Any]) -> tuple[str, Optional[str]]:
    """`qemu-img map` human output (data extents only) and the error qemu-img stops with, if any.

    Like qemu-img, the lines before a compressed (or encrypted) extent are printed, then it fails."""
    lines = [f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File"]
    for e in entries:
        if e.data and e.offset is None:
            return "\n".join(lines) + "\n", "File contains external, encrypted or compressed clusters."
        if e.data and not e.zero:
            lines.append(f"{_hex(e.start):<16}{_hex(e.length):<16}{_hex(e.offset or 0):<16}{e.filename or ''}")
    return "\n".join(lines) + "\n", None


# ---------------------------------------------------------------- virtopt qcow2 dump
_HEX_FIELDS = {"magic", "backing-file-offset", "backing-file-size", "l1-table-offset", "refcount-table-offset",
               "snapshot-offset"}
_FLAG_FIELDS = {"incompatible-features", "compatible-features", "autoclear-features"}
_BITMAP_FLAGS = {0x1: "in-use", 0x2: "auto"}
_PRINTABLE = set(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ \t\n\r\x0b\x0c")


def _kv(name: str, value: Any) -> str:
    return f"{name:<25} {value}"


def _bitmap_flags(v: int) -> str:
    bits = [_BITMAP_FLAGS.get(v & (1 << b), f"bit-{b}") for b in range(64) if v & (1 << b)]
    return f"{v:#x} ({bits})"


def _bitmap_lines(e: dict[str, Any], cluster_size: int) -> list[str]:
    """qcow2.py Qcow2BitmapDirEntry.dump(): the entry, then its table."""
    out = [_kv("Bitmap name", e["name"]), _kv("bitmap_table_offset", f"{e['bitmap-table-offset']:#x}"),
           _kv("bitmap_table_size", e["bitmap-table-size"]), _kv("flags", _bitmap_flags(e["flags"])),
           _kv("type", e["type"]), _kv("granularity_bits", e["granularity-bits"]),
           _kv("name_size", e["name-size"]), _kv("extra_data_size", e["extra-data-size"]),
           f"{'Bitmap table':<14} {'type':<15} {'size':<12} offset"]
    for r in e["table"]:
        size = cluster_size if r["type"] == "serialized" else 0
        out.append(f"{r['index']:<14} {r['type']:<15} {size:<12} {r['offset']}")
    return out


def _extension_lines(x: dict[str, Any], cluster_size: int) -> list[str]:
    """qcow2.py QcowHeaderExtension.dump()."""
    out = ["Header extension:", _kv("magic", f"{x['magic']:#x} ({x['name']})"), _kv("length", x["length"])]
    if "bitmap-directory" in x:
        import struct

        nb, res, size, off = struct.unpack(">IIQQ", bytes.fromhex(x["data"])[:24])
        out += [_kv("nb_bitmaps", nb), _kv("reserved32", res), _kv("bitmap_directory_size", f"{size:#x}"),
                _kv("bitmap_directory_offset", f"{off:#x}")]
        for e in x["bitmap-directory"]:
            out.append("")
            out += _bitmap_lines(e, cluster_size)
    else:
        data = bytes.fromhex(x["data"])
        text = f"'{data.decode('ascii')}'" if all(c in _PRINTABLE for c in data) else "<binary>"
        out.append(_kv("data", text))
    return out


def dump_human(d: dict[str, Any]) -> str:
    """`virtopt qcow2 dump` as text: header and extensions exactly as QEMU's
    tests/qemu-iotests/qcow2.py dump-header prints them, the tables as aligned columns."""
    what = d["what"]
    out: list[str] = []
    if what in ("header", "extensions"):
        if what == "header":
            for k, v in d["header"].items():
                name = k.replace("-", "_")
                if k in _HEX_FIELDS:
                    v = f"{v:#x}"
                elif k in _FLAG_FIELDS:
                    v = str([b for b in range(64) if v >> b & 1])
                out.append(_kv(name, v))
            out.append("")
        for x in d["extensions"]:
            out += _extension_lines(x, d["cluster-size"])
            out.append("")
        return "\n".join(out)
    if what == "snapshots":
        for s in d["snapshots"]:
            out += [_kv(k.replace("-", "_"), v) for k, v in s.items() if k != "extra-data"] + [""]
        out.append(_kv("table_size", d["table-size"]))
        return "\n".join(out)
    if what == "bitmaps":
        for b in d["bitmaps"]:
            e = {"name": b["name"], "bitmap-table-offset": b["bitmap-table-offset"],
                 "bitmap-table-size": b["bitmap-table-size"], "flags": b["flags"], "type": b["type"],
                 "granularity-bits": b["granularity-bits"], "name-size": len(b["name"].encode()),
                 "extra-data-size": b["extra-data-size"], "table": b["table"]}
            out += [*_bitmap_lines(e, d["cluster-size"]), ""]
        return "\n".join(out)
    from qemu_ext.output import table

    if what == "l1":
        out.append(f"{d['table']} L1 table: {d['l1-size']} entries, {len(d['entries'])} allocated")
        rows = [[r["index"], f"{r['raw']:#018x}", f"{r['l2-offset']:#x}", "yes" if r["copied"] else "no",
                 f"{r['reserved-bits']:#x}" if r["reserved-bits"] else ""] for r in d["entries"]]
        out.append(table(["index", "entry", "L2 table", "copied", "reserved bits"], rows, right=[0]))
    elif what == "l2":
        out.append(f"{d['table']} L1 entry {d['l1-index']}: L2 table at {d['l2-offset']:#x}, "
                   f"{len(d['entries'])} entries in use")
        rows = []
        for r in d["entries"]:
            where = (f"{r['compressed-offset']:#x} +{r['compressed-bytes']}" if r["type"] == "compressed"
                     else f"{r['host-offset']:#x}")
            row = [r["index"], f"{r['guest-offset']:#x}", f"{r['raw']:#018x}", r["type"], where,
                   "yes" if r["copied"] else "no"]
            if d["extended-l2"]:
                row += [r["alloc-bitmap"], r["zero-bitmap"]]
            rows.append(row)
        headers = ["index", "guest offset", "entry", "type", "host offset", "copied"]
        if d["extended-l2"]:
            headers += ["allocated subclusters 0-31", "zero subclusters 0-31"]
        out.append(table(headers, rows, right=[0]))
    else:
        out.append(f"refcount table at {d['refcount-table-offset']:#x}: {d['refcount-table-entries']} entries, "
                   f"{d['refcount-bits']}-bit refcounts, {d['entries-per-block']} per block")
        rows = [[r["index"], f"{r['block-offset']:#x}", r["first-cluster"], r["used-clusters"],
                 ", ".join(f"{k}: {v}" for k, v in r["refcount-histogram"].items())] for r in d["blocks"]]
        out.append(table(["index", "block", "first cluster", "clusters in use", "refcount: clusters"], rows,
                         right=[0, 2, 3]))
    return "\n".join(out)
