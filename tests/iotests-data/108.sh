# QEMU 7.2 tests/qemu-iotests/108: images without a refcount table, refblocks beyond the end
begin_case no-reftable  # === Repairing an image without any refcount table ===
_make_test_img 64M
$QEMU_IO -c 'write -P 42 0 64k' "$TEST_IMG"
poke_file "$TEST_IMG" $((0x30)) "\x00\x00\x00\x00\x00\x00\x00\x00"
poke_file "$TEST_IMG" $((0x38)) "\x00\x00\x00\x00"

begin_case unreferenced-data  # === Repairing unreferenced data cluster in new refblock area ===
_make_test_img -o 'cluster_size=512' 64M
$QEMU_IO -c 'write 0 0x1b200' "$TEST_IMG"
poke_file "$TEST_IMG" $((0x1ccc8)) "\x80\x00\x00\x00\x00\x02\x00\x00"
truncate -s $((0x20200)) "$TEST_IMG"
"$QEMU_IO_BIN" -c "open -o driver=raw $TEST_IMG" -c 'write -P 42 128k 512' >/dev/null 2>&1

begin_case refblock-beyond-end-clean  # --- Otherwise clean ---
_make_test_img 64M
poke_file "$TEST_IMG" $((0x10008)) "\x00\x00\x00\x00\x00\x10\x00\x00"
poke_file "$TEST_IMG" $((0x20020)) "\x00\x01"

begin_case refblock-beyond-end-unallocated  # --- Refblock is unallocated ---
_make_test_img 64M
poke_file "$TEST_IMG" $((0x10008)) "\x00\x00\x00\x00\x00\x10\x00\x00"

begin_case refblock-signed-overflow  # --- Signed overflow after the refblock ---
_make_test_img 64M
poke_file "$TEST_IMG" $((0x10008)) "\x7f\xff\xff\xff\xff\xff\x00\x00"

begin_case refblock-unsigned-overflow  # --- Unsigned overflow after the refblock ---
_make_test_img 64M
poke_file "$TEST_IMG" $((0x10008)) "\xff\xff\xff\xff\xff\xff\x00\x00"

begin_case refblock-zeroed-512  # --- Does the image size increase? ---
_make_test_img -o 'cluster_size=512' 1M
$QEMU_IO -c 'write 0 64k' "$TEST_IMG"
file_len=$(stat -c '%s' "$TEST_IMG")
truncate -s $((file_len + 256 * 1024)) "$TEST_IMG"
rt_offset=$(peek_file_be "$TEST_IMG" 48 8)
rb_offset=$(peek_file_be "$TEST_IMG" $rt_offset 8)
poke_file "$TEST_IMG" $rb_offset "\x00\x00"
