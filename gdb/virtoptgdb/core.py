"""Shared machinery of the virtopt gdb commands (gdb-only: imports the gdb module).

- ``VirtoptCommand``: a gdb command with argparse parsing, ``--json``, and errors
  turned into one-line ``gdb.GdbError``s (tracebacks only with ``set virtopt-debug on``).
- Requirements (``needs_debug_info``, ``needs_kvm``, ``needs_symbols``): class decorators
  that gate a command on what the inferior offers, checked before it runs.
- ``CachedType`` and the per-objfile caches, dropped when gdb loads new objfiles.
- Memory helpers that only read and write memory: gdb never calls into QEMU.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import traceback
from typing import Any, Callable, ClassVar, Optional

import gdb
from qemu_ext.gdbmi import elfsyms

# ---------------------------------------------------------------- errors


class VirtoptGdbError(Exception):
    """A user-facing problem: rendered as one gdb error line."""


class NotAvailable(VirtoptGdbError):
    """The command cannot work in this process (no debug info, no KVM, not QEMU)."""


# ---------------------------------------------------------------- parameters


class DebugParameter(gdb.Parameter):
    """Show Python tracebacks of virtopt commands (off by default)."""

    set_doc = "Set whether virtopt commands show Python tracebacks."
    show_doc = "Show whether virtopt commands show Python tracebacks."

    def __init__(self) -> None:
        super().__init__("virtopt-debug", gdb.COMMAND_DATA, gdb.PARAM_BOOLEAN)
        self.value = bool(os.environ.get("VIRTOPT_DEBUG"))


class NoDebugInfoParameter(gdb.Parameter):
    """Pretend the inferior has no debug info (to check the symbol-only paths on a debug build)."""

    set_doc = "Set whether virtopt ignores QEMU's debug info."
    show_doc = "Show whether virtopt ignores QEMU's debug info."

    def __init__(self) -> None:
        super().__init__("virtopt-ignore-debug-info", gdb.COMMAND_DATA, gdb.PARAM_BOOLEAN)
        self.value = False

    def get_set_string(self) -> str:
        clear_caches()
        return ""


class JsonDirParameter(gdb.Parameter):
    """Directory where --json output goes as files (set by virtopt's pygdbmi driver: large JSON
    through gdb/MI console records is slow). Empty: --json prints to the console."""

    set_doc = "Set the directory virtopt writes --json output to (empty: the console)."
    show_doc = "Show the directory virtopt writes --json output to."

    def __init__(self) -> None:
        super().__init__("virtopt-json-dir", gdb.COMMAND_DATA, gdb.PARAM_OPTIONAL_FILENAME)
        self.value = ""


JSON_MARKER = "@virtopt-json-file "
_json_seq = [0]


def emit_json(data: Any) -> None:
    text = json.dumps(data, indent=4)
    d = JSON_DIR.value if JSON_DIR is not None else ""
    if d and os.path.isdir(d):
        _json_seq[0] += 1
        path = os.path.join(d, f"{os.getpid()}-{_json_seq[0]}.json")
        with open(path, "w") as f:
            f.write(text + "\n")
        gdb.write(f"{JSON_MARKER}{path}\n")
    else:
        gdb.write(text + "\n")


DEBUG: Optional[DebugParameter] = None
JSON_DIR: Optional[JsonDirParameter] = None
IGNORE_DEBUG_INFO: Optional[NoDebugInfoParameter] = None


def debug_enabled() -> bool:
    return bool(DEBUG is not None and DEBUG.value)


# ---------------------------------------------------------------- caches

_CACHES: list[dict] = []


def per_objfile_cache() -> dict:
    """A dict emptied whenever gdb loads or drops objfiles (a new QEMU, a re-attach)."""
    d: dict = {}
    _CACHES.append(d)
    return d


def clear_caches(*_: object) -> None:
    for d in _CACHES:
        d.clear()


def connect_events() -> None:
    gdb.events.new_objfile.connect(clear_caches)
    gdb.events.clear_objfiles.connect(clear_caches)
    gdb.events.exited.connect(clear_caches)


class CachedType:
    """A type looked up on first use and cached until the objfiles change (like Linux's utils.CachedType)."""

    _cache = per_objfile_cache()

    def __init__(self, name: str) -> None:
        self.name = name

    def get(self) -> gdb.Type:
        t = self._cache.get(self.name)
        if t is None:
            try:
                t = gdb.lookup_type(self.name)
            except gdb.error as exc:
                raise NotAvailable(f"type {self.name} not found in the debug info: this QEMU differs ({exc})") from exc
            self._cache[self.name] = t
        return t

    def pointer(self) -> gdb.Type:
        return self.get().pointer()


# ---------------------------------------------------------------- the process

_proc_cache = per_objfile_cache()


def inferior() -> gdb.Inferior:
    inf = gdb.selected_inferior()
    if inf is None or inf.pid == 0:
        raise VirtoptGdbError("no process: attach to a running QEMU first (gdb -p PID)")
    return inf


def pid() -> int:
    return inferior().pid


def exe_path() -> str:
    """The executable of the process: /proc/PID/exe when readable, else gdb's file."""
    p = pid()
    proc = f"/proc/{p}/exe"
    if os.access(proc, os.R_OK):
        return proc
    name = gdb.current_progspace().filename
    if not name:
        raise VirtoptGdbError("gdb does not know the executable of this process")
    return name


def comm(tid: int) -> str:
    try:
        with open(f"/proc/{pid()}/task/{tid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def elf_symbols() -> dict[str, elfsyms.ElfSymbol]:
    syms = _proc_cache.get("elf")
    if syms is None:
        path = exe_path()
        try:
            syms = elfsyms.read_symbols(path)
        except Exception as exc:  # BadInputError, a vanished file
            raise VirtoptGdbError(f"cannot read the symbols of {path}: {exc}") from exc
        _proc_cache["elf"] = syms
    return syms


def symbol_address(name: str) -> Optional[int]:
    """Address of a global or static symbol (debug info or minimal symbol), None when absent."""
    key = ("addr", name)
    if key in _proc_cache:
        return _proc_cache[key]
    addr: Optional[int] = None
    try:
        addr = int(gdb.parse_and_eval(f"(unsigned long)&'{name}'"))
    except gdb.error:
        try:
            sym = gdb.lookup_static_symbol(name)
            if sym is not None:
                addr = int(sym.value().address)
        except (gdb.error, TypeError):
            addr = None
    _proc_cache[key] = addr
    return addr


def load_bias() -> int:
    """Run-time address minus link-time address of the executable (PIE)."""
    bias = _proc_cache.get("bias")
    if bias is None:
        syms = elf_symbols()
        for anchor in ("trace_events_enabled_count", "main_loop_tlg", "qemu_loglevel", "main"):
            if anchor in syms:
                a = symbol_address(anchor)
                if a is not None:
                    bias = a - syms[anchor].value
                    break
        if bias is None:
            raise NotAvailable("cannot relate the executable's symbols to the process (no anchor symbol)")
        _proc_cache["bias"] = bias
    return bias


def is_qemu() -> bool:
    if "is_qemu" not in _proc_cache:
        _proc_cache["is_qemu"] = symbol_address("main_loop_tlg") is not None or symbol_address(
            "qemu_main_loop") is not None
    return _proc_cache["is_qemu"]


def has_debug_info() -> bool:
    if IGNORE_DEBUG_INFO is not None and IGNORE_DEBUG_INFO.value:
        return False
    if "debug" not in _proc_cache:
        try:
            gdb.lookup_type("CPUState")
            ok = True
        except gdb.error:
            ok = False
        _proc_cache["debug"] = ok
    return _proc_cache["debug"]


def read(addr: int, n: int) -> bytes:
    try:
        return bytes(inferior().read_memory(addr, n))
    except gdb.MemoryError as exc:
        raise VirtoptGdbError(f"cannot read {n} bytes at {addr:#x}: {exc}") from exc


def read_u8(addr: int) -> int:
    return read(addr, 1)[0]


def read_u16(addr: int) -> int:
    return struct.unpack("<H", read(addr, 2))[0]


def read_u32(addr: int) -> int:
    return struct.unpack("<I", read(addr, 4))[0]


def read_s32(addr: int) -> int:
    return struct.unpack("<i", read(addr, 4))[0]


def read_u64(addr: int) -> int:
    return struct.unpack("<Q", read(addr, 8))[0]


def read_cstring(addr: int, limit: int = 256) -> str:
    if not addr:
        return ""
    try:
        data = bytes(inferior().read_memory(addr, limit))
    except gdb.MemoryError:
        data = b""
        for i in range(limit):  # near the end of a mapping: byte by byte
            try:
                c = bytes(inferior().read_memory(addr + i, 1))
            except gdb.MemoryError:
                break
            if c == b"\0":
                break
            data += c
    return data.split(b"\0", 1)[0].decode("utf-8", "replace")


def write(addr: int, data: bytes) -> None:
    try:
        inferior().write_memory(addr, data)
    except gdb.MemoryError as exc:
        raise VirtoptGdbError(f"cannot write {len(data)} bytes at {addr:#x}: {exc}") from exc


def kvm_enabled() -> Optional[bool]:
    a = symbol_address("kvm_allowed")
    return None if a is None else bool(read_u8(a))


def tcg_enabled() -> Optional[bool]:
    a = symbol_address("tcg_allowed")
    return None if a is None else bool(read_u8(a))


# ---------------------------------------------------------------- values with debug info


def value_of(name: str) -> gdb.Value:
    """A global or file-static variable with its debug type."""
    try:
        sym = gdb.lookup_global_symbol(name) or gdb.lookup_static_symbol(name)
        if sym is not None:
            return sym.value()
        return gdb.parse_and_eval(name)
    except gdb.error as exc:
        raise NotAvailable(f"variable {name} not found: this QEMU differs ({exc})") from exc


def field(v: gdb.Value, name: str) -> gdb.Value:
    try:
        return v[name]
    except gdb.error as exc:
        raise NotAvailable(f"{v.type} has no member {name}: this QEMU's structures differ") from exc


def ptr(v: gdb.Value) -> int:
    return int(v.cast(gdb.lookup_type("unsigned long")))


def cstr(v: gdb.Value, limit: int = 256) -> str:
    """A char* or char[] as text (empty for NULL), without exceptions on bad pointers."""
    try:
        if v.type.strip_typedefs().code == gdb.TYPE_CODE_ARRAY:
            return read_cstring(int(v.address), min(limit, v.type.sizeof))
        return read_cstring(ptr(v), limit)
    except (gdb.error, VirtoptGdbError):
        return "<unreadable>"


def int128(v: gdb.Value) -> int:
    """An Int128 as a Python int: works for QEMU's struct and for native __int128 (where int() fails)."""
    t = v.type.strip_typedefs()
    if t.code == gdb.TYPE_CODE_STRUCT:
        return int(v["lo"]) + (int(v["hi"]) << 64)
    if v.address is not None:
        return int.from_bytes(read(int(v.address), 16), "little", signed=True)
    return int(v)


def qtailq(head: gdb.Value, link: str) -> list[gdb.Value]:
    """Elements of a QTAILQ/QLIST/QSLIST head whose elements are linked through member ``link``."""
    out: list[gdb.Value] = []
    first = None
    for name in ("tqh_first", "lh_first", "slh_first", "sqh_first"):
        try:
            first = head[name]
            break
        except gdb.error:
            continue
    if first is None:
        raise NotAvailable(f"{head.type} is not a QEMU list head")
    node = first
    seen = set()
    while ptr(node) and ptr(node) not in seen and len(out) < 100000:
        seen.add(ptr(node))
        out.append(node)
        entry = node[link]
        nxt = None
        for name in ("tqe_next", "le_next", "sle_next", "sqe_next"):
            try:
                nxt = entry[name]
                break
            except gdb.error:
                continue
        if nxt is None:
            raise NotAvailable(f"{entry.type} is not a QEMU list entry")
        node = nxt
    return out


def symbolize(addr: int) -> Optional[str]:
    """Function or variable name at addr (debug info or minimal symbols), without offsets."""
    if not addr:
        return None
    try:
        block = gdb.block_for_pc(addr)
    except RuntimeError:
        block = None
    while block is not None and block.function is None and block.superblock is not None:
        block = block.superblock
    if block is not None and block.function is not None:
        return block.function.print_name
    try:
        text = gdb.execute(f"info symbol {addr:#x}", to_string=True).strip()
    except gdb.error:
        return None
    if text.startswith("No symbol"):
        return None
    return text.split(" in section ")[0]


# ---------------------------------------------------------------- requirements


class Requirement:
    def __init__(self, check: Callable[[], Optional[str]]) -> None:
        self.check = check


def _req_debug(cmd: str) -> Optional[str]:
    if has_debug_info():
        return None
    return (f"virtopt {cmd} needs QEMU's debug info (DWARF) and {os.path.basename(exe_path_safe())} has none: "
            "use a QEMU built with --enable-debug-info or install its debug symbols")


def exe_path_safe() -> str:
    try:
        return os.path.realpath(exe_path())
    except VirtoptGdbError:
        return "this process"


def needs_debug_info(cls: type) -> type:
    cls.requires = [*cls.requires, ("debug", _req_debug)]
    return cls


def needs_kvm(cls: type) -> type:
    def check(cmd: str) -> Optional[str]:
        return None if kvm_enabled() else f"virtopt {cmd} needs a QEMU running with KVM (this one uses TCG)"

    cls.requires = [*cls.requires, ("kvm", check)]
    return cls


def needs_symbols(*names: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        def check(cmd: str) -> Optional[str]:
            missing = [n for n in names if symbol_address(n) is None]
            if missing:
                return f"virtopt {cmd} needs the symbol(s) {', '.join(missing)}, which this QEMU does not have"
            return None

        cls.requires = [*cls.requires, ("symbols", check)]
        return cls

    return deco


def check_process(cmd: str) -> None:
    p = pid()
    if not is_qemu():
        name = comm(p) or os.path.basename(exe_path_safe())
        raise NotAvailable(
            f"virtopt {cmd}: process {p} ({name}) is not QEMU: none of QEMU's symbols (main_loop_tlg, qemu_main_loop) found")


# ---------------------------------------------------------------- commands


class _ParserExit(Exception):
    pass


class ArgParser(argparse.ArgumentParser):
    """argparse that reports through gdb: errors are GdbErrors, --help does not exit gdb."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise gdb.GdbError(f"{self.prog}: {message} (see: help {self.prog})")

    def exit(self, status: int = 0, message: Optional[str] = None) -> None:  # type: ignore[override]
        if message:
            gdb.write(message)
        raise _ParserExit()

    def _print_message(self, message: str, file: Any = None) -> None:
        if message:
            gdb.write(message)


class VirtoptPrefix(gdb.Command):
    """virtopt: QEMU debugging commands that only read (and, for trace, write) QEMU's memory.

They never call functions in QEMU, so they are safe on a live VM and work where gdb
cannot call into the inferior. Every command takes --json.

Commands: info, threads, vcpus, mtree, mtree lookup, timers, trace list|enable|disable,
qcow2, coroutines. `help virtopt COMMAND` for each."""

    def __init__(self, name: str = "virtopt") -> None:
        super().__init__(name, gdb.COMMAND_DATA, gdb.COMPLETE_NONE, True)


COMMANDS: list = []
PREFIX: list = []


class VirtoptCommand(gdb.Command):
    """Base class: subclasses set name, summary, epilog; implement add_arguments, collect, render."""

    name = ""
    summary = ""
    epilog = ""
    prefix = False
    requires: ClassVar[list] = []
    json_option = True

    def __init__(self) -> None:
        self.__doc__ = self._doc()
        super().__init__("virtopt " + self.name, gdb.COMMAND_DATA, gdb.COMPLETE_NONE, self.prefix)
        COMMANDS.append(self)

    def availability(self) -> Optional[str]:
        """None when the command can run in this process, else the one-line reason."""
        try:
            self.check()
        except VirtoptGdbError as exc:
            return str(exc)
        return None

    def _doc(self) -> str:
        # gdb shows the first line in `help virtopt`: the summary, then the full argparse help
        return self.summary + "\n\n" + self.parser().format_help().rstrip()

    def parser(self) -> ArgParser:
        p = ArgParser(prog="virtopt " + self.name, description=self.summary, epilog=self.epilog,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
        self.add_arguments(p)
        if self.json_option:
            p.add_argument("--json", action="store_true", help="print the data as JSON")
        return p

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        pass

    def collect(self, args: argparse.Namespace) -> Any:
        raise NotImplementedError

    def render(self, data: Any, args: argparse.Namespace) -> None:
        emit_json(data)

    def check(self) -> None:
        check_process(self.name)
        for _kind, req in self.requires:
            msg = req(self.name)
            if msg:
                raise NotAvailable(msg)

    def invoke(self, arg: str, from_tty: bool) -> None:
        try:
            args = self.parser().parse_args(gdb.string_to_argv(arg))
        except _ParserExit:
            return
        try:
            self.check()
            data = self.collect(args)
            if getattr(args, "json", False):
                emit_json(data)
            else:
                self.render(data, args)
        except gdb.GdbError:
            raise
        except VirtoptGdbError as exc:
            if debug_enabled():
                traceback.print_exc()
            msg = str(exc)
            if not msg.startswith("virtopt "):
                msg = f"virtopt {self.name}: {msg}"
            raise gdb.GdbError(msg) from None
        except KeyboardInterrupt:
            raise gdb.GdbError(f"virtopt {self.name}: interrupted") from None
        except gdb.MemoryError as exc:
            if debug_enabled():
                traceback.print_exc()
            raise gdb.GdbError(f"virtopt {self.name}: cannot read QEMU's memory: {exc} "
                               "(a dangling pointer, or QEMU's structures differ)") from None
        except gdb.error as exc:
            if debug_enabled():
                traceback.print_exc()
            raise gdb.GdbError(f"virtopt {self.name}: this QEMU's structures differ from what virtopt knows: "
                               f"{exc}") from None
        except Exception as exc:
            if debug_enabled():
                traceback.print_exc()
            raise gdb.GdbError(
                f"virtopt {self.name}: {type(exc).__name__}: {exc} (set virtopt-debug on for the traceback)") from None


def hexaddr(v: Optional[int]) -> Optional[str]:
    return None if v is None else f"{v:#x}"


def table(rows: list[list[Any]], headers: list[str]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines) + "\n"


def init() -> None:
    global DEBUG, IGNORE_DEBUG_INFO, JSON_DIR
    if DEBUG is None:
        DEBUG = DebugParameter()
        JSON_DIR = JsonDirParameter()
        IGNORE_DEBUG_INFO = NoDebugInfoParameter()
        connect_events()
