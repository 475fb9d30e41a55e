"""The executable's symbol table, read fast enough for a sub-second `virtopt inspect`.

Same contents as qemu_ext.gdbmi.elfsyms.read_symbols (defined symbols of .symtab, else .dynsym;
every size and offset checked against the file before use), but names come from one split of
the string table instead of a search per symbol, and the entries are built at C speed: a third
of the CPU time on a debug QEMU's 42,000 symbols. Opening the file, the ELF header check and the
build-id are qemu_ext.gdbmi.elfsyms' (the one owner of the ELF primitives). Standard library only.
"""

from __future__ import annotations

import bisect
import itertools
import mmap
import os
import struct
from typing import Any, NamedTuple, Optional

from qemu_ext.errors import BadInputError
from qemu_ext.gdbmi import elfsyms

SHT_SYMTAB = 2
SHT_DYNSYM = 11


class Sym(NamedTuple):
    """One defined symbol: link-time ``value`` (add the load bias for a PIE), ``size``, ``kind`` (STT_*)."""

    value: int
    size: int
    kind: int


_new = tuple.__new__  # builds Sym instances at C speed (no Python __init__ per symbol)


def symbols(path: str, table: int = SHT_SYMTAB) -> dict[str, Sym]:
    """Defined symbols of a 64-bit little-endian ELF file by name: ``table`` (SHT_SYMTAB, falling
    back to SHT_DYNSYM when the file is stripped; SHT_DYNSYM: the exported ones only)."""
    names, values, sizes, kinds = _parse(path, table)
    return dict(zip(names, map(_new, itertools.repeat(Sym), zip(values, sizes, kinds))))


def _parse(path: str, table: int) -> tuple[list[str], list[int], list[int], list[int]]:
    return _with_table(path, table, _entries, ([], [], [], []))


def count(path: str, table: int = SHT_SYMTAB) -> int:
    """How many defined symbols ``symbols`` reads, without decoding a name (a fifth of its time)."""
    return _with_table(path, table, _count, 0)


def has_prefix(path: str, prefixes: tuple[bytes, ...], table: int = SHT_SYMTAB) -> bool:
    """Does a symbol name of the table start with one of prefixes? (A search of its string table:
    names of undefined symbols count too.)"""
    return _with_table(path, table, lambda m, off, sz, strtab: any(b"\0" + p in strtab for p in prefixes), False)


def _with_table(path: str, table: int, fn: Any, empty: Any) -> Any:
    fd, size = elfsyms.open_elf(path)
    try:
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as m:
            found = _locate(m, size, path, table)
            return empty if found is None else fn(m, *found)
    finally:
        os.close(fd)


def _locate(m: mmap.mmap, size: int, path: str, table: int) -> Optional[tuple[int, int, bytes]]:
    """(offset, size, string table) of the symbol table, None when the file has none; every offset
    checked against the file."""
    elfsyms.check_header(m, size, path)
    (shoff,) = struct.unpack_from("<Q", m, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", m, 0x3A)
    if shentsize != 64 or not 0 < shnum < 65536 or shoff + shnum * 64 > size:
        raise elfsyms.bad_elf(path, "bad section header table")
    sections = [struct.unpack_from("<IIQQQQIIQQ", m, shoff + i * 64) for i in range(shnum)]
    by_type: dict[int, int] = {}
    for i, sh in enumerate(sections):
        by_type.setdefault(sh[1], i)
    order = [SHT_SYMTAB, SHT_DYNSYM] if table == SHT_SYMTAB else [SHT_DYNSYM]
    idx = next((by_type[t] for t in order if t in by_type), None)
    if idx is None:
        return None
    _n, _t, _f, _a, off, sz, link, _i, _al, entsize = sections[idx]
    if entsize != 24 or off + sz > size or link >= len(sections):
        raise elfsyms.bad_elf(path, "symbol table beyond the end of the file")
    str_off, str_sz = sections[link][4], sections[link][5]
    if str_off + str_sz > size:
        raise elfsyms.bad_elf(path, "string table beyond the end of the file")
    return off, sz, m[str_off:str_off + str_sz]


_NONZERO = bytes([0] + [1] * 255)  # byte -> 1 when nonzero
_BAD_KIND = bytes(1 if b & 0xF in (3, 4) else 0 for b in range(256))  # STT_SECTION, STT_FILE


def _count(m: mmap.mmap, off: int, sz: int, strtab: bytes) -> int:
    """Entries with a section (st_shndx), a name (st_name) and a kind other than SECTION/FILE:
    one byte per entry and per test, combined as big integers (no Python loop over the table)."""
    buf = m[off:off + sz - sz % 24]
    n = len(buf) // 24

    def nonzero(*cols: int) -> int:
        out = 0
        for c in cols:
            out |= int.from_bytes(buf[c::24].translate(_NONZERO), "little")
        return out

    good = nonzero(0, 1, 2, 3) & nonzero(6, 7)  # st_name, st_shndx
    good &= int.from_bytes(b"\x01" * n, "little") ^ int.from_bytes(buf[4::24].translate(_BAD_KIND), "little")
    return good.bit_count()


def _entries(m: mmap.mmap, off: int, sz: int, strtab: bytes) -> tuple[list[str], list[int], list[int], list[int]]:
    str_sz = len(strtab)
    parts = strtab.split(b"\0")
    starts = dict(zip(itertools.accumulate((len(p) + 1 for p in parts), initial=0), parts))
    names: list[str] = []
    values: list[int] = []
    sizes: list[int] = []
    kinds: list[int] = []
    for st_name, st_info, _other, st_shndx, st_value, st_size in struct.iter_unpack("<IBBHQQ", m[off:off + sz]):
        if st_shndx == 0 or st_name == 0 or st_name >= str_sz:
            continue
        kind = st_info & 0xF
        if kind in (3, 4):  # STT_SECTION, STT_FILE
            continue
        raw = starts.get(st_name)
        if raw is None:  # a suffix of another string (the linker shares tails)
            end = strtab.find(b"\0", st_name)
            raw = strtab[st_name:end if end >= 0 else str_sz]
        names.append(raw.decode("ascii", "replace"))
        values.append(st_value)
        sizes.append(st_size)
        kinds.append(kind)
    return names, values, sizes, kinds


class AddressIndex:
    """Address -> name over the symbols ``symbols`` reads, built without decoding a name (a tenth
    of the time of the sorted dict). ``name_at`` answers what Target.symbolize answers from the
    dict: each name once (its last entry in the table: the linker stores a name once, so by its
    string offset), functions and objects only, the last symbol starting at or before the address
    (by address, then the smallest, then by name), if it holds the address."""

    def __init__(self, entries: list[tuple[int, int, int]], strtab: bytes) -> None:
        self.entries = entries  # (value, -size, name offset), sorted by value then -size
        self.starts = [e[0] for e in entries]
        self.strtab = strtab

    def _name(self, off: int) -> str:
        end = self.strtab.find(b"\0", off)
        return self.strtab[off:end if end >= 0 else len(self.strtab)].decode("ascii", "replace")

    def name_at(self, rel: int) -> Optional[str]:
        i = bisect.bisect_right(self.starts, rel) - 1
        if i < 0:
            return None
        value, neg_size, _off = self.entries[i]
        first = bisect.bisect_left(self.starts, value)
        name = max(self._name(e[2]) for e in self.entries[first:i + 1] if e[1] == neg_size)
        return name if rel == value or rel < value - neg_size else None


def address_index(path: str, table: int = SHT_SYMTAB) -> AddressIndex:
    return _with_table(path, table, _index, None) or AddressIndex([], b"")


def _index(m: mmap.mmap, off: int, sz: int, strtab: bytes) -> AddressIndex:
    str_sz = len(strtab)
    last: dict[int, tuple[int, int, int]] = {}
    for st_name, st_info, _o, st_shndx, st_value, st_size in struct.iter_unpack("<IBBHQQ", m[off:off + sz]):
        if st_shndx != 0 and 0 < st_name < str_sz:
            kind = st_info & 0xF
            if kind != 3 and kind != 4:  # STT_SECTION, STT_FILE
                last[st_name] = (st_value, -st_size, kind)  # a name's last entry wins, as in symbols()
    entries = sorted((v, ns, name) for name, (v, ns, kind) in last.items() if (kind == 1 or kind == 2) and v)
    return AddressIndex(entries, strtab)


def build_id(path: str) -> Optional[str]:
    """The GNU build-id (NT_GNU_BUILD_ID in a PT_NOTE segment) as hex, None when the file has none
    or cannot be read as an ELF file (elfsyms.build_id, which says why)."""
    try:
        return elfsyms.build_id(path)
    except (OSError, BadInputError):
        return None
