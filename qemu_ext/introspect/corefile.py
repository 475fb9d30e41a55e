"""What an ELF core file says about the process it came from, for ``virtopt inspect --core``: the
executable (the NT_FILE mapping that holds NT_AUXV's AT_PHDR, else AT_ENTRY), the entry point
(AT_ENTRY), the pid and the program name (NT_PRPSINFO), each thread's registers (NT_PRSTATUS), and the
core file's own times. The notes are read by qemu_ext.gdbmi.corefile.read_core, the one reader of a
core's notes (Linux's fs/binfmt_elf.c layout; every offset and size checked against the file before
it is used; BadInputError with one line otherwise). Standard library only."""

from __future__ import annotations

import os
from typing import Optional

from qemu_ext.gdbmi.corefile import AT_ENTRY, read_core


def executable(path: str) -> Optional[str]:
    """The executable the core's process ran: the NT_FILE mapping that holds its program headers
    (AT_PHDR) or, failing that, its entry point (AT_ENTRY)."""
    return read_core(path).exe


def entry_point(path: str) -> Optional[int]:
    """The run-time address of the executable's entry point (NT_AUXV's AT_ENTRY)."""
    return read_core(path).auxv.get(AT_ENTRY)


def process_info(path: str) -> tuple[Optional[int], Optional[str]]:
    """(pid, program name) from NT_PRPSINFO (struct elf_prpsinfo, x86-64); (None, None) without one."""
    info = read_core(path)
    return (None, None) if info.pid is None else (info.pid, info.fname)


def registers(path: str) -> dict[int, dict[str, int]]:
    """tid -> the thread's general registers at the dump (its NT_PRSTATUS note), as the kernel's
    user_regs_struct names them (orig_rax: the system call the thread was in, -1 as unsigned when none)."""
    return read_core(path).registers


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
