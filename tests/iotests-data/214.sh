# QEMU 7.2 tests/qemu-iotests/214: corrupted size field in compressed cluster descriptors
begin_case compressed-size  # === Corrupted size field in compressed cluster descriptor ===
_make_test_img 8M -o cluster_size=2M,compression_type=zlib
$QEMU_IO -c "write -c -P 0x11 0 2M" -c "write -c -P 0x11 2M 2M" "$TEST_IMG"
poke_file "$TEST_IMG" $((0x800000)) "\x40\x06"
snap 4006
poke_file "$TEST_IMG" $((0x800000)) "\x7f\xfe"
poke_file "$TEST_IMG" $((0x800008)) "\x7f\xfe"

begin_case compress-driver  # === Write compressed data of multiple clusters ===
cluster_size=0x10000
_make_test_img 2M -o cluster_size=$cluster_size
let data_size="3 * $cluster_size + $cluster_size / 2"
"$QEMU_IO_BIN" -c "write -P 0xbb 0 $data_size" --image-opts \
         "driver=compress,file.driver=$IMGFMT,file.file.driver=file,file.file.filename=$TEST_IMG" >/dev/null 2>&1
let offset="4 * $cluster_size + $cluster_size / 4"
"$QEMU_IO_BIN" -c "write -P 0xcc $offset $data_size" "json:{\
    'driver': 'compress',
    'file': {'driver': '$IMGFMT',
             'file': {'driver': 'file',
                      'filename': '$TEST_IMG'}}}" >/dev/null 2>&1
