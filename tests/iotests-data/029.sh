# QEMU 7.2 tests/qemu-iotests/029: snapshot L1 tables smaller than the active one; a tiny L1
offset_size=24
offset_l1_size=36
begin_case snapshot-smaller-l1  # Test loading internal snapshots where the L1 table of the snapshot is smaller
CLUSTER_SIZE=65536
_make_test_img 64M
$QEMU_IMG snapshot -c foo "$TEST_IMG"
$QEMU_IO -c 'write -b 0 4k' "$TEST_IMG"
$QEMU_IMG snapshot -a foo "$TEST_IMG"

begin_case snapshot-smaller-l1-1k
CLUSTER_SIZE=1024
_make_test_img 16M
$QEMU_IMG snapshot -c foo "$TEST_IMG"
$QEMU_IO -c 'write -b 0 4M' "$TEST_IMG"
snap before-apply
$QEMU_IMG snapshot -a foo "$TEST_IMG"

begin_case huge-vm-state  # Try using a huge VM state
CLUSTER_SIZE=65536
_make_test_img 64M
$QEMU_IO -c "write -b -P 0x11 1T 4k" $TEST_IMG
$QEMU_IMG snapshot -c foo $TEST_IMG
$QEMU_IMG snapshot -a foo $TEST_IMG

begin_case l1-size-from-snapshot  # qcow2_snapshot_load_tmp() should take the L1 size from the snapshot
CLUSTER_SIZE=512
_make_test_img 64M
$QEMU_IMG snapshot -c foo "$TEST_IMG"
poke_file "$TEST_IMG" "$offset_size" "\x00\x00\x00\x00\x00\x00\x02\x00"
poke_file "$TEST_IMG" "$offset_l1_size" "\x00\x00\x00\x01"
