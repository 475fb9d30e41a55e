"""Read an ELF executable's symbol tables (.symtab, else .dynsym) without any dependency.

gdb's Python API cannot enumerate minimal symbols, yet Debian's QEMU exports
about 20,000 dynamic symbols (all ``_TRACE_*_DSTATE`` among them). This reads
them straight from the file, checking every size and offset against the file
size before using it, so a truncated or hostile file raises BadInputError.

This module also owns virtopt's ELF primitives (ELF gABI, 64-bit little-endian): opening a file
(open_elf), the header check (check_header), program headers, note iteration and the GNU
build-id. qemu_ext.introspect.elf (the fast symbol reader of ``virtopt inspect``) and the core
readers (qemu_ext.gdbmi.corefile, qemu_ext.introspect.corefile) use them.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

from qemu_ext import errors
from qemu_ext.errors import BadInputError

SHT_SYMTAB = 2
SHT_DYNSYM = 11
STT_OBJECT = 1
STT_FUNC = 2


@dataclass(frozen=True)
class ElfSymbol:
    name: str
    value: int  # link-time address (add the load bias for a PIE)
    size: int
    kind: int  # STT_*
    defined: bool


def bad_elf(path: str, what: str) -> BadInputError:
    """The one wording for an ELF file virtopt cannot use."""
    return BadInputError(f"{path}: not a usable ELF file ({what})")


def _check(cond: bool, path: str, what: str) -> None:
    if not cond:
        raise bad_elf(path, what)


def read_symbols(
    path: str, want: Optional[Callable[[str], bool]] = None, prefer: str = "symtab"
) -> dict[str, ElfSymbol]:
    """Defined symbols of a 64-bit little-endian ELF file, by name.

    ``want(name)`` filters names (the filter is applied before decoding anything else).
    ``prefer``: ``symtab`` reads .symtab when present (debug builds) and .dynsym otherwise.
    """
    fd, size = open_elf(path)
    try:
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as m:
            return _read(m, size, path, want, prefer)
    finally:
        os.close(fd)


def open_elf(path: str) -> tuple[int, int]:
    """An fd and the size of a regular file, with CONTRIBUTING's one wording per condition (a FIFO is
    refused without blocking on it, a directory is "Is a directory")."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise errors.open_error(path, exc) from None
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        os.close(fd)
        raise errors.open_error(path, IsADirectoryError(21, os.strerror(21)))
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise errors.not_a_file(path)
    if st.st_size == 0:
        os.close(fd)
        raise errors.empty_file(path)
    return fd, st.st_size


def check_header(m: bytes | mmap.mmap, size: int, path: str) -> None:
    """BadInputError unless the file starts with a 64-bit little-endian ELF header (e_ident:
    ELFMAG, ELFCLASS64, ELFDATA2LSB)."""
    _check(size >= 64, path, "shorter than an ELF header")
    _check(m[:4] == b"\x7fELF", path, "bad magic")
    _check(m[4] == 2 and m[5] == 1, path, "only 64-bit little-endian ELF is supported")


def _read(m: mmap.mmap, size: int, path: str, want: Optional[Callable[[str], bool]], prefer: str) -> dict[str, ElfSymbol]:
    check_header(m, size, path)
    (e_shoff,) = struct.unpack_from("<Q", m, 0x28)
    e_shentsize, e_shnum = struct.unpack_from("<HH", m, 0x3A)
    _check(e_shentsize == 64 and 0 < e_shnum < 65536, path, "bad section header table")
    _check(e_shoff + e_shnum * 64 <= size, path, "section headers beyond the end of the file")
    sections = [struct.unpack_from("<IIQQQQIIQQ", m, e_shoff + i * 64) for i in range(e_shnum)]
    by_type: dict[int, int] = {}
    for i, sh in enumerate(sections):
        by_type.setdefault(sh[1], i)
    order = [SHT_SYMTAB, SHT_DYNSYM] if prefer == "symtab" else [SHT_DYNSYM, SHT_SYMTAB]
    idx = next((by_type[t] for t in order if t in by_type), None)
    if idx is None:
        return {}
    _name, _type, _flags, _addr, off, sz, link, _info, _align, entsize = sections[idx]
    _check(entsize == 24 and off + sz <= size, path, "symbol table beyond the end of the file")
    _check(link < len(sections), path, "bad string table link")
    str_off, str_sz = sections[link][4], sections[link][5]
    _check(str_off + str_sz <= size, path, "string table beyond the end of the file")
    strtab = m[str_off:str_off + str_sz]
    out: dict[str, ElfSymbol] = {}
    for st_name, st_info, _other, st_shndx, st_value, st_size in struct.iter_unpack("<IBBHQQ", m[off:off + sz]):
        if st_shndx == 0 or st_name >= str_sz:
            continue
        end = strtab.find(b"\0", st_name)
        if end < 0:
            continue
        name = strtab[st_name:end].decode("ascii", "replace")
        if want is not None and not want(name):
            continue
        out[name] = ElfSymbol(name, st_value, st_size, st_info & 0xF, True)
    return out


def find_string(path: str, prefix: bytes, limit: int = 200) -> Optional[str]:
    """The first NUL- or newline-terminated string in the file starting with ``prefix``."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            pos = m.find(prefix)
            if pos < 0:
                return None
            chunk = m[pos:pos + limit]
    except (OSError, ValueError):
        return None
    for stop in (b"\0", b"\n"):
        i = chunk.find(stop)
        if i >= 0:
            chunk = chunk[:i]
    return chunk.decode("utf-8", "replace")


# ---------------------------------------------------------------- notes and build-ids

PT_LOAD = 1
PT_NOTE = 4
NT_GNU_BUILD_ID = 3


def iter_notes(data: bytes) -> list[tuple[bytes, int, bytes]]:
    """(name, type, desc) of each ELF note in ``data`` (a PT_NOTE segment); stops at the first bad size.

    ELF gABI "Note Section": namesz, descsz, type (32-bit words), then the name and the desc, each
    padded to 4 bytes (what Linux's fs/binfmt_elf.c writes in a core, and the linker in a binary).
    The name is returned without its NUL."""
    out = []
    pos = 0
    while pos + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
        name_end = pos + 12 + namesz
        desc_off = pos + 12 + ((namesz + 3) & ~3)
        desc_end = desc_off + descsz
        if name_end > len(data) or desc_end > len(data):
            break
        out.append((data[pos + 12:name_end].rstrip(b"\0"), ntype, data[desc_off:desc_end]))
        pos = desc_off + ((descsz + 3) & ~3)
    return out


class ProgramHeader(NamedTuple):
    """One Elf64_Phdr (without p_paddr)."""

    type: int  # PT_LOAD 1, PT_NOTE 4, PT_TLS 7
    flags: int  # PF_X 1, PF_W 2, PF_R 4
    offset: int
    vaddr: int
    filesz: int
    memsz: int
    align: int


def program_headers(m: bytes | mmap.mmap, size: int, path: str) -> list[ProgramHeader]:
    """Each program header (Elf64_Phdr) of a 64-bit little-endian ELF file, the table checked
    against the file size."""
    check_header(m, size, path)
    (e_phoff,) = struct.unpack_from("<Q", m, 0x20)
    e_phentsize, e_phnum = struct.unpack_from("<HH", m, 0x36)
    if e_phnum == 0:
        return []
    _check(e_phentsize == 56 and e_phnum < 65535, path, "bad program header table")
    _check(e_phoff + e_phnum * 56 <= size, path, "program headers beyond the end of the file")
    out = []
    for i in range(e_phnum):
        p_type, p_flags, p_offset, p_vaddr, _paddr, p_filesz, p_memsz, p_align = struct.unpack_from(
            "<IIQQQQQQ", m, e_phoff + i * 56)
        out.append(ProgramHeader(p_type, p_flags, p_offset, p_vaddr, p_filesz, p_memsz, p_align))
    return out


def file_program_headers(path: str) -> list[ProgramHeader]:
    """The program headers of the ELF file at ``path`` (BadInputError when it is not a usable one)."""
    fd, size = open_elf(path)
    try:
        _check(size >= 64, path, "shorter than an ELF header")
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as m:
            return program_headers(m, size, path)
    finally:
        os.close(fd)


def build_id(path: str) -> Optional[str]:
    """The GNU build-id (hex) of an ELF file, from its PT_NOTE segments; None when it has none.
    Raises BadInputError for a file that cannot be opened or is not a usable ELF file."""
    fd, size = open_elf(path)
    try:
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as m:
            for p_type, _fl, off, _va, filesz, _ms, _al in program_headers(m, size, path):
                if p_type != PT_NOTE:
                    continue
                _check(off + filesz <= size, path, "note segment beyond the end of the file")
                for name, ntype, desc in iter_notes(m[off:off + filesz]):
                    if name == b"GNU" and ntype == NT_GNU_BUILD_ID and desc:
                        return desc.hex()
    finally:
        os.close(fd)
    return None
