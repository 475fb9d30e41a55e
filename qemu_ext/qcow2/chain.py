"""Backing chains: open an image and every backing file below it, read-only, refusing loops."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from qemu_ext.errors import BadInputError, NotAvailableError
from qemu_ext.qcow2 import format as F
from qemu_ext.qcow2.image import OpenError, OpenMode, PathLike, Qcow2Image, open_child

MAX_CHAIN = 256
# QEMU's block drivers (7.2 and 10.0 as Debian builds them): a backing format outside this list is
# "Unknown driver"; one inside it that is neither qcow2 nor raw is a format virtopt does not read.
QEMU_DRIVERS = frozenset("""blkdebug blklogwrites blkreplay blkverify bochs cloop compress copy-before-write
copy-on-read dmg file ftp ftps gluster host_cdrom host_device http https io_uring iscsi iser luks nbd nfs
null-aio null-co nvme nvme-io_uring parallels preallocate qcow qcow2 qed quorum raw rbd replication
snapshot-access ssh throttle vdi vhdx vmdk vpc vvfat""".split())
RAW_LIKE = frozenset({"raw", "file", "host_device"})  # read as the guest disk byte for byte


def path_has_protocol(name: str) -> bool:
    """QEMU's path_has_protocol(): a ':' before any '/' ("nbd:host:10809", "json:{...}")."""
    i = len(name)
    for j, ch in enumerate(name):
        if ch in ":/":
            i = j
            break
    return i < len(name) and name[i] == ":"


def path_combine(base: str, name: str) -> str:
    """bdrv_get_full_backing_filename_from_filename() / path_combine(): a relative backing name is
    relative to the overlay's directory; absolute names and protocol names stay as they are."""
    if path_has_protocol(name) or os.path.isabs(name):
        return name
    d = base[: base.rfind("/") + 1]
    return d + name


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


def _probe(fd: int) -> str:
    """bdrv_probe_all() for the formats virtopt reads: qcow2 by its magic, anything else raw."""
    return "qcow2" if os.pread(fd, 4, 0) == F.QCOW_MAGIC else "raw"


def _open_layer(filename: str, fmt: Optional[str], mode: OpenMode, compat: tuple[int, int], top: bool = False) -> Layer:
    if top:  # the image the user named: errors in virtopt's words for files (qemu_ext.errors)
        img = Qcow2Image(filename, mode, compat)
        return Layer(filename, "qcow2", img.virtual_size, img=img, file_size=img.file_size)
    if fmt is not None and fmt not in QEMU_DRIVERS:
        raise OpenError(filename, f"Unknown driver '{fmt}'")
    if fmt is not None and fmt != "qcow2" and fmt not in RAW_LIKE:
        raise NotAvailableError(f"{filename}: backing format {fmt!r} is not supported (qcow2 and raw are)")
    fd, length = open_child(filename, filename)  # QEMU's words for a file it cannot open
    if (fmt or _probe(fd)) == "qcow2":
        os.close(fd)
        img = Qcow2Image(filename, mode, compat)
        return Layer(filename, "qcow2", img.virtual_size, img=img, file_size=img.file_size)
    # a raw layer's size is the file's, in whole sectors (bdrv_getlength)
    return Layer(filename, "raw", F.align_up(length, 512), fd=fd, file_size=length)


def open_chain(path: PathLike, follow_backing: bool = True, snapshot: Optional[str] = None,
               mode: OpenMode = OpenMode.IO, compat: tuple[int, int] = (10, 0)) -> Chain:
    """Open path as qemu-img opens it for ``mode`` and (unless follow_backing is False) its whole
    backing chain, each backing file by the name and format its overlay records (relative names
    relative to the overlay, the format probed when none is recorded).

    snapshot: id or name of an internal snapshot of the top image whose L1 table (and disk size)
    replace the active ones, as `qemu-img convert -l` does."""
    filename = os.fspath(path)
    layers: list[Layer] = []
    seen: set[str] = set()
    fmt: Optional[str] = "qcow2"
    try:
        while True:
            if len(layers) >= MAX_CHAIN:
                raise BadInputError(f"{filename}: backing chain longer than {MAX_CHAIN} images")
            if layers and path_has_protocol(filename):  # nbd:, json:{...}, http://...: QEMU would connect
                raise OpenError(layers[0].filename, f"Could not open backing file: {filename!r}: virtopt reads "
                                "local backing files only")
            real = os.path.realpath(filename)
            if real in seen:  # qemu-img info --backing-chain's words (map and check recurse until memory runs out)
                raise BadInputError(f"Backing file '{filename}' creates an infinite loop.")
            seen.add(real)
            try:
                layer = _open_layer(filename, fmt, mode, compat, top=not layers)
            except OpenError as exc:
                if not layers:
                    raise
                raise OpenError(layers[0].filename, f"Could not open backing file: {exc.reason}") from None
            layers.append(layer)
            img = layer.img
            if not follow_backing or img is None or not img.backing_file:
                break
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
