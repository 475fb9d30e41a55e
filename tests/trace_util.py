"""Helpers for the trace tests and bench: real traces from a debug QEMU, that version's own simpletrace.py.

Everything takes a ``qemu_ext.vm.QemuBuild`` (a debug build: simple+log trace backends, its
source tree in ``build.src``), so that every comparison runs on the QEMU that wrote the trace.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from qemu_ext import vm


def events_file(build: vm.QemuBuild) -> Path:
    """The trace-events-all of the build's QEMU version.

    The debug builds make only the three binaries (not the install target that writes
    trace-events-all), so this is the stock package of the same series: Debian's 7.2 in
    /usr/share/qemu, or 10.0's private prefix (same Debian source version as the debug build).
    """
    if build.trace_events is not None:
        return build.trace_events
    stock = vm.find_build(build.series, debug=False)
    if stock is not None and stock.trace_events is not None:
        return stock.trace_events
    assert build.src is not None
    raise AssertionError(f"no trace-events-all for QEMU {build.series}: install its stock package beside the debug build")


def capture_qemu_io(
    build: vm.QemuBuild,
    image: Path,
    trace: Path,
    commands: Sequence[str],
    pattern: str = "qcow2_*",
    image_opts: Optional[str] = None,
    timeout: float = 600,
) -> str:
    """Run the build's qemu-io with ``-T PATTERN,file=TRACE`` on image; commands go to its stdin.

    Returns the log backend's text (stderr): the same events, written by the other backend.
    """
    argv = [build.io, "-T", f"{pattern},file={trace}"]
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
        env=build.env(),
    )
    if cp.returncode != 0:
        raise AssertionError(f"qemu-io {build.label} failed ({cp.returncode}): {cp.stderr[-500:]}")
    return cp.stderr


def simpletrace_argv(build: vm.QemuBuild, trace: Path, events: Optional[Path] = None) -> list[str]:
    """The command line of the build's own scripts/simpletrace.py, run by the system Python (as a user would)."""
    script = build.simpletrace
    assert script is not None, f"{build.label} has no scripts/simpletrace.py"
    py = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    return [py, str(script), str(events or events_file(build)), str(trace)]


def simpletrace_py(
    build: vm.QemuBuild, trace: Path, events: Optional[Path] = None, check: bool = True
) -> subprocess.CompletedProcess:
    """QEMU's own decoder of that version, on trace, with that version's trace-events-all."""
    cp = subprocess.run(simpletrace_argv(build, trace, events), capture_output=True, timeout=600)
    if check and cp.returncode != 0:
        raise AssertionError(f"simpletrace.py {build.label} failed ({cp.returncode}): {cp.stderr[-800:]!r}")
    return cp


def parse_simpletrace_text(text: str) -> list[tuple[str, int, int, dict[str, str]]]:
    """simpletrace.py's lines as (name, timestamp_ns relative to the first record, pid, {arg: text}).

    Both versions' lines: 10.0 ends a line without arguments with a space after ``pid=N``.
    """
    out = []
    t = 0
    for line in text.splitlines():
        fields = line.rstrip(" ").split(" ")
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


def mixed_workload(n: int, seed: int = 7, image_size: int = 1 << 30) -> list[str]:
    """qemu-io commands for a mixed qcow2 trace: asynchronous writes (cluster and L2 allocation, COW),
    reads, zero writes and flushes, several requests in flight (many coroutine and qiov pointers)."""
    r = random.Random(seed)
    cmds = []
    for i in range(n):
        x = r.random()
        ln = r.choice([4096, 16384, 65536, 131072, 262144])
        off = r.randrange(0, (image_size - ln) // 16384) * 16384
        if x < 0.5:
            cmds.append(f"aio_write -P {i % 250 + 1} {off} {ln}")
        elif x < 0.9:
            cmds.append(f"aio_read {off} {ln}")
        elif x < 0.95:
            cmds.append(f"aio_write -z {off} {ln}")
        else:
            cmds.append("aio_flush")
        if i % 16 == 15:
            cmds.append("aio_flush")
    cmds.append("aio_flush")
    return cmds
