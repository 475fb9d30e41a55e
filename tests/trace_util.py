"""Helpers for the trace tests and bench: real traces from the debug QEMU, QEMU's own simpletrace.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

SYSTEM_EVENTS = Path("/usr/share/qemu/trace-events-all")


def events_file(debug_src: Optional[Path] = None) -> Path:
    """The trace-events-all to hand to simpletrace.py (Debian's, same QEMU version as the debug build)."""
    if SYSTEM_EVENTS.is_file():
        return SYSTEM_EVENTS
    assert debug_src is not None
    return debug_src / "build" / "trace" / "trace-events-all"


def capture_qemu_io(
    debug_src: Path,
    image: Path,
    trace: Path,
    commands: Sequence[str],
    pattern: str = "qcow2_*",
    image_opts: Optional[str] = None,
    timeout: float = 600,
) -> str:
    """Run the debug qemu-io with ``-T PATTERN,file=TRACE`` on image; commands go to its stdin.

    Returns the log backend's text (stderr): the same events, written by the other backend.
    """
    qio = debug_src / "build" / "qemu-io"
    argv = [str(qio), "-T", f"{pattern},file={trace}"]
    if image_opts:
        argv += ["--image-opts", image_opts]
    else:
        argv += ["-f", "qcow2", str(image)]
    cp = subprocess.run(
        argv,
        input="\n".join([*commands, "quit"]) + "\n",
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if cp.returncode != 0:
        raise AssertionError(f"qemu-io failed ({cp.returncode}): {cp.stderr[-500:]}")
    return cp.stderr


def simpletrace_py(debug_src: Path, trace: Path, events: Optional[Path] = None, check: bool = True) -> subprocess.CompletedProcess:
    """QEMU's own decoder, run from the debug source tree with the system Python (as a user would)."""
    script = debug_src / "scripts" / "simpletrace.py"
    py = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    cp = subprocess.run(
        [py, str(script), str(events or events_file(debug_src)), str(trace)], capture_output=True, timeout=600
    )
    if check and cp.returncode != 0:
        raise AssertionError(f"simpletrace.py failed ({cp.returncode}): {cp.stderr[-800:]!r}")
    return cp


def parse_simpletrace_text(text: str) -> list[tuple[str, int, int, dict[str, str]]]:
    """simpletrace.py's lines as (name, timestamp_ns relative to the first record, pid, {arg: text})."""
    out = []
    t = 0
    for line in text.splitlines():
        fields = line.split(" ")
        name, delta, pid = fields[0], fields[1], fields[2]
        whole, frac = delta.lstrip("-").split(".")
        d = int(whole) * 1000 + int(frac)
        t += -d if delta.startswith("-") else d
        args = {}
        for f in fields[3:]:
            k, _, v = f.partition("=")
            args[k] = v
        out.append((name, t, int(pid.split("=")[1]), args))
    return out
