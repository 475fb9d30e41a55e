# QEMU 7.2 tests/qemu-iotests/061: qemu-img amend (version downgrade/upgrade, zero expansion, data files)

begin_case downgrade-zero-expansion  # === Testing version downgrade with zero expansion ===
_make_test_img -o "compat=1.1,lazy_refcounts=on" 64M
$QEMU_IO -c "write -z 0 128k" "$TEST_IMG"
snap v3
$QEMU_IMG amend -o "compat=0.10" "$TEST_IMG"

begin_case downgrade-4k-entries  # === Testing version downgrade with zero expansion and 4K cache entries ===
_make_test_img -o "compat=1.1,lazy_refcounts=on" 64M
$QEMU_IO -c "write -z 0 128k" "$TEST_IMG"
$QEMU_IO -c "write -z 32M 128k" "$TEST_IMG"
$QEMU_IMG amend -o "compat=0.10" --image-opts \
          driver=qcow2,file.filename=$TEST_IMG,l2-cache-entry-size=4096

begin_case dirty-downgrade  # === Testing dirty version downgrade ===
_make_test_img -o "compat=1.1,lazy_refcounts=on" 64M
_NO_VALGRIND \
$QEMU_IO -c "write -P 0x2a 0 128k" -c flush \
         -c "sigraise $(kill -l KILL)" "$TEST_IMG" 2>&1
snap dirty
$QEMU_IMG amend -o "compat=0.10" "$TEST_IMG"

begin_case unknown-compat-autoclear  # === Testing version downgrade with unknown compat/autoclear flags ===
_make_test_img -o "compat=1.1" 64M
$PYTHON qcow2.py "$TEST_IMG" set-feature-bit compatible 42
$PYTHON qcow2.py "$TEST_IMG" set-feature-bit autoclear 42
snap v3
$QEMU_IMG amend -o "compat=0.10" "$TEST_IMG"

begin_case upgrade-resize  # === Testing version upgrade and resize ===
_make_test_img -o "compat=0.10" 64M
$QEMU_IO -c "write -P 0x2a 42M 64k" "$TEST_IMG"
snap v2
$QEMU_IMG amend -o "compat=1.1,lazy_refcounts=on,size=128M" "$TEST_IMG"

begin_case resize-snapshots  # === Testing resize with snapshots ===
_make_test_img -o "compat=0.10" 32M
$QEMU_IO -c "write -P 0x2a 24M 64k" "$TEST_IMG"
$QEMU_IMG snapshot -c foo "$TEST_IMG"
$QEMU_IMG resize "$TEST_IMG" 64M
$QEMU_IMG amend -o "compat=1.1,size=128M" "$TEST_IMG"
$QEMU_IMG snapshot -c bar "$TEST_IMG"
$QEMU_IMG resize --shrink "$TEST_IMG" 64M
snap shrunk
$QEMU_IMG amend -o "compat=0.10,size=32M" "$TEST_IMG"
$QEMU_IMG snapshot -a bar "$TEST_IMG"
$QEMU_IMG snapshot -d bar "$TEST_IMG"
$QEMU_IMG amend -o "compat=0.10,size=32M" "$TEST_IMG"

begin_case dirty-lazy-off  # === Testing dirty lazy_refcounts=off ===
_make_test_img -o "compat=1.1,lazy_refcounts=on" 64M
_NO_VALGRIND \
$QEMU_IO -c "write -P 0x2a 0 128k" -c flush \
         -c "sigraise $(kill -l KILL)" "$TEST_IMG" 2>&1
$QEMU_IMG amend -o "lazy_refcounts=off" "$TEST_IMG"

begin_case backing-file  # === Testing backing file ===
_make_test_img -o "compat=1.1" 64M
TEST_IMG="$TEST_IMG.base" _make_test_img -o "compat=1.1" 64M
$QEMU_IO -c "write -P 0x2a 0 128k" "$TEST_IMG.base"
$QEMU_IMG rebase -u -b "$TEST_IMG.base" -F qcow2 "$TEST_IMG"
$QEMU_IMG amend -o "backing_file=$TEST_IMG.base,backing_fmt=qcow2" "$TEST_IMG"

begin_case zero-inactive  # === Testing zero expansion on inactive clusters ===
_make_test_img -o "compat=1.1" 64M
$QEMU_IO -c "write -z 0 128k" "$TEST_IMG"
$QEMU_IMG snapshot -c foo "$TEST_IMG"
$QEMU_IO -c "write -P 0x2a 0 128k" "$TEST_IMG"
$QEMU_IMG amend -o "compat=0.10" "$TEST_IMG"

begin_case zero-shared-l2  # === Testing zero expansion on shared L2 table ===
_make_test_img -o "compat=1.1" 64M
$QEMU_IO -c "write -z 0 128k" "$TEST_IMG"
$QEMU_IMG snapshot -c foo "$TEST_IMG"
$QEMU_IMG amend -o "compat=0.10" "$TEST_IMG"

begin_case zero-backed  # === Testing zero expansion on backed image ===
TEST_IMG="$TEST_IMG.base" _make_test_img -o "compat=1.1" 64M
$QEMU_IO -c "write -P 0x2a 0 128k" "$TEST_IMG.base"
_make_test_img -o "compat=1.1" -b "$TEST_IMG.base" -F $IMGFMT 64M
$QEMU_IO -c "read -P 0x2a 0 128k" -c "write -z 0 64k" "$TEST_IMG"
$QEMU_IMG amend -o "compat=0.10" "$TEST_IMG"

begin_case zero-backed-inactive  # === Testing zero expansion on backed inactive clusters ===
TEST_IMG="$TEST_IMG.base" _make_test_img -o "compat=1.1" 64M
$QEMU_IO -c "write -P 0x2a 0 128k" "$TEST_IMG.base"
_make_test_img -o "compat=1.1" -b "$TEST_IMG.base" -F $IMGFMT 64M
$QEMU_IO -c "write -z 0 64k" "$TEST_IMG"
$QEMU_IMG snapshot -c foo "$TEST_IMG"
$QEMU_IO -c "write -P 0x42 0 128k" "$TEST_IMG"
$QEMU_IMG amend -o "compat=0.10" "$TEST_IMG"

begin_case prealloc-zero-full  # === Testing preallocated zero expansion on full image ===
TEST_IMG="$TEST_IMG" _make_test_img -o "compat=1.1" 64M
$QEMU_IO -c "write -P 0x2a 0 64M" "$TEST_IMG" -c "write -z 0 64M"
snap v3
$QEMU_IMG amend -o "compat=0.10" "$TEST_IMG"

begin_case progress-snapshot  # === Testing progress report with snapshot ===
TEST_IMG="$TEST_IMG.base" _make_test_img -o "compat=1.1" 4G
_make_test_img -o "compat=1.1" -b "$TEST_IMG.base" -F $IMGFMT 4G
$QEMU_IO -c "write -z 0  64k" \
         -c "write -z 1G 64k" \
         -c "write -z 2G 64k" \
         -c "write -z 3G 64k" "$TEST_IMG"
$QEMU_IMG snapshot -c foo "$TEST_IMG"
$QEMU_IMG amend -p -o "compat=0.10" "$TEST_IMG"

begin_case data-file-downgrade  # === Testing version downgrade with external data file ===
_make_test_img -o "compat=1.1,data_file=$TEST_IMG.data" 64M
$QEMU_IMG amend -o "compat=0.10" "$TEST_IMG"

begin_case extl2-downgrade  # === Testing version downgrade with extended L2 entries ===
_make_test_img -o "compat=1.1,extended_l2=on" 64M
$QEMU_IMG amend -o "compat=0.10" "$TEST_IMG"

begin_case data-file-foo  # === Try changing the external data file ===
_make_test_img -o "compat=1.1,data_file=$TEST_IMG.data" 64M
$QEMU_IMG amend -o "data_file=foo" "$TEST_IMG"
snap foo
$QEMU_IMG amend -o "data_file=" --image-opts "data-file.filename=$TEST_IMG.data,file.filename=$TEST_IMG"

begin_case data-file-raw  # === Clearing and setting data-file-raw ===
_make_test_img -o "compat=1.1,data_file=$TEST_IMG.data,data_file_raw=on" 64M
$QEMU_IMG amend -o "data_file_raw=on" "$TEST_IMG"
$QEMU_IMG amend -o "data_file_raw=off" "$TEST_IMG"
snap off
$QEMU_IMG amend -o "data_file_raw=on" "$TEST_IMG"
