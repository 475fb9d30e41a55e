# QEMU 7.2 tests/qemu-iotests/114: backing formats that are missing or unknown
begin_case no-backing-format  # backing file without a format extension
truncate -s $((64 * 1024 * 1024)) "$TEST_IMG.orig"
_make_test_img -b "$TEST_IMG.orig" -F raw 64M
$PYTHON qcow2.py "$TEST_IMG" del-header-ext 0xE2792ACA

begin_case backing-format-foo  # an unknown backing format
TEST_IMG="$TEST_IMG.base" _make_test_img 64M
_make_test_img -u -b "$TEST_IMG.base" -F $IMGFMT 64M
$PYTHON qcow2.py "$TEST_IMG" del-header-ext 0xE2792ACA
$PYTHON qcow2.py "$TEST_IMG" add-header-ext 0xE2792ACA "foo"
