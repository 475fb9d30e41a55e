"""Rendering decoded traces: simpletrace.py's text (byte for byte), JSON and CSV.

scripts/simpletrace.py prints, for every record::

    NAME DELTA_US pid=PID arg=0xHEX ... arg=b'string' ...

with DELTA_US = ``'%0.3f' % ((ts - previous ts) / 1000.0)`` and dropped records as
``Dropped_Event ... num_events_dropped=0x..``. The simpletrace text of a SimpleTrace is
built with numpy, a block of records at a time: each event kind is laid out in a
fixed-width byte matrix (digits right-aligned, padding zero bytes), the kinds are
merged in file order, and the zero bytes are squeezed out.
"""

from __future__ import annotations

import csv
import io
import json
from typing import BinaryIO, Iterable, Iterator, Optional

import numpy as np

from qemu_ext.trace.records import TraceRecord
from qemu_ext.trace.simple import SimpleTrace, StringColumn, is_signed_type

_HEX_THR = np.array([16**i for i in range(1, 16)], dtype=np.uint64)
_DEC_THR = np.array([10**i for i in range(1, 20)], dtype=np.uint64)
_EXACT_DELTA = 1 << 52  # below this, '%0.3f' % (d / 1000.0) is exactly the integer rendering of d
# two hex digits per byte value, as one uint16 (little-endian: first digit in the low byte)
_HEX2 = np.frombuffer(b"".join(f"{i:02x}".encode() for i in range(256)), np.uint16)
# three decimal digits per value 0..999 (zero-padded), as rows of a (1000, 3) matrix
_DEC3 = np.frombuffer(b"".join(f"{i:03d}".encode() for i in range(1000)), np.uint8).reshape(1000, 3)

BLOCK = 1 << 15


def _hex_width(v: np.ndarray) -> tuple[np.ndarray, int]:
    k = 1 + np.searchsorted(_HEX_THR, v, side="right")
    return k, int(k.max()) if len(k) else 1


def _put_hex(dst: np.ndarray, v: np.ndarray, k: np.ndarray, w: int) -> None:
    """Write the hex digits of uint64 v right-aligned into dst (n, w); leading positions stay 0."""
    be = v.astype(">u8").view(np.uint8).reshape(-1, 8)  # most significant byte first
    nb = (w + 1) // 2
    two = _HEX2[be[:, 8 - nb :]].view(np.uint8).reshape(-1, 2 * nb)
    if w > 1 and int(k.min()) < w:
        np.multiply(two[:, 2 * nb - w :], np.arange(w)[None, :] >= (w - k)[:, None], out=dst)
    else:
        dst[:] = two[:, 2 * nb - w :]


def _dec_width(v: np.ndarray) -> tuple[np.ndarray, int]:
    k = 1 + np.searchsorted(_DEC_THR, v, side="right")
    return k, int(k.max()) if len(k) else 1


def _put_dec(dst: np.ndarray, v: np.ndarray, k: np.ndarray, w: int) -> None:
    """Write the decimal digits of uint64 v right-aligned into dst (n, w); leading positions stay 0."""
    ng = (w + 2) // 3
    groups = np.empty((len(v), 3 * ng), np.uint8)
    x = v.astype(np.uint64, copy=True)
    for g in range(ng - 1, -1, -1):
        groups[:, 3 * g : 3 * g + 3] = _DEC3[(x % np.uint64(1000)).astype(np.intp)]
        x //= np.uint64(1000)
    if w > 1 and int(k.min()) < w:
        np.multiply(groups[:, 3 * ng - w :], np.arange(w)[None, :] >= (w - k)[:, None], out=dst)
    else:
        dst[:] = groups[:, 3 * ng - w :]


class _KindLayout:
    """What is constant about the lines of one event kind."""

    def __init__(self, name: str, arg_names: list[str], arg_cols: list) -> None:
        self.head = np.frombuffer((name + " ").encode(), np.uint8)
        self.labels = [
            np.frombuffer((f" {a}=" if isinstance(c, StringColumn) else f" {a}=0x").encode(), np.uint8)
            for a, c in zip(arg_names, arg_cols)
        ]
        self.cols = arg_cols
        self.string_tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _string_table(col: StringColumn, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(matrix of str(bytes) renderings of the distinct strings, zero-padded; index of each record's string)."""
    uniq, inv = col.unique(data)
    texts = [str(u).encode("ascii") for u in uniq]
    w = max(len(t) for t in texts) if texts else 1
    tbl = np.zeros((max(len(texts), 1), w), np.uint8)
    for i, t in enumerate(texts):
        tbl[i, : len(t)] = np.frombuffer(t, np.uint8)
    return tbl, inv


_PID = np.frombuffer(b" pid=", np.uint8)
_DOT = ord(".")
_NL = ord("\n")


def _kind_lines(
    lay: _KindLayout, g: np.ndarray, pk: np.ndarray, ip: np.ndarray, neg: np.ndarray, fp: np.ndarray, pids: np.ndarray
) -> np.ndarray:
    """The zero-padded line matrix of the records g (all of one kind; pk their positions within the kind)."""
    cnt = len(g)
    # plan the columns: (kind, width, payload)
    ipv = ip[g]
    kd, wd = _dec_width(ipv)
    pv = pids[g]
    p0 = int(pv[0])
    const_pid = not np.any(pv != p0)
    if const_pid:
        pid_text = np.frombuffer(str(p0).encode(), np.uint8)
        kp, wp = None, len(pid_text)
    else:
        pid_text = None
        kp, wp = _dec_width(pv.astype(np.uint64))
    argw: list = []
    for j, col in enumerate(lay.cols):
        if isinstance(col, StringColumn):
            tbl, inv = lay.string_tables[j]
            argw.append(("s", tbl.shape[1], (tbl, inv[pk])))
        else:
            v = col[pk]
            k, w = _hex_width(v)
            argw.append(("x", w, (v, k)))
    width = len(lay.head) + (wd + 1) + 4 + len(_PID) + wp + sum(len(lay.labels[j]) + a[1] for j, a in enumerate(argw)) + 1
    G = np.empty((cnt, width), np.uint8)  # every byte is written below
    c = len(lay.head)
    G[:, :c] = lay.head
    # delta: [sign][digits].[3 digits]
    G[:, c] = 0
    _put_dec(G[:, c + 1 : c + 1 + wd], ipv, kd, wd)
    ngr = np.flatnonzero(neg[g])
    if len(ngr):
        G[ngr, c + wd - kd[ngr]] = ord("-")
    c += wd + 1
    G[:, c] = _DOT
    G[:, c + 1 : c + 4] = _DEC3[fp[g]]
    c += 4
    G[:, c : c + len(_PID)] = _PID
    c += len(_PID)
    if pid_text is not None:
        G[:, c : c + wp] = pid_text
    else:
        _put_dec(G[:, c : c + wp], pv.astype(np.uint64), kp, wp)
    c += wp
    for j, (kind, w, payload) in enumerate(argw):
        lab = lay.labels[j]
        G[:, c : c + len(lab)] = lab
        c += len(lab)
        if kind == "s":
            tbl, idx = payload
            G[:, c : c + w] = tbl[idx]
        else:
            v, k = payload
            _put_hex(G[:, c : c + w], v, k, w)
        c += w
    G[:, c] = _NL
    return G


def iter_simpletrace_text(st: SimpleTrace, block: int = BLOCK) -> Iterator[bytes]:
    """The exact bytes scripts/simpletrace.py prints for st, in blocks."""
    n = len(st)
    if n == 0:
        return
    ts = st.timestamps
    delta = np.empty(n, np.int64)
    delta[0] = 0
    delta[1:] = (ts[1:] - ts[:-1]).view(np.int64)
    # a delta beyond the exact range (or a wrapped u64 difference) is printed by Python itself
    slow = np.abs(delta) >= _EXACT_DELTA
    slow_rows = set(np.flatnonzero(slow).tolist())

    nk = len(st.kinds)
    layouts: list[_KindLayout] = []
    pos_in_kind = np.zeros(n, np.int64)
    for k in range(nk):
        ev = st.kind_event(k)
        rows = st.kind_rows(k)
        pos_in_kind[rows] = np.arange(len(rows))
        lay = _KindLayout(ev.name, ev.arg_names, st.kind_args(k))
        for j, c in enumerate(lay.cols):
            if isinstance(c, StringColumn):
                lay.string_tables[j] = _string_table(c, st.data)
        layouts.append(lay)

    neg = delta < 0
    absd = np.abs(delta).astype(np.uint64)
    ip = absd // np.uint64(1000)
    fp = (absd % np.uint64(1000)).astype(np.intp)
    pids = st.pids

    for a in range(0, n, block):
        b = min(n, a + block)
        codes = st.codes[a:b]
        m = b - a
        kinds_here = np.flatnonzero(np.bincount(codes, minlength=nk)).tolist()
        mats: list[tuple[np.ndarray, np.ndarray]] = []
        width = 0
        for k in kinds_here:
            loc = np.flatnonzero(codes == k) if len(kinds_here) > 1 else np.arange(m)
            g = loc + a
            mat = _kind_lines(layouts[k], g, pos_in_kind[g], ip, neg, fp, pids)
            width = max(width, mat.shape[1])
            mats.append((loc, mat))
        if len(mats) == 1:
            out = mats[0][1]
        else:
            out = np.zeros((m, width), np.uint8)
            for loc, mat in mats:
                out[loc, : mat.shape[1]] = mat
        text = out[out != 0].tobytes()
        if slow_rows and any(a <= r < b for r in slow_rows):
            text = _patch_slow_rows(st, text, a, b, delta, slow_rows)
        yield text


def _patch_slow_rows(st: SimpleTrace, text: bytes, a: int, b: int, delta: np.ndarray, slow_rows: set) -> bytes:
    """Re-render lines whose delta Python's float formatting must print (huge or wrapped deltas)."""
    lines = text.split(b"\n")
    ts = st.timestamps
    for r in sorted(x for x in slow_rows if a <= x < b):
        d = int(ts[r]) - int(ts[r - 1]) if r > 0 else 0
        fields = lines[r - a].split(b" ")
        fields[1] = ("%0.3f" % (d / 1000.0)).encode()
        lines[r - a] = b" ".join(fields)
    return b"\n".join(lines)


def write_simpletrace_text(st: SimpleTrace, out: BinaryIO) -> None:
    for chunk in iter_simpletrace_text(st):
        out.write(chunk)


def _fmt_arg(v) -> str:
    if isinstance(v, int):
        return f"0x{v:x}"
    return str(v)


def iter_simpletrace_text_records(records: Iterable[TraceRecord]) -> Iterator[bytes]:
    """simpletrace.py's line layout for TraceRecords (log text: unknown timestamps/pids print as 0)."""
    last: Optional[int] = None
    buf: list[str] = []
    for r in records:
        t = r.timestamp_ns
        if t is None:
            d = 0
        else:
            if last is None:
                last = t
            d = t - last
            last = t
        fields = [r.name, f"{d / 1000.0:0.3f}", f"pid={r.pid or 0}"]
        fields += [f"{k}={_fmt_arg(v)}" for k, v in r.args.items()]
        buf.append(" ".join(fields))
        if len(buf) >= 4096:
            yield ("\n".join(buf) + "\n").encode()
            buf = []
    if buf:
        yield ("\n".join(buf) + "\n").encode()


def _record_dicts(st: SimpleTrace) -> Iterator[dict]:
    for r in st.records():
        yield {"event": r.name, "timestamp_ns": r.timestamp_ns, "pid": r.pid, "args": r.args}


def iter_json(records: Iterable[TraceRecord]) -> Iterator[bytes]:
    """A JSON array of {"event", "timestamp_ns", "pid", "args": {name: value}}, one record per line."""
    first = True
    buf: list[str] = ["[\n"]
    for r in records:
        s = json.dumps({"event": r.name, "timestamp_ns": r.timestamp_ns, "pid": r.pid, "args": r.args})
        buf.append(("    " if first else ",\n    ") + s)
        first = False
        if len(buf) >= 4096:
            yield "".join(buf).encode()
            buf = []
    buf.append("\n]\n" if not first else "]\n")
    yield "".join(buf).encode()


CSV_FIELDS = ["index", "event", "timestamp_ns", "pid", "args"]


def iter_csv(records: Iterable[TraceRecord]) -> Iterator[bytes]:
    """CSV: index,event,timestamp_ns,pid,args with args as ``name=value`` separated by spaces (ints decimal)."""
    sio = io.StringIO()
    w = csv.writer(sio, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for i, r in enumerate(records):
        args = " ".join(f"{k}={v}" for k, v in r.args.items())
        w.writerow([i, r.name, "" if r.timestamp_ns is None else r.timestamp_ns, "" if r.pid is None else r.pid, args])
        if sio.tell() > 1 << 20:
            yield sio.getvalue().encode()
            sio.seek(0)
            sio.truncate()
    yield sio.getvalue().encode()


__all__ = [
    "is_signed_type",
    "iter_csv",
    "iter_json",
    "iter_simpletrace_text",
    "iter_simpletrace_text_records",
    "write_simpletrace_text",
]
