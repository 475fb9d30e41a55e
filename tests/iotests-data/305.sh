# QEMU 7.2 tests/qemu-iotests/305: a corrupted refcount block offset, then allocating writes
begin_case refblock-offset  # ### Corrupt the offset of the second refcount block
_make_test_img -o refcount_bits=64,cluster_size=1k 1M
$QEMU_IO -c 'write 0 124k' "$TEST_IMG"
$QEMU_IO -c 'discard 121k 1k' "$TEST_IMG"
$QEMU_IO -c 'discard 123k 1k' "$TEST_IMG"
refcount_table_offset=$(peek_file_be "$TEST_IMG" 48 8)
poke_file "$TEST_IMG" $(($refcount_table_offset+14)) "\x06"
snap before-write
$QEMU_IO -c 'write 121k 3k' "$TEST_IMG"
