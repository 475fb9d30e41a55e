# QEMU 7.2 tests/qemu-iotests/242: bitmaps in qemu-img info, an unknown bitmap flag.
# The test adds the bitmaps from a VM (QMP block-dirty-bitmap-add, written at shutdown); qemu-img
# bitmap --add writes the same directory entry at the same offset (flag byte 0x5000f).
chunk=$((256 * 1024))
flag_offset=$((0x5000f))
begin_case bitmaps  # Test 1..3
"$QEMU_IMG_BIN" create -q -f qcow2 "$TEST_IMG" 1M
for num in 2 3; do
    granularity=$((1 << (13 + num)))
    if [ $num = 2 ]; then disable=--disable; else disable=; fi
    "$QEMU_IMG_BIN" bitmap --add -g $granularity $disable "$TEST_IMG" bitmap-$((num - 1))
    $QEMU_IO -c "write $(((num - 1) * chunk)) $chunk" "$TEST_IMG"
done
snap clean
$QEMU_IO -c abort "$TEST_IMG"   # Test 4: "in-use" flag, as left by a running VM

begin_case unknown-flag  # Write an unknown bitmap flag '0x4' into a new QCOW2 image at offset 327695
"$QEMU_IMG_BIN" create -q -f qcow2 "$TEST_IMG" 1M
"$QEMU_IMG_BIN" bitmap --add -g $((1 << 14)) "$TEST_IMG" bitmap-0
flags=$(peek_file_be "$TEST_IMG" $flag_offset 1)
poke_file "$TEST_IMG" $flag_offset "$(printf '\\x%02x' $((flags ^ 4)))"
