# QEMU 7.2 tests/qemu-iotests/060: overlapping and misaligned metadata (the images, section by section)
rt_offset=65536  # 0x10000 (XXX: just an assumption)
rb_offset=131072 # 0x20000 (XXX: just an assumption)
l1_offset=196608 # 0x30000 (XXX: just an assumption)
l2_offset=262144 # 0x40000 (XXX: just an assumption)
l2_offset_after_snapshot=524288 # 0x80000 (XXX: just an assumption)

begin_case l2-into-l1  # === Testing L2 reference into L1 ===
OPEN_RW="open -o overlap-check=all $TEST_IMG"
_make_test_img 64M
poke_file "$TEST_IMG" "$l1_offset" "\x80\x00\x00\x00\x00\x03\x00\x00"
snap before-write
$QEMU_IO -c "$OPEN_RW" -c "write -P 0x2a 0 512"   # marks the image corrupt

begin_case data-into-refblock  # === Testing cluster data reference into refcount block ===
OPEN_RW="open -o overlap-check=all $TEST_IMG"
_make_test_img 64M
truncate -s "$(($l2_offset+65536))" "$TEST_IMG"
poke_file "$TEST_IMG" "$l1_offset" "\x80\x00\x00\x00\x00\x04\x00\x00"
poke_file "$TEST_IMG" "$(($rb_offset+8))" "\x00\x01"
poke_file "$TEST_IMG" "$l2_offset" "\x80\x00\x00\x00\x00\x02\x00\x00"
snap before-write
$QEMU_IO -c "$OPEN_RW" -c "write -P 0x2a 0 512"

begin_case data-into-inactive-l2  # === Testing cluster data reference into inactive L2 table ===
OPEN_RW="open -o overlap-check=all $TEST_IMG"
_make_test_img 64M
$QEMU_IO -c "$OPEN_RW" -c "write -P 1 0 512"
$QEMU_IMG snapshot -c foo "$TEST_IMG"
$QEMU_IO -c "$OPEN_RW" -c "write -P 2 0 512"
poke_file "$TEST_IMG" "$l2_offset_after_snapshot" "\x80\x00\x00\x00\x00\x04\x00\x00"
snap before-write
$QEMU_IO -c "$OPEN_RW" -c "write -P 3 0 512"

begin_case cow-overlap  # === Testing overlap while COW is in flight === (the image before the COW)
BACKING_IMG=$TEST_IMG.base
TEST_IMG=$BACKING_IMG _make_test_img 1G
$QEMU_IO -c 'write 0k 64k' "$BACKING_IMG"
_make_test_img -b "$BACKING_IMG" -F $IMGFMT 1G
$QEMU_IO -c 'write 0k 64k' -c 'write 512M 64k' "$TEST_IMG"
poke_file "$TEST_IMG" "$l2_offset" "\x00\x00\x00\x00\x00\x00\x00\x00"
poke_file "$TEST_IMG" "$(($rb_offset+10))" "\x00\x00"
poke_file "$TEST_IMG" "$(($rb_offset+12))" "\x00\x00"

begin_case unallocated-header  # === Testing unallocated image header ===
_make_test_img 64M
$QEMU_IO -c "write 0 64k" "$TEST_IMG"
poke_file "$TEST_IMG" "$rb_offset" "\x00\x00"
snap before-write
$QEMU_IO -c "write 64k 64k" "$TEST_IMG"

begin_case unaligned-l1-entry  # === Testing unaligned L1 entry ===
_make_test_img 64M
$QEMU_IO -c "write 0 64k" "$TEST_IMG"
poke_file "$TEST_IMG" "$l1_offset" "\x80\x00\x00\x00\x00\x04\x2a\x00"

begin_case unaligned-l2-entry  # === Testing unaligned L2 entry ===
_make_test_img 64M
$QEMU_IO -c "write 0 64k" "$TEST_IMG"
poke_file "$TEST_IMG" "$l2_offset" "\x80\x00\x00\x00\x00\x05\x2a\x00"

begin_case unaligned-prealloc-zero  # === Testing unaligned pre-allocated zero cluster ===
_make_test_img 64M
$QEMU_IO -c "write 0 64k" "$TEST_IMG"
poke_file "$TEST_IMG" "$l2_offset" "\x80\x00\x00\x00\x00\x05\x2a\x01"

begin_case unaligned-reftable-entry  # === Testing unaligned reftable entry ===
_make_test_img 64M
poke_file "$TEST_IMG" "$rt_offset" "\x00\x00\x00\x00\x00\x02\x2a\x00"

begin_case two-unaligned-l2  # === Testing non-fatal and then fatal corruption report ===
_make_test_img 64M
$QEMU_IO -c "write 0 128k" "$TEST_IMG"
poke_file "$TEST_IMG" "$l2_offset"        "\x80\x00\x00\x00\x00\x05\x2a\x00"
poke_file "$TEST_IMG" "$(($l2_offset+8))" "\x80\x00\x00\x00\x00\x06\x2a\x00"

begin_case empty-reftable  # === Testing empty refcount table ===
_make_test_img 64M
poke_file "$TEST_IMG" "$rt_offset"        "\x00\x00\x00\x00\x00\x00\x00\x00"
snap before-write
$QEMU_IO -c "write 0 64k" "$TEST_IMG"

begin_case empty-reftable-l1-l2  # === Testing empty refcount table with valid L1 and L2 tables ===
_make_test_img 64M
$QEMU_IO -c "write 0 64k" "$TEST_IMG"
poke_file "$TEST_IMG" "$rt_offset"        "\x00\x00\x00\x00\x00\x00\x00\x00"
snap before-write
$QEMU_IO -c "write 0 128k" "$TEST_IMG"

begin_case empty-refblock  # === Testing empty refcount block ===
_make_test_img 64M
poke_file "$TEST_IMG" "$rb_offset"        "\x00\x00\x00\x00\x00\x00\x00\x00"
snap before-write
$QEMU_IO -c "write 0 64k" "$TEST_IMG"

begin_case empty-refblock-compressed  # === Testing empty refcount block with compressed write ===
_make_test_img 64M
$QEMU_IO -c "write 64k 64k" "$TEST_IMG"
poke_file "$TEST_IMG" "$rb_offset"        "\x00\x00\x00\x00\x00\x00\x00\x00"
snap before-write
$QEMU_IO -c "write -c 0k 64k" "$TEST_IMG"

begin_case zero-reftable-size  # === Testing zero refcount table size ===
_make_test_img 64M
poke_file "$TEST_IMG" "56"                "\x00\x00\x00\x00"

begin_case zero-reftable-offset  # === Testing incorrect refcount table offset ===
_make_test_img 64M
poke_file "$TEST_IMG" "48"                "\x00\x00\x00\x00\x00\x00\x00\x00"

begin_case dirty-corrupt  # === Testing dirty corrupt image ===
_make_test_img 64M
poke_file "$TEST_IMG" "$rt_offset"        "\x00\x00\x00\x00\xff\xff\x2a\x00"
$PYTHON qcow2.py "$TEST_IMG" set-feature-bit incompatible 0

begin_case unaligned-prealloc-zero-in-header  # === Writing to an unaligned preallocated zero cluster ===
_make_test_img 64M
$QEMU_IO -c "write 0 64k" -c "discard 0 64k" "$TEST_IMG"
poke_file "$TEST_IMG" "$l2_offset" "\x80\x00\x00\x00\x00\x00\x2a\x01"

begin_case unaligned-refblock  # === Discarding with an unaligned refblock ===
_make_test_img 64M
$QEMU_IO -c "write 0 128k" "$TEST_IMG"
poke_file "$TEST_IMG" "$(($rt_offset))" "\x00\x00\x00\x00\x00\x00\x2a\x00"

begin_case refblock-out-of-bounds  # === Discarding an out-of-bounds refblock ===
_make_test_img 64M
poke_file "$TEST_IMG" "$(($rt_offset+8))" "\x00\xff\xff\xff\x00\x00\x00\x00"

begin_case refblock-not-covered  # === Discarding a non-covered in-bounds refblock ===
_make_test_img -o 'refcount_bits=1' 64M
poke_file "$TEST_IMG" "$(($rt_offset+8))" "\x00\x00\x00\x10\x00\x00\x00\x00"

begin_case refblock-covered-by-unaligned  # === Discarding a refblock covered by an unaligned refblock ===
_make_test_img -o 'refcount_bits=1' 64M
poke_file "$TEST_IMG" "$(($rt_offset+8))" "\x00\x00\x00\x10\x00\x00\x00\x00"
poke_file "$TEST_IMG" "$(($rt_offset+16))" "\x00\x00\x00\x00\x00\x00\x02\x00"

begin_case unaligned-l1-incoming  # === Testing incoming inactive corrupted image ===
_make_test_img 64M
poke_file "$TEST_IMG" "$l1_offset" "\x00\x00\x00\x00\x2a\x2a\x2a\x2a"
