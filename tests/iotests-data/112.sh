# QEMU 7.2 tests/qemu-iotests/112: refcount_bits limits, overflows and amend
begin_case snapshot-rc1  # === Snapshot limit on refcount_bits=1 ===
_make_test_img -o "refcount_bits=1" 64M
$QEMU_IO -c 'write 0 512' "$TEST_IMG"
$QEMU_IMG snapshot -c foo "$TEST_IMG"

begin_case snapshot-rc2  # === Snapshot limit on refcount_bits=2 ===
_make_test_img -o "refcount_bits=2" 64M
$QEMU_IO -c 'write 0 512' "$TEST_IMG"
$QEMU_IMG snapshot -c foo "$TEST_IMG"
$QEMU_IMG snapshot -c bar "$TEST_IMG"
$QEMU_IMG snapshot -c baz "$TEST_IMG"

begin_case compressed-rc1  # === Compressed clusters with refcount_bits=1 ===
_make_test_img -o "refcount_bits=1" 64M
$QEMU_IO -c 'write -P 0 -c  0  64k' \
         -c 'write -P 1 -c 64k 64k' \
         "$TEST_IMG"

begin_case msb-rc64  # === MSb set in 64 bit refcount ===
_make_test_img -o "refcount_bits=64" 64M
$QEMU_IO -c 'write 0 512' "$TEST_IMG"
poke_file "$TEST_IMG" $((0x20028)) "\x80\x00\x00\x00\x00\x00\x00\x00"
poke_file "$TEST_IMG" $((0x40000)) "\x00\x00\x00\x00\x00\x05\x00\x00"

begin_case max-rc64  # === Snapshot on maximum 64 bit refcount value ===
_make_test_img -o "refcount_bits=64" 64M
$QEMU_IO -c 'write 0 512' "$TEST_IMG"
poke_file "$TEST_IMG" $((0x20028)) "\xff\xff\xff\xff\xff\xff\xff\xff"
poke_file "$TEST_IMG" $((0x40000)) "\x00\x00\x00\x00\x00\x05\x00\x00"
$QEMU_IMG snapshot -c foo "$TEST_IMG"

begin_case amend  # === Amend from refcount_bits=16 to refcount_bits=1 ... with snapshot ===
_make_test_img 64M
$QEMU_IO -c 'write 16M 32M' "$TEST_IMG"
$QEMU_IMG amend -o refcount_bits=1 "$TEST_IMG"
snap rc1
$QEMU_IMG amend -o refcount_bits=64 "$TEST_IMG"
snap rc64
$QEMU_IMG amend -o compat=0.10 "$TEST_IMG"
$QEMU_IMG amend -o compat=0.10,refcount_bits=16 "$TEST_IMG"
$QEMU_IMG amend -o compat=1.1 "$TEST_IMG"
$QEMU_IMG amend -o refcount_bits=32,compat=0.10 "$TEST_IMG"
$QEMU_IMG snapshot -c foo "$TEST_IMG"
$QEMU_IO -c 'write 0 16M' "$TEST_IMG"
$QEMU_IMG amend -o refcount_bits=1 "$TEST_IMG"
$QEMU_IMG amend -o refcount_bits=2 "$TEST_IMG"

begin_case too-many-refs  # === Testing too many references for check ===
_make_test_img -o "refcount_bits=1" 64M
$QEMU_IO -c 'write 0 64k' "$TEST_IMG"
poke_file "$TEST_IMG" $((0x40008)) "\x80\x00\x00\x00\x00\x05\x00\x00"

begin_case multiple-walks  # === Multiple walks necessary during amend ===
_make_test_img -o "refcount_bits=1,cluster_size=512" 64k
$QEMU_IO -c "write 0 $((58 * 512))" "$TEST_IMG"
$QEMU_IMG amend -o refcount_bits=64 -p "$TEST_IMG"
