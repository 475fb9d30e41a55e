# QEMU 7.2 tests/qemu-iotests/031: unknown header extensions, rewritten headers, host_device backing
CLUSTER_SIZE=65536
for compat in "compat=0.10" "compat=1.1"; do
    begin_case unknown-ext-$compat  # === Create image with unknown header extension ===
    CLUSTER_SIZE=65536
    _make_test_img -o $compat 64M
    $PYTHON qcow2.py "$TEST_IMG" add-header-ext 0x12345678 "This is a test header extension"
    snap added
    $QEMU_IMG rebase -u -b "" "$TEST_IMG"   # === Rewrite header with no backing file ===
    snap rewritten
    $QEMU_IMG rebase -u -b "/some/backing/file/path" -F host_device "$TEST_IMG"   # === Add a backing file and format ===
done
