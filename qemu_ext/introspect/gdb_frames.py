"""Stack unwinding for the gdb backend (GdbTarget.frames): a thread's own stack, or a stack that
starts from saved registers (a yielded coroutine's jmp_buf), unwound by gdb from memory with
QEMU's and glibc's CFI. Nothing is written: no register of the inferior changes and no function
in QEMU is called (QEMU's `qemu bt` writes $rsp/$rip and calls functions; this does neither).

The saved registers are presented by a gdb unwinder as the caller of the thread's newest frame
(the frame id is put just below the saved stack pointer, so gdb's "inner than callee" check
passes); gdb then walks the older frames by itself. Only imported inside gdb.
"""

from __future__ import annotations

from typing import Any, Optional

from gdb.unwinder import Unwinder, register_unwinder  # type: ignore[import-not-found]

import gdb  # type: ignore[import-not-found]

OUTERMOST = ("__start_context", "start_thread", "clone3", "__clone3", "_start")


class _FrameId:
    def __init__(self, sp: Any, pc: Any) -> None:
        self.sp, self.pc = sp, pc


class SavedContextUnwinder(Unwinder):
    """While ``regs`` is set: the selected thread's newest frame has these registers as its caller."""

    def __init__(self) -> None:
        super().__init__("virtopt-saved-context")
        self.regs: Optional[dict[str, int]] = None

    def __call__(self, pending: Any) -> Any:
        if self.regs is None or pending.level() != 0:
            return None
        ulong = gdb.lookup_type("unsigned long")
        info = pending.create_unwind_info(_FrameId(gdb.Value(self.regs["rsp"] - 16).cast(ulong),
                                                   pending.read_register("rip")))
        for reg, val in self.regs.items():
            info.add_saved_register(reg, gdb.Value(val).cast(ulong))
        return info


_UNWINDER: list[SavedContextUnwinder] = []


def _unwinder() -> SavedContextUnwinder:
    if not _UNWINDER:
        u = SavedContextUnwinder()
        register_unwinder(None, u, replace=True)
        _UNWINDER.append(u)
    return _UNWINDER[0]


def frame_dict(f: Any, symbolize: Any) -> dict[str, Any]:
    try:
        sal = f.find_sal()
        file = sal.symtab.filename if sal.symtab else None
        line = sal.line or None
    except gdb.error:
        file, line = None, None
    name = f.name()
    pc = int(f.pc())
    if not name:
        name = symbolize(pc)
    return {"pc": pc, "function": name, "file": file, "line": line,
            "inline": f.type() == gdb.INLINE_FRAME}


def frames(thread: Any, regs: Optional[dict[str, int]], symbolize: Any, limit: int = 64) -> list[dict[str, Any]]:
    """The frames of gdb thread ``thread`` (newest first), or of the stack the saved registers
    ``regs`` (rip, rsp, rbp, rbx, r12-r15) describe."""
    selected = gdb.selected_thread()
    u = _unwinder() if regs is not None else None
    out: list[dict[str, Any]] = []
    try:
        thread.switch()
        if u is not None:
            u.regs = regs
        gdb.invalidate_cached_frames()
        f: Optional[Any] = gdb.newest_frame()
        if u is not None and f is not None:
            f = f.older()
        while f is not None and len(out) < limit:
            if not f.pc():
                break
            fr = frame_dict(f, symbolize)
            out.append(fr)
            if fr["function"] in OUTERMOST:
                break
            try:
                f = f.older()
            except gdb.error:
                break
    except gdb.error:
        pass
    finally:
        if u is not None:
            u.regs = None
        gdb.invalidate_cached_frames()
        if selected is not None and selected.is_valid():
            selected.switch()
    return out
