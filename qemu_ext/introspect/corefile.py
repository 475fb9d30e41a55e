"""What an ELF core file says about the process it came from: the executable (NT_AUXV's AT_ENTRY
inside an NT_FILE mapping), the pid and the program name (NT_PRPSINFO), each thread's registers
(NT_PRSTATUS). Every offset and size is checked against the file before it is used. Standard
library only."""

from __future__ import annotations

import os
import struct
from typing import Optional

from qemu_ext.errors import BadInputError

PT_NOTE = 4
NT_PRSTATUS = 1
NT_PRPSINFO = 3
NT_AUXV = 6
NT_FILE = 0x46494C45
AT_ENTRY = 9
MAX_NOTES = 64 << 20


def _notes(path: str) -> list[tuple[int, bytes, bytes]]:
    """(type, name, desc) of every note of the core's PT_NOTE segments."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        hdr = f.read(64)
        if len(hdr) < 64 or hdr[:4] != b"\x7fELF" or hdr[4] != 2 or hdr[5] != 1:
            raise BadInputError(f"{path}: not a 64-bit little-endian ELF core file")
        if struct.unpack_from("<H", hdr, 16)[0] != 4:  # ET_CORE
            raise BadInputError(f"{path}: an ELF file, but not a core file")
        phoff, = struct.unpack_from("<Q", hdr, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", hdr, 0x36)
        if phentsize != 56 or phoff + phnum * 56 > size:
            raise BadInputError(f"{path}: program headers beyond the end of the file")
        f.seek(phoff)
        table = f.read(phnum * 56)
        out = []
        for i in range(phnum):
            p_type, _fl, off, _va, _pa, filesz, _memsz, _al = struct.unpack_from("<IIQQQQQQ", table, i * 56)
            if p_type != PT_NOTE:
                continue
            if filesz > MAX_NOTES or off + filesz > size:
                raise BadInputError(f"{path}: a note segment beyond the end of the file")
            f.seek(off)
            blob = f.read(filesz)
            pos = 0
            while pos + 12 <= len(blob):
                namesz, descsz, ntype = struct.unpack_from("<III", blob, pos)
                pos += 12
                name = blob[pos:pos + namesz]
                pos += (namesz + 3) & ~3
                desc = blob[pos:pos + descsz]
                pos += (descsz + 3) & ~3
                if pos > len(blob):
                    break
                out.append((ntype, name.rstrip(b"\0"), desc))
    return out


def executable(path: str) -> Optional[str]:
    """The executable the core's process ran: the NT_FILE mapping that holds its entry point."""
    entry = None
    files: list[tuple[int, int, str]] = []
    for ntype, name, desc in _notes(path):
        if ntype == NT_AUXV and name == b"CORE":
            for i in range(0, len(desc) - 15, 16):
                key, val = struct.unpack_from("<QQ", desc, i)
                if key == AT_ENTRY:
                    entry = val
        elif ntype == NT_FILE and name == b"CORE" and len(desc) >= 16:
            count, _page = struct.unpack_from("<QQ", desc, 0)
            if 16 + count * 24 > len(desc):
                continue
            names = desc[16 + count * 24:].split(b"\0")
            for i in range(min(count, len(names))):
                start, end, _off = struct.unpack_from("<QQQ", desc, 16 + i * 24)
                files.append((start, end, names[i].decode("utf-8", "replace")))
    if entry is None:
        return None
    for start, end, fname in files:
        if start <= entry < end:
            return fname
    return None


def entry_point(path: str) -> Optional[int]:
    """The run-time address of the executable's entry point (NT_AUXV's AT_ENTRY)."""
    for ntype, name, desc in _notes(path):
        if ntype == NT_AUXV and name == b"CORE":
            for i in range(0, len(desc) - 15, 16):
                key, val = struct.unpack_from("<QQ", desc, i)
                if key == AT_ENTRY:
                    return val
    return None


def process_info(path: str) -> tuple[Optional[int], Optional[str]]:
    """(pid, program name) from NT_PRPSINFO (struct elf_prpsinfo, x86-64)."""
    for ntype, name, desc in _notes(path):
        if ntype == NT_PRPSINFO and name == b"CORE" and len(desc) >= 136:
            pid = struct.unpack_from("<i", desc, 24)[0]
            fname = desc[40:56].split(b"\0", 1)[0].decode("utf-8", "replace")
            return pid, fname
    return None, None


# struct elf_prstatus (x86-64, include/linux/elfcore.h): pr_pid at 32, pr_reg (elf_gregset_t, the
# user_regs_struct of arch/x86/include/asm/user_64.h) at 112, 27 registers of 8 bytes
PRSTATUS_PID = 32
PRSTATUS_REG = 112
USER_REGS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx", "rsi", "rdi",
             "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs")


def registers(path: str) -> dict[int, dict[str, int]]:
    """tid -> the thread's general registers at the dump (its NT_PRSTATUS note), as the kernel's
    user_regs_struct names them (orig_rax: the system call the thread was in, -1 as unsigned when none)."""
    out: dict[int, dict[str, int]] = {}
    need = PRSTATUS_REG + 8 * len(USER_REGS)
    for ntype, name, desc in _notes(path):
        if ntype == NT_PRSTATUS and name == b"CORE" and len(desc) >= need:
            tid = struct.unpack_from("<i", desc, PRSTATUS_PID)[0]
            values = struct.unpack_from(f"<{len(USER_REGS)}Q", desc, PRSTATUS_REG)
            out.setdefault(tid, dict(zip(USER_REGS, values)))
    return out


def file_times(path: str) -> tuple[Optional[int], int]:
    """(birth, modification) time of a file in ns of CLOCK_REALTIME. The birth time comes from
    statx(2) (STATX_BTIME: ext4, xfs, btrfs, tmpfs since Linux 5.x); None where the file system
    does not record it (or statx is missing)."""
    st = os.stat(path)
    return _birth_time_ns(path), st.st_mtime_ns


STATX_BTIME = 0x800
AT_FDCWD = -100


def _birth_time_ns(path: str) -> Optional[int]:
    import ctypes

    class _Ts(ctypes.Structure):  # struct statx_timestamp
        _fields_ = [("sec", ctypes.c_int64), ("nsec", ctypes.c_uint32), ("pad", ctypes.c_int32)]

    class _Statx(ctypes.Structure):  # struct statx (include/uapi/linux/stat.h), 256 bytes
        _fields_ = [("mask", ctypes.c_uint32), ("blksize", ctypes.c_uint32), ("attributes", ctypes.c_uint64),
                    ("nlink", ctypes.c_uint32), ("uid", ctypes.c_uint32), ("gid", ctypes.c_uint32),
                    ("mode", ctypes.c_uint16), ("pad1", ctypes.c_uint16), ("ino", ctypes.c_uint64),
                    ("size", ctypes.c_uint64), ("blocks", ctypes.c_uint64), ("attributes_mask", ctypes.c_uint64),
                    ("atime", _Ts), ("btime", _Ts), ("ctime", _Ts), ("mtime", _Ts), ("rest", ctypes.c_uint64 * 18)]

    try:
        statx = ctypes.CDLL(None, use_errno=True).statx
    except (OSError, AttributeError):
        return None
    buf = _Statx()
    if statx(AT_FDCWD, os.fsencode(path), 0, STATX_BTIME, ctypes.byref(buf)) != 0:
        return None
    if not buf.mask & STATX_BTIME or (buf.btime.sec == 0 and buf.btime.nsec == 0):
        return None
    return buf.btime.sec * 1_000_000_000 + buf.btime.nsec
