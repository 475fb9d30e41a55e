"""L2-cache advice in libvirt terms.

libvirt has one knob for the qcow2 caches: a disk's ``<driver><metadata_cache><max_size>``, which it
passes to QEMU as ``cache-size`` (the total of the L2 and refcount caches; libvirt 9.0 sets no
``l2-cache-size``/``refcount-cache-size``). QEMU splits ``cache-size`` alone in read_cache_sizes()
(block/qcow2.c, identical in 7.2 and 10.0):

- ``cache-size >= max_l2_cache + 4 clusters``: the L2 cache gets max_l2_cache (every L2 table of the
  image), the refcount cache the rest;
- otherwise the refcount cache gets ``MIN(cache-size, 4 clusters)`` (MIN_REFCOUNT_CACHE_SIZE) and
  the L2 cache the rest; and since that L2 cache does not cover the disk, its entries are 4 KiB
  ("default to 4KB entries") unless l2-cache-entry-size is set, which libvirt cannot do.

So a wanted l2-cache-size L below max_l2_cache is ``cache-size = L + 4 clusters`` (the refcount cache
is then always 4 clusters), and full coverage is ``max_l2_cache + R`` for a refcount cache R of at
least 4 clusters. :func:`metadata_cache_for` computes it, checks it against qemu_ext.l2cache.options
(the same rules, per version) and gives the XML, ``virsh edit`` and ``virt-xml`` lines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from qemu_ext.errors import BadInputError, VirtoptError

MIN_REFCOUNT_CACHE_CLUSTERS = 4  # MIN_REFCOUNT_CACHE_SIZE, block/qcow2.h (7.2, 10.0)


@dataclass
class MetadataCacheAdvice:
    domain: Optional[str]
    target: str
    cluster_size: int
    virtual_size: int
    wanted_l2_cache_size: int
    wanted_refcount_cache_size: Optional[int]
    max_size: int  # bytes: <max_size>, QEMU's cache-size
    l2_cache_size: int  # what QEMU makes of it (read_cache_sizes)
    l2_cache_entry_size: int
    refcount_cache_size: int
    xml: str
    virsh: str
    virt_xml: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "target": self.target,
            "cluster-size": self.cluster_size,
            "virtual-size": self.virtual_size,
            "wanted-l2-cache-size": self.wanted_l2_cache_size,
            "wanted-refcount-cache-size": self.wanted_refcount_cache_size,
            "max-size": self.max_size,
            "cache-size": self.max_size,
            "l2-cache-size": self.l2_cache_size,
            "l2-cache-entry-size": self.l2_cache_entry_size,
            "refcount-cache-size": self.refcount_cache_size,
            "xml": self.xml,
            "virsh": self.virsh,
            "virt-xml": self.virt_xml,
            "notes": list(self.notes),
        }


def _xml_size(n: int) -> tuple[int, str]:
    return (n // 1024, "KiB") if n % 1024 == 0 else (n, "bytes")


def metadata_cache_for(
    l2_cache_size: int,
    cluster_size: int,
    virtual_size: int,
    refcount_cache_size: Optional[int] = None,
    target: str = "vda",
    domain: Optional[str] = None,
    extended_l2: bool = False,
    qemu_version: str = "7.2",
) -> MetadataCacheAdvice:
    """The ``<metadata_cache><max_size>`` (QEMU cache-size) that gives an image of ``cluster_size`` and
    ``virtual_size`` an L2 cache of ``l2_cache_size`` bytes (capped, as QEMU does, at what holds every L2
    table) and, where cache-size alone allows it, a refcount cache of ``refcount_cache_size``."""
    from qemu_ext.l2cache import options

    if l2_cache_size <= 0:
        raise BadInputError(f"l2-cache-size must be > 0 (got {l2_cache_size})")
    if refcount_cache_size is not None and refcount_cache_size < 0:
        raise BadInputError(f"refcount-cache-size must be >= 0 (got {refcount_cache_size})")
    # validates the cluster size the way QEMU does, and gives max_l2_cache
    base = options.resolve(cluster_size, virtual_size, extended_l2, qemu_version=qemu_version)
    max_l2 = base.max_l2_cache
    min_rc = MIN_REFCOUNT_CACHE_CLUSTERS * cluster_size
    notes: list[str] = []
    if l2_cache_size >= max_l2:
        if l2_cache_size > max_l2:
            notes.append(f"the image's L2 tables take {max_l2} bytes: QEMU never gives the L2 cache more "
                         "(read_cache_sizes caps it at max_l2_cache)")
        rc = max(refcount_cache_size if refcount_cache_size is not None else min_rc, min_rc)
        if refcount_cache_size is not None and refcount_cache_size < min_rc:
            notes.append(f"the refcount cache cannot be smaller than 4 clusters ({min_rc} bytes) with cache-size")
        cache = max_l2 + rc
    else:
        cache = l2_cache_size + min_rc
        if refcount_cache_size is not None and refcount_cache_size != min_rc:
            notes.append(f"with cache-size alone (all libvirt sets) QEMU gives the refcount cache 4 clusters "
                         f"({min_rc} bytes) whenever the L2 cache does not cover the whole disk: "
                         f"refcount-cache-size {refcount_cache_size} cannot be had through libvirt")
    got = options.resolve(cluster_size, virtual_size, extended_l2, cache_size=cache, qemu_version=qemu_version)
    if got.l2_cache_size != min(l2_cache_size, max_l2):  # the rules above and QEMU's model disagree
        raise VirtoptError(f"internal check failed: cache-size {cache} gives l2-cache-size {got.l2_cache_size}, "
                           f"not {min(l2_cache_size, max_l2)}")
    if got.l2_cache_size < max_l2:
        notes.append(f"the L2 cache does not cover the whole disk: QEMU uses {got.l2_cache_entry_size}-byte L2 cache "
                     "entries (read_cache_sizes: 4 KiB unless l2-cache-entry-size is set, which libvirt cannot set)")
    value, unit = _xml_size(cache)
    xml = f"<metadata_cache><max_size unit='{unit}'>{value}</max_size></metadata_cache>"
    name = domain or "DOMAIN"
    virsh = (f"virsh edit {name}   # in the <disk> with <target dev='{target}'/>, inside "
             f"<driver name='qemu' type='qcow2'>: {xml}")
    virt_xml = (f"virt-xml {name} --edit target={target} --disk "
                f"driver.metadata_cache.max_size={value},driver.metadata_cache.max_size.unit={unit}")
    return MetadataCacheAdvice(domain, target, cluster_size, virtual_size, l2_cache_size, refcount_cache_size,
                               cache, got.l2_cache_size, got.l2_cache_entry_size, got.refcount_cache_size, xml,
                               virsh, virt_xml, notes)
