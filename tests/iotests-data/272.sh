# QEMU 7.2 tests/qemu-iotests/272: refcounts of 1 in a 4 GiB file of 2 MiB clusters, then a compressed write
begin_case compressed-refblock
_make_test_img -o cluster_size=2M,refcount_bits=2 64M
reft_offs=$(peek_file_be "$TEST_IMG" 48 8)
refb_offs=$(peek_file_be "$TEST_IMG" $reft_offs 8)
truncate -s 4G "$TEST_IMG"
for ((in_refb_offs = 0; in_refb_offs < 512; in_refb_offs += 8)); do
    poke_file "$TEST_IMG" $((refb_offs + in_refb_offs)) \
        '\x55\x55\x55\x55\x55\x55\x55\x55'
done
$QEMU_IO -c 'write -c -P 42 0 2M' "$TEST_IMG"
