"""The gdb backend: a Target over gdb's Python API (only imported inside gdb).

Memory through ``Inferior.read_memory``/``write_memory`` (a live process gdb holds stopped,
or a core file), types through ``gdb.lookup_type`` converted to TypeInfo, variables through
``gdb.lookup_global_symbol``/``lookup_static_symbol``, registers through the selected thread's
frame. gdb never calls a function in QEMU.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any, Optional

import gdb  # type: ignore[import-not-found]
from qemu_ext.host import procfs

from .target import Field, IntrospectError, MemoryReadError, Target, ThreadInfo, TypeInfo, proc_comm

_CODES = {
    gdb.TYPE_CODE_PTR: "ptr", gdb.TYPE_CODE_ARRAY: "array", gdb.TYPE_CODE_STRUCT: "struct",
    gdb.TYPE_CODE_UNION: "union", gdb.TYPE_CODE_ENUM: "enum", gdb.TYPE_CODE_INT: "int",
    gdb.TYPE_CODE_BOOL: "bool", gdb.TYPE_CODE_CHAR: "int", gdb.TYPE_CODE_FLT: "float",
    gdb.TYPE_CODE_FUNC: "func", gdb.TYPE_CODE_VOID: "void",
}


def convert(t: Any, block: Any = None) -> TypeInfo:
    """gdb.Type -> TypeInfo (fields and targets converted when first used). ``block``: the scope the
    type was met in (a variable's file), where a struct declared in a header is complete."""
    name = str(t)
    s = _complete(t.strip_typedefs(), block)
    kind = _CODES.get(s.code, "int")
    size = 0 if kind in ("void", "func") else s.sizeof
    signed = False
    if kind in ("int", "enum"):
        try:
            signed = bool(s.is_signed)
        except (AttributeError, ValueError, gdb.error):
            signed = False
    length = None
    if kind == "array":
        lo, hi = s.range()
        length = hi - lo + 1
    return TypeInfo(name, kind, size, signed, length, native=(s, block), conv=_lazy)


def _lazy(what: tuple[str, Any]) -> Any:
    part, (s, block) = what
    if part == "target":
        return convert(s.target(), block)
    out: dict[str, Field] = {}
    _collect_fields(_complete(s, block), 0, out, block)
    return out


def _complete(s: Any, block: Any = None) -> Any:
    """The full definition of a struct seen through a declaration only (``typedef struct X X;`` in a
    header): gdb resolves such stubs from the selected frame's scope, which may not see the one
    source file that defines it (block/qcow2-cache.c for Qcow2Cache)."""
    if s.code not in (gdb.TYPE_CODE_STRUCT, gdb.TYPE_CODE_UNION) or s.sizeof:
        return s  # complete (a declaration has no size)
    tag = s.tag
    if tag is None or s.fields():
        # an anonymous struct cannot be declared without its body, and one with members is a
        # definition: both are complete, only empty (the GNU C `struct {} start_init_save;`
        # markers of CPUX86State, target/i386/cpu.h 7.2 and 10.0)
        return s
    kw = "union" if s.code == gdb.TYPE_CODE_UNION else "struct"
    key = (kw, tag, (block.start, block.end) if block is not None else None)
    if key in _COMPLETED:
        return _COMPLETED[key] or s
    full = _find_definition(s, kw, tag, block)
    _COMPLETED[key] = full
    return full or s


#: (struct|union, tag, scope's address range) -> its definition, or None when there is none (a
#: struct only ever declared, or defined empty): looked up once per set of objfiles (forget())
_COMPLETED: dict[tuple[str, str, Any], Any] = {}


def forget() -> None:
    """Drop what was learnt of the types (gdb loaded or dropped objfiles)."""
    _COMPLETED.clear()


def _find_definition(s: Any, kw: str, tag: str, block: Any) -> Any:
    """The sized definition of struct/union tag, or None."""
    if block is not None:
        try:
            full = gdb.lookup_type(f"{kw} {tag}", block).strip_typedefs()
            if full.sizeof:
                return full
        except gdb.error:
            pass
    cands = []
    try:
        cands.append(gdb.lookup_global_symbol(tag, gdb.SYMBOL_STRUCT_DOMAIN))
        cands += gdb.lookup_static_symbols(tag, gdb.SYMBOL_STRUCT_DOMAIN)
    except (gdb.error, AttributeError, TypeError):
        pass
    for sym in cands:
        if sym is not None and sym.type.strip_typedefs().sizeof:
            return sym.type.strip_typedefs()
    # the defining file's symbols are not read yet: `info types` names the file, its static
    # block then has the definition
    try:
        text = gdb.execute(f"info types {tag}", to_string=True)
    except gdb.error:
        return None
    current = None
    for line in text.splitlines():
        if line.startswith("File ") and line.endswith(":"):
            current = line[5:-1]
            continue
        num, _, decl = line.strip().partition(":")
        if current and decl.strip() == f"{kw} {tag};" and num.isdigit():
            try:
                sal = gdb.decode_line(f"{current}:{num}")[1][0]
                full = gdb.lookup_type(f"{kw} {tag}", sal.symtab.static_block()).strip_typedefs()
            except (gdb.error, TypeError, IndexError, AttributeError):
                continue
            if full.sizeof:
                return full
    return None


def _collect_fields(s: Any, base: int, out: dict[str, Field], block: Any = None) -> None:
    for f in s.fields():
        if not hasattr(f, "bitpos"):
            continue  # static members (C++ only)
        ft = f.type
        if not f.name:  # an anonymous struct/union: its members are the parent's
            _collect_fields(ft.strip_typedefs(), base + f.bitpos, out, block)
            continue
        if f.name not in out:
            out[f.name] = Field(f.name, base + f.bitpos, f.bitsize, native=functools.partial(convert, ft, block))


class GdbTarget(Target):
    backend = "gdb"
    stops_process = True

    def __init__(self, ignore_debug_info: bool = False) -> None:
        super().__init__()
        inf = gdb.selected_inferior()
        if inf is None or inf.pid == 0:
            raise IntrospectError("no process: attach to a running QEMU first (gdb -p PID)")
        self.inf = inf
        self.ignore_debug_info = ignore_debug_info
        self._debug: Optional[bool] = None
        # a core: gdb has a core target, and procfs knows nothing of the dead pid
        self.kind = "core" if _is_core() else "live"
        self.pid = inf.pid
        self.can_write = self.kind == "live"
        self.can_read_registers = True

    def exe(self) -> str:
        if self.kind == "live":
            proc = procfs.proc_path(self.pid, "exe")
            if os.access(proc, os.R_OK):
                return proc
        name = gdb.current_progspace().filename
        if not name:
            raise IntrospectError("gdb does not know the executable of this process (use: file QEMU)")
        return name

    def symbol_file(self) -> Optional[str]:
        return gdb.current_progspace().filename

    def core_path(self) -> Optional[str]:
        if self.kind != "core":
            return None
        try:
            text = gdb.execute("info target", to_string=True)
        except gdb.error:
            return None
        m = re.search(r"Local core dump file:\s*\n?\s*`([^']+)'", text)
        return m.group(1) if m else None

    def has_debug_info(self) -> bool:
        if self.ignore_debug_info:
            return False
        if self._debug is None:
            try:
                gdb.lookup_type("CPUState")
                self._debug = True
            except gdb.error:
                self._debug = False
        return self._debug

    def _read_raw(self, addr: int, n: int) -> bytes:
        try:
            return bytes(self.inf.read_memory(addr, n))
        except (gdb.MemoryError, gdb.error, OverflowError, ValueError) as exc:
            raise MemoryReadError(f"cannot read {n} bytes at {addr:#x}: {exc}") from None

    def _write_raw(self, addr: int, data: bytes) -> None:
        try:
            self.inf.write_memory(addr, data)
        except (gdb.MemoryError, gdb.error) as exc:
            raise MemoryReadError(f"cannot write {len(data)} bytes at {addr:#x}: {exc}") from None

    def _native_type(self, name: str) -> Optional[TypeInfo]:
        try:
            return convert(gdb.lookup_type(name))
        except gdb.error:
            return None

    def _native_type_near(self, name: str, near: str) -> Optional[TypeInfo]:
        try:
            fn = gdb.lookup_global_symbol(near) or gdb.lookup_static_symbol(near)
            block = fn.symtab.static_block() if fn is not None and fn.symtab is not None else None
            return convert(gdb.lookup_type(name, block) if block is not None else gdb.lookup_type(name), block)
        except (gdb.error, RuntimeError):
            return self._native_type(name)

    def _native_var(self, name: str) -> Optional[tuple[int, TypeInfo]]:
        try:
            sym = gdb.lookup_global_symbol(name) or gdb.lookup_static_symbol(name)
        except gdb.error:
            sym = None
        if sym is None or sym.is_function or sym.addr_class == gdb.SYMBOL_LOC_TYPEDEF:
            return None
        try:
            v = sym.value()
            addr = v.address
        except gdb.error:
            return None
        if addr is None:
            return None
        try:
            block = sym.symtab.static_block() if sym.symtab is not None else None
        except (gdb.error, RuntimeError):
            block = None
        return int(addr), convert(sym.type, block)

    def _runtime_address(self, name: str) -> Optional[int]:
        try:
            return int(gdb.parse_and_eval(f"(unsigned long)&'{name}'"))
        except gdb.error:
            return None

    def threads(self) -> list[ThreadInfo]:
        out = []
        for th in sorted(self.inf.threads(), key=lambda t: t.num):
            tid = th.ptid[1] or th.ptid[2]
            name = proc_comm(self.pid, tid) if self.kind == "live" else None
            out.append(ThreadInfo(th.num, tid, name))
        return out

    def _thread(self, tid: int) -> Any:
        for th in self.inf.threads():
            if (th.ptid[1] or th.ptid[2]) == tid:
                return th
        return None

    def register(self, tid: int, name: str) -> Optional[int]:
        th = self._thread(tid)
        if th is None:
            return None
        selected = gdb.selected_thread()
        try:
            th.switch()
            return int(gdb.parse_and_eval(f"(unsigned long)${name}"))
        except gdb.error:
            return None
        finally:
            if selected is not None and selected.is_valid():
                selected.switch()

    def frames(self, tid: int, regs: Optional[dict[str, int]] = None, limit: int = 64) -> Optional[list[dict[str, Any]]]:
        th = self._thread(tid)
        if th is None:
            return None
        from . import gdb_frames

        return gdb_frames.frames(th, regs, self.symbolize, limit)

    def frame_functions(self, tid: int, limit: int = 40) -> list[str]:
        """The function names of thread tid's stack, newest first (gdb unwinds from memory)."""
        th = self._thread(tid)
        if th is None:
            return []
        selected = gdb.selected_thread()
        out: list[str] = []
        try:
            th.switch()
            f = gdb.newest_frame()
            while f is not None and len(out) < limit:
                out.append(f.name() or "")
                f = f.older()
        except gdb.error:
            pass
        finally:
            if selected is not None and selected.is_valid():
                selected.switch()
        return out


def _is_core() -> bool:
    try:
        text = gdb.execute("info target", to_string=True)
    except gdb.error:
        return False
    return "Local core dump file" in text
