# QEMU 7.2 tests/qemu-iotests/220: a 513 TiB image with hand-made refcount blocks
begin_case huge-refblocks  # == Creating huge file ==
_make_test_img -o 'cluster_size=2M,refcount_bits=1' 513T
to_hex() {
    printf %016x\\n $1 | sed 's/\(..\)/\\x\1/g'
}
truncate --size=38m "$TEST_IMG"
entry=$((0x200000))
"$QEMU_IO_BIN" -f raw -c "w -P 0xff 4m 2m" "$TEST_IMG" >/dev/null
for i in {1..15}; do
    offs=$((0x600000 + i*0x200000))
    poke_file "$TEST_IMG" $((i*8 + entry)) $(to_hex $offs)
    "$QEMU_IO_BIN" -f raw -c "w -P 0xff $offs 2m" "$TEST_IMG" >/dev/null
done
snap before
$QEMU_IO_PROG -c 'w -c 0 2m' "$TEST_IMG"   # == Trying to write compressed cluster ==
$QEMU_IO_PROG -c 'w 0 2m' "$TEST_IMG"      # == Writing normal cluster ==
"$QEMU_IO_BIN" -f raw -c "w -z 5m 1m" -c "w -z 8m 30m" "$TEST_IMG" >/dev/null
