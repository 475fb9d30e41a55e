"""Load QEMU's own scripts/qemu-gdb.py beside virtopt's commands, when it can be found.

Where from, in order: the ``virtopt-qemu-gdb-script`` parameter, $VIRTOPT_QEMU_GDB_SCRIPT,
or a QEMU source tree above the executable (a build directory sits inside its source
tree: src/build/qemu-system-x86_64 -> src/scripts/qemu-gdb.py). Tried at source time and
again whenever gdb loads a new executable (sourcing before attaching works too).
"""

from __future__ import annotations

import os
from typing import Optional

import gdb
from qemu_ext.host import procfs

LOADED: list[str] = []
NAMESPACES: list[dict] = []


def find_script(exe: Optional[str]) -> Optional[str]:
    cand = os.environ.get("VIRTOPT_QEMU_GDB_SCRIPT")
    if PARAM is not None and PARAM.value:
        cand = PARAM.value
    if cand:
        return cand if os.path.isfile(cand) else None
    if not exe:
        return None
    d = os.path.dirname(os.path.realpath(exe))
    for _ in range(4):
        script = os.path.join(d, "scripts", "qemu-gdb.py")
        if os.path.isfile(script) and os.path.isdir(os.path.join(d, "scripts", "qemugdb")):
            return script
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    return None


def _exe() -> Optional[str]:
    try:
        inf = gdb.selected_inferior()
        if inf is not None and inf.pid:
            link = procfs.proc_path(inf.pid, "exe")
            if os.access(link, os.R_OK):
                return os.path.realpath(link)
    except gdb.error:
        pass
    return gdb.current_progspace().filename


def load(explicit: bool = False) -> Optional[str]:
    """Source qemu-gdb.py once; returns its path, None when not found (or it failed)."""
    script = find_script(_exe())
    if script is None:
        if explicit:
            gdb.write("virtopt: no QEMU scripts/qemu-gdb.py found\n", gdb.STDERR)
        return None
    script = os.path.realpath(script)
    if script in LOADED:
        return script
    # Run it in a namespace kept alive here: a nested `source` from Python loses the
    # command objects it creates (and with them the `qemu` commands).
    ns = {"__file__": script, "__name__": "qemu_gdb_script"}
    try:
        with open(script) as f:
            code = compile(f.read(), script, "exec")
        exec(code, ns)
    except Exception as exc:
        gdb.write(f"virtopt: could not load {script}: {exc}\n", gdb.STDERR)
        return None
    LOADED.append(script)
    NAMESPACES.append(ns)
    if PARAM is not None and not PARAM.value:
        PARAM.value = script  # `show virtopt-qemu-gdb-script` says what was loaded
    return script


class QemuScriptParameter(gdb.Parameter):
    """Path of QEMU's scripts/qemu-gdb.py to load beside virtopt's commands."""

    set_doc = "Set the QEMU scripts/qemu-gdb.py that virtopt loads."
    show_doc = "Show the QEMU scripts/qemu-gdb.py that virtopt loads."

    def __init__(self) -> None:
        super().__init__("virtopt-qemu-gdb-script", gdb.COMMAND_DATA, gdb.PARAM_OPTIONAL_FILENAME)

    def get_set_string(self) -> str:
        path = load(explicit=True)
        return f"loaded {path}" if path else ""


PARAM: Optional[QemuScriptParameter] = None


def _on_new_objfile(event: gdb.NewObjFileEvent) -> None:
    if LOADED:
        return
    try:
        if event.new_objfile.filename == gdb.current_progspace().filename:
            load()
    except Exception:  # never break gdb's loading of a file
        pass


def setup() -> None:
    global PARAM
    if PARAM is None:
        PARAM = QemuScriptParameter()
        gdb.events.new_objfile.connect(_on_new_objfile)
    load()
