"""Rendering decoded traces: simpletrace.py's text (byte for byte), JSON and CSV.

scripts/simpletrace.py prints, for every record::

    NAME DELTA_US pid=PID arg=0xHEX ... arg=b'string' ...

with DELTA_US = ``'%0.3f' % ((ts - previous ts) / 1000.0)`` and dropped records as
``Dropped_Event ... num_events_dropped=0x..``. The text of a SimpleTrace is built with
numpy, never a Python loop per record: records are grouped by kind and by the number of
digits of every variable field, so that within a group every line has the same layout;
a group is one byte matrix (a template with the constant text, plus digit columns) whose
rows are copied to their lines' offsets in the output, about 16 MiB of text at a time.
Deltas beyond float exactness (>= 2**52 ns) are printed by Python's own '%0.3f'.
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import BinaryIO, Iterable, Iterator, Optional

import numpy as np
from numpy.lib.stride_tricks import as_strided

from qemu_ext.errors import VirtoptError
from qemu_ext.trace.header import delta_text
from qemu_ext.trace.records import TraceRecord
from qemu_ext.trace.simple import SimpleTrace, StringColumn, is_signed_type

_HEX_THR = np.array([16**i for i in range(1, 16)], dtype=np.uint64)
_DEC_THR = np.array([10**i for i in range(1, 20)], dtype=np.uint64)
_EXACT_DELTA = 1000 << 42  # below this, '%0.3f' % (d / 1000.0) is exactly the integer rendering of d (d / 1000 < 2**42: half an ulp < 0.0005)
# two hex digits per byte value, as one uint16 (little-endian: first digit in the low byte)
_HEX2 = np.frombuffer(b"".join(f"{i:02x}".encode() for i in range(256)), np.uint16)
# three decimal digits per value 0..999 (zero-padded), as rows of a (1000, 3) matrix
_DEC3 = np.frombuffer(b"".join(f"{i:03d}".encode() for i in range(1000)), np.uint8).reshape(1000, 3)

BLOCK = 1 << 15
_DOT = ord(".")


def _hex_len(v: np.ndarray) -> np.ndarray:
    return 1 + np.searchsorted(_HEX_THR, v, side="right")


def _dec_len(v: np.ndarray) -> np.ndarray:
    return 1 + np.searchsorted(_DEC_THR, v, side="right")


def _ndigits(v: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Digits of each uint64 in v (uint8), given the powers of the base from base**1 up."""
    if len(v) == 0:
        return np.ones(0, np.uint8)
    lo, hi = v.min(), v.max()
    klo = 1 + int(np.searchsorted(thresholds, lo, side="right"))
    khi = 1 + int(np.searchsorted(thresholds, hi, side="right"))
    out = np.full(len(v), klo, np.uint8)
    for t in thresholds[klo - 1 : khi - 1]:  # only the powers between the smallest and largest value
        out += v >= t
    return out


def _hex_chars(v: np.ndarray, w: int) -> np.ndarray:
    """(n, w) hex digits of uint64 v, zero-padded with '0' characters on the left."""
    be = v.astype(">u8").view(np.uint8).reshape(-1, 8)  # most significant byte first, contiguous
    nb = (w + 1) // 2
    if nb < 8:
        be = be[:, 8 - nb :]
    two = np.take(_HEX2, be).view(np.uint8).reshape(-1, 2 * nb)
    return two[:, 2 * nb - w :]


def _dec_chars(v: np.ndarray, w: int) -> np.ndarray:
    """(n, w) decimal digits of uint64 v, zero-padded with '0' characters on the left."""
    ng = (w + 2) // 3
    groups = np.empty((len(v), 3 * ng), np.uint8)
    x = v.astype(np.uint64, copy=True)
    for g in range(ng - 1, -1, -1):
        groups[:, 3 * g : 3 * g + 3] = _DEC3[(x % np.uint64(1000)).astype(np.intp)]
        if g:
            x //= np.uint64(1000)
    return groups[:, 3 * ng - w :]


def _put_digits(dst: np.ndarray, chars: np.ndarray, k: Optional[np.ndarray], w: int) -> None:
    """Write right-aligned digits; the positions left of each value's k digits become 0 (squeezed out)."""
    if k is None or w == 1:
        dst[:] = chars
    else:
        np.multiply(chars, np.arange(w)[None, :] >= (w - k)[:, None], out=dst)


class _Slot:
    """A variable part of a line: where it goes, how wide it is, and how to make it."""

    __slots__ = ("col", "kind", "klen", "pos", "tbl", "values", "width")

    def __init__(self, kind: str, pos: int, width: int, values=None, klen=None, tbl=None, col: int = -1) -> None:
        self.kind = kind  # "hex", "str", "delta", "pid"
        self.pos = pos
        self.width = width
        self.values = values  # per record of the kind (hex: uint64; str: index into tbl)
        self.klen = klen  # digits per record, None when all have `width` digits
        self.tbl = tbl
        self.col = col


class _Layout:
    """One event kind's line: a template with every constant byte in place, and its variable slots."""

    def __init__(self, st: SimpleTrace, k: int, ip_len: np.ndarray, pid_const: Optional[int],
                 qemu10: bool = False) -> None:
        ev = st.kind_event(k)
        rows = st.kind_rows(k)
        parts: list[bytes] = []
        self.slots: list[_Slot] = []
        pos = 0

        def const(b: bytes) -> None:
            nonlocal pos
            parts.append(b)
            pos += len(b)

        def var(slot: _Slot) -> None:
            nonlocal pos
            parts.append(b"\0" * slot.width)
            self.slots.append(slot)
            pos += slot.width

        const((ev.name + " ").encode())
        wd = int(ip_len[rows].max()) if len(rows) else 1
        var(_Slot("delta", pos, wd + 1 + 4))  # [-]digits.ddd
        const(b" pid=")
        if pid_const is not None:
            const(str(pid_const).encode())
        else:
            pv = st.pids[rows].astype(np.uint64)
            kl = _dec_len(pv)
            var(_Slot("pid", pos, int(kl.max()), klen=kl))
        for a, col in zip(ev.args, st.kind_args(k)):
            if isinstance(col, StringColumn):
                const(f" {a.name}=".encode())
                uniq, inv = col.unique(st.data)
                texts = [str(u).encode("ascii") for u in uniq]
                if len(texts) == 1:
                    const(texts[0])
                    continue
                w = max(len(t) for t in texts)
                tbl = np.zeros((len(texts), w), np.uint8)
                for i, t in enumerate(texts):
                    tbl[i, : len(t)] = np.frombuffer(t, np.uint8)
                var(_Slot("str", pos, w, values=inv, tbl=tbl, klen=np.array([len(t) for t in texts], np.int64)))
            else:
                const(f" {a.name}=0x".encode())
                v0 = col[0] if len(col) else 0
                if len(col) and not np.any(col != v0):
                    const(f"{int(v0):x}".encode())
                    continue
                kl = _hex_len(col)
                w = int(kl.max())
                var(_Slot("hex", pos, w, values=col, klen=None if int(kl.min()) == w else kl))
        const(b" \n" if qemu10 and not ev.args else b"\n")
        self.template = np.frombuffer(b"".join(parts), np.uint8)
        self.width = len(self.template)
        self.const_len = int(np.count_nonzero(self.template))


GROUP_CHUNK = 1 << 15
WINDOW_BYTES = 16 << 20  # text rendered at a time (one reused buffer)
MAX_GROUPS = 20000


def _python_line(st: SimpleTrace, r: int, qemu10: bool = False) -> bytes:
    """One line exactly as simpletrace.py formats it, by Python (for deltas beyond float exactness)."""
    k = int(st.codes[r])
    ev = st.kind_event(k)
    d = int(st.timestamps[r]) - int(st.timestamps[r - 1]) if r > 0 else 0
    rows = st.kind_rows(k)
    j = int(np.searchsorted(rows, r))
    fields = [ev.name, delta_text(d, qemu10), f"pid={int(st.pids[r])}"]
    for a, col in zip(ev.args, st.kind_args(k)):
        if isinstance(col, StringColumn):
            raw = st.data[int(col.starts[j]) : int(col.starts[j]) + int(col.lens[j])]
            fields.append(f"{a.name}={raw!s}")
        else:
            fields.append(f"{a.name}=0x{int(col[j]):x}")
    return (" ".join(fields) + (" \n" if qemu10 and not ev.args else "\n")).encode()


def plan_simpletrace(st: SimpleTrace, qemu10: bool = False) -> _Plan:
    """Plan simpletrace.py's text for st.

    Records are grouped by kind and by the width of every variable field (digits of the delta,
    of each hex argument, which string); within a group every line has the same layout, so the
    group is one dense byte matrix (a template plus digit columns) copied row by row to its
    lines' places in the output.
    """
    n = len(st)
    if n == 0:
        return _Plan(np.zeros(0, np.int64), [], {})
    ts = st.timestamps
    ad = np.empty(n, np.int64)
    ad[0] = 0
    np.subtract(ts[1:], ts[:-1], out=ad[1:].view(np.uint64))  # u64 differences, read as signed
    neg = ad < 0
    np.abs(ad, out=ad)
    slow = ad >= _EXACT_DELTA
    any_slow = bool(slow.any())
    ip, fp = np.divmod(ad, 1000)  # fp: 0..999, an index into _DEC3
    del ad
    ipu = ip.view(np.uint64)
    kd = _ndigits(ipu, _DEC_THR)
    p0 = int(st.pids[0])
    pid_const = not np.any(st.pids != p0)
    pids = st.pids if pid_const else st.pids.astype(np.uint64)
    kp = None if pid_const else _ndigits(pids, _DEC_THR)

    L_row = np.zeros(n, np.int64)
    groups: list[tuple[np.ndarray, int, np.ndarray, list]] = []  # (global rows, line length, template, slots)
    for k in range(len(st.kinds)):
        ev = st.kind_event(k)
        rows_all = st.kind_rows(k)
        cols = st.kind_args(k)
        keep = np.flatnonzero(~slow[rows_all]) if any_slow else None
        rows = rows_all[keep] if keep is not None else rows_all
        if len(rows) == 0:
            continue
        # per-row varying parts: (component array with a small range, how to render it)
        comps: list[np.ndarray] = [kd[rows] - 1, neg[rows].view(np.uint8)]
        specs: list[tuple] = []
        if not pid_const:
            assert kp is not None
            comps.append(kp[rows] - 1)
        for a, col in zip(ev.args, cols):
            if isinstance(col, StringColumn):
                uniq, inv = col.unique(st.data)
                texts = [str(u).encode("ascii") for u in uniq]
                comps.append(inv[keep] if keep is not None else inv)
                specs.append(("str", a.name, texts))
            else:
                v = col[keep] if keep is not None else col
                v0 = v[0]
                if not np.any(v != v0):
                    specs.append(("const", a.name, f"{int(v0):x}".encode()))
                    continue
                comps.append(_ndigits(v, _HEX_THR) - 1)
                specs.append(("hex", a.name, v))
        sig = np.zeros(len(rows), np.int64)
        mult = 1
        for c in comps:
            c = c.astype(np.int64, copy=False)
            sig += c * mult
            mult *= int(c.max()) + 1
            if mult > 1 << 40:
                raise _TooManyGroups
        order = np.argsort(sig.astype(np.uint16) if mult <= 1 << 16 else sig, kind="stable")
        ss = sig[order]
        bounds = [0, *(np.flatnonzero(ss[1:] != ss[:-1]) + 1).tolist(), len(ss)]
        if len(bounds) > MAX_GROUPS:
            raise _TooManyGroups
        name_b = (ev.name + " ").encode()
        for gs, ge in zip(bounds[:-1], bounds[1:]):
            gi = order[gs:ge]  # positions among the kept rows of this kind, increasing
            r0 = int(gi[0])
            parts: list[bytes] = [name_b]
            slots: list[tuple] = []
            pos = len(name_b)
            if neg[rows[r0]]:
                parts.append(b"-")
                pos += 1
            w = int(kd[rows[r0]])
            slots.append(("dec", pos, w, ipu, True))
            parts += [b"\0" * w, b".", b"\0\0\0", b" pid="]
            slots.append(("frac", pos + w + 1, 3, fp, True))
            pos += w + 4 + 5
            if pid_const:
                t = str(p0).encode()
                parts.append(t)
                pos += len(t)
            else:
                assert kp is not None
                w = int(kp[rows[r0]])
                slots.append(("dec", pos, w, pids, True))
                parts.append(b"\0" * w)
                pos += w
            ci = 3 if not pid_const else 2
            for kind, aname, payload in specs:
                if kind == "const":
                    t = f" {aname}=0x".encode() + payload
                    parts.append(t)
                    pos += len(t)
                elif kind == "str":
                    t = f" {aname}=".encode() + payload[int(comps[ci][r0])]
                    parts.append(t)
                    pos += len(t)
                    ci += 1
                else:
                    lab = f" {aname}=0x".encode()
                    w = int(comps[ci][r0]) + 1
                    parts += [lab, b"\0" * w]
                    slots.append(("hex", pos + len(lab), w, payload, False))
                    pos += len(lab) + w
                    ci += 1
            parts.append(b" \n" if qemu10 and not ev.args else b"\n")
            tmpl = np.frombuffer(b"".join(parts), np.uint8)
            grows = rows[gi]
            L_row[grows] = len(tmpl)
            groups.append((grows, gi, tmpl, slots))
    slow_rows = np.flatnonzero(slow).tolist()
    slow_lines = {r: _python_line(st, r, qemu10) for r in slow_rows}
    for r, line in slow_lines.items():
        L_row[r] = len(line)
    return _Plan(L_row, groups, slow_lines)


class _Plan:
    """Every line's length and the groups of same-layout lines: enough to write any range of lines."""

    def __init__(self, L_row: np.ndarray, groups: list, slow_lines: dict[int, bytes]) -> None:
        self.L_row = L_row
        self.dst = np.cumsum(L_row)
        self.dst -= L_row
        self.total = int(L_row.sum())
        self.groups = groups
        self.slow_lines = slow_lines

    def windows(self, target: int = 0) -> Iterator[tuple[int, int]]:
        """Record ranges [a, b) of about `target` bytes of text (default WINDOW_BYTES)."""
        target = target or WINDOW_BYTES
        n = len(self.L_row)
        ends = np.cumsum(self.L_row)
        a = 0
        while a < n:
            b = int(np.searchsorted(ends, int(self.dst[a]) + target, side="right"))
            b = max(b, a + 1)
            yield a, min(b, n)
            a = b

    def render(self, a: int, b: int, buf: np.ndarray) -> int:
        """Write the text of records [a, b) into buf; return its length."""
        base = int(self.dst[a])
        size = int(self.dst[b - 1] + self.L_row[b - 1]) - base
        for grows, gi, tmpl, slots in self.groups:
            i0, i1 = np.searchsorted(grows, [a, b]).tolist()
            if i0 == i1:
                continue
            lg = len(tmpl)
            vt = np.dtype(("V", lg))
            # one item of lg bytes at every byte offset of buf: a 1-D scatter of whole lines (memcpy each)
            vd = np.ndarray(shape=(size - lg + 1,), dtype=vt, buffer=buf, strides=(1,))
            for c0 in range(i0, i1, GROUP_CHUNK):
                c1 = min(i1, c0 + GROUP_CHUNK)
                gr = grows[c0:c1]
                gk = gi[c0:c1]
                G = np.empty((c1 - c0, lg), np.uint8)
                G[:] = tmpl
                for kind, pos, w, src, by_row in slots:
                    vals = src[gr] if by_row else src[gk]
                    if kind == "hex":
                        G[:, pos : pos + w] = _hex_chars(vals, w)
                    elif kind == "frac":
                        G[:, pos : pos + 3] = np.take(_DEC3, vals, axis=0)
                    else:
                        G[:, pos : pos + w] = _dec_chars(vals, w)
                vd[self.dst[gr] - base] = G.view(vt).reshape(-1)
        for r, line in self.slow_lines.items():
            if a <= r < b:
                o = int(self.dst[r]) - base
                buf[o : o + len(line)] = np.frombuffer(line, np.uint8)
        return size


class _TooManyGroups(Exception):
    pass


def iter_simpletrace_text(st: SimpleTrace, block: int = BLOCK, qemu10: bool = False) -> Iterator[bytes]:
    """The exact bytes scripts/simpletrace.py prints for st, in chunks of about 16 MiB.

    qemu10: print as 10.0's simpletrace.py, which ends the line of an event without
    arguments with a space after ``pid=N`` (7.2's does not) and divides huge time steps
    differently (header.delta_text).
    """
    try:
        plan = plan_simpletrace(st, qemu10)
    except _TooManyGroups:
        yield from _iter_simpletrace_text_blocks(st, block, qemu10)
        return
    if plan.total == 0:
        return
    buf: Optional[np.ndarray] = None
    for a, b in plan.windows():
        need = int(plan.dst[b - 1] + plan.L_row[b - 1] - plan.dst[a])
        if buf is None or len(buf) < need:
            buf = np.empty(need, np.uint8)  # reused: its pages are faulted in once
        size = plan.render(a, b, buf)
        yield buf[:size].tobytes()


def _iter_simpletrace_text_blocks(st: SimpleTrace, block: int = BLOCK, qemu10: bool = False) -> Iterator[bytes]:
    """The exact bytes scripts/simpletrace.py prints for st, in blocks of records: each kind laid out
    in a fixed-width byte matrix (digits right-aligned, zero bytes as padding), the kinds merged in
    file order, the zero bytes squeezed out. Used when lines have too many different layouts."""
    n = len(st)
    if n == 0:
        return
    ts = st.timestamps
    delta = np.empty(n, np.int64)
    delta[0] = 0
    delta[1:] = (ts[1:] - ts[:-1]).view(np.int64)
    # a delta beyond the exact range (or a wrapped u64 difference) is printed by Python itself
    slow_rows = set(np.flatnonzero(np.abs(delta) >= _EXACT_DELTA).tolist())
    neg = delta < 0
    any_neg = bool(neg.any())
    absd = np.abs(delta).astype(np.uint64)
    ip = absd // np.uint64(1000)
    fp = (absd - ip * np.uint64(1000)).astype(np.intp)
    ip_len = _dec_len(ip)
    pids = st.pids
    p0 = int(pids[0])
    pid_const = p0 if not np.any(pids != p0) else None

    nk = len(st.kinds)
    layouts = [_Layout(st, k, ip_len, pid_const, qemu10) for k in range(nk)]
    pos_in_kind = np.zeros(n, np.int64)
    for k in range(nk):
        rows = st.kind_rows(k)
        pos_in_kind[rows] = np.arange(len(rows))
    wmax = max(lay.width for lay in layouts)
    templates = np.zeros((nk, wmax), np.uint8)
    for k, lay in enumerate(layouts):
        templates[k, : lay.width] = lay.template

    def kind_block(k: int, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the lines of records g of kind k, concatenated; each line's length)."""
        lay = layouts[k]
        cnt = len(g)
        G = np.empty((cnt, lay.width), np.uint8)
        G[:] = lay.template
        L = np.full(cnt, lay.const_len, np.int64)
        pk = pos_in_kind[g]
        for sl in lay.slots:
            dst = G[:, sl.pos : sl.pos + sl.width]
            if sl.kind == "delta":
                wd = sl.width - 5
                kd = ip_len[g]
                _put_digits(dst[:, 1 : 1 + wd], _dec_chars(ip[g], wd), kd if int(kd.min()) < wd else None, wd)
                dst[:, 0] = 0
                L += kd + 4
                if any_neg:
                    ngr = np.flatnonzero(neg[g])
                    if len(ngr):
                        dst[ngr, wd - kd[ngr]] = ord("-")
                        L[ngr] += 1
                dst[:, 1 + wd] = _DOT
                dst[:, 2 + wd :] = _DEC3[fp[g]]
            elif sl.kind == "hex":
                kl = None if sl.klen is None else sl.klen[pk]
                _put_digits(dst, _hex_chars(sl.values[pk], sl.width), kl, sl.width)
                L += sl.width if kl is None else kl
            elif sl.kind == "str":
                idx = sl.values[pk]
                dst[:] = sl.tbl[idx]
                L += sl.klen[idx]
            else:  # pid
                kl = sl.klen[pk]
                _put_digits(dst, _dec_chars(pids[g].astype(np.uint64), sl.width), kl, sl.width)
                L += kl
        return G[G != 0], L

    def render(a: int) -> bytes:
        b = min(n, a + block)
        codes = st.codes[a:b]
        m = b - a
        kinds_here = np.flatnonzero(np.bincount(codes, minlength=nk)).tolist()
        if len(kinds_here) == 1:
            text = kind_block(kinds_here[0], np.arange(a, b))[0].tobytes()
        else:
            parts = []
            Lrow = np.empty(m, np.int64)
            for k in kinds_here:
                loc = np.flatnonzero(codes == k)
                C, L = kind_block(k, loc + a)
                Lrow[loc] = L
                parts.append((loc, C, L))
            dst0 = np.cumsum(Lrow) - Lrow
            flat = np.empty(int(Lrow.sum()), np.uint8)
            for loc, C, L in parts:
                src0 = np.cumsum(L) - L
                d0 = dst0[loc]
                for ln in np.unique(L).tolist():
                    sel = np.flatnonzero(L == ln)
                    vs = as_strided(C, shape=(len(C) - ln + 1, ln), strides=(1, 1), writeable=False)
                    vd = as_strided(flat, shape=(len(flat) - ln + 1, ln), strides=(1, 1))
                    vd[d0[sel]] = vs[src0[sel]]
            text = flat.tobytes()
        if slow_rows and any(a <= r < b for r in slow_rows):
            text = _patch_slow_rows(st, text, a, b, delta, slow_rows, qemu10)
        return text

    for a in range(0, n, block):
        yield render(a)


def _patch_slow_rows(st: SimpleTrace, text: bytes, a: int, b: int, delta: np.ndarray, slow_rows: set,
                     qemu10: bool = False) -> bytes:
    """Re-render lines whose delta Python's float formatting must print (huge or wrapped deltas)."""
    lines = text.split(b"\n")
    ts = st.timestamps
    for r in sorted(x for x in slow_rows if a <= x < b):
        d = int(ts[r]) - int(ts[r - 1]) if r > 0 else 0
        fields = lines[r - a].split(b" ")
        fields[1] = delta_text(d, qemu10).encode()
        lines[r - a] = b" ".join(fields)
    return b"\n".join(lines)


def write_simpletrace_text(st: SimpleTrace, out: BinaryIO, qemu10: bool = False) -> None:
    """Write simpletrace.py's text for st to a binary stream (no copy of the rendered chunks)."""
    try:
        plan = plan_simpletrace(st, qemu10)
    except _TooManyGroups:
        for chunk in _iter_simpletrace_text_blocks(st, qemu10=qemu10):
            out.write(chunk)
        return
    buf: Optional[np.ndarray] = None
    for a, b in plan.windows():
        need = int(plan.dst[b - 1] + plan.L_row[b - 1] - plan.dst[a])
        if buf is None or len(buf) < need:
            buf = np.empty(need, np.uint8)
        size = plan.render(a, b, buf)
        out.write(memoryview(buf[:size]))


def _write_all(fd: int, view: memoryview) -> None:
    while len(view):
        n = os.write(fd, view)
        view = view[n:]


class _Windows:
    """Renders the windows of a plan into one reused buffer."""

    def __init__(self, plan: _Plan) -> None:
        self.plan = plan
        self.buf: Optional[np.ndarray] = None

    def render(self, a: int, b: int) -> memoryview:
        plan = self.plan
        need = int(plan.dst[b - 1] + plan.L_row[b - 1] - plan.dst[a])
        if self.buf is None or len(self.buf) < need:
            self.buf = np.empty(need, np.uint8)
        size = plan.render(a, b, self.buf)
        return memoryview(self.buf[:size])


def write_simpletrace_fd(st: SimpleTrace, fd: int, jobs: int = 2, qemu10: bool = False) -> None:
    """Write simpletrace.py's text for st to a file descriptor.

    With jobs >= 2 and a large trace, a forked helper renders every other window while this
    process renders and writes the others; the two take turns to write, so the output is in
    order. (Rendering is numpy work that holds the GIL: threads would not run it in parallel.)
    """
    try:
        plan = plan_simpletrace(st, qemu10)
    except _TooManyGroups:
        for chunk in _iter_simpletrace_text_blocks(st, qemu10=qemu10):
            _write_all(fd, memoryview(chunk))
        return
    wins = list(plan.windows())
    if jobs < 2 or len(wins) < 4 or not hasattr(os, "fork"):
        w = _Windows(plan)
        for a, b in wins:
            _write_all(fd, w.render(a, b))
        return
    to_child_r, to_child_w = os.pipe()
    to_parent_r, to_parent_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the helper: odd windows
        code = 0
        try:
            os.close(to_child_w)
            os.close(to_parent_r)
            w = _Windows(plan)
            for i in range(1, len(wins), 2):
                view = w.render(*wins[i])
                if os.read(to_child_r, 1) != b"g":
                    code = 1  # the parent gave up
                    break
                _write_all(fd, view)
                os.write(to_parent_w, b"g")
        except BrokenPipeError:
            code = 3
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(to_child_r)
    os.close(to_parent_w)
    ok = False
    try:
        w = _Windows(plan)
        for i in range(0, len(wins), 2):
            view = w.render(*wins[i])
            if i > 0:
                _wait_turn(to_parent_r, pid)
            _write_all(fd, view)
            if i + 1 < len(wins):
                os.write(to_child_w, b"g")
        if len(wins) % 2 == 0:
            _wait_turn(to_parent_r, pid)  # the helper writes the last window
        ok = True
    finally:
        os.close(to_child_w)
        os.close(to_parent_r)
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:  # already reaped by _wait_turn
            status = 0
        if ok and os.waitstatus_to_exitcode(status) != 0:
            raise VirtoptError("the helper process that renders half of the text failed")


def _wait_turn(fd: int, pid: int) -> None:
    if os.read(fd, 1) == b"g":
        return
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 3:
        raise BrokenPipeError("the reader of the output went away")
    raise VirtoptError(f"the helper process that renders half of the text failed (exit {code})")


def _fmt_arg(v) -> str:
    if isinstance(v, int):
        return f"0x{v:x}"
    return str(v)


def iter_simpletrace_text_records(records: Iterable[TraceRecord], qemu10: bool = False) -> Iterator[bytes]:
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
        fields = [r.name, delta_text(d, qemu10), f"pid={r.pid or 0}"]
        fields += [f"{k}={_fmt_arg(v)}" for k, v in r.args.items()]
        buf.append(" ".join(fields) + (" " if qemu10 and not r.args else ""))
        if len(buf) >= 4096:
            yield ("\n".join(buf) + "\n").encode()
            buf = []
    if buf:
        yield ("\n".join(buf) + "\n").encode()


def iter_json(records: Iterable[TraceRecord]) -> Iterator[bytes]:
    """A JSON array of {"event", "timestamp-ns", "pid", "args": {name: value}}, one record per line.

    Our keys are kebab-case (CONTRIBUTING.md); the keys inside ``args`` are QEMU's own argument
    names from trace-events (``read_from_disk``), kept as QEMU spells them: they are data.
    """
    first = True
    buf: list[str] = ["[\n"]
    for r in records:
        s = json.dumps({"event": r.name, "timestamp-ns": r.timestamp_ns, "pid": r.pid, "args": r.args})
        buf.append(("    " if first else ",\n    ") + s)
        first = False
        if len(buf) >= 4096:
            yield "".join(buf).encode()
            buf = []
    buf.append("\n]\n" if not first else "]\n")
    yield "".join(buf).encode()


CSV_FIELDS = ["index", "event", "timestamp-ns", "pid", "args"]  # the JSON's names


def iter_csv(records: Iterable[TraceRecord]) -> Iterator[bytes]:
    """CSV: index,event,timestamp-ns,pid,args with args as ``name=value`` separated by spaces (ints decimal)."""
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
