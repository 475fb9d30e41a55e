"""The backend interface every view is written against, and the backend-neutral pieces on top of it.

A backend (gdb, drgn) supplies a handful of primitives: raw memory reads (and writes where it
can), a QEMU-global variable's address and type, a named type, the threads, one register of a
thread where it can. Everything else lives here, once, for both:

- ``TypeInfo``: a C type reduced to what the views need (kind, size, fields with offsets,
  pointer/array targets), converted lazily from the backend's own type and cached per objfile.
- ``Value``: a typed address: ``v["field"]``, ``v.deref()``, ``v.index(i)``, ``int(v)``,
  ``v.cstring()``. Reads go through the target's snapshot cache (one page read serves many
  fields; a live reader sees one consistent page per read).
- symbols from the executable itself (``elfsyms``: address, size, exported or not), the load
  bias, symbolization, thread-local variables from a thread's $fs_base.

Standard library only: gdb's own Python imports this module.
"""

from __future__ import annotations

import bisect
import dataclasses
import os
import struct
import time
from typing import Any, Callable, Iterator, Optional

from qemu_ext.errors import NotAvailableError, QemuError
from qemu_ext.host import procfs

from . import elf

PAGE = 4096
U64 = (1 << 64) - 1
STT_TLS = 6


class IntrospectError(QemuError):
    """A user-facing problem reading QEMU (one line)."""


class NotAvailable(NotAvailableError, IntrospectError):
    """The view cannot work on this target (no debug info, no KVM, a core, ...): one line."""


class MemoryReadError(IntrospectError):
    """Memory that cannot be read: a dangling pointer, or (live) a structure that changed under us."""


class TornRead(IntrospectError):
    """A live structure changed while it was walked (a cycle, a list longer than its bound)."""


# ---------------------------------------------------------------- types


class Field:
    """A member: ``name``, ``bitpos``, ``bitsize`` (0 unless a bit field) and its ``type``, converted
    from the backend's type when first used (a structure's other members cost nothing)."""

    __slots__ = ("_native", "_type", "bitpos", "bitsize", "name")

    def __init__(self, name: str, bitpos: int, bitsize: int, type_: Optional[TypeInfo] = None,
                 native: Optional[Callable[[], TypeInfo]] = None) -> None:
        self.name, self.bitpos, self.bitsize, self._type, self._native = name, bitpos, bitsize, type_, native

    @property
    def type(self) -> TypeInfo:
        if self._type is None:
            if self._native is None:
                raise IntrospectError(f"member {self.name} has no type")
            self._type = self._native()
        return self._type

    def __repr__(self) -> str:
        return f"<Field {self.name} @{self.bitpos}>"


class TypeInfo:
    """A C type as the views see it. ``kind``: int, bool, enum, float, ptr, array, struct, union,
    func, void. Fields and targets are converted from the backend's type on first use."""

    __slots__ = ("_conv", "_fields", "_native", "_target", "kind", "length", "name", "signed", "size")

    def __init__(self, name: str, kind: str, size: int, signed: bool = False, length: Optional[int] = None,
                 native: Any = None, conv: Optional[Callable[[Any], TypeInfo]] = None,
                 target: Optional[TypeInfo] = None, fields: Optional[dict[str, Field]] = None) -> None:
        self.name, self.kind, self.size, self.signed, self.length = name, kind, size, signed, length
        self._native, self._conv, self._target, self._fields = native, conv, target, fields

    def __repr__(self) -> str:
        return f"<TypeInfo {self.name} {self.kind} {self.size}>"

    @property
    def target(self) -> TypeInfo:
        if self._target is None:
            if self._conv is None:
                raise IntrospectError(f"type {self.name} has no target type")
            self._target = self._conv(("target", self._native))
        return self._target

    @property
    def fields(self) -> dict[str, Field]:
        if self._fields is None:
            self._fields = self._conv(("fields", self._native)) if self._conv is not None else {}
        return self._fields

    def field(self, name: str) -> Field:
        f = self.fields.get(name)
        if f is None:
            raise NotAvailable(f"{self.name} has no member {name}: this QEMU's structures differ")
        return f

    def has(self, name: str) -> bool:
        return name in self.fields

    def offset(self, name: str) -> int:
        return self.field(name).bitpos // 8


def scalar(name: str, size: int, signed: bool = False, kind: str = "int") -> TypeInfo:
    return TypeInfo(name, kind, size, signed)


def pointer_to(t: Optional[TypeInfo], name: str = "") -> TypeInfo:
    return TypeInfo(name or (f"{t.name} *" if t is not None else "void *"), "ptr", 8, target=t)


def struct_type(name: str, size: int, fields: dict[str, tuple[int, TypeInfo]]) -> TypeInfo:
    """A hand-made layout (no DWARF): every offset must be confirmed by the caller (see layouts)."""
    return TypeInfo(name, "struct", size, fields={n: Field(n, off * 8, 0, t) for n, (off, t) in fields.items()})


U8, U16, U32, S32, U64T, S64 = (scalar("uint8_t", 1), scalar("uint16_t", 2), scalar("uint32_t", 4),
                                scalar("int32_t", 4, True), scalar("uint64_t", 8), scalar("int64_t", 8, True))
BOOL = scalar("bool", 1, kind="bool")
VOIDP = pointer_to(None)
CHARP = TypeInfo("char *", "ptr", 8, target=scalar("char", 1, True))


class CachedType:
    """A named type looked up on first use, per target (the target caches per objfile). Declared
    at the top of each view module, like Linux's scripts/gdb utils.CachedType, so a module's
    type dependencies are visible at a glance."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def get(self, t: Target) -> TypeInfo:
        return t.type(self.name)


# ---------------------------------------------------------------- values


class Value:
    """A typed object in QEMU's memory (the address and its TypeInfo)."""

    __slots__ = ("addr", "t", "type")

    def __init__(self, target: Target, addr: int, type_: TypeInfo) -> None:
        self.t, self.addr, self.type = target, addr, type_

    def __repr__(self) -> str:
        return f"<Value {self.type.name} at {self.addr:#x}>"

    def __getitem__(self, name: str) -> Value:
        f = self.type.field(name)
        return Value(self.t, self.addr + f.bitpos // 8, f.type) if not f.bitsize else _BitValue(self, f)

    def has(self, name: str) -> bool:
        return self.type.has(name)

    def __int__(self) -> int:
        ty = self.type
        k = ty.kind
        if k in ("struct", "union", "array", "func", "void"):
            if ty.kind == "struct" and ty.size == 16 and ty.has("lo") and ty.has("hi"):
                return int128(self)
            raise IntrospectError(f"{ty.name} is not a number")
        n = ty.size
        raw = self.t.read(self.addr, n)
        return int.from_bytes(raw, "little", signed=ty.signed and k != "ptr")

    def __index__(self) -> int:
        return int(self)

    def __bool__(self) -> bool:  # explicit: a Value is never silently true
        raise TypeError("use int(v) or v.is_null()")

    def is_null(self) -> bool:
        return int(self) == 0

    def bool(self) -> bool:
        return int(self) != 0

    def ptr(self) -> int:
        """The pointer value (an address; 0 for NULL)."""
        return int(self) & U64

    def deref(self) -> Value:
        p = self.ptr()
        if not p:
            raise MemoryReadError(f"NULL {self.type.name} dereferenced")
        return Value(self.t, p, self.type.target)

    def cast(self, ty: TypeInfo | str) -> Value:
        if isinstance(ty, str):
            ty = self.t.type(ty)
        return Value(self.t, self.addr, ty)

    def as_pointer_to(self, ty: TypeInfo | str) -> Value:
        """The object this pointer-sized value points to, seen as ty (e.g. bs->opaque as BDRVQcow2State)."""
        if isinstance(ty, str):
            ty = self.t.type(ty)
        p = self.ptr()
        if not p:
            raise MemoryReadError(f"NULL pointer where a {ty.name} was expected")
        return Value(self.t, p, ty)

    def index(self, i: int) -> Value:
        ty = self.type
        if ty.kind == "array":
            elem = ty.target
            return Value(self.t, self.addr + i * elem.size, elem)
        if ty.kind == "ptr":
            elem = ty.target
            return Value(self.t, self.ptr() + i * elem.size, elem)
        raise IntrospectError(f"{ty.name} cannot be indexed")

    def cstring(self, limit: int = 256) -> str:
        """A char* (or char[]) as text; "" for NULL; "<unreadable>" for a bad pointer."""
        try:
            if self.type.kind == "array":
                return self.t.read_cstring(self.addr, min(limit, self.type.size or limit))
            return self.t.read_cstring(self.ptr(), limit)
        except MemoryReadError:
            return "<unreadable>"


class _BitValue(Value):
    __slots__ = ("bitoff", "bits")

    def __init__(self, parent: Value, f: Field) -> None:
        super().__init__(parent.t, parent.addr + f.bitpos // 8, f.type)
        self.bitoff, self.bits = f.bitpos % 8, f.bitsize

    def __int__(self) -> int:
        nbytes = (self.bitoff + self.bits + 7) // 8
        raw = int.from_bytes(self.t.read(self.addr, nbytes), "little")
        return (raw >> self.bitoff) & ((1 << self.bits) - 1)


def int128(v: Value) -> int:
    """An Int128 (QEMU's struct {lo, hi} or a native __int128) as a Python int."""
    if v.type.kind == "struct":
        return int(v["lo"]) + (int(v["hi"]) << 64)
    return int.from_bytes(v.t.read(v.addr, 16), "little", signed=True)


# ---------------------------------------------------------------- QEMU lists


MAX_LIST = 100000
_FIRST = ("tqh_first", "lh_first", "slh_first", "sqh_first")
_NEXT = ("tqe_next", "le_next", "sle_next", "sqe_next")


def walk(head: Value, link: str, limit: int = MAX_LIST) -> Iterator[Value]:
    """The elements (pointer Values) of a QTAILQ/QLIST/QSLIST/QSIMPLEQ head linked through member
    ``link``. Bounded and cycle-checked: a cycle or an overlong list is a TornRead (retried on a
    live target, an error on a stopped one)."""
    first = next((n for n in _FIRST if head.has(n)), None)
    if first is None:
        raise NotAvailable(f"{head.type.name} is not a QEMU list head")
    node = head[first]
    seen: set[int] = set()
    nxt_name: Optional[str] = None
    while True:
        p = node.ptr()
        if not p:
            return
        if p in seen:
            raise TornRead(f"the list at {head.addr:#x} loops back to {p:#x}")
        if len(seen) >= limit:
            raise TornRead(f"the list at {head.addr:#x} is longer than {limit} elements")
        seen.add(p)
        yield node
        entry = node.deref()[link]
        if nxt_name is None:
            nxt_name = next((n for n in _NEXT if entry.has(n)), None)
            if nxt_name is None:
                raise NotAvailable(f"{entry.type.name} is not a QEMU list entry")
        node = entry[nxt_name]


def qlist(head: Value, link: str, limit: int = MAX_LIST) -> list[Value]:
    return list(walk(head, link, limit))


# ---------------------------------------------------------------- targets


@dataclasses.dataclass
class ThreadInfo:
    num: int  # the backend's thread number (gdb's); 1.. in order otherwise
    tid: int
    name: Optional[str]  # the OS thread name where the backend knows it (live: procfs.comm)


class Symbol:
    """A symbol of the executable: run-time ``address``, ``size``, ``exported`` (in .dynsym: there
    on stripped builds too; read on first use)."""

    __slots__ = ("_t", "address", "name", "size")

    def __init__(self, name: str, address: int, size: int, target: Target) -> None:
        self.name, self.address, self.size, self._t = name, address, size, target

    @property
    def exported(self) -> bool:
        return self.name in self._t.exported()


class Target:
    """What a view reads from: one QEMU process (live, or its core)."""

    backend = "?"
    #: does reading stop QEMU (gdb: yes; drgn: never)
    stops_process = True

    def __init__(self) -> None:
        self._pages: dict[int, bytes] = {}
        self._types: dict[str, Optional[TypeInfo]] = {}
        self._vars: dict[str, Optional[tuple[int, TypeInfo]]] = {}
        self._syms: Optional[dict[str, elf.Sym]] = None
        self._dyn: Optional[set[str]] = None
        self._bias: Optional[int] = None
        self._sorted: Optional[tuple[list[int], list[tuple[int, int, str]]]] = None
        self._tls: Optional[tuple[int, int, int]] = None
        self.memo: dict[str, Any] = {}  # per-target results other modules cache (events, layouts)
        self.snapshot_time: float = time.time()

    # -- what the target is (backends override)
    kind = "live"  # or "core"
    pid: Optional[int] = None
    can_write = False
    can_read_registers = False

    def exe(self) -> str:
        raise NotImplementedError

    def has_debug_info(self) -> bool:
        raise NotImplementedError

    def relocation_mismatch(self) -> Optional[str]:
        """One line when the reader has this QEMU's symbols at other addresses than the kernel
        mapped the executable (a symbol file loaded before attaching and not relocated)."""
        bias = self.maps_bias()
        if bias is None:
            return None
        for anchor in ("main_loop_tlg", "trace_events_enabled_count", "main"):
            sym = self.elf_symbol(anchor)
            if sym is not None:
                got = self._runtime_address(anchor)
                if got is not None and got != sym.value + bias:
                    return (f"the reader has {anchor} at {got:#x}, but process {self.pid} has it at "
                            f"{sym.value + bias:#x}: its symbols are stale or not relocated "
                            f"(start gdb with -p {self.pid} and no other executable)")
                return None
        return None

    def symbol_file(self) -> Optional[str]:
        """The file the reader takes symbols and types from, when it is not exe() (gdb's `file`)."""
        return None

    def core_path(self) -> Optional[str]:
        """The core file read (None for a live QEMU)."""
        return None

    def executable_mismatch(self) -> Optional[str]:
        """One line when the symbols come from another build than the process runs (build-ids
        differ): every address would be wrong. None when they agree or cannot be compared."""
        if self.kind != "live" or self.pid is None:
            return None
        sym = self.symbol_file()
        link = procfs.proc_path(self.pid, "exe")  # the running file, even if replaced since
        try:
            running = os.path.realpath(link)
        except OSError:
            return None
        if not sym or os.path.realpath(sym) == running:
            return self.relocation_mismatch()
        a, b = elf.build_id(sym), elf.build_id(link)
        if a is None or b is None or a == b:
            return self.relocation_mismatch()
        return (f"the symbols come from {sym} (build-id {a[:12]}) but process {self.pid} runs {running} "
                f"(build-id {b[:12]}): load the right one (file {running})")

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "kind": self.kind, "pid": self.pid, "executable": self.exe(),
                "debug-info": self.has_debug_info(), "can-write": self.can_write,
                "can-read-registers": self.can_read_registers, "stops-process": self.stops_process}

    # -- primitives (backends implement)
    def _read_raw(self, addr: int, n: int) -> bytes:
        raise NotImplementedError

    def _write_raw(self, addr: int, data: bytes) -> None:
        raise NotAvailable("this reader cannot write QEMU's memory")

    def _native_type(self, name: str) -> Optional[TypeInfo]:
        """A named type from the debug info (None when absent)."""
        raise NotImplementedError

    def _native_var(self, name: str) -> Optional[tuple[int, TypeInfo]]:
        """(address, type) of a global or file-static variable from the debug info."""
        raise NotImplementedError

    def _runtime_address(self, name: str) -> Optional[int]:
        """The run-time address of an ELF symbol as the backend sees it (for the load bias)."""
        raise NotImplementedError

    def threads(self) -> list[ThreadInfo]:
        raise NotImplementedError

    def register(self, tid: int, name: str) -> Optional[int]:
        """One register of a thread (rip, rsp, fs_base, ...), None when this reader cannot see it."""
        return None

    def frames(self, tid: int, regs: Optional[dict[str, int]] = None, limit: int = 64) -> Optional[list[dict[str, Any]]]:
        """The stack of thread tid, newest frame first: [{pc, function, file, line, inline}]; with
        ``regs`` (rip, rsp, rbp, rbx, r12-r15: a yielded coroutine's saved context) the stack those
        registers describe instead. None when this reader cannot unwind (no registers, no unwinder)."""
        return None

    # -- snapshot cache
    def begin_snapshot(self) -> None:
        """Forget cached memory: the next reads see QEMU as it is now."""
        self._pages.clear()
        self.snapshot_time = time.time()

    def read(self, addr: int, n: int) -> bytes:
        if n <= 0:
            return b""
        if addr < 0 or addr + n > U64:
            raise MemoryReadError(f"cannot read {n} bytes at {addr:#x}")
        first, last = addr // PAGE, (addr + n - 1) // PAGE
        if last - first > 64:  # big reads (cache tables, event spans) go straight to the backend
            return self._read_direct(addr, n)
        parts = []
        for pg in range(first, last + 1):
            data = self._pages.get(pg)
            if data is None:
                try:
                    data = self._read_raw(pg * PAGE, PAGE)
                except MemoryReadError:
                    return self._read_direct(addr, n)  # at the edge of a mapping: exactly what was asked
                self._pages[pg] = data
            parts.append(data)
        blob = parts[0] if len(parts) == 1 else b"".join(parts)
        off = addr - first * PAGE
        return blob[off:off + n]

    def _read_direct(self, addr: int, n: int) -> bytes:
        data = self._read_raw(addr, n)
        if len(data) != n:
            raise MemoryReadError(f"cannot read {n} bytes at {addr:#x}")
        return data

    def read_u8(self, addr: int) -> int:
        return self.read(addr, 1)[0]

    def read_u32(self, addr: int) -> int:
        return struct.unpack("<I", self.read(addr, 4))[0]

    def read_s32(self, addr: int) -> int:
        return struct.unpack("<i", self.read(addr, 4))[0]

    def read_u64(self, addr: int) -> int:
        return struct.unpack("<Q", self.read(addr, 8))[0]

    def read_cstring(self, addr: int, limit: int = 256) -> str:
        if not addr:
            return ""
        out = b""
        pos = addr
        while len(out) < limit:
            chunk = min(limit - len(out), PAGE - pos % PAGE)
            data = self.read(pos, chunk)
            i = data.find(b"\0")
            if i >= 0:
                out += data[:i]
                break
            out += data
            pos += chunk
        return out.decode("utf-8", "replace")

    def write(self, addr: int, data: bytes) -> None:
        if not self.can_write:
            raise NotAvailable("this reader cannot write QEMU's memory")
        self._write_raw(addr, data)
        for pg in range(addr // PAGE, (addr + len(data) - 1) // PAGE + 1):
            self._pages.pop(pg, None)

    # -- types and variables
    def type(self, name: str, near: Optional[str] = None) -> TypeInfo:
        """A named type. ``near``: a function of the source file that defines it, for a struct that
        other files only declare (gdb may otherwise find just the declaration; drgn needs no hint)."""
        t = self.find_type(name, near)
        if t is None:
            raise NotAvailable(f"type {name} not found in the debug info: this QEMU differs")
        return t

    def find_type(self, name: str, near: Optional[str] = None) -> Optional[TypeInfo]:
        if not self.has_debug_info():
            return None
        key = name if near is None else f"{name}@{near}"
        if key not in self._types:
            self._types[key] = self._native_type(name) if near is None else self._native_type_near(name, near)
        return self._types[key]

    def _native_type_near(self, name: str, near: str) -> Optional[TypeInfo]:
        return self._native_type(name)

    def var(self, name: str) -> Value:
        """A global or file-static variable with its debug type."""
        found = self.find_var(name)
        if found is None:
            raise NotAvailable(f"variable {name} not found: this QEMU differs")
        return found

    def find_var(self, name: str) -> Optional[Value]:
        if not self.has_debug_info():
            return None
        if name not in self._vars:
            self._vars[name] = self._native_var(name)
        got = self._vars[name]
        return None if got is None else Value(self, got[0], got[1])

    def first_var(self, *names: str) -> Value:
        """The first of names that exists (QEMU renames: cpus -> cpus_queue in 8.2, ...)."""
        for n in names:
            v = self.find_var(n)
            if v is not None:
                return v
        raise NotAvailable(f"none of {', '.join(names)} found: this QEMU differs")

    def value(self, addr: int, ty: TypeInfo | str) -> Value:
        return Value(self, addr, self.type(ty) if isinstance(ty, str) else ty)

    # -- symbols of the executable itself
    def elf_symbols(self) -> dict[str, elf.Sym]:
        if self._syms is None:
            path = self.exe()
            try:
                self._syms = elf.symbols(path)
            except Exception as exc:  # BadInputError, a vanished file
                raise IntrospectError(f"cannot read the symbols of {path}: {exc}") from exc
        return self._syms

    def symbol_count(self) -> int:
        """How many defined symbols the executable has (its symbol table, else its dynamic one)."""
        path = self.exe()
        try:
            return elf.count(path)
        except Exception as exc:  # BadInputError, a vanished file
            raise IntrospectError(f"cannot read the symbols of {path}: {exc}") from exc

    def exported(self) -> set[str]:
        if self._dyn is None:
            try:
                self._dyn = set(elf.symbols(self.exe(), elf.SHT_DYNSYM))
            except Exception:
                self._dyn = set()
        return self._dyn

    def maps_bias(self) -> Optional[int]:
        """The load bias of a live process's executable as the kernel mapped it (procfs.maps: the
        executable's mapping at file offset 0, minus its first PT_LOAD address)."""
        if self.kind != "live" or self.pid is None:
            return None
        try:
            exe = os.path.realpath(procfs.proc_path(self.pid, "exe"))
            for m in procfs.maps(self.pid):
                if m.path == exe and m.offset == 0:
                    return m.start - _first_load(exe)
        except (OSError, ValueError, IntrospectError):
            return None
        return None

    def load_bias(self) -> int:
        """Run-time minus link-time address of the executable (PIE)."""
        if self._bias is None:
            self._bias = self.maps_bias()
        if self._bias is None:
            for anchor in ("trace_events_enabled_count", "main_loop_tlg", "qemu_loglevel", "main"):
                sym = self.elf_symbol(anchor)
                if sym is not None:
                    a = self._runtime_address(anchor)
                    if a is not None:
                        self._bias = a - sym.value
                        break
            if self._bias is None:
                raise NotAvailable("cannot relate the executable's symbols to the process (no anchor symbol)")
        return self._bias

    def elf_symbol(self, name: str) -> Optional[elf.Sym]:
        """One symbol of the executable by name (link-time value): from the whole table, which a
        backend that has its own symbol index may avoid reading for a single name."""
        return self.elf_symbols().get(name)

    def symbol(self, name: str) -> Optional[Symbol]:
        s = self.elf_symbol(name)
        if s is None or s.kind == STT_TLS:
            return None
        return Symbol(name, s.value + self.load_bias(), s.size, self)

    def symbol_address(self, name: str) -> Optional[int]:
        s = self.symbol(name)
        return None if s is None else s.address

    def symbolize(self, addr: int) -> Optional[str]:
        """The function or variable of the executable that contains addr (no offset), else None."""
        if not addr:
            return None
        if self._sorted is None:
            syms = sorted((s.value, -s.size, n) for n, s in self.elf_symbols().items() if s.kind in (1, 2) and s.value)
            self._sorted = ([v for v, _s, _n in syms], [(v, -ns, n) for v, ns, n in syms])
        starts, syms = self._sorted
        try:
            rel = addr - self.load_bias()
        except NotAvailable:
            return None
        i = bisect.bisect_right(starts, rel) - 1
        if i < 0:
            return None
        value, size, name = syms[i]
        if rel == value or rel < value + size:
            return name
        return None

    # -- thread-local variables (x86-64 static TLS of the executable, glibc's TLS_TCB_AT_TP)
    def tls_address(self, tid: int, name: str) -> Optional[int]:
        """Where thread tid keeps its copy of the __thread variable name, from the thread pointer
        ($fs_base) and the executable's PT_TLS segment (glibc _dl_determine_tlsoffset, module 1)."""
        s = self.elf_symbol(name)
        if s is None or s.kind != STT_TLS:
            return None
        fs = self.register(tid, "fs_base")
        if not fs:
            return None
        if self._tls is None:
            self._tls = _pt_tls(self.exe())
        memsz, align, vaddr = self._tls
        firstbyte = (-vaddr) & (align - 1)
        off = ((memsz - firstbyte + align - 1) // align) * align + firstbyte
        return fs - off + s.value


def _program_headers(path: str) -> list[Any]:
    from qemu_ext.errors import BadInputError
    from qemu_ext.gdbmi.elfsyms import file_program_headers

    try:
        return file_program_headers(path)
    except BadInputError as exc:
        raise IntrospectError(str(exc)) from None


def _first_load(path: str) -> int:
    """The page-aligned address of the first PT_LOAD segment (0 for a PIE)."""
    for ph in _program_headers(path):
        if ph.type == 1:  # PT_LOAD
            return ph.vaddr & ~(PAGE - 1)
    raise IntrospectError(f"{path} has no loadable segment")


def _pt_tls(path: str) -> tuple[int, int, int]:
    """(p_memsz, p_align, p_vaddr) of the executable's PT_TLS program header."""
    for ph in _program_headers(path):
        if ph.type == 7:  # PT_TLS
            return ph.memsz, max(ph.align, 1), ph.vaddr
    raise IntrospectError(f"{path} has no thread-local storage segment")


def proc_comm(pid: int, tid: int) -> Optional[str]:
    """A live thread's name (procfs.comm), None when it is gone."""
    try:
        return procfs.comm(pid, tid).strip()
    except (OSError, ValueError):
        return None
