"""Rendering helpers shared by every front door: output formats, progress bars, plots."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Iterable, Optional, Sequence

from qemu_ext.errors import NotAvailableError


def add_output_option(parser: argparse.ArgumentParser, choices: Sequence[str] = ("human", "json")) -> None:
    """Add qemu-img's ``--output=human|json`` (plus any extra formats) to a sub-command."""
    parser.add_argument(
        "--output",
        choices=list(choices),
        default=choices[0],
        help=f"output format ({', '.join(choices)}; default {choices[0]})",
    )


def dumps_json(obj: Any) -> str:
    """JSON the way qemu-img prints it: 4-space indent, keys in insertion order."""
    return json.dumps(obj, indent=4)


def print_json(obj: Any) -> None:
    sys.stdout.write(dumps_json(obj) + "\n")


def human_size(n: float) -> str:
    """qemu-img's size rendering: 1 KiB, 64 MiB, 1.5 GiB (base 1024, up to 3 significant digits)."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    i = 0
    v = float(n)
    while v >= 1024 and i < len(units) - 1:
        v /= 1024
        i += 1
    if i == 0:
        return f"{int(n)} B"
    text = f"{v:.3g}"
    return f"{text} {units[i]}"


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


def save_plot(
    path: str,
    series: Iterable[tuple[str, Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    title: str = "",
    logx: bool = False,
    kind: str = "line",
) -> None:
    """Write a PNG with matplotlib (the `plot` extra). kind: line | step | bar."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise NotAvailableError("--plot needs matplotlib: pip install 'virtopt[plot]'") from exc
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    try:
        for label, xs, ys in series:
            if kind == "bar":
                ax.bar(list(xs), list(ys), label=label)
            elif kind == "step":
                ax.step(list(xs), list(ys), where="post", label=label)
            else:
                ax.plot(list(xs), list(ys), label=label)
        if logx:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best")
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
