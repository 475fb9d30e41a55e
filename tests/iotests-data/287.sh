# QEMU 7.2 tests/qemu-iotests/287: compression type and its incompatible bit
begin_case zstd  # === Testing adjacent clusters reading and writing with zstd ===
_make_test_img -o compression_type=zstd 64M
$QEMU_IO -c "write -c -P 0xAB 0 64K " "$TEST_IMG"
$QEMU_IO -c "write -c -P 0xAC 64K 64K " "$TEST_IMG"
$QEMU_IO -c "write -c -P 0xAD 128K 64K " "$TEST_IMG"

begin_case zlib-bit-set  # === Testing zlib with incompatible bit set ===
_make_test_img -o compression_type=zlib 64M
$PYTHON qcow2.py "$TEST_IMG" set-feature-bit incompatible 3

begin_case zstd-bit-unset  # === Testing zstd with incompatible bit unset ===
_make_test_img -o compression_type=zstd 64M
$PYTHON qcow2.py "$TEST_IMG" set-header incompatible_features 0

begin_case incompressible  # === Testing incompressible cluster processing with zstd ===
RAND_FILE="$TEST_DIR/rand_data"
dd if=/dev/urandom of="$RAND_FILE" bs=1M count=1 seek=1 2>/dev/null
"$QEMU_IO_BIN" -f raw -c "write -P 0xFA 0 1M" "$RAND_FILE" >/dev/null
"$QEMU_IMG_BIN" convert -f raw -O $IMGFMT -c -o "compression_type=zlib" "$RAND_FILE" "$TEST_DIR/zlib.qcow2"
"$QEMU_IMG_BIN" convert -O $IMGFMT -c -o "compression_type=zstd" "$TEST_DIR/zlib.qcow2" "$TEST_IMG"
rm -f "$RAND_FILE" "$TEST_DIR/zlib.qcow2"
