"""`virtopt qcow2 ...`: render what the qcow2 library returns (info, map, check, dump, read, convert)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from qemu_ext.errors import BadInputError
from qemu_ext.output import add_output_option, dumps_json, human_size, number, print_json

RAW = argparse.RawDescriptionHelpFormatter
COMPAT_HELP = ("print what this QEMU's qemu-img prints (default: the qemu-img on PATH); verified byte for byte "
               "against 7.2 and 10.0, 8.x and 9.x follow QEMU's sources unverified")


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
    except ValueError:  # the words of every size option (l2cache.options.parse_size)
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (expected e.g. 65536, 64k, 2M)") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: negative")
    return v


def _progress_wanted() -> Any:
    """qemu_ext.output.progress on a terminal (bars for scans over a second), else None."""
    if not sys.stderr.isatty():
        return None
    from qemu_ext.output import progress

    return progress


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
def _compat(args: argparse.Namespace) -> tuple[int, int]:
    """--qemu-compat, else the qemu-img on PATH, else the newest verified QEMU."""
    from qemu_ext.qcow2.render import VERIFIED_COMPAT, parse_compat, qemu_img_on_path

    if args.qemu_compat:
        return parse_compat(args.qemu_compat)
    return qemu_img_on_path() or parse_compat(VERIFIED_COMPAT[-1])


def _compat_arg(text: str) -> str:
    from qemu_ext.qcow2.render import parse_compat

    try:
        parse_compat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def cmd_info(args: argparse.Namespace) -> int:
    _tune_malloc()
    from qemu_ext.qcow2.info import image_info
    from qemu_ext.qcow2.render import info_extras_human, info_for_compat, info_human, qemu_json_text

    compat = _compat(args)
    infos = image_info(args.image, backing_chain=args.backing_chain, with_extras=not args.qemu_only,
                       progress=_progress_wanted(), compat=compat)
    if args.output == "json":
        ordered = []
        for d in infos:  # qemu-img's own key order for its fields, then ours
            extra = d.pop("virtopt", None)
            o = info_for_compat(d, compat)
            if extra is not None:
                o["virtopt"] = extra
            ordered.append(o)
        print(qemu_json_text(ordered if args.backing_chain else ordered[0]))
    else:
        blocks = []
        for d in infos:
            text = info_human(d, compat)
            if "virtopt" in d:
                text += "\n" + "\n".join(info_extras_human(d["virtopt"]))
            blocks.append(text)
        print("\n\n".join(blocks))
    return 0


# ------------------------------------------------------------------ map
def cmd_map(args: argparse.Namespace) -> int:
    _tune_malloc()
    from qemu_ext.qcow2.map import image_map
    from qemu_ext.qcow2.render import map_human, map_json_lines

    compat = _compat(args)
    entries = image_map(args.image, progress=_progress_wanted(), start=args.start_offset, max_length=args.max_length)
    if args.output == "json":
        sys.stdout.writelines(map_json_lines(entries, compat))
    else:
        text, error = map_human(entries)
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
        from qemu_ext.qcow2.render import qemu_json_text, qemu_key_order

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
        from qemu_ext.qcow2.render import check_human

        sys.stdout.write(check_human(res))
    if res.check_errors:
        print("virtopt: check failed", file=sys.stderr)
    return res.exit_code


# ------------------------------------------------------------------ dump
def cmd_dump(args: argparse.Namespace) -> int:
    from qemu_ext.qcow2.dump import dump
    from qemu_ext.qcow2.render import dump_human

    d = dump(args.image, args.what, l1_index=args.l1_index, snapshot=args.snapshot)
    if args.output == "json":
        print_json(d)
    else:
        print(dump_human(d))
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

    if args.out == "-":  # raw on standard output, as `read` writes it
        if sys.stdout.isatty():
            raise BadInputError("refusing to write a raw disk to a terminal; redirect stdout")
        sys.stdout.flush()
        convert_to_raw(args.image, sys.stdout.fileno(), progress=_progress_wanted(), snapshot=args.snapshot)
        return 0
    size = convert_to_raw(args.image, args.out, progress=_progress_wanted(), snapshot=args.snapshot)
    if args.output == "json":
        print_json({"filename": args.image, "output": args.out, "virtual-size": size})
    else:
        print(f"wrote {args.out}: {human_size(size)} ({size} bytes) of guest data")
    return 0


SNAPSHOT_HELP = "an internal snapshot (id or name) instead of the active state; -l as in qemu-img convert"


def register(sub: Any, name: str, summary: str) -> None:
    """Add `virtopt qcow2` and its sub-commands to the top-level parser."""
    p = sub.add_parser(name, help=summary, formatter_class=RAW, description=f"""{summary}.

Images are opened read-only, never written, and validated the way QEMU opens them: an image
qemu-img refuses is refused with qemu-img's reason (exit 1). -l always means --snapshot (read,
convert, dump), as in qemu-img convert.""", epilog="""examples:
  virtopt qcow2 info disk.qcow2 --output=json
  virtopt qcow2 map disk.qcow2 --output=json
  virtopt qcow2 check disk.qcow2
  virtopt qcow2 dump disk.qcow2 header
  virtopt qcow2 convert disk.qcow2 disk.raw
""")
    s = p.add_subparsers(dest="qcow2_cmd", metavar="COMMAND")

    a = s.add_parser("info", help="qemu-img info's fields plus what it hides (L2 tables, metadata, fragmentation)",
                     formatter_class=RAW, description="""\
What `qemu-img info` prints (the same text and JSON), then what it does not show: L2 tables,
metadata bytes, fragmentation, compressed and zero clusters, per-snapshot sizes, bitmap flags.
The output has the shape of the QEMU given by --qemu-compat, else of the qemu-img on PATH.""",
                     epilog="""examples:
  virtopt qcow2 info disk.qcow2
  virtopt qcow2 info top.qcow2 --backing-chain --output=json
  virtopt qcow2 info disk.qcow2 --output=json --qemu-only   # exactly qemu-img's JSON
  virtopt qcow2 info disk.qcow2 --qemu-only --qemu-compat 7.2
""")
    a.add_argument("image")
    a.add_argument("--backing-chain", action="store_true", help="show every image of the backing chain")
    a.add_argument("--qemu-only", action="store_true", help="leave out the 'virtopt' extras (exactly qemu-img's output)")
    a.add_argument("--qemu-compat", type=_compat_arg, metavar="VERSION", help=COMPAT_HELP)
    add_output_option(a)
    a.set_defaults(func=cmd_info)

    m = s.add_parser("map", help="the guest-to-host mapping, as qemu-img map prints it", formatter_class=RAW,
                     description="""\
Which guest ranges are data, zeros or unallocated, and where they live in which file of the
backing chain: the same text and JSON as `qemu-img map` of the QEMU given by --qemu-compat (else
of the qemu-img on PATH). qemu-img map takes -l for --max-length; in virtopt -l always means
--snapshot (as in qemu-img convert), so --max-length has no short form.""", epilog="""examples:
  virtopt qcow2 map disk.qcow2
  virtopt qcow2 map top.qcow2 --output=json     # same bytes as qemu-img map --output=json
  virtopt qcow2 map disk.qcow2 --start-offset 1M --max-length 64M
""")
    m.add_argument("image")
    m.add_argument("-s", "--start-offset", type=_num, default=0, help="first guest byte to map (as qemu-img map)")
    m.add_argument("--max-length", type=_num, default=None, help="map at most this many bytes (qemu-img map's -l)")
    m.add_argument("--qemu-compat", type=_compat_arg, metavar="VERSION", help=COMPAT_HELP)
    add_output_option(m)
    m.set_defaults(func=cmd_map)

    c = s.add_parser("check", help="read-only consistency check (qemu-img check's counts and exit codes)",
                     formatter_class=RAW, description="""\
Recomputes every refcount from the active and snapshot tables, as `qemu-img check` does (same
summary, JSON and exit codes), without ever repairing, and lists each problem with the table
that points at it (on stderr, one line each; in JSON under "problems").""", epilog="""examples:
  virtopt qcow2 check disk.qcow2
  virtopt qcow2 check disk.qcow2 --output=json
  virtopt qcow2 check disk.qcow2 --output=json --qemu-only   # exactly qemu-img's JSON

exit codes (as qemu-img check): 0 clean, 2 corruptions, 3 leaked clusters only,
1 the check could not be done (the image does not open, or qemu-img's check gives up).
""")
    c.add_argument("image")
    c.add_argument("--qemu-only", action="store_true", help="JSON without the per-problem list")
    add_output_option(c)
    c.set_defaults(func=cmd_check)

    from qemu_ext.qcow2 import DUMP_STRUCTURES as WHAT

    d = s.add_parser("dump", help="one on-disk structure decoded: header, extensions, L1/L2, refcounts, ...",
                     formatter_class=RAW, description="""\
One structure as it is on disk. header and extensions print exactly what QEMU's
tests/qemu-iotests/qcow2.py dump-header prints (and work on images QEMU refuses); l1, l2,
refcounts, snapshots and bitmaps are decoded entry by entry.""", epilog="""examples:
  virtopt qcow2 dump disk.qcow2 header
  virtopt qcow2 dump disk.qcow2 l2 --l1-index 0 --output=json
  virtopt qcow2 dump disk.qcow2 l1 -l snap1
  virtopt qcow2 dump disk.qcow2 refcounts
""")
    d.add_argument("image")
    d.add_argument("what", choices=WHAT)
    d.add_argument("--l1-index", type=number(int, 0), metavar="N", help="which L2 table (for 'l2'), 0 or more")
    d.add_argument("-l", "--snapshot", help=SNAPSHOT_HELP + " (for 'l1' and 'l2')")
    add_output_option(d)
    d.set_defaults(func=cmd_dump)

    r = s.add_parser("read", help="guest bytes through the backing chain", formatter_class=RAW,
                     description="""\
Guest bytes [OFFSET, OFFSET+LENGTH) through the backing chain, as qemu-io's read gets them (a
request past the end of the disk fails). Raw bytes go to stdout (not to a terminal).""",
                     epilog="""examples:
  virtopt qcow2 read disk.qcow2 0 512 --output=hex
  virtopt qcow2 read disk.qcow2 1M 64k > chunk.bin
  virtopt qcow2 read disk.qcow2 0 4k -l snap1 --output=json
""")
    r.add_argument("image")
    r.add_argument("offset", type=_num)
    r.add_argument("length", type=_num)
    r.add_argument("-l", "--snapshot", help=SNAPSHOT_HELP)
    add_output_option(r, ("raw", "hex", "json"))
    r.set_defaults(func=cmd_read)

    v = s.add_parser("convert", help="the guest disk as raw (the bytes of qemu-img convert -O raw)",
                     formatter_class=RAW, description="""\
Writes the guest disk as raw: to a file (sparse where the guest reads zeros), a block device, a
pipe or /dev/null, or to stdout with OUT = -. The bytes are those of qemu-img convert -O raw.""",
                     epilog="""examples:
  virtopt qcow2 convert disk.qcow2 disk.raw
  virtopt qcow2 convert disk.qcow2 snap1.raw -l snap1
  virtopt qcow2 convert disk.qcow2 - | sha256sum
  virtopt qcow2 convert disk.qcow2 /dev/null     # read the whole disk once
""")
    v.add_argument("image")
    v.add_argument("out", help="output file, block device, pipe, or - for stdout")
    v.add_argument("-l", "--snapshot", help=SNAPSHOT_HELP)
    add_output_option(v)
    v.set_defaults(func=cmd_convert)

    def no_cmd(args: argparse.Namespace) -> int:
        p.print_help(sys.stderr)
        return 2

    p.set_defaults(func=no_cmd)


__all__ = ["dumps_json", "register"]
