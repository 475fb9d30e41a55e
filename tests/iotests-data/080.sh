# QEMU 7.2 tests/qemu-iotests/080: invalid header fields and table offsets
header_size=112
offset_backing_file_offset=8
offset_backing_file_size=16
offset_l1_size=36
offset_l1_table_offset=40
offset_refcount_table_offset=48
offset_refcount_table_clusters=56
offset_nb_snapshots=60
offset_snapshots_offset=64
offset_header_size=100
offset_ext_magic=$header_size
offset_ext_size=$((header_size + 4))
offset_l2_table_0=$((0x40000))
offset_snap1=$((0x70000))
offset_snap1_l1_offset=$((offset_snap1 + 0))
offset_snap1_l1_size=$((offset_snap1 + 8))

begin_case huge-header-size  # == Huge header size ==
_make_test_img 64M
poke_file "$TEST_IMG" "$offset_header_size" "\xff\xff\xff\xff"
snap ffffffff
poke_file "$TEST_IMG" "$offset_header_size" "\x7f\xff\xff\xff"

begin_case huge-extension  # == Huge unknown header extension ==
_make_test_img 64M
poke_file "$TEST_IMG" "$offset_backing_file_offset" "\xff\xff\xff\xff\xff\xff\xff\xff"
poke_file "$TEST_IMG" "$offset_ext_magic" "\x12\x34\x56\x78"
poke_file "$TEST_IMG" "$offset_ext_size" "\x7f\xff\xff\xff"
snap backing-offset-huge
poke_file "$TEST_IMG" "$offset_backing_file_offset" "\x00\x00\x00\x00\x00\x00\x00\x$(printf %x $offset_ext_size)"
snap crossing-backing-name
poke_file "$TEST_IMG" "$offset_backing_file_offset" "\x00\x00\x00\x00\x00\x00\x00\x00"

begin_case huge-reftable-size  # == Huge refcount table size ==
_make_test_img 64M
poke_file "$TEST_IMG" "$offset_refcount_table_clusters" "\xff\xff\xff\xff"
snap ffffffff
poke_file "$TEST_IMG" "$offset_refcount_table_clusters" "\x00\x02\x00\x01"

begin_case misaligned-reftable  # == Misaligned refcount table ==
_make_test_img 64M
poke_file "$TEST_IMG" "$offset_refcount_table_offset" "\x12\x34\x56\x78\x90\xab\xcd\xef"

begin_case huge-reftable-offset  # == Huge refcount offset ==
_make_test_img 64M
poke_file "$TEST_IMG" "$offset_refcount_table_offset" "\xff\xff\xff\xff\xff\xff\x00\x00"
poke_file "$TEST_IMG" "$offset_refcount_table_clusters" "\x00\x00\x00\x7f"

begin_case invalid-snapshot-table  # == Invalid snapshot table ==
_make_test_img 64M
poke_file "$TEST_IMG" "$offset_nb_snapshots" "\xff\xff\xff\xff"
snap nb-ffffffff
poke_file "$TEST_IMG" "$offset_nb_snapshots" "\x7f\xff\xff\xff"
snap nb-7fffffff
poke_file "$TEST_IMG" "$offset_snapshots_offset" "\xff\xff\xff\xff\xff\xff\x00\x00"
poke_file "$TEST_IMG" "$offset_nb_snapshots" "\x00\x00\xff\xff"
snap offset-huge
poke_file "$TEST_IMG" "$offset_snapshots_offset" "\x12\x34\x56\x78\x90\xab\xcd\xef"
poke_file "$TEST_IMG" "$offset_nb_snapshots" "\x00\x00\x00\x00"

begin_case snapshot-table-limit  # == Hitting snapshot table size limit ==
_make_test_img 64M
poke_file "$TEST_IMG" "$offset_snapshots_offset" "\x00\x00\x00\x00\x01\x00\x00\x00"
poke_file "$TEST_IMG" "$offset_nb_snapshots" "\x00\x01\x00\x00"

begin_case invalid-l1  # == Invalid L1 table ==
_make_test_img 64M
poke_file "$TEST_IMG" "$offset_l1_size" "\xff\xff\xff\xff"
snap size-ffffffff
poke_file "$TEST_IMG" "$offset_l1_size" "\x7f\xff\xff\xff"
snap size-7fffffff
poke_file "$TEST_IMG" "$offset_l1_table_offset" "\x7f\xff\xff\xff\xff\xff\x00\x00"
poke_file "$TEST_IMG" "$offset_l1_size" "\x00\x00\xff\xff"
snap offset-huge
poke_file "$TEST_IMG" "$offset_l1_table_offset" "\x12\x34\x56\x78\x90\xab\xcd\xef"
poke_file "$TEST_IMG" "$offset_l1_size" "\x00\x00\x00\x01"

begin_case l1-size-zero-snapshot  # == Invalid L1 table (with internal snapshot in the image) ==
_make_test_img 64M
$QEMU_IMG snapshot -c foo $TEST_IMG
poke_file "$TEST_IMG" "$offset_l1_size" "\x00\x00\x00\x00"

begin_case backing-name-size  # == Invalid backing file size ==
_make_test_img 64M
poke_file "$TEST_IMG" "$offset_backing_file_offset" "\x00\x00\x00\x00\x00\x00\x10\x00"
poke_file "$TEST_IMG" "$offset_backing_file_size" "\xff\xff\xff\xff"

begin_case l2-huge-offset  # == Invalid L2 entry (huge physical offset) ==
_make_test_img 64M
$QEMU_IO -c "write 0 512" $TEST_IMG
poke_file "$TEST_IMG" "$offset_l2_table_0" "\xbf\xff\xff\xff\xff\xff\x00\x00"
snap compressed
poke_file "$TEST_IMG" "$offset_l2_table_0" "\x80\x00\x00\xff\xff\xff\x00\x00"

begin_case snapshot-l1-offset  # == Invalid snapshot L1 table offset ==
_make_test_img 64M
$QEMU_IO -c "write 0 512" $TEST_IMG
$QEMU_IMG snapshot -c test $TEST_IMG
poke_file "$TEST_IMG" "$offset_snap1_l1_offset" "\x00\x00\x00\x00\x00\x40\x02\x00"

begin_case snapshot-l1-size  # == Invalid snapshot L1 table size ==
_make_test_img 64M
$QEMU_IO -c "write 0 512" $TEST_IMG
$QEMU_IMG snapshot -c test $TEST_IMG
poke_file "$TEST_IMG" "$offset_snap1_l1_size" "\x10\x00\x00\x00"
