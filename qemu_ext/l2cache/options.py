"""QEMU's qcow2 cache option resolution (read_cache_sizes + qcow2_update_options_prepare), per version.

Sources:
* 7.2 and the current release: block/qcow2.c read_cache_sizes() / qcow2_update_options_prepare()
  and block/qcow2.h (MIN_L2_CACHE_SIZE 2 entries, MIN_REFCOUNT_CACHE_SIZE 4 clusters,
  DEFAULT_L2_CACHE_MAX_SIZE 32 MiB on Linux / 8 MiB elsewhere, DEFAULT_CACHE_CLEAN_INTERVAL
  600 s on Linux / 0 elsewhere); the max L2 cache is ROUND_UP(clusters * l2_entry_size, cluster)
  where l2_entry_size is 16 with extended L2 entries (5.2+) and 8 otherwise.
* 4.0: the same function with 8-byte entries; 4.0 added "if the L2 cache does not cover the
  whole disk and l2-cache-entry-size is not set, use MIN(cluster_size, 4096)" (docs/qcow2-cache.txt:
  "Since QEMU 4.0 the value of l2-cache-entry-size defaults to 4KB").
* 3.1: L2 cache sized to the image up to DEFAULT_L2_CACHE_MAX_SIZE, refcount cache at its
  minimum, cache-clean-interval 600 s on Linux (Leonid Bloch's / Alberto Garcia's 2018 series);
  entry size defaults to the cluster size.
* 10.0: read_cache_sizes() and the constants of block/qcow2.h are the same as 7.2's (compared in
  the 10.0.2 source); the test suite checks the resolution against both QEMUs' qemu-io.
* 2.12: the older ratio rules (DEFAULT_L2_CACHE_BYTE_SIZE 1 MiB or DEFAULT_L2_CACHE_CLUSTERS 8
  clusters, whichever is more; refcount cache = L2 / DEFAULT_L2_REFCOUNT_SIZE_RATIO 4;
  cache-size alone splits 4:1), l2-cache-entry-size new in 2.12 (default cluster size),
  cache-clean-interval default 0. Not verified against a 2.12 build: the ratio rules are read
  from the pre-2.12 read_cache_sizes(); docs/qcow2-cache.txt (written for 3.1) says the 1/4
  refcount default ended "before QEMU 2.12", while commit 52253998ec ("Give the refcount cache
  the minimum possible size by default") is from the 2018 cache series that shipped in 3.1.
  Only the refcount-cache size depends on that, not the L2 cache.

Sizes are byte counts after QEMU's size parsing (the caller converts "1M" with parse_size).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from qemu_ext.errors import BadInputError, NotAvailableError, UsageError

KiB = 1024
MiB = 1024 * KiB
INT_MAX = 2**31 - 1
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MIN_L2_CACHE_SIZE = 2  # entries
MIN_REFCOUNT_CACHE_SIZE = 4  # clusters

VERSIONS = ("2.12", "3.1", "4.0", "7.2", "current")
DEFAULT_VERSION = "7.2"  # Debian 12's QEMU, the one the tests run
# which rule sets were checked against a real QEMU (tests/test_l2cache.py runs qemu-io of each
# installed build with every option combination and compares the cache it builds); "current"
# is QEMU 10.0 (Debian 13 / bookworm-backports), whose rules are 7.2's
VERIFIED = {"2.12": None, "3.1": None, "4.0": None, "7.2": "7.2.22", "current": "10.0.2"}
QCOW_MAX_L1_SIZE = 32 * MiB  # block/qcow2.h (7.2, 10.0)
L1E_SIZE = 8


@dataclass
class CacheConfig:
    """What QEMU ends up with for one image and one set of options."""

    qemu_version: str
    cluster_size: int
    virtual_size: int
    extended_l2: bool
    l2_entry_size: int  # bytes per L2 entry (8, or 16 with extended L2)
    l2_cache_size: int  # bytes asked for after read_cache_sizes (before dividing into entries)
    l2_cache_entry_size: int  # bytes per cache entry (an L2 slice)
    l2_cache_entries: int  # Qcow2Cache size (number of slices)
    refcount_cache_size: int
    refcount_cache_entries: int
    cache_clean_interval: int  # seconds, 0 = off
    max_l2_cache: int  # bytes needed to hold every L2 table of the image (full coverage)

    @property
    def l2_slice_entries(self) -> int:
        return self.l2_cache_entry_size // self.l2_entry_size

    @property
    def l2_memory(self) -> int:
        """Bytes of table memory QEMU allocates for the L2 cache."""
        return self.l2_cache_entries * self.l2_cache_entry_size

    @property
    def refcount_memory(self) -> int:
        return self.refcount_cache_entries * self.cluster_size

    @property
    def covered_bytes(self) -> int:
        """Guest bytes the L2 cache maps when full."""
        return self.l2_cache_entries * self.l2_slice_entries * self.cluster_size

    def as_dict(self) -> dict:
        """JSON-ready, kebab-case keys as QEMU's own options."""
        d = asdict(self)
        d.update(
            l2_slice_entries=self.l2_slice_entries,
            l2_memory=self.l2_memory,
            refcount_memory=self.refcount_memory,
            covered_bytes=self.covered_bytes,
        )
        return {k.replace("_", "-"): v for k, v in d.items()}


_SUFFIX = {"": 1, "b": 1, "k": KiB, "m": MiB, "g": 1024 * MiB, "t": 1024**4, "p": 1024**5, "e": 1024**6}


def parse_size(text: str | int) -> int:
    """QEMU's size syntax (qemu_strtosz): 65536, 64k, 1M, 1.5G (binary suffixes)."""
    if isinstance(text, int):
        return text
    s = str(text).strip().lower()
    if not s:
        raise BadInputError("empty size")
    unit = ""
    if s[-1] in _SUFFIX and not s[-1].isdigit():
        unit = s[-1]
        s = s[:-1]
    try:
        v = float(s) if "." in s else int(s, 0)
    except ValueError:
        raise BadInputError(f"invalid size {text!r} (expected e.g. 65536, 64k, 2M)") from None
    if v < 0:
        raise BadInputError(f"invalid size {text!r}: negative")
    n = int(v * _SUFFIX[unit])
    if n >= 2**64:
        raise BadInputError(f"size {text!r} is too large")
    return n


def _round_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def resolve(
    cluster_size: int,
    virtual_size: int,
    extended_l2: bool = False,
    l2_cache_size: Optional[int] = None,
    refcount_cache_size: Optional[int] = None,
    cache_size: Optional[int] = None,
    l2_cache_entry_size: Optional[int] = None,
    cache_clean_interval: Optional[int] = None,
    qemu_version: str = DEFAULT_VERSION,
    linux: bool = True,
) -> CacheConfig:
    """The cache geometry QEMU `qemu_version` builds for these -drive/-blockdev options.

    None means "option not given". Raises BadInputError with QEMU's own message where QEMU
    refuses the options.
    """
    v = qemu_version
    if v not in VERSIONS:
        raise NotAvailableError(f"unknown QEMU version {v!r}; known: {', '.join(VERSIONS)}")
    if not _is_pow2(cluster_size) or not (1 << MIN_CLUSTER_BITS) <= cluster_size <= (1 << MAX_CLUSTER_BITS):
        raise BadInputError(f"cluster size must be a power of two between 512 and 2M, not {cluster_size}")
    if extended_l2 and v in ("2.12", "3.1", "4.0"):
        raise NotAvailableError(f"QEMU {v} cannot open images with extended L2 entries (added in 5.2)")
    l2e = 16 if extended_l2 else 8
    cs = cluster_size
    # virtual_disk_size = bs->total_sectors * BDRV_SECTOR_SIZE (the size rounded up to sectors)
    vsize = _round_up(virtual_size, 512)
    max_l2_entries = -(-vsize // cs)
    max_l2_cache = _round_up(max_l2_entries * l2e, cs)
    combined_set = cache_size is not None
    l2_set = l2_cache_size is not None
    rc_set = refcount_cache_size is not None
    entry_set = l2_cache_entry_size is not None
    combined = cache_size or 0
    rc = refcount_cache_size or 0
    entry = l2_cache_entry_size if entry_set else cs

    if combined_set:
        if l2_set and rc_set:
            raise BadInputError("cache-size, l2-cache-size and refcount-cache-size may not be set at the same time")
        if l2_set and (l2_cache_size or 0) > combined:
            raise BadInputError("l2-cache-size may not exceed cache-size")
        if rc > combined:
            raise BadInputError("refcount-cache-size may not exceed cache-size")

    if v == "2.12":
        # QEMU 2.12 read_cache_sizes(): DEFAULT_L2_CACHE_BYTE_SIZE / DEFAULT_L2_CACHE_CLUSTERS /
        # DEFAULT_L2_REFCOUNT_SIZE_RATIO
        l2 = l2_cache_size or 0
        if combined_set:
            if l2_set:
                rc = combined - l2
            elif rc_set:
                l2 = combined - rc
            else:
                rc = combined // 5
                l2 = combined - rc
        else:
            if not l2_set and not rc_set:
                l2 = max(1 * MiB, 8 * cs)
                rc = l2 // 4
            elif not l2_set:
                l2 = rc * 4
            elif not rc_set:
                rc = l2 // 4
        clean_default = 0
    else:
        # 3.1 and later: the L2 cache setting is a maximum, capped at what the image needs
        default_max = (32 if linux else 8) * MiB
        l2_max_setting = l2_cache_size if l2_set else default_max
        l2 = min(max_l2_cache, l2_max_setting)
        min_rc = MIN_REFCOUNT_CACHE_SIZE * cs
        if combined_set:
            if l2_set:
                rc = combined - l2
            elif rc_set:
                l2 = combined - rc
            elif combined >= max_l2_cache + min_rc:
                l2 = max_l2_cache
                rc = combined - l2
            else:
                rc = min(combined, min_rc)
                l2 = combined - rc
        if v != "3.1" and l2 < max_l2_cache and not entry_set:
            # 4.0+: "If the L2 cache is not enough to cover the whole disk then default to 4KB entries"
            entry = min(cs, 4096)
        clean_default = 600 if linux else 0

    if entry < (1 << MIN_CLUSTER_BITS) or entry > cs or not _is_pow2(entry):
        raise BadInputError(f"L2 cache entry size must be a power of two between 512 and the cluster size ({cs})")

    # qcow2_update_options_prepare(): divide into entries, apply the minimums
    l2_entries = max(l2 // entry, MIN_L2_CACHE_SIZE)
    if l2_entries > INT_MAX:
        raise BadInputError("L2 cache size too big")
    rc_entries = max(rc // cs, MIN_REFCOUNT_CACHE_SIZE)
    if rc_entries > INT_MAX:
        raise BadInputError("Refcount cache size too big")
    clean = clean_default if cache_clean_interval is None else int(cache_clean_interval)
    if clean and not linux:
        raise BadInputError("cache-clean-interval not supported on this host")
    if clean < 0 or clean > 2**32 - 1:
        raise BadInputError("Cache clean interval too big")
    return CacheConfig(
        qemu_version=v,
        cluster_size=cs,
        virtual_size=virtual_size,
        extended_l2=extended_l2,
        l2_entry_size=l2e,
        l2_cache_size=l2,
        l2_cache_entry_size=entry,
        l2_cache_entries=int(l2_entries),
        refcount_cache_size=rc,
        refcount_cache_entries=int(rc_entries),
        cache_clean_interval=clean,
        max_l2_cache=max_l2_cache,
    )


def check_virtual_size(virtual_size: int, cluster_size: int, extended_l2: bool = False) -> None:
    """Refuse disk sizes QEMU refuses, with qemu-img's reason: above INT64_MAX (qemu-img.c
    cvtnum: "Invalid image size specified. Must be between 0 and 9223372036854775807."), or an L1
    table over QCOW_MAX_L1_SIZE (block/qcow2-cluster.c qcow2_grow_l1_table returns -EFBIG, which
    qemu-img create words as below; 7.2 and 10.0)."""
    if virtual_size <= 0:
        raise UsageError(f"the disk size must be positive, not {virtual_size}")
    if virtual_size > 2**63 - 1:
        raise UsageError("Invalid image size specified. Must be between 0 and 9223372036854775807.")
    l2e = 16 if extended_l2 else 8
    per_l1 = (cluster_size // l2e) * cluster_size
    if -(-_round_up(virtual_size, 512) // per_l1) > QCOW_MAX_L1_SIZE // L1E_SIZE:
        raise UsageError(f"{virtual_size} bytes: The image size is too large for file format 'qcow2' "
                         "(try using a larger cluster size)")


def l2_for_cache_size(l2_size: int, cluster_size: int, virtual_size: int, extended_l2: bool = False) -> int:
    """The cache-size (the TOTAL qcow2 metadata cache, what libvirt's
    <driver><metadata_cache><max_size> sets) that gives an L2 cache of l2_size bytes.

    read_cache_sizes() (block/qcow2.c, 7.2 and 10.0) with only cache-size set: if cache-size >=
    max_l2_cache + MIN_REFCOUNT_CACHE_SIZE clusters, L2 = max_l2_cache and the refcount cache
    gets the rest; else the refcount cache gets MIN(cache-size, 4 clusters) and L2 the rest.
    So an L2 cache below full coverage needs cache-size = l2_size + 4 clusters, and full coverage
    needs max_l2_cache + 4 clusters (more only grows the refcount cache)."""
    max_l2 = full_coverage_size(cluster_size, virtual_size, extended_l2)
    return min(l2_size, max_l2) + MIN_REFCOUNT_CACHE_SIZE * cluster_size


def full_coverage_size(cluster_size: int, virtual_size: int, extended_l2: bool = False) -> int:
    """l2-cache-size that holds every L2 table: disk size * 8 / cluster size (x2 for extended L2),
    rounded up to a cluster as QEMU does."""
    l2e = 16 if extended_l2 else 8
    return _round_up(-(-_round_up(virtual_size, 512) // cluster_size) * l2e, cluster_size)


def option_text(l2_cache_size: int, l2_cache_entry_size: Optional[int] = None, image: str = "disk.qcow2",
                node: str = "disk0", cluster_size: Optional[int] = None, virtual_size: Optional[int] = None,
                extended_l2: bool = False, qemu_version: str = DEFAULT_VERSION) -> dict:
    """The -drive, -blockdev and libvirt text for these settings.

    libvirt has no l2-cache-size: its <metadata_cache><max_size> becomes QEMU's cache-size (the
    total of both caches), computed with l2_for_cache_size(); "libvirt-entry-size" is the entry
    size QEMU then picks on its own (libvirt cannot set l2-cache-entry-size)."""
    extra = f",l2-cache-entry-size={l2_cache_entry_size}" if l2_cache_entry_size else ""
    drive = f"-drive file={image},format=qcow2,node-name={node},l2-cache-size={l2_cache_size}{extra}"
    bd_extra = f',"l2-cache-entry-size":{l2_cache_entry_size}' if l2_cache_entry_size else ""
    blockdev = (
        f"-blockdev '{{\"driver\":\"qcow2\",\"node-name\":\"{node}\","
        f"\"l2-cache-size\":{l2_cache_size}{bd_extra},"
        f"\"file\":{{\"driver\":\"file\",\"filename\":\"{image}\"}}}}'"
    )
    out: dict = {"drive": drive, "blockdev": blockdev}
    if cluster_size is not None and virtual_size is not None:
        total = l2_for_cache_size(l2_cache_size, cluster_size, virtual_size, extended_l2)
        out["cache-size"] = total
        out["libvirt"] = (f"<driver name='qemu' type='qcow2'><metadata_cache><max_size unit='bytes'>{total}"
                          "</max_size></metadata_cache></driver>")
        try:
            got = resolve(cluster_size, virtual_size, extended_l2, cache_size=total, qemu_version=qemu_version)
            out["libvirt-l2-cache-size"] = got.l2_cache_size
            out["libvirt-entry-size"] = got.l2_cache_entry_size
        except BadInputError:
            pass
    return out
