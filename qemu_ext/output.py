"""Rendering helpers shared by every front door: output formats, progress bars, plots."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Iterable, Optional, Sequence

from qemu_ext.errors import NotAvailableError


def add_output_option(parser: argparse.ArgumentParser, choices: Sequence[str] = ("human", "json")) -> None:
    """Add qemu-img's ``--output=human|json`` (plus any extra formats) to a sub-command."""
    parser.add_argument(
        "--output",
        choices=list(choices),
        default=choices[0],
        help=f"output format ({', '.join(choices)}; default {choices[0]})",
    )


def number(kind: type = float, lo: float = 0, hi: float = float("inf"), lo_open: bool = False,
           what: str = "") -> Callable[[str], Any]:
    """The argparse ``type`` of a numeric option: a finite ``kind`` in [lo, hi] ((lo, hi] with
    ``lo_open``). One wording per condition (a usage error, exit 2): ``not a number: 'abc'``,
    ``-1 is out of range (from 0 to 3600)`` (``what`` replaces the range text)."""
    import math

    def conv(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(v) or v > hi or (v <= lo if lo_open else v < lo):
            f = (lambda x: str(int(x))) if kind is int else (lambda x: f"{x:g}")
            if hi == float("inf"):
                rng = what or (f"above {f(lo)}" if lo_open else f"{f(lo)} or more")
            else:
                rng = what or (f"above {f(lo)} and at most {f(hi)}" if lo_open else f"from {f(lo)} to {f(hi)}")
            raise argparse.ArgumentTypeError(f"{text} is out of range ({rng})")
        return v

    return conv


def dumps_json(obj: Any) -> str:
    """JSON the way qemu-img prints it: 4-space indent, keys in insertion order.

    The same bytes as ``json.dumps(obj, indent=4)`` at twice its speed (the standard library's
    indenting encoder is pure Python: 15 ms for the 4,069 events of ``inspect PID trace list``,
    here 7 ms): strings through the C escaper, containers by one recursive writer. Anything
    outside plain dicts (string keys), lists, tuples, strings, numbers, bools and None goes to
    ``json.dumps`` as it is."""
    out: list[str] = []
    app = out.append
    string = _json_string

    def dump(o: Any, ind: str) -> None:
        t = type(o)
        if t is str:
            app(string(o))
        elif t is dict:
            if not o:
                app("{}")
                return
            inner = ind + "    "
            sep = "{\n" + inner
            for k, v in o.items():
                if type(k) is not str:
                    raise TypeError("key")
                app(sep)
                app(string(k))
                app(": ")
                tv = type(v)
                if tv is str:
                    app(string(v))
                elif tv is dict or tv is list or tv is tuple:
                    dump(v, inner)
                else:
                    app(_json_scalar(v))
                sep = ",\n" + inner
            app("\n" + ind + "}")
        elif t is list or t is tuple:
            if not o:
                app("[]")
                return
            inner = ind + "    "
            sep = "[\n" + inner
            for v in o:
                app(sep)
                dump(v, inner)
                sep = ",\n" + inner
            app("\n" + ind + "]")
        else:
            app(_json_scalar(o))

    try:
        dump(obj, "")
    except (TypeError, RecursionError):
        return json.dumps(obj, indent=4)
    return "".join(out)


_json_string = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]
_INF = float("inf")


def _json_scalar(o: Any) -> str:
    """A number, bool or None as json.dumps writes it (floats by repr, NaN/Infinity as it allows)."""
    if o is None:
        return "null"
    if o is True:
        return "true"
    if o is False:
        return "false"
    if isinstance(o, int):
        return int.__repr__(o)
    if isinstance(o, float):
        if o != o:
            return "NaN"
        if o == _INF:
            return "Infinity"
        if o == -_INF:
            return "-Infinity"
        return float.__repr__(o)
    raise TypeError(type(o).__name__)


def print_json(obj: Any) -> None:
    sys.stdout.write(dumps_json(obj) + "\n")


def human_size(val: float) -> str:
    """QEMU's size_to_str() (util/cutils.c, 7.2 and 10.0), as qemu-img prints sizes: 512 B, 348 KiB,
    64 MiB, 1.5 GiB. The one size formatter of every front door's human output."""
    import math

    val = int(val)
    if val <= 0:
        return f"{val} B" if val < 0 else "0 B"
    _m, e = math.frexp(val / (1000.0 / 1024.0))
    e = int((e - 1) / 10) * 10  # C division truncates toward zero
    prefix = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"][min(e // 10, 6)]
    return f"{val / (1 << e):0.3g} {prefix}B"


def percent(fraction: Optional[float], digits: int = 1) -> str:
    """A ratio for people: 0.305 -> "30.5%". JSON carries the fraction itself (0.305)."""
    if fraction is None:
        return "-"
    return f"{fraction * 100:.{digits}f}%"


def duration(seconds: Optional[float]) -> str:
    """The one duration format of human output: 850 ns, 234 µs, 1.20 ms, 3.40 s, 2 min 05 s, 1 h 02 min."""
    if seconds is None:
        return "-"
    s = float(seconds)
    neg, s = s < 0, abs(s)
    if s < 1e-6:
        text = f"{s * 1e9:.0f} ns"
    elif s < 1e-3:
        text = f"{s * 1e6:.3g} µs"
    elif s < 1:
        text = f"{s * 1e3:.3g} ms"
    elif s < 60:
        text = f"{s:.3g} s"
    elif s < 3600:
        text = f"{int(s // 60)} min {int(s % 60):02d} s"
    else:
        text = f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"
    return "-" + text if neg else text


def count(n: Optional[float]) -> str:
    """An integer count with thousands separators (1,234,567), the form of every total and rate."""
    if n is None:
        return "-"
    if isinstance(n, float) and not n.is_integer():
        return f"{n:,.1f}"
    return f"{int(n):,}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """The one text table of every front door: headers, then rows; columns in ``right`` are right-aligned."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = []
    for r in cells:
        parts = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(r)]
        out.append("  ".join(parts).rstrip())
    return "\n".join(out)


def progress(total: Optional[int], desc: str, unit: str = "it", unit_scale: bool = False):  # -> tqdm
    """A progress bar on stderr that shows up only for scans lasting over a second on a terminal."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit_scale,
        file=sys.stderr,
        delay=1.0,
        disable=not sys.stderr.isatty(),
        leave=False,
    )


def ascii_plot(
    xs: Sequence[float],
    ys: Sequence[float],
    width: int = 64,
    height: int = 16,
    xlabel: str = "",
    ylabel: str = "",
    logx: bool = False,
    xfmt=str,
    yfmt=lambda v: f"{v:.3g}",
) -> str:
    """A small terminal line plot (for `curve` and `summary` when no PNG is asked for)."""
    import math

    pts = [(float(x), float(y)) for x, y in zip(xs, ys) if not (logx and x <= 0)]
    if not pts:
        return "(no data to plot)"
    tx = [math.log2(x) if logx else x for x, _ in pts]
    ymin = min(y for _, y in pts)
    ymax = max(y for _, y in pts)
    if ymax == ymin:
        ymax = ymin + 1
    xmin, xmax = min(tx), max(tx)
    if xmax == xmin:
        xmax = xmin + 1
    grid = [[" "] * width for _ in range(height)]
    for (_x, y), t in zip(pts, tx):
        col = round((t - xmin) / (xmax - xmin) * (width - 1))
        row = height - 1 - round((y - ymin) / (ymax - ymin) * (height - 1))
        grid[row][col] = "*"
    lw = max(len(yfmt(ymax)), len(yfmt(ymin)))
    lines = []
    for r, row in enumerate(grid):
        label = yfmt(ymax) if r == 0 else yfmt(ymin) if r == height - 1 else ""
        lines.append(f"{label:>{lw}} |" + "".join(row))
    lines.append(" " * lw + " +" + "-" * width)
    left, right = xfmt(pts[0][0]), xfmt(pts[-1][0])
    lines.append(" " * (lw + 2) + left + " " * max(1, width - len(left) - len(right)) + right)
    if xlabel or ylabel:
        lines.append(" " * (lw + 2) + f"x: {xlabel}   y: {ylabel}".strip())
    return "\n".join(lines)


def tune_bulk_numpy() -> None:
    """Call before bulk numpy work (trace decoding, qcow2 scans, L2 curves): the one tuning of every front door.

    No OpenBLAS/OpenMP thread pool (virtopt does no linear algebra; starting the pool costs more
    than a tenth of a second on 2 cores; only effective before numpy is imported), and glibc malloc
    keeps freed big arrays for reuse instead of returning them to the kernel (with its defaults,
    each array of tens of MB is a fresh mmap whose pages fault in again: a third of the run time
    of a bulk decode on a VM). ``VIRTOPT_MALLOPT=0`` leaves malloc alone.
    """
    import os

    if "numpy" not in sys.modules:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
            os.environ.setdefault(var, "1")
    if os.environ.get("VIRTOPT_MALLOPT") == "0":
        return
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt(M_MMAP_THRESHOLD, 1 << 30)
    mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)


def check_plot_path(path: str) -> str:
    """The PNG a ``--plot`` option names, checked before any work: a name ending in .png (a usage
    error otherwise, exit 2) in a directory that exists (``cannot open PATH: No such file or
    directory`` otherwise). Returns the path, as the plot will be written and reported."""
    import os

    from qemu_ext.errors import VirtoptError, open_error

    if not str(path).lower().endswith(".png"):
        raise VirtoptError(f"--plot {path}: the plot is a PNG image: give a file name ending in .png", exit_code=2)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        err = FileNotFoundError(2, os.strerror(2)) if not os.path.exists(parent) else NotADirectoryError(20, os.strerror(20))
        raise open_error(path, err)
    if os.path.isdir(path):
        raise open_error(path, IsADirectoryError(21, os.strerror(21)))
    return str(path)


def save_plot(
    path: str,
    series: Iterable[tuple[str, Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    title: str = "",
    logx: bool = False,
    kind: str = "line",
    *,
    xfmt: Optional[Callable[[float], str]] = None,
    yfmt: Optional[Callable[[float], str]] = None,
    panels: Sequence[dict] = (),
    marks: Sequence[tuple[str, float, float]] = (),
) -> str:
    """Write a PNG with matplotlib (the `plot` extra); return the file written (the path given).

    kind: line | step | bar | barh. xfmt/yfmt format the tick labels (use the units of the text
    output: ``duration``, ``count``, ``human_size``). panels: more plots below the first, each a
    dict of these same arguments (series, xlabel, ylabel, title, logx, kind, xfmt, yfmt, marks).
    marks: (label, x, y) points marked and labelled on the plot (the sizes a table names).
    A name that is not .png or a directory that does not exist is one clear line (check_plot_path).
    """
    check_plot_path(path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError as exc:
        raise NotAvailableError("--plot needs matplotlib: pip install 'virtopt[plot]'") from exc
    specs = [dict(series=series, xlabel=xlabel, ylabel=ylabel, title=title, logx=logx, kind=kind, xfmt=xfmt,
                  yfmt=yfmt, marks=marks), *panels]
    fig, axes = plt.subplots(len(specs), 1, figsize=(8, 4.5 * len(specs)), dpi=100, squeeze=False)
    try:
        for ax, spec in zip([row[0] for row in axes], specs):
            k = spec.get("kind", "line")
            labelled = False
            for label, xs, ys in spec["series"]:
                labelled = labelled or bool(label)
                if k == "bar":
                    ax.bar(list(xs), list(ys), label=label)
                elif k == "barh":
                    ax.barh(list(xs), list(ys), label=label)
                elif k == "step":
                    ax.step(list(xs), list(ys), where="post", label=label)
                else:
                    ax.plot(list(xs), list(ys), label=label)
            for label, x, y in spec.get("marks", ()):
                ax.plot([x], [y], marker="o", linestyle="none", color="black", markersize=5)
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, -10), fontsize="x-small")
            if spec.get("logx"):
                ax.set_xscale("log", base=2)
            for axis, fmt in ((ax.xaxis, spec.get("xfmt")), (ax.yaxis, spec.get("yfmt"))):
                if fmt is not None:
                    axis.set_major_formatter(FuncFormatter(lambda v, _pos, f=fmt: f(v)))
            ax.set_xlabel(spec.get("xlabel", ""))
            ax.set_ylabel(spec.get("ylabel", ""))
            if spec.get("title"):
                ax.set_title(spec["title"])
            ax.grid(True, alpha=0.3)
            if labelled:
                ax.legend(loc="best", fontsize="small")
        fig.tight_layout()
        try:
            fig.savefig(path, format="png")
        except OSError as exc:
            from qemu_ext.errors import open_error

            raise open_error(path, exc) from None
    finally:
        plt.close(fig)
    return str(path)
