"""qcow2 inspection, read-only: decoders (format.py), image object (image.py) and reports.

Public API::

    from qemu_ext.qcow2 import open_image
    with open_image("disk.qcow2") as img:
        img.cluster_bits, img.cluster_size, img.virtual_size, img.extended_l2, img.l2_entry_size
        img.l1_entries()          # numpy uint64, raw L1 entries
        img.l2_table_offset(i)    # host offset of L2 table i (0 = unallocated)
        img.header, img.file_size

The names are imported lazily so that `virtopt --help` does not pay for numpy/construct.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Qcow2Image", "open_image"]

# the structures `virtopt qcow2 dump` can show (kept here so the CLI needs no heavy import)
DUMP_STRUCTURES = ("header", "extensions", "l1", "l2", "refcounts", "snapshots", "bitmaps")


def __getattr__(name: str) -> Any:
    if name in __all__:
        from qemu_ext.qcow2 import image

        return getattr(image, name)
    raise AttributeError(f"module 'qemu_ext.qcow2' has no attribute {name!r}")
