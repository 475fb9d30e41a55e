"""Backing chains: open an image and every backing file below it, read-only, refusing loops."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from qemu_ext.errors import BadInputError, NotAvailableError
from qemu_ext.qcow2 import format as F
from qemu_ext.qcow2.image import PathLike, Qcow2Image

MAX_CHAIN = 256


def path_combine(base: str, name: str) -> str:
    """QEMU's path_combine(): a relative backing name is relative to the overlay's directory."""
    if os.path.isabs(name) or "://" in name:
        return name
    d = os.path.dirname(base)
    return os.path.join(d, name) if d else name


@dataclass
class Layer:
    """One image of a chain: qcow2 (img set) or raw (a plain file read as the guest disk)."""

    filename: str  # as QEMU names it (the overlay's dir + backing name)
    format: str  # qcow2 | raw
    size: int  # virtual size
    img: Optional[Qcow2Image] = None
    fd: int = -1
    file_size: int = 0
    l1: Optional[Any] = None  # numpy L1 entries to use instead of the active table (a snapshot's)

    def l1_entries(self) -> Any:
        assert self.img is not None
        return self.l1 if self.l1 is not None else self.img.l1_entries()

    def close(self) -> None:
        if self.img is not None:
            self.img.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Chain:
    """An image and its backing files, top first.  Use as a context manager."""

    def __init__(self, layers: list[Layer]) -> None:
        self.layers = layers

    def __enter__(self) -> Chain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for layer in self.layers:
            layer.close()


def _probe(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return "qcow2" if f.read(4) == F.QCOW_MAGIC else "raw"
    except OSError as exc:
        raise BadInputError(f"{path}: cannot open: {exc.strerror}") from None


def _open_layer(filename: str, fmt: Optional[str]) -> Layer:
    fmt = fmt or _probe(filename)
    if fmt == "qcow2":
        img = Qcow2Image(filename)
        return Layer(filename, "qcow2", img.virtual_size, img=img, file_size=img.file_size)
    if fmt == "raw":
        try:
            fd = os.open(filename, os.O_RDONLY)
        except OSError as exc:
            raise BadInputError(f"{filename}: cannot open: {exc.strerror}") from None
        size = os.fstat(fd).st_size
        return Layer(filename, "raw", size, fd=fd, file_size=size)
    raise NotAvailableError(f"{filename}: backing format {fmt!r} is not supported (qcow2 and raw are)")


def open_chain(path: PathLike, follow_backing: bool = True, snapshot: Optional[str] = None) -> Chain:
    """Open path and (unless follow_backing is False) its whole backing chain.

    snapshot: id or name of an internal snapshot of the top image whose L1 table (and disk size)
    replace the active ones, as `qemu-img convert -l` does."""
    filename = os.fspath(path)
    layers: list[Layer] = []
    seen: set[str] = set()
    fmt: Optional[str] = None
    try:
        while True:
            if "\0" in filename or not filename:
                raise BadInputError(f"{layers[-1].filename if layers else filename!r}: invalid backing file name "
                                    f"{filename!r}")
            if "://" in filename or filename.startswith("json:"):
                raise NotAvailableError(f"backing file {filename!r}: only local files are supported")
            real = os.path.realpath(filename)
            if real in seen:
                raise BadInputError(f"{filename}: backing chain loops (the file is already in the chain)")
            if len(layers) >= MAX_CHAIN:
                raise BadInputError(f"{filename}: backing chain longer than {MAX_CHAIN} images")
            seen.add(real)
            if not os.path.exists(filename):
                if layers:
                    raise BadInputError(f"{layers[-1].filename}: could not open backing file {filename!r}: no such file")
                raise BadInputError(f"{filename}: no such file")
            layer = _open_layer(filename, fmt if layers else "qcow2")
            layers.append(layer)
            img = layer.img
            if not follow_backing or img is None or not img.backing_file:
                break
            if img.has_data_file and img.backing_file:
                pass
            fmt = img.backing_format
            filename = path_combine(layer.filename, img.backing_file)
        if snapshot is not None:
            top = layers[0]
            assert top.img is not None
            sn = next((x for x in top.img.snapshots() if snapshot in (x.id, x.name)), None)
            if sn is None:
                raise BadInputError(f"{top.filename}: no snapshot with id or name {snapshot!r}")
            top.l1 = top.img.snapshot_l1_entries(sn)
            top.size = sn.disk_size
    except BaseException:
        for layer in layers:
            layer.close()
        raise
    return Chain(layers)
