# QEMU 7.2 tests/qemu-iotests/054: an image too large (1 EB)
begin_case size-1eb  # creating too large image (1 EB) using qcow2.py
_make_test_img 4G
$PYTHON qcow2.py "$TEST_IMG" set-header size $((1024 ** 6))
