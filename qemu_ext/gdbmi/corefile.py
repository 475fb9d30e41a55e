"""What a core file says about the process it was made from: PID, executable, build-id, registers.

The one reader of a core's notes (``virtopt gdb --core`` and, through qemu_ext.introspect.corefile,
``virtopt inspect --core``). Read from the core's own notes (Linux's fs/binfmt_elf.c layout, also
written by gdb's generate-core-file / gcore): NT_PRPSINFO (pr_pid, pr_fname, pr_psargs), NT_AUXV
(AT_PHDR, AT_ENTRY), NT_FILE (every mapped file: start, end, offset in pages, path), NT_PRSTATUS (each
thread's registers). The executable is the NT_FILE entry that holds AT_PHDR; its build-id is read
from its ELF header and notes as they were in memory (the first page of every ELF mapping is dumped:
coredump_filter bit 4, gdb does the same), so a rebuilt or replaced binary at the same path is told
apart from the one that ran.

Every offset and count is checked against the file before it is used (a truncated or hostile core
raises BadInputError with one line).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Optional

from qemu_ext.errors import BadInputError
from qemu_ext.gdbmi import elfsyms

ET_CORE = 4
NT_PRSTATUS = 1
NT_PRPSINFO = 3
NT_AUXV = 6
NT_FILE = 0x46494C45
AT_PHDR = 3
AT_ENTRY = 9
MAX_NOTES_BYTES = 64 << 20  # a QEMU core's notes are well under 1 MiB


@dataclass(frozen=True)
class FileMapping:
    start: int
    end: int
    offset: int  # bytes into the file
    path: str


@dataclass
class CoreInfo:
    path: str
    pid: Optional[int] = None
    fname: str = ""  # pr_fname: the first 15 characters of the command name
    psargs: str = ""  # pr_psargs: the first 79 characters of the command line
    exe: Optional[str] = None  # path of the executable as mapped when the core was made
    exe_base: Optional[int] = None  # where its ELF header was mapped
    build_id: Optional[str] = None  # of the executable that ran (from the core's memory)
    files: list[FileMapping] = field(default_factory=list)
    auxv: dict[int, int] = field(default_factory=dict)  # NT_AUXV: AT_* -> value (AT_ENTRY: the run-time entry point)
    registers: dict[int, dict[str, int]] = field(default_factory=dict)  # tid -> NT_PRSTATUS's registers

    def to_dict(self) -> dict:
        return {"core": self.path, "pid": self.pid, "command": self.fname or None, "exe": self.exe,
                "build-id": self.build_id}


def read_core(path: str) -> CoreInfo:
    """The PID, executable, build-id, auxiliary vector and threads' registers a core file records.
    BadInputError for anything that is not a usable 64-bit little-endian ELF core."""
    fd, size = elfsyms.open_elf(path)
    try:
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as m:
            if size < 64 or m[:4] != b"\x7fELF":
                raise BadInputError(f"{path}: not a core file (not an ELF file)")
            (e_type,) = struct.unpack_from("<H", m, 0x10)
            if m[4] == 2 and m[5] == 1 and e_type != ET_CORE:
                raise BadInputError(f"{path}: not a core file (an ELF {'executable' if e_type in (2, 3) else 'file'})")
            phdrs = elfsyms.program_headers(m, size, path)
            return _parse(m, size, path, phdrs)
    finally:
        os.close(fd)


# struct elf_prstatus (x86-64, include/linux/elfcore.h): pr_pid at 32, pr_reg (elf_gregset_t, the
# user_regs_struct of arch/x86/include/asm/user_64.h) at 112, 27 registers of 8 bytes
PRSTATUS_PID = 32
PRSTATUS_REG = 112
USER_REGS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx", "rsi", "rdi",
             "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs")
PRSTATUS_SIZE = PRSTATUS_REG + 8 * len(USER_REGS)


def _parse(m: mmap.mmap, size: int, path: str, phdrs: list) -> CoreInfo:
    info = CoreInfo(path)
    loads = [(va, off, fsz) for t, _f, off, va, fsz, _ms, _al in phdrs if t == elfsyms.PT_LOAD and off + fsz <= size]
    auxv = info.auxv
    total = 0
    for t, _f, off, _va, fsz, _ms, _al in phdrs:
        if t != elfsyms.PT_NOTE:
            continue
        if off + fsz > size:
            raise BadInputError(f"{path}: truncated core file (notes beyond the end of the file)")
        total += fsz
        if total > MAX_NOTES_BYTES:
            raise BadInputError(f"{path}: not a usable core file (notes larger than {MAX_NOTES_BYTES >> 20} MiB)")
        for name, ntype, desc in elfsyms.iter_notes(m[off:off + fsz]):
            if name != b"CORE":
                continue
            if ntype == NT_PRSTATUS and len(desc) >= PRSTATUS_SIZE:
                (tid,) = struct.unpack_from("<i", desc, PRSTATUS_PID)
                regs = struct.unpack_from(f"<{len(USER_REGS)}Q", desc, PRSTATUS_REG)
                info.registers.setdefault(tid, dict(zip(USER_REGS, regs)))
            elif ntype == NT_PRPSINFO and len(desc) >= 136 and info.pid is None:  # struct elf_prpsinfo, x86-64
                (info.pid,) = struct.unpack_from("<i", desc, 24)
                info.fname = desc[40:56].split(b"\0", 1)[0].decode("utf-8", "replace")
                info.psargs = desc[56:136].split(b"\0", 1)[0].decode("utf-8", "replace").strip()
            elif ntype == NT_AUXV:
                for i in range(0, len(desc) - 15, 16):
                    k, v = struct.unpack_from("<QQ", desc, i)
                    auxv.setdefault(k, v)
            elif ntype == NT_FILE:
                info.files = _nt_file(desc, path)
    anchor = auxv.get(AT_PHDR) or auxv.get(AT_ENTRY)
    if anchor is not None:
        hit = next((f for f in info.files if f.start <= anchor < f.end), None)
        if hit is not None:
            info.exe = hit.path
            first = [f for f in info.files if f.path == hit.path and f.offset == 0]
            if first:
                info.exe_base = min(f.start for f in first)
                info.build_id = _build_id_in_memory(m, loads, info.exe_base)
    return info


def _nt_file(desc: bytes, path: str) -> list[FileMapping]:
    if len(desc) < 16:
        return []
    count, page = struct.unpack_from("<QQ", desc, 0)
    if count > (len(desc) - 16) // 24 or not page:
        raise BadInputError(f"{path}: not a usable core file (bad NT_FILE note)")
    names = desc[16 + 24 * count:].split(b"\0")
    out = []
    for i in range(count):
        start, end, pgoff = struct.unpack_from("<QQQ", desc, 16 + 24 * i)
        name = names[i].decode("utf-8", "surrogateescape") if i < len(names) else ""
        out.append(FileMapping(start, end, pgoff * page, name))
    return out


def _read_mem(m: mmap.mmap, loads: list[tuple[int, int, int]], addr: int, n: int) -> Optional[bytes]:
    """n bytes of the process's memory at addr, when the core holds them."""
    for va, off, fsz in loads:
        if va <= addr and addr + n <= va + fsz:
            return bytes(m[off + addr - va:off + addr - va + n])
    return None


def _build_id_in_memory(m: mmap.mmap, loads: list[tuple[int, int, int]], base: int) -> Optional[str]:
    ehdr = _read_mem(m, loads, base, 64)
    if ehdr is None or ehdr[:4] != b"\x7fELF" or ehdr[4] != 2 or ehdr[5] != 1:
        return None
    (phoff,) = struct.unpack_from("<Q", ehdr, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", ehdr, 0x36)
    if phentsize != 56 or not 0 < phnum < 256:
        return None
    table = _read_mem(m, loads, base + phoff, phnum * 56)
    if table is None:
        return None
    ph = [struct.unpack_from("<IIQQQQQQ", table, i * 56) for i in range(phnum)]
    first_load = [p for p in ph if p[0] == elfsyms.PT_LOAD and p[2] == 0]
    bias = base - (first_load[0][3] & ~0xFFF) if first_load else base
    for p_type, _fl, _off, vaddr, _pa, filesz, _ms, _al in ph:
        if p_type != elfsyms.PT_NOTE or filesz > 1 << 16:
            continue
        data = _read_mem(m, loads, bias + vaddr, filesz)
        if data is None:
            continue
        for name, ntype, desc in elfsyms.iter_notes(data):
            if name == b"GNU" and ntype == elfsyms.NT_GNU_BUILD_ID and desc:
                return desc.hex()
    return None
