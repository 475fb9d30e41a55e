# QEMU 7.2 tests/qemu-iotests/138: a multiple of 2^32 clusters; fixed counts
begin_case cluster-2p32  # === Check on an image with a multiple of 2^32 clusters ===
_make_test_img -o "cluster_size=512" 512
$QEMU_IO -c 'write 0 512' "$TEST_IMG"
poke_file "$TEST_IMG" $((2048 + 8)) "\x00\x80\x00\x00\x00\x00\x00\x00"

begin_case refcount-and-copied  # === Check leaks-fixed/corruptions-fixed report
_make_test_img 64k
$QEMU_IO -c 'write 0 64k' "$TEST_IMG"
reftable_ofs=$(peek_file_be "$TEST_IMG" 48 8)
refblock_ofs=$(peek_file_be "$TEST_IMG" $reftable_ofs 8)
poke_file_be "$TEST_IMG" "$refblock_ofs" 2 2
l1_ofs=$(peek_file_be "$TEST_IMG" 40 8)
l1_entry=$(peek_file_be "$TEST_IMG" $l1_ofs 8)
l1_entry=$((l1_entry & ~(1 << 63)))
poke_file_be "$TEST_IMG" $l1_ofs 8 $l1_entry
