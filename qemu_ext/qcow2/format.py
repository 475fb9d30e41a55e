"""qcow2 on-disk structures, declared with construct, field by field as docs/interop/qcow2.txt.

Everything is big endian. Byte offsets in the comments are those of the spec.
Fixed-size records (header, extension headers, feature-name entries, snapshot
and bitmap directory entries) are construct Structs; tables with up to millions
of entries (L1, L2, refcount table/blocks, bitmap tables) are decoded in bulk
with numpy by `image.py`, using the masks and bit positions defined here.
"""

from __future__ import annotations

from construct import (
    Array,
    BitsInteger,
    BitStruct,
    Bytes,
    Const,
    Construct,
    Flag,
    Int8ub,
    Int16ub,
    Int32ub,
    Int64ub,
    Padding,
    Struct,
)

QCOW_MAGIC = b"QFI\xfb"

# ---------------------------------------------------------------- header
# Bytes 0-71: the version 2 header (and the first part of every v3 header).
HeaderV2 = Struct(
    "magic" / Const(QCOW_MAGIC),  # 0-3    "QFI\xfb"
    "version" / Int32ub,  # 4-7    2 or 3
    "backing_file_offset" / Int64ub,  # 8-15   0 = no backing file; name not NUL terminated
    "backing_file_size" / Int32ub,  # 16-19  length of the name, <= 1023
    "cluster_bits" / Int32ub,  # 20-23  cluster_size = 1 << cluster_bits, 9..21 in QEMU
    "size" / Int64ub,  # 24-31  virtual disk size in bytes
    "crypt_method" / Int32ub,  # 32-35  0 none, 1 AES, 2 LUKS
    "l1_size" / Int32ub,  # 36-39  entries in the active L1 table
    "l1_table_offset" / Int64ub,  # 40-47  cluster aligned
    "refcount_table_offset" / Int64ub,  # 48-55  cluster aligned
    "refcount_table_clusters" / Int32ub,  # 56-59  clusters of the refcount table
    "nb_snapshots" / Int32ub,  # 60-63  entries in the snapshot table
    "snapshots_offset" / Int64ub,  # 64-71  cluster aligned
)
HEADER_V2_SIZE = HeaderV2.sizeof()  # 72

# Bytes 72-103: mandatory for version 3 (header_length >= 104).
HeaderV3Tail = Struct(
    "incompatible_features" / Int64ub,  # 72-79  see INCOMPAT_*
    "compatible_features" / Int64ub,  # 80-87  see COMPAT_*
    "autoclear_features" / Int64ub,  # 88-95  see AUTOCLEAR_*
    "refcount_order" / Int32ub,  # 96-99  refcount_bits = 1 << refcount_order (0..6)
    "header_length" / Int32ub,  # 100-103 >= 104, multiple of 8
)
HEADER_V3_SIZE = HEADER_V2_SIZE + HeaderV3Tail.sizeof()  # 104

# Byte 104: optional additional field (compression_type, 0 zlib, 1 zstd), present when
# header_length > 104; bytes 105-111 are padding.
COMPRESSION_TYPE_OFFSET = HEADER_V3_SIZE
COMPRESSION_TYPES = {0: "zlib", 1: "zstd"}
CRYPT_METHODS = {0: "none", 1: "aes", 2: "luks"}

# incompatible_features (bytes 72-79)
INCOMPAT_DIRTY = 1 << 0  # refcounts may be inconsistent
INCOMPAT_CORRUPT = 1 << 1  # any structure may be corrupt; do not write
INCOMPAT_DATA_FILE = 1 << 2  # guest clusters live in an external data file
INCOMPAT_COMPRESSION = 1 << 3  # compression_type field present and != 0
INCOMPAT_EXTL2 = 1 << 4  # extended (128-bit) L2 entries, 32 subclusters
INCOMPAT_KNOWN_MASK = 0x1F
# compatible_features (bytes 80-87)
COMPAT_LAZY_REFCOUNTS = 1 << 0
# autoclear_features (bytes 88-95)
AUTOCLEAR_BITMAPS = 1 << 0  # bitmaps extension consistent
AUTOCLEAR_DATA_FILE_RAW = 1 << 1  # external data file readable as raw

# QEMU's own names for the bits (used when no feature name table is present)
KNOWN_FEATURE_NAMES = {
    ("incompatible", 0): "dirty bit",
    ("incompatible", 1): "corrupt bit",
    ("incompatible", 2): "external data file",
    ("incompatible", 3): "compression type",
    ("incompatible", 4): "extended L2 entries",
    ("compatible", 0): "lazy refcounts",
    ("autoclear", 0): "bitmaps",
    ("autoclear", 1): "raw external data",
}
FEATURE_TYPES = {0: "incompatible", 1: "compatible", 2: "autoclear"}

# ---------------------------------------------------------------- header extensions
# Directly after the header (at header_length), each padded to a multiple of 8.
ExtensionHeader = Struct(
    "type" / Int32ub,  # 0-3  EXT_*
    "length" / Int32ub,  # 4-7  length of the data (without padding)
)
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA  # string: backing file format name
EXT_FEATURE_TABLE = 0x6803F857  # feature name table
EXT_BITMAPS = 0x23852875  # bitmaps extension
EXT_CRYPTO_HEADER = 0x0537BE77  # full disk encryption header pointer
EXT_DATA_FILE = 0x44415441  # string: external data file name
EXTENSION_NAMES = {
    EXT_BACKING_FORMAT: "backing-format",
    EXT_FEATURE_TABLE: "feature-table",
    EXT_BITMAPS: "bitmaps",
    EXT_CRYPTO_HEADER: "crypto-header",
    EXT_DATA_FILE: "data-file",
}

# One entry of the feature name table (48 bytes).
FeatureNameEntry = Struct(
    "type" / Int8ub,  # 0     0 incompatible, 1 compatible, 2 autoclear
    "bit" / Int8ub,  # 1     bit number 0..63
    "name" / Bytes(46),  # 2-47  zero padded, not necessarily NUL terminated
)
FEATURE_NAME_ENTRY_SIZE = FeatureNameEntry.sizeof()  # 48

# Bitmaps extension data (24 bytes).
BitmapsExtension = Struct(
    "nb_bitmaps" / Int32ub,  # 0-3   >= 1, QEMU supports <= 65535
    Padding(4),  # 4-7   reserved, zero
    "bitmap_directory_size" / Int64ub,  # 8-15
    "bitmap_directory_offset" / Int64ub,  # 16-23 cluster aligned
)
BITMAPS_EXTENSION_SIZE = BitmapsExtension.sizeof()  # 24

# Full disk encryption header pointer (16 bytes).
CryptoHeaderExtension = Struct(
    "offset" / Int64ub,  # 0-7  cluster aligned
    "length" / Int64ub,  # 8-15 bytes of the written encryption header
)
CRYPTO_HEADER_EXTENSION_SIZE = CryptoHeaderExtension.sizeof()  # 16

# LUKS1 partition header at the start of the encryption header clusters (crypt_method 2), 592 bytes.
LUKS_MAGIC = b"LUKS\xba\xbe"
LuksKeySlot = Struct(
    "active" / Int32ub,  # 0x00AC71F3 enabled, 0x0000DEAD disabled
    "iterations" / Int32ub,  # PBKDF2 iterations
    "salt" / Bytes(32),
    "key_offset_sector" / Int32ub,  # key material, in 512-byte sectors from the header start
    "stripes" / Int32ub,  # anti-forensic stripes
)
LUKS_KEY_SLOT_ENABLED = 0x00AC71F3
LuksHeader = Struct(
    "magic" / Const(LUKS_MAGIC),  # 0-5
    "version" / Int16ub,  # 6-7     1
    "cipher_name" / Bytes(32),  # 8-39    e.g. "aes"
    "cipher_mode" / Bytes(32),  # 40-71   e.g. "xts-plain64", "cbc-essiv:sha256"
    "hash_spec" / Bytes(32),  # 72-103  e.g. "sha256"
    "payload_offset_sector" / Int32ub,  # 104-107
    "master_key_len" / Int32ub,  # 108-111 key bytes
    "master_key_digest" / Bytes(20),  # 112-131
    "master_key_salt" / Bytes(32),  # 132-163
    "master_key_iterations" / Int32ub,  # 164-167
    "uuid" / Bytes(40),  # 168-207
    "key_slots" / Array(8, LuksKeySlot),  # 208-591
)
LUKS_HEADER_SIZE = LuksHeader.sizeof()  # 592


# ---------------------------------------------------------------- cluster mapping
# L1 table entry (64 bits)
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00  # bits 9-55: L2 table offset
L1E_RESERVED_MASK = 0x7F000000000001FF  # bits 0-8, 56-62
L1E_COPIED = 1 << 63  # refcount exactly one

# L2 table entry (64 bits; extended entries add a 64-bit subcluster bitmap)
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00  # standard: bits 9-55 host cluster offset
L2E_STD_RESERVED_MASK = 0x3F000000000001FE  # standard: bits 1-8, 56-61
L2E_ZERO = 1 << 0  # standard: reads as zeros (v3, not with extended L2)
L2E_COMPRESSED = 1 << 62  # compressed cluster descriptor follows
L2E_COPIED = 1 << 63  # refcount exactly one
L2E_DESCRIPTOR_MASK = (1 << 62) - 1  # bits 0-61: cluster descriptor

# Extended L2 bitmap (second 64 bits)
SUBCLUSTERS_PER_CLUSTER = 32
L2_BITMAP_ALLOC_MASK = 0x00000000FFFFFFFF  # bit x: subcluster x allocated
L2_BITMAP_ZERO_MASK = 0xFFFFFFFF00000000  # bit 32+x: subcluster x reads as zeros


# The same entries as construct BitStructs (most significant bit first).  They document the
# layout and decode single entries (dump); whole tables are decoded with numpy using the masks
# above, and the tests check both decoders agree.
L1Entry = BitStruct(
    "copied" / Flag,  # bit 63: refcount exactly one
    "reserved_hi" / BitsInteger(7),  # bits 56-62
    "l2_offset_9" / BitsInteger(47),  # bits 9-55: L2 table offset >> 9
    "reserved_lo" / BitsInteger(9),  # bits 0-8
)
L2StandardEntry = BitStruct(
    "copied" / Flag,  # bit 63: refcount exactly one
    "compressed" / Flag,  # bit 62: 0 here
    "reserved_hi" / BitsInteger(6),  # bits 56-61
    "host_offset_9" / BitsInteger(47),  # bits 9-55: host cluster offset >> 9
    "reserved_lo" / BitsInteger(8),  # bits 1-8
    "zero" / Flag,  # bit 0: reads as zeros (v3, not with extended L2)
)
L2SubclusterBitmap = BitStruct(
    "zero" / BitsInteger(32),  # bits 32-63: subcluster x reads as zeros (bit 32+x)
    "alloc" / BitsInteger(32),  # bits 0-31: subcluster x allocated (bit x)
)
RefcountTableEntry = BitStruct(
    "block_offset_9" / BitsInteger(55),  # bits 9-63: refcount block offset >> 9
    "reserved" / BitsInteger(9),  # bits 0-8
)
BitmapTableEntry = BitStruct(
    "reserved_hi" / BitsInteger(8),  # bits 56-63
    "offset_9" / BitsInteger(47),  # bits 9-55: data cluster offset >> 9
    "reserved_lo" / BitsInteger(8),  # bits 1-8
    "all_ones" / Flag,  # bit 0: unallocated cluster reads as all ones
)


def L2CompressedEntry(cluster_bits: int) -> Construct:  # a construct factory, named like one
    """Compressed cluster descriptor: x = 62 - (cluster_bits - 8) offset bits, the rest sector count."""
    x = 62 - (cluster_bits - 8)
    nbits = 62 - x
    return BitStruct(
        "copied" / Flag,  # bit 63: never set for compressed clusters
        "compressed" / Flag,  # bit 62: 1
        "additional_sectors" / BitsInteger(nbits),  # bits x-61: 512-byte sectors beyond the first
        "host_offset" / BitsInteger(x),  # bits 0..x-1: byte offset (not aligned)
    )


# ---------------------------------------------------------------- refcounts
RT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00  # refcount table entry: bits 9-63 (block offset)
RT_RESERVED_MASK = 0x1FF

# ---------------------------------------------------------------- snapshots
# Fixed part of a snapshot table entry (40 bytes), then extra data, id, name, padding to 8.
SnapshotHeader = Struct(
    "l1_table_offset" / Int64ub,  # 0-7    cluster aligned
    "l1_size" / Int32ub,  # 8-11   entries of this snapshot's L1 table
    "id_str_size" / Int16ub,  # 12-13
    "name_size" / Int16ub,  # 14-15
    "date_sec" / Int32ub,  # 16-19  seconds since the Epoch
    "date_nsec" / Int32ub,  # 20-23
    "vm_clock_nsec" / Int64ub,  # 24-31  guest run time in ns
    "vm_state_size" / Int32ub,  # 32-35  (ignored when extra data has vm_state_size_large)
    "extra_data_size" / Int32ub,  # 36-39
)
SNAPSHOT_HEADER_SIZE = SnapshotHeader.sizeof()  # 40
# Known fields of the extra data (each present only if extra_data_size covers it).
SnapshotExtra = Struct(
    "vm_state_size_large" / Int64ub,  # 40-47
    "disk_size" / Int64ub,  # 48-55  virtual disk size of the snapshot
    "icount" / Int64ub,  # 56-63  -1 (all ones) when icount was disabled
)
SNAPSHOT_EXTRA_SIZE = SnapshotExtra.sizeof()  # 24
QCOW_MAX_SNAPSHOTS = 65536
QCOW_MAX_SNAPSHOT_EXTRA_DATA = 1024

# ---------------------------------------------------------------- bitmaps
# Fixed part of a bitmap directory entry (24 bytes), then extra data, name, padding to 8.
BitmapDirEntryHeader = Struct(
    "bitmap_table_offset" / Int64ub,  # 0-7    cluster aligned
    "bitmap_table_size" / Int32ub,  # 8-11   entries of the bitmap table
    "flags" / Int32ub,  # 12-15  BME_FLAG_*
    "type" / Int8ub,  # 16     1 = dirty tracking
    "granularity_bits" / Int8ub,  # 17     granularity = 1 << bits (QEMU: 9..31)
    "name_size" / Int16ub,  # 18-19  non-zero, <= 1023
    "extra_data_size" / Int32ub,  # 20-23
)
BITMAP_DIR_ENTRY_HEADER_SIZE = BitmapDirEntryHeader.sizeof()  # 24
BME_FLAG_IN_USE = 1 << 0
BME_FLAG_AUTO = 1 << 1
BME_FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2
BME_FLAG_NAMES = {BME_FLAG_IN_USE: "in-use", BME_FLAG_AUTO: "auto"}
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00  # bits 9-55
BME_TABLE_ENTRY_FLAG_ALL_ONES = 1 << 0
BME_TABLE_ENTRY_RESERVED_MASK = 0xFF000000000001FE

# QEMU implementation limits (block/qcow2.h, qcow2-bitmap.c; the same in 7.2 and 10.0)
QCOW_MAX_L1_SIZE = 0x2000000  # 32 MiB of L1 table
QCOW_MAX_REFTABLE_SIZE = 0x800000  # 8 MiB of refcount table
QCOW_MAX_SNAPSHOTS_SIZE = 1024 * QCOW_MAX_SNAPSHOTS  # bytes of snapshot table
QCOW2_MAX_BITMAPS = 65535
QCOW2_MAX_BITMAP_DIRECTORY_SIZE = 1024 * QCOW2_MAX_BITMAPS
BME_MAX_TABLE_SIZE = 0x8000000  # entries of a bitmap table
BME_MAX_PHYS_SIZE = 0x20000000  # bytes of bitmap data
BME_MAX_GRANULARITY_BITS = 31
BME_MIN_GRANULARITY_BITS = 9
BME_MAX_NAME_SIZE = 1023
BME_RESERVED_FLAGS = 0xFFFFFFFC
BT_DIRTY_TRACKING_BITMAP = 1
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21


def align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a
