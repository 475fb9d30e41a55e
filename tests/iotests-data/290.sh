# QEMU 7.2 tests/qemu-iotests/290: discard on v2 and v3 images, with and without a backing file
for qcow2_compat in 0.10 1.1; do
    begin_case discard-$qcow2_compat  # "# Create an image with compat=$qcow2_compat without a backing file"
    _make_test_img -o "compat=$qcow2_compat" 128k
    $QEMU_IO -c 'write -P 0x01 0 128k' "$TEST_IMG"
    $QEMU_IO -c 'discard 0 128k' "$TEST_IMG"
done
for qcow2_compat in 0.10 1.1; do
    begin_case discard-backing-$qcow2_compat  # "# Create an image with compat=$qcow2_compat and a backing file"
    BACKING_IMG="$TEST_IMG.base"
    TEST_IMG="$BACKING_IMG" _make_test_img 128k
    $QEMU_IO -c 'write -P 0xff 0 128k' "$BACKING_IMG"
    _make_test_img -o "compat=$qcow2_compat" -b "$BACKING_IMG" -F $IMGFMT
    $QEMU_IO -c 'write -P 0x01 0 128k' "$TEST_IMG"
    $QEMU_IO -c 'discard 0 128k' "$TEST_IMG"
done
