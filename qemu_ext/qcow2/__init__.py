"""qcow2 inspection, read-only: on-disk format (format.py), L2 entries (entries.py), the image opened
as QEMU opens it (image.py, snapshots.py, bitmaps.py), backing chains (chain.py) and the reports.

Public API (stable)::

    from qemu_ext.qcow2 import open_image, OpenMode
    with open_image("disk.qcow2") as img:          # validated like qcow2_do_open, never written
        img.cluster_bits, img.cluster_size, img.virtual_size, img.extended_l2, img.l2_entry_size
        img.header, img.file_size, img.refcount_bits, img.has_data_file, img.backing_file
        img.l1_entries()            # numpy uint64, active L1 entries up to the end of the file
        img.l2_table_offset(i)      # host offset of L2 table i (0 = unallocated)
        img.read_l2_table(off)      # numpy uint64 (n,) or (n, 2) for extended L2
        img.refcount_table(), img.refcounts()   # raw reftable; decoded refcount per cluster
        img.snapshots(), img.bitmaps(), img.extensions, img.features()

    qemu_ext.qcow2.entries          -> ClusterType, SubclusterType, cluster_type(s), compressed_span
    qemu_ext.qcow2.info.image_info(path, backing_chain=False)  -> [dict]   (qemu-img info + "virtopt" extras)
    qemu_ext.qcow2.map.image_map(path)                          -> [MapEntry] (qemu-img map)
    qemu_ext.qcow2.check.check_image(path)                      -> CheckResult (qemu-img check + problems)
    qemu_ext.qcow2.dump.dump(path, what, l1_index=None)         -> dict
    qemu_ext.qcow2.data.read_guest(path, offset, length)        -> bytes
    qemu_ext.qcow2.data.convert_to_raw(path, out)               -> int

Errors are qemu_ext.errors classes (one line each, with QEMU's reason where QEMU refuses).
The names here are imported lazily so that `virtopt --help` does not pay for numpy/construct.
"""

from __future__ import annotations

from typing import Any

__all__ = ["OpenMode", "Qcow2Image", "open_image"]

# the structures `virtopt qcow2 dump` can show (kept here so the CLI needs no heavy import)
DUMP_STRUCTURES = ("header", "extensions", "l1", "l2", "refcounts", "snapshots", "bitmaps")


def __getattr__(name: str) -> Any:
    if name in __all__:
        from qemu_ext.qcow2 import image

        return getattr(image, name)
    raise AttributeError(f"module 'qemu_ext.qcow2' has no attribute {name!r}")
