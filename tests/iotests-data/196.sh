# QEMU 7.2 tests/qemu-iotests/196: unknown autoclear bits (written by the test over a running migration)
begin_case autoclear-ff  # f.seek(88); f.write(b'\xff')
"$QEMU_IMG_BIN" create -q -f qcow2 "$TEST_IMG" 1M
printf '\xff' | dd of="$TEST_IMG" bs=1 seek=88 conv=notrunc &>/dev/null
