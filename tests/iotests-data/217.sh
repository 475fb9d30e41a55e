# QEMU 7.2 tests/qemu-iotests/217: an I/O error during snapshot deletion leaves leaks
begin_case snapshot-delete-eio  # === Simulating an I/O error during snapshot deletion ===
_make_test_img 64M
$QEMU_IO -c 'write 0 64k' "$TEST_IMG"
$QEMU_IMG snapshot -c foo "$TEST_IMG"
cat > "$TEST_DIR/blkdebug.conf" <<EOC
[inject-error]
event = "cluster_free"
errno = "5"
EOC
$QEMU_IMG snapshot -d foo "blkdebug:$TEST_DIR/blkdebug.conf:$TEST_IMG"
