# The part of QEMU 7.2's tests/qemu-iotests/common.rc that the image-building lines of the
# ported iotests use, so that the NNN.sh files here can keep QEMU's own lines (poke_file,
# _make_test_img, $QEMU_IO, $QEMU_IMG, qcow2.py) word for word.
#
# Each NNN.sh is run once by tests/qcow2_util.py (bash, with OUT, QEMU_IMG, QEMU_IO and PYTHON
# set). `begin_case NAME` starts a fresh directory $OUT/NNN-NAME holding TEST_IMG=t.qcow2 (plus
# t.qcow2.base, t.qcow2.data... as the test makes them); `snap SUFFIX` copies the directory as
# it is now to $OUT/NNN-NAME-SUFFIX, for tests that go on poking the same image. Every
# directory holding a t.qcow2 at the end is one hostile image of the comparison suite.

set -u
IMGFMT=qcow2
IMGPROTO=file
CLUSTER_SIZE=
IMGOPTS=
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TEST_NUMBER=${TEST_NUMBER:?}

begin_case() {
    CASE="$TEST_NUMBER-$1"
    TEST_DIR="$OUT/$CASE"
    rm -rf "$TEST_DIR"
    mkdir -p "$TEST_DIR"
    TEST_IMG="$TEST_DIR/t.qcow2"
    CLUSTER_SIZE=
    IMGOPTS=
    cd "$TEST_DIR"
}

snap() {
    rm -rf "$OUT/$CASE-$1"
    cp -a "$TEST_DIR" "$OUT/$CASE-$1"
}

# qemu-io/qemu-img output is not what these files are about: keep it quiet
_filter_qemu_io() { cat >/dev/null; }
_filter_testdir() { cat; }
_filter_imgfmt() { cat; }
_filter_img_create() { cat >/dev/null; }
_filter_qemu_img_map() { cat; }
_filter_qemu_img_check() { cat; }
_NO_VALGRIND() { "$@"; }
_check_test_img() { :; }   # the comparison suite runs qemu-img check itself
_img_info() { :; }
_qcow2_dump_header() { :; }

qemu_io_quiet() { "$QEMU_IO_BIN" "$@" >/dev/null 2>&1 || true; }
qemu_img_quiet() { "$QEMU_IMG_BIN" "$@" >/dev/null 2>&1 || true; }
QEMU_IO_BIN=$QEMU_IO
QEMU_IMG_BIN=$QEMU_IMG
QEMU_IO="qemu_io_quiet"
QEMU_IO_PROG="qemu_io_quiet"
QEMU_IMG="qemu_img_quiet"
PYTHON="python3"
# `$PYTHON qcow2.py` of the iotests: QEMU 7.2's qcow2.py, vendored next to this file
python3() {
    if [ "${1:-}" = qcow2.py ]; then shift; command python3 "$HERE/qcow2.py" "$@" >/dev/null; return; fi
    command python3 "$@"
}

poke_file() {
    printf "$3" | dd "of=$1" bs=1 "seek=$2" conv=notrunc &>/dev/null
}

poke_file_be() {
    local img=$1 ofs=$2 len=$3 val=$4
    local str=$(printf "%0$((len * 2))x\n" $val | sed 's/\(..\)/\\x\1/g')
    poke_file "$img" "$ofs" "$str"
}

peek_file_be() {
    local val=0 byte
    for byte in $(od -j"$2" -N"$3" -An -v -tu1 "$1"); do
        val=$(( (val << 8) | byte ))
    done
    printf %llu $val
}

peek_file_raw() {
    dd if="$1" bs=1 skip="$2" count="$3" status=none
}

_optstr_add() {
    if [ -n "$1" ]; then echo "$1,$2"; else echo "$2"; fi
}

# common.rc's _make_test_img: -b BACKING, -o OPTS (repeatable), IMGOPTS, CLUSTER_SIZE, then
# the rest (-F FMT, -u, the size) for qemu-img create
_make_test_img() {
    local optstr="" use_backing=0 backing_file="" opts_param=false misc_params=()
    if [ -n "$IMGOPTS" ]; then optstr=$(_optstr_add "$optstr" "$IMGOPTS"); fi
    for param; do
        if [ "$use_backing" = "1" -a -z "$backing_file" ]; then backing_file=$param; continue
        elif $opts_param; then optstr=$(_optstr_add "$optstr" "$param"); opts_param=false; continue; fi
        case "$param" in
            -b) use_backing=1 ;;
            -o) opts_param=true ;;
            --no-opts) optstr="" ;;
            *) misc_params=("${misc_params[@]}" "$param") ;;
        esac
    done
    if [ -n "$CLUSTER_SIZE" ]; then optstr=$(_optstr_add "$optstr" "cluster_size=$CLUSTER_SIZE"); fi
    local extra=()
    if [ -n "$optstr" ]; then extra=(-o "$optstr"); fi
    rm -f "$TEST_IMG"
    if [ $use_backing = 1 ]; then
        "$QEMU_IMG_BIN" create -q -f $IMGFMT "${extra[@]}" -b "$backing_file" "$TEST_IMG" "${misc_params[@]}" || true
    else
        "$QEMU_IMG_BIN" create -q -f $IMGFMT "${extra[@]}" "$TEST_IMG" "${misc_params[@]}" || true
    fi
}
