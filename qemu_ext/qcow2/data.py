"""Guest data: `read` and `convert` through the backing chain, byte-identical to qemu-img convert -O raw.

Handles standard, zero and preallocated-zero clusters and subclusters (extended L2),
zlib (raw deflate) and zstd compressed clusters, external data files and raw or
qcow2 backing files.  Encrypted images are not supported.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Optional

import numpy as np

from qemu_ext.errors import BadInputError, NotAvailableError
from qemu_ext.qcow2 import format as F
from qemu_ext.qcow2.chain import Chain, Layer, open_chain
from qemu_ext.qcow2.entries import compressed_span
from qemu_ext.qcow2.image import PathLike, ProgressFactory, Qcow2Image, start_bar
from qemu_ext.qcow2.map import DATA, UNALLOC, ZERO, Runs, _descend, layer_runs

U = np.uint64


def data_file_path(img: Qcow2Image) -> str:
    if not img.data_file or "\0" in img.data_file:
        raise BadInputError(f"{img.path}: external data file bit set but no usable data file name")
    # QEMU opens the data file as a child node by its name: relative names are relative to the
    # current directory (unlike backing files, which are relative to the overlay)
    return img.data_file


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
        try:
            import zstandard
        except ImportError as exc:
            raise NotAvailableError("zstd compressed clusters need the 'zstandard' Python package") from exc
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
            blob = decompress_cluster(img, e)
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
            raise NotAvailableError(f"{img.path}: encrypted images are not supported")
        elif img.has_data_file:
            p = data_file_path(img)
            try:
                fds.append(os.open(p, os.O_RDONLY))
            except OSError as exc:
                raise BadInputError(f"{img.path}: cannot open data file {p}: {exc.strerror}") from None
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


def read_guest(path: PathLike, offset: int, length: int, snapshot: Optional[str] = None) -> bytes:
    """Guest bytes [offset, offset+length) through the backing chain (clamped to the virtual size),
    of the active layer or of an internal snapshot (id or name)."""
    if offset < 0 or length < 0:
        raise BadInputError("offset and length must not be negative")
    with open_chain(path, snapshot=snapshot) as chain:
        size = chain.layers[0].size
        if offset >= size:
            return b""
        length = min(length, size - offset)
        if length > READ_MAX:
            raise BadInputError(f"read returns at most {READ_MAX >> 30} GiB at a time; "
                                "use 'virtopt qcow2 convert' for the whole disk")
        r = _open_reader(chain)
        try:
            return r.read(offset, length)
        finally:
            _close_reader(r)


def iter_guest(path: PathLike, chunk: int = 4 << 20,
               snapshot: Optional[str] = None) -> Iterator[tuple[int, Optional[bytes]]]:
    """(offset, bytes or None for an all-zero chunk) over the whole disk."""
    with open_chain(path, snapshot=snapshot) as chain:
        size = chain.layers[0].size
        r = _open_reader(chain)
        try:
            rows: list[tuple] = []
            _descend(r.runs, chain.layers, 0, 0, size, rows)
            for (s, ln, depth, _p, zero, data, off, _comp) in rows:
                if zero or not data:
                    yield s, None
                    continue
                pos = s
                while pos < s + ln:
                    n = min(chunk, s + ln - pos)
                    buf = bytearray(n)
                    r.read_piece(depth, pos, n, None if off is None else off + (pos - s), data, zero, buf, 0)
                    yield pos, bytes(buf)
                    pos += n
        finally:
            _close_reader(r)


def convert_to_raw(path: PathLike, out_path: PathLike, progress: Optional[ProgressFactory] = None,
                   snapshot: Optional[str] = None) -> int:
    """Write the guest disk (or an internal snapshot of it) as a raw file, sparse where the guest
    reads zeros; returns its size."""
    with open_chain(path, snapshot=snapshot) as chain:
        size = chain.layers[0].size
        inputs = [layer.filename for layer in chain.layers]
        inputs += [data_file_path(layer.img) for layer in chain.layers if layer.img is not None and layer.img.has_data_file]
    if os.path.exists(out_path):
        for name in inputs:
            try:
                same = os.path.samefile(out_path, name)
            except OSError:
                same = False
            if same:
                raise BadInputError(f"{out_path}: refusing to overwrite an input of the conversion ({name})")
    bar = start_bar(progress, size, "qcow2 convert", unit="B", unit_scale=True)
    try:
        with open(out_path, "wb") as f:
            _write(f, path, bar, snapshot)
            f.truncate(size)
    finally:
        if bar is not None:
            bar.close()
    return size


def _write(f: BinaryIO, path: PathLike, bar: object, snapshot: Optional[str]) -> None:
    for off, data in iter_guest(path, snapshot=snapshot):
        if data is None:
            continue
        if data == bytes(len(data)):  # keep the output sparse like qemu-img
            continue
        f.seek(off)
        f.write(data)
        if bar is not None:
            bar.update(len(data))  # type: ignore[attr-defined]


__all__ = ["DATA", "UNALLOC", "ZERO", "convert_to_raw", "data_file_path", "decompress_cluster", "iter_guest", "read_guest"]
