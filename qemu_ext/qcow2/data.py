"""Guest data: `read` and `convert` through the backing chain, byte-identical to qemu-img convert -O raw.

Handles standard, zero and preallocated-zero clusters and subclusters (extended L2),
zlib (raw deflate) and zstd compressed clusters, external data files and raw or
qcow2 backing files.  Encrypted images are not supported.
"""

from __future__ import annotations

import errno
import os
import stat
import zlib
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import numpy as np

from qemu_ext.errors import BadInputError, NotAvailableError, open_error
from qemu_ext.qcow2 import format as F
from qemu_ext.qcow2.chain import Chain, Layer, open_chain
from qemu_ext.qcow2.entries import compressed_span
from qemu_ext.qcow2.image import PathLike, ProgressFactory, Qcow2Image, open_file, start_bar
from qemu_ext.qcow2.map import DATA, UNALLOC, ZERO, Runs, _descend, layer_runs

U = np.uint64


def data_file_path(img: Qcow2Image) -> str:
    """The external data file, opened as QEMU opens it (Qcow2Image.data_file_path)."""
    return img.data_file_path()


def decompress_cluster(img: Qcow2Image, l2_entry: int) -> bytes:
    """One compressed cluster (zlib raw deflate or zstd), as qcow2_co_decompress does."""
    cs = img.cluster_size
    coff, csize = compressed_span(l2_entry, img.cluster_bits)
    buf = img.pread_zero_padded(coff, csize)
    if img.header.compression_type == 0:
        d = zlib.decompressobj(-15)
        try:
            out = d.decompress(buf, cs)
        except zlib.error as exc:
            raise BadInputError(f"{img.path}: compressed cluster at {coff:#x} does not inflate: {exc}") from None
    else:
        import zstandard
        out = b""
        try:
            while len(out) < cs and buf:
                d = zstandard.ZstdDecompressor().decompressobj()
                out += d.decompress(buf)
                buf = d.unused_data
        except zstandard.ZstdError as exc:
            raise BadInputError(f"{img.path}: compressed cluster at {coff:#x} does not decompress: {exc}") from None
    if len(out) < cs:
        raise BadInputError(f"{img.path}: compressed cluster at {coff:#x} is short ({len(out)} of {cs} bytes)")
    return out[:cs]


@dataclass
class _Reader:
    chain: Chain
    runs: list[Runs]
    data_fds: list[int]

    def l2_entry(self, layer: Layer, guest: int) -> int:
        img = layer.img
        assert img is not None
        cl = guest >> img.cluster_bits
        per = img.l2_entries_per_table
        l1 = layer.l1_entries()
        l2 = int(l1[cl // per]) & F.L1E_OFFSET_MASK if cl // per < len(l1) else 0
        raw = img.pread_zero_padded(l2 + (cl % per) * img.l2_entry_size, 8)
        return int.from_bytes(raw, "big")

    def read_piece(self, depth: int, start: int, length: int, off: Optional[int], data: bool, zero: bool,
                   out: bytearray, pos: int) -> None:
        if zero or not data:
            return  # out is zero-initialised
        layer = self.chain.layers[depth]
        fd = self.data_fds[depth]
        if off is not None:
            got = os.pread(fd, length, off)
            out[pos : pos + len(got)] = got  # past the end of the file reads as zeros
            return
        img = layer.img
        assert img is not None
        cs = img.cluster_size
        g = start
        end = start + length
        while g < end:
            cstart = g - g % cs
            e = self.l2_entry(layer, g)
            if not e & F.L2E_COMPRESSED:
                raise BadInputError(f"{img.path}: guest offset {g:#x}: data without a host offset")
            try:
                blob = decompress_cluster(img, e)
            except BadInputError as exc:
                raise read_error(img, cstart, str(exc).removeprefix(f"{img.path}: ")) from None
            n = min(end, cstart + cs) - g
            out[pos + (g - start) : pos + (g - start) + n] = blob[g - cstart : g - cstart + n]
            g += n

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        rows: list[tuple] = []
        _descend(self.runs, self.chain.layers, 0, offset, offset + length, rows)
        for (s, ln, depth, _present, zero, data, off, _comp) in rows:
            self.read_piece(depth, s, ln, off, data, zero, out, s - offset)
        return bytes(out)


def _open_reader(chain: Chain) -> _Reader:
    fds = []
    for layer in chain.layers:
        img = layer.img
        if img is None:
            fds.append(layer.fd)
        elif img.header.crypt_method:
            raise NotAvailableError(f"{img.path}: encrypted image: its guest data needs the key, which virtopt does "
                                    "not take (qemu-img without it: Parameter 'encrypt.key-secret' is required for "
                                    "cipher)")
        elif img.has_data_file:
            fds.append(open_file(data_file_path(img))[0])
        else:
            fds.append(img._fd)
    runs = [_plain_runs(layer) for layer in chain.layers]
    return _Reader(chain, runs, fds)


def _plain_runs(layer: Layer) -> Runs:
    return layer_runs(layer)


def _close_reader(r: _Reader) -> None:
    for layer, fd in zip(r.chain.layers, r.data_fds):
        if layer.img is not None and layer.img.has_data_file:
            os.close(fd)


READ_MAX = 1 << 30  # read_guest returns bytes in memory: bigger pieces go through convert
CHUNK = 4 << 20


def read_error(img: Qcow2Image, guest: int, detail: str) -> BadInputError:
    """A guest read that fails (qemu-img convert: "error while reading at byte N: Input/output
    error"), with what virtopt found wrong."""
    return BadInputError(f"{img.path}: error while reading at byte {guest}: Input/output error ({detail})")


def read_guest(path: PathLike, offset: int, length: int, snapshot: Optional[str] = None) -> bytes:
    """Guest bytes [offset, offset+length) through the backing chain, of the active layer or of an
    internal snapshot (id or name). Like qemu-io's read, a request past the end of the disk fails."""
    if offset < 0 or length < 0:
        raise BadInputError("offset and length must not be negative")
    with open_chain(path, snapshot=snapshot) as chain:
        size = chain.layers[0].size
        if offset > size or length > size - offset:  # blk_check_byte_request(): -EIO
            raise BadInputError(f"{path}: read of {length} bytes at byte {offset} goes past the end of the disk "
                                f"({size} bytes): Input/output error")
        if length > READ_MAX:
            raise BadInputError(f"read returns at most {READ_MAX >> 30} GiB at a time; "
                                "use 'virtopt qcow2 convert' for the whole disk")
        r = _open_reader(chain)
        try:
            return r.read(offset, length)
        finally:
            _close_reader(r)


def iter_guest(path: PathLike, chunk: int = CHUNK,
               snapshot: Optional[str] = None) -> Iterator[tuple[int, int, Optional[bytes]]]:
    """(offset, length, bytes or None where the guest reads zeros) over the whole disk, in order."""
    with open_chain(path, snapshot=snapshot) as chain:
        r = _open_reader(chain)
        try:
            yield from _iter_reader(r, chunk)
        finally:
            _close_reader(r)


def _iter_reader(r: _Reader, chunk: int = CHUNK) -> Iterator[tuple[int, int, Optional[bytes]]]:
    rows: list[tuple] = []
    _descend(r.runs, r.chain.layers, 0, 0, r.chain.layers[0].size, rows)
    for (s, ln, depth, _p, zero, data, off, _comp) in rows:
        if zero or not data:
            yield s, ln, None
            continue
        pos = s
        while pos < s + ln:
            n = min(chunk, s + ln - pos)
            buf = bytearray(n)
            r.read_piece(depth, pos, n, None if off is None else off + (pos - s), data, zero, buf, 0)
            yield pos, n, bytes(buf)
            pos += n


class _Output:
    """Where convert writes, as qemu-img would have it: a regular file stays sparse where the guest
    reads zeros and gets the disk's length at the end; a block device gets every byte (it must be
    large enough); a stream (stdout, a pipe, /dev/null, any character device) gets every byte in
    order, zeros included. OS errors are one line naming the output."""

    def __init__(self, out: Union[PathLike, int], size: int) -> None:
        self.name = "standard output" if isinstance(out, int) else os.fspath(out)
        self.size = size
        self.own = not isinstance(out, int)
        if isinstance(out, int):
            self.fd = out
        else:
            try:
                st = os.stat(out)
                exists = True
            except OSError:
                exists = False
            flags = os.O_WRONLY | os.O_CLOEXEC
            if not exists or stat.S_ISREG(st.st_mode):
                flags |= os.O_CREAT | os.O_TRUNC
            try:
                self.fd = os.open(out, flags, 0o644)
            except OSError as exc:
                raise open_error(out, exc) from None
        st = os.fstat(self.fd)
        self.regular = stat.S_ISREG(st.st_mode)
        self.block = stat.S_ISBLK(st.st_mode)
        if self.block:
            dev = os.lseek(self.fd, 0, os.SEEK_END)
            if dev < size:
                self.close()
                raise BadInputError(f"{self.name}: error while converting raw: the device is {dev} bytes, the disk "
                                    f"{size}")
        self.pos = 0

    def fail(self, what: str, exc: OSError) -> BadInputError:
        return BadInputError(f"{self.name}: {what}: {exc.strerror or exc}")

    def write(self, offset: int, data: Optional[bytes], length: int) -> None:
        if data is None or (self.regular and data.count(0) == len(data)):
            if self.regular:
                return  # a hole: the file stays sparse there
            data = None
        if not (self.regular or self.block) and offset != self.pos:
            raise AssertionError("stream writes out of order")
        try:
            if self.regular or self.block:
                if data is not None:
                    os.pwrite(self.fd, data, offset)
                else:
                    for k in range(0, length, CHUNK):
                        os.pwrite(self.fd, _zeros(min(CHUNK, length - k)), offset + k)
            else:
                if data is not None:
                    _write_all(self.fd, data)
                else:
                    for k in range(0, length, CHUNK):
                        _write_all(self.fd, _zeros(min(CHUNK, length - k)))
        except OSError as exc:
            raise self.fail(f"error while writing at byte {offset}", exc) from None
        self.pos = offset + length

    def finish(self) -> None:
        if self.regular:
            try:
                os.ftruncate(self.fd, self.size)
            except OverflowError:
                raise self.fail("error while converting raw: Could not resize file",
                                OSError(errno.EFBIG, os.strerror(errno.EFBIG))) from None
            except OSError as exc:  # qemu-img's words (block/file-posix.c raw_co_create)
                raise self.fail("error while converting raw: Could not resize file", exc) from None

    def close(self) -> None:
        if self.own and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_ZEROS = bytes(CHUNK)


def _zeros(n: int) -> bytes:
    return _ZEROS if n == CHUNK else bytes(n)


def _write_all(fd: int, data: bytes) -> None:
    mv = memoryview(data)
    while len(mv):
        n = os.write(fd, mv)
        mv = mv[n:]


def convert_to_raw(path: PathLike, out_path: Union[PathLike, int], progress: Optional[ProgressFactory] = None,
                   snapshot: Optional[str] = None) -> int:
    """Write the guest disk (or an internal snapshot of it) as raw to a file (sparse where the guest
    reads zeros), a block device, or a stream (an fd such as stdout, a pipe, /dev/null); returns
    the disk size. The inputs (the chain and its data files) are never written, and nothing is
    created before the image is known to be readable."""
    with open_chain(path, snapshot=snapshot) as chain:
        size = chain.layers[0].size
        inputs = [layer.filename for layer in chain.layers]
        inputs += [layer.img.data_file_path() for layer in chain.layers
                   if layer.img is not None and layer.img.has_data_file]
        if not isinstance(out_path, int) and os.path.exists(out_path):
            for name in inputs:
                try:
                    same = os.path.samefile(out_path, name)
                except OSError:
                    same = False
                if same:
                    raise BadInputError(f"{out_path}: refusing to overwrite an input of the conversion ({name})")
        r = _open_reader(chain)
        try:
            out = _Output(out_path, size)
            bar = start_bar(progress, size, "qcow2 convert", unit="B", unit_scale=True)
            try:
                for off, n, data in _iter_reader(r):
                    out.write(off, data, n)
                    bar.update(n)
                out.finish()
            finally:
                bar.close()
                out.close()
        finally:
            _close_reader(r)
    return size


__all__ = ["DATA", "UNALLOC", "ZERO", "convert_to_raw", "data_file_path", "decompress_cluster", "iter_guest", "read_guest"]
