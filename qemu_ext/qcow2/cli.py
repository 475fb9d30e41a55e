"""`virtopt qcow2 ...`: render what the qcow2 library returns (info, map, check, dump, read, convert)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from qemu_ext.errors import BadInputError
from qemu_ext.output import add_output_option, dumps_json, human_size, print_json

RAW = argparse.RawDescriptionHelpFormatter


def _num(text: str) -> int:
    """A byte count/offset: decimal, 0x hex, or with a k/M/G/T suffix (powers of 1024)."""
    t = text.strip()
    mult = 1
    suffixes = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    if t and t[-1].lower() in suffixes:
        mult = suffixes[t[-1].lower()]
        t = t[:-1]
    try:
        v = int(t, 0) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return v


def _progress_wanted() -> bool:
    return sys.stderr.isatty()


def _tune_malloc() -> None:
    """Keep freed numpy buffers in the heap (glibc): whole-table scans then reuse memory instead of
    page-faulting fresh mmaps for every chunk (halves check/map time on big images).  CLI only."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 512 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


# ------------------------------------------------------------------ info
def size_to_str(val: int) -> str:
    """QEMU's size_to_str() (util/cutils.c): 348 KiB, 64 MiB, 1 TiB."""
    import math

    _m, e = math.frexp(val / (1000.0 / 1024.0))
    e = int((e - 1) / 10) * 10  # C division truncates toward zero
    prefix = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"][e // 10]
    return f"{val / (1 << e):0.3g} {prefix}B"


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


def _info_human(d: dict[str, Any]) -> str:
    """qemu-img info's human text (bdrv_image_info_dump) for qemu's fields, then virtopt's extras."""
    import datetime

    from qemu_ext.qcow2.format import qemu_key_order

    out = [
        f"image: {d['filename']}\n",
        f"file format: {d['format']}\n",
        f"virtual size: {size_to_str(d['virtual-size'])} ({d['virtual-size']} bytes)\n",
        f"disk size: {size_to_str(d['actual-size']) if 'actual-size' in d else 'unavailable'}\n",
    ]
    if d.get("encrypted"):
        out.append("encrypted: yes\n")
    if "cluster-size" in d:
        out.append(f"cluster_size: {d['cluster-size']}\n")
    if d.get("dirty-flag"):
        out.append("cleanly shut down: no\n")
    if "backing-filename" in d:
        bf = d["backing-filename"]
        full = d.get("full-backing-filename")
        line = f"backing file: {bf}"
        if full is None:
            line += " (cannot determine actual path)"
        elif full != bf:
            line += f" (actual path: {full})"
        out.append(line + "\n")
        if "backing-filename-format" in d:
            out.append(f"backing file format: {d['backing-filename-format']}\n")
    if d.get("snapshots"):
        out.append("Snapshot list:\n")
        out.append(f"{'ID':<10}{'TAG':<17}{'VM SIZE':>8}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}\n")
        for sn in d["snapshots"]:
            date = datetime.datetime.fromtimestamp(sn["date-sec"]).strftime("%Y-%m-%d %H:%M:%S")
            secs = sn["vm-clock-sec"] + sn["vm-clock-nsec"] // 1_000_000_000
            ms = (sn["vm-clock-sec"] * 1000 + sn["vm-clock-nsec"] // 1_000_000) % 1000
            clock = f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{ms:03d}"
            icount = str(sn["icount"]) if "icount" in sn else ""
            out.append(f"{sn['id']:<9} {sn['name']:<16} {size_to_str(sn['vm-state-size']):>8}{date:>20}{clock:>13}"
                       f"{icount:>11}\n")
    fs = d.get("format-specific")
    if fs:
        out.append("Format specific information:\n")
        _dump_qobject(1, qemu_key_order(fs["data"]), out)
    lines = ["".join(out).rstrip("\n")]
    x = d.get("virtopt")
    if x:
        lines.append("virtopt (not shown by qemu-img):")
        lines.append(f"    version {x['version']}, header length {x['header-length']}, L2 entry size {x['l2-entry-size']}")
        lines.append(f"    L2 tables allocated: {x['l2-tables-allocated']} (+{x['l2-tables-snapshots-only']} only in snapshots), "
                     f"refcount blocks: {x['refcount-blocks']}")
        lines.append(f"    metadata: {human_size(x['metadata-bytes'])} ({x['metadata-bytes']} bytes)")
        lines.append(f"    clusters: {x['data-clusters']} data, {x['compressed-clusters']} compressed "
                     f"({human_size(x['compressed-bytes'])}), {x['zero-clusters']} zero, "
                     f"{x['zero-clusters-preallocated']} preallocated zero")
        lines.append(f"    fragmentation: {x['fragmentation'] * 100:.2f}% ({x['fragmented-clusters']}/{x['allocated-clusters']})")
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
            lines.append(f"    bitmap {b['name']}: granularity {b['granularity']}, flags {','.join(b['flags']) or '-'}, "
                         f"{b['data-clusters']} data clusters")
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    _tune_malloc()
    from qemu_ext.qcow2.format import qemu_json_text, qemu_key_order
    from qemu_ext.qcow2.info import image_info

    infos = image_info(args.image, backing_chain=args.backing_chain, with_extras=not args.qemu_only,
                       progress=_progress_wanted())
    if args.output == "json":
        ordered = []
        for d in infos:  # qemu-img's own key order for its fields, then ours
            extra = d.pop("virtopt", None)
            o = qemu_key_order(d)
            assert isinstance(o, dict)
            if extra is not None:
                o["virtopt"] = extra
            ordered.append(o)
        print(qemu_json_text(ordered if args.backing_chain else ordered[0]))
    else:
        print("\n\n".join(_info_human(d) for d in infos))
    return 0


# ------------------------------------------------------------------ map
def cmd_map(args: argparse.Namespace) -> int:
    _tune_malloc()
    from qemu_ext.qcow2.map import image_map, render_human, render_json

    entries = image_map(args.image, progress=_progress_wanted(), start=args.start_offset, max_length=args.max_length)
    if args.output == "json":
        sys.stdout.write(render_json(entries))
    else:
        text, error = render_human(entries)
        sys.stdout.write(text)
        if error:
            sys.stdout.flush()
            raise BadInputError(error)
    return 0


# ------------------------------------------------------------------ check
def cmd_check(args: argparse.Namespace) -> int:
    _tune_malloc()
    from qemu_ext.qcow2.check import check_image

    res = check_image(args.image, progress=_progress_wanted())
    if args.output == "json":
        from qemu_ext.qcow2.format import qemu_json_text, qemu_key_order

        d = qemu_key_order(res.qemu_json())
        assert isinstance(d, dict)
        if not args.qemu_only:
            full = res.as_dict()
            d["problems"] = full["problems"]
            if "problems-not-listed" in full:
                d["problems-not-listed"] = full["problems-not-listed"]
        print(qemu_json_text(d))
    else:
        for p in res.problems:
            where = f" [{p.table}]" if p.table else ""
            if p.referrers is not None:
                where += " [referenced by: " + ("; ".join(p.referrers) or "nothing") + "]"
            # like qemu-img's own ERROR/Leaked lines, the findings go to stderr; stdout is qemu-img's summary
            print(f"{p.kind.upper()}: {p.what}{where}", file=sys.stderr)
        if res.problems_not_listed:
            print(f"... and {res.problems_not_listed} more problems not listed", file=sys.stderr)
        if not (res.corruptions or res.leaks or res.check_errors):
            print("No errors were found on the image.")
        else:
            if res.corruptions:
                print(f"\n{res.corruptions} errors were found on the image.\n"
                      "Data may be corrupted, or further writes to the image may corrupt it.")
            if res.leaks:
                print(f"\n{res.leaks} leaked clusters were found on the image.\n"
                      "This means waste of disk space, but no harm to data.")
            if res.check_errors:
                print(f"\n{res.check_errors} internal errors have occurred during the check.")
        if res.total_clusters and res.allocated_clusters:
            a, t = res.allocated_clusters, res.total_clusters
            print(f"{a}/{t} = {a * 100.0 / t:0.2f}% allocated, {res.fragmented_clusters * 100.0 / a:0.2f}% fragmented, "
                  f"{res.compressed_clusters * 100.0 / a:0.2f}% compressed clusters")
        if res.image_end_offset:
            print(f"Image end offset: {res.image_end_offset}")
    if res.check_errors:
        print("virtopt: check failed", file=sys.stderr)
    return res.exit_code


# ------------------------------------------------------------------ dump
def cmd_dump(args: argparse.Namespace) -> int:
    from qemu_ext.qcow2.dump import dump, render_human

    d = dump(args.image, args.what, l1_index=args.l1_index, snapshot=args.snapshot)
    if args.output == "json":
        print_json(d)
    else:
        print(render_human(d))
    return 0


# ------------------------------------------------------------------ read / convert
def cmd_read(args: argparse.Namespace) -> int:
    from qemu_ext.qcow2.data import read_guest

    data = read_guest(args.image, args.offset, args.length, snapshot=args.snapshot)
    if args.output == "json":
        print_json({"offset": args.offset, "length": len(data), "data": data.hex()})
    elif args.output == "hex":
        for i in range(0, len(data), 16):
            row = data[i : i + 16]
            text = "".join(chr(c) if 32 <= c < 127 else "." for c in row)
            print(f"{args.offset + i:08x}:  {row.hex(' '):<47}  {text}")
    else:
        if sys.stdout.isatty():
            raise BadInputError("refusing to write binary data to a terminal; redirect stdout or use --output=hex")
        sys.stdout.buffer.write(data)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    _tune_malloc()
    from qemu_ext.qcow2.data import convert_to_raw

    size = convert_to_raw(args.image, args.out, progress=_progress_wanted(), snapshot=args.snapshot)
    if args.output == "json":
        print_json({"filename": args.image, "output": args.out, "virtual-size": size})
    else:
        print(f"wrote {args.out}: {human_size(size)} ({size} bytes) of guest data")
    return 0


def register(sub: Any, name: str, summary: str) -> None:
    """Add `virtopt qcow2` and its sub-commands to the top-level parser."""
    p = sub.add_parser(name, help=summary, description=summary + ".\nImages are opened read-only and never written.",
                       formatter_class=RAW, epilog="""examples:
  virtopt qcow2 info disk.qcow2 --output=json
  virtopt qcow2 map disk.qcow2 --output=json
  virtopt qcow2 check disk.qcow2
  virtopt qcow2 dump disk.qcow2 l2 --l1-index 0
  virtopt qcow2 convert disk.qcow2 disk.raw
  virtopt qcow2 convert disk.qcow2 before-upgrade.raw --snapshot before-upgrade
""")
    s = p.add_subparsers(dest="qcow2_cmd", metavar="COMMAND")

    a = s.add_parser("info", help="qemu-img info fields plus L2/metadata/fragmentation/snapshot/bitmap facts",
                     formatter_class=RAW, epilog="""examples:
  virtopt qcow2 info disk.qcow2
  virtopt qcow2 info top.qcow2 --backing-chain --output=json
  virtopt qcow2 info disk.qcow2 --output=json --qemu-only   # exactly qemu-img's fields
""")
    a.add_argument("image")
    a.add_argument("--backing-chain", action="store_true", help="show every image of the backing chain")
    a.add_argument("--qemu-only", action="store_true", help="leave out the 'virtopt' extras (JSON like qemu-img's)")
    add_output_option(a)
    a.set_defaults(func=cmd_info)

    m = s.add_parser("map", help="guest-to-host mapping, identical to qemu-img map", formatter_class=RAW,
                     epilog="""examples:
  virtopt qcow2 map disk.qcow2
  virtopt qcow2 map top.qcow2 --output=json     # same bytes as qemu-img map --output=json
  virtopt qcow2 map disk.qcow2 --start-offset 1G --max-length 64M
""")
    m.add_argument("image")
    m.add_argument("-s", "--start-offset", type=_num, default=0, help="first guest byte to map (as qemu-img map)")
    m.add_argument("-l", "--max-length", type=_num, default=None, help="map at most this many bytes")
    add_output_option(m)
    m.set_defaults(func=cmd_map)

    c = s.add_parser("check", help="read-only consistency check (qemu-img check counts and exit codes)",
                     formatter_class=RAW, epilog="""examples:
  virtopt qcow2 check disk.qcow2
  virtopt qcow2 check disk.qcow2 --output=json

exit codes (as qemu-img check): 0 clean, 2 corruptions, 3 leaked clusters only,
1 the check could not finish.  Never repairs; every problem is listed.
""")
    c.add_argument("image")
    c.add_argument("--qemu-only", action="store_true", help="JSON without the per-problem list")
    add_output_option(c)
    c.set_defaults(func=cmd_check)

    from qemu_ext.qcow2 import DUMP_STRUCTURES as WHAT

    d = s.add_parser("dump", help="decoded header, extensions, L1/L2, refcounts, snapshots, bitmaps",
                     formatter_class=RAW, epilog="""examples:
  virtopt qcow2 dump disk.qcow2 header
  virtopt qcow2 dump disk.qcow2 l2 --l1-index 0 --output=json
  virtopt qcow2 dump disk.qcow2 l1 --snapshot snap1
  virtopt qcow2 dump disk.qcow2 l2 --l1-index 0 --snapshot snap1
""")
    d.add_argument("image")
    d.add_argument("what", choices=WHAT)
    d.add_argument("--l1-index", type=_num, help="which L2 table (for 'l2')")
    d.add_argument("--snapshot", help="use this snapshot's tables (for 'l1' and 'l2'): id or name")
    add_output_option(d)
    d.set_defaults(func=cmd_dump)

    r = s.add_parser("read", help="guest bytes through the backing chain", formatter_class=RAW, epilog="""examples:
  virtopt qcow2 read disk.qcow2 0 512 --output=hex
  virtopt qcow2 read disk.qcow2 1M 64k > chunk.bin
""")
    r.add_argument("image")
    r.add_argument("offset", type=_num)
    r.add_argument("length", type=_num)
    r.add_argument("-l", "--snapshot", help="read an internal snapshot (id or name) instead of the active state")
    add_output_option(r, ("raw", "hex", "json"))
    r.set_defaults(func=cmd_read)

    v = s.add_parser("convert", help="write the guest disk as raw (same bytes as qemu-img convert -O raw)",
                     formatter_class=RAW, epilog="""examples:
  virtopt qcow2 convert disk.qcow2 disk.raw
  virtopt qcow2 convert disk.qcow2 before-upgrade.raw --snapshot before-upgrade
""")
    v.add_argument("image")
    v.add_argument("out")
    v.add_argument("-l", "--snapshot", help="convert an internal snapshot (id or name), like qemu-img convert -l")
    add_output_option(v)
    v.set_defaults(func=cmd_convert)

    def no_cmd(args: argparse.Namespace) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=no_cmd)


__all__ = ["dumps_json", "register"]
