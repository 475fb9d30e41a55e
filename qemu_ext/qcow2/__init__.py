"""qcow2 inspection, read-only: decoders (format.py), image object (image.py) and reports.

Public API::

    from qemu_ext.qcow2 import open_image
    with open_image("disk.qcow2") as img:
        img.cluster_bits, img.cluster_size, img.virtual_size, img.extended_l2, img.l2_entry_size
        img.l1_entries()          # numpy uint64, raw L1 entries
        img.l2_table_offset(i)    # host offset of L2 table i (0 = unallocated)
        img.header, img.file_size
"""

from qemu_ext.qcow2.image import Qcow2Image, open_image

__all__ = ["Qcow2Image", "open_image"]
