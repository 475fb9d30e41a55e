# QEMU 7.2 tests/qemu-iotests/289: a failed write to an external data file
begin_case data-file-write-eio  # === Avoid freeing external data clusters on failure ===
cat > "$TEST_DIR/blkdebug.conf" <<EOC
[inject-error]
event = "write_aio"
errno = "5"
once = "on"
EOC
_make_test_img -o "data_file=$TEST_IMG.data_file" 64k
$QEMU_IO -c "write 0 64k" \
    "json:{
         'driver': 'qcow2',
         'file': { 'driver': 'file', 'filename': '$TEST_IMG' },
         'data-file': {
             'driver': 'raw',
             'file': {
                 'driver': 'blkdebug',
                 'config': '$TEST_DIR/blkdebug.conf',
                 'image': {
                     'driver': 'file',
                     'filename': '$TEST_IMG.data_file'
                 }
             }
         }
     }"
