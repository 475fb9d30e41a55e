"""gdb-side utilities of the virtopt pack (like Linux's scripts/gdb/linux/utils.py): the Target
the views read through, its per-objfile lifetime, and the few gdb value helpers commands need.

Every view lives in qemu_ext.introspect and is written once for gdb and drgn; this module hands
it a ``GdbTarget`` (qemu_ext.introspect.gdb_backend) for the selected inferior, dropped whenever
gdb loads or drops objfiles (a new QEMU, a re-attach, a core) so types are looked up again.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import gdb  # type: ignore[import-not-found]
from qemu_ext.introspect import gdb_backend
from qemu_ext.introspect.gdb_backend import GdbTarget
from qemu_ext.introspect.target import IntrospectError

_TARGET: list[Optional[GdbTarget]] = [None]
_CACHES: list[dict] = []
_IGNORE_DEBUG_INFO: list[Callable[[], bool]] = [lambda: False]


def per_objfile_cache() -> dict:
    """A dict emptied whenever gdb loads or drops objfiles."""
    d: dict = {}
    _CACHES.append(d)
    return d


def clear_caches(*_: object) -> None:
    _TARGET[0] = None
    gdb_backend.forget()
    for d in _CACHES:
        d.clear()


def connect_events(ignore_debug_info: Callable[[], bool]) -> None:
    _IGNORE_DEBUG_INFO[0] = ignore_debug_info
    gdb.events.new_objfile.connect(clear_caches)
    gdb.events.clear_objfiles.connect(clear_caches)
    gdb.events.exited.connect(clear_caches)


def target() -> GdbTarget:
    """The Target of the selected inferior (a live QEMU gdb holds stopped, or a core)."""
    t = _TARGET[0]
    inf = gdb.selected_inferior()
    if t is None or t.inf != inf or t.pid != inf.pid or t.ignore_debug_info != _IGNORE_DEBUG_INFO[0]():
        t = GdbTarget(ignore_debug_info=_IGNORE_DEBUG_INFO[0]())
        _TARGET[0] = t
    return t


def parse_int(text: str) -> int:
    """An integer or address the way gdb reads one (0x.., decimal, or an expression)."""
    t = text.strip()
    try:
        return int(t, 0)
    except ValueError:
        pass
    try:
        return int(gdb.parse_and_eval(t))
    except gdb.error as exc:
        raise IntrospectError(f"not a number or address: {text}") from exc


def frame_info(f: Any) -> dict[str, Any]:
    """One frame as the pack's JSON shows it (level is filled in by the caller)."""
    sal = f.find_sal()
    name = f.name()
    if not name:
        try:
            name = target().symbolize(f.pc())
        except IntrospectError:
            name = None
    return {"pc": f.pc(), "function": name, "file": sal.symtab.filename if sal.symtab else None,
            "line": sal.line or None}
