"""The refcount-cache lookups of allocating writes held to real QEMU: Debian's qemu-io with
-T 'qcow2_cache_*' (the `qcow2_cache_get ... is_l2_cache 0` lines) against the simulator, lookup for
lookup (refcount block offset, hit or miss). Covers the first block-status call's scan of the file
(qcow2_detect_metadata_preallocation), first-fit allocation from free_cluster_index, update_refcount,
and new refcount blocks (alloc_refcount_block, -EAGAIN and the retry)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import make_qcow2, sha256
from l2cache_util import qemu_io_trace, random_cmds, refcount_trace, simulated_refcount_sequence

from qemu_ext.l2cache import sim

if shutil.which("qemu-io") is None:  # a real user condition: QEMU's tools not installed
    pytest.skip("qemu-io is not installed (apt-get install qemu-utils)", allow_module_level=True)

GiB = 1 << 30
MiB = 1 << 20


def _qemu_refcount(image: Path, cmds: list[str], tmp: Path, extra: str = "") -> list[tuple[int, bool]]:
    return _qemu_refcount_and_log(image, cmds, tmp, extra)[0]


def _qemu_refcount_and_log(image: Path, cmds: list[str], tmp: Path, extra: str = "") -> tuple[list[tuple[int, bool]], str]:
    work = tmp / f"qemu-{image.name}"
    shutil.copyfile(image, work)
    _l2, out = qemu_io_trace(work, cmds, extra=extra)
    return refcount_trace(out), out


def test_first_small_write_on_a_fresh_image_scans_the_file_like_qemu(tmp_path):
    # one 4 KiB allocating write: the new L2 table and the data cluster are found by scanning
    # from cluster 0, and the write's COW check (block status) scans the whole file once more
    img = make_qcow2(tmp_path / "one.qcow2", size="1G")
    before = sha256(img)
    cmds = ["write 0 4096"]
    sim = simulated_refcount_sequence(img, cmds)
    assert sha256(img) == before
    qemu = _qemu_refcount(img, cmds, tmp_path)
    assert len(qemu) > 2
    assert sim == qemu


@pytest.mark.parametrize("align", [65536, 512], ids=["cluster-aligned", "unaligned"])
def test_allocating_writes_on_a_fresh_image_make_qemus_refcount_lookups(tmp_path, align):
    img = make_qcow2(tmp_path / "fresh.qcow2", size="8G")
    cmds = random_cmds(4, 300, 8 * GiB, ops=("write", "write", "read"), sizes=(4096, 65536, 1 << 20, 3 << 20), align=align)
    # the L2 slice size changes how writes split, and so the allocations: QEMU runs with the same
    opts = {"l2_cache_size": 32768, "l2_cache_entry_size": 4096}
    qemu = _qemu_refcount(img, cmds, tmp_path, extra=",l2-cache-size=32768,l2-cache-entry-size=4096")
    assert len(qemu) > 1000
    cmdfile = tmp_path / "cmds.txt"
    cmdfile.write_text("\n".join(cmds) + "\n")
    res = sim.simulate(sim.Disk(image=str(img)), sim.Settings(**opts), sim.load_workload(qemu_io=str(cmdfile)))
    # the simulator's report and its lookup stream both agree with QEMU
    assert res["refcount-cache"]["lookups"] == len(qemu)
    assert res["refcount-cache"]["misses"] == sum(1 for _o, hit in qemu if not hit)
    assert simulated_refcount_sequence(img, cmds, entry=4096, l2_cache_size=32768) == qemu


def test_partly_written_64k_image_refcount_lookups_match_qemu(tmp_path):
    regions = [(0, 24 * MiB), (200 * MiB, 8 * MiB), (700 * MiB, 4 * MiB)]
    img = make_qcow2(tmp_path / "used.qcow2", size="1G", io=[f"write -P 0x5a {s} {n}" for s, n in regions])
    cmds = random_cmds(3, 200, GiB, ops=("read", "write"), sizes=(512, 4096, 65536, 196608))
    cmds += random_cmds(4, 100, GiB, ops=("write",), sizes=(4096, 65536), regions=regions)
    qemu = _qemu_refcount(img, cmds, tmp_path)
    # the first COW check scans the whole used file (about 600 clusters here), one lookup each
    assert len(qemu) > 600
    assert simulated_refcount_sequence(img, cmds) == qemu


def test_partly_written_2m_image_refcount_lookups_match_qemu(tmp_path):
    img = make_qcow2(tmp_path / "used2m.qcow2", size="4G", options={"cluster_size": "2M"},
                     io=["write -P 1 0 16M", "write -P 2 1G 8M"])
    cmds = random_cmds(6, 150, 4 * GiB, ops=("read", "write"), sizes=(4096, 65536, 3 << 20))
    qemu = _qemu_refcount(img, cmds, tmp_path)
    assert len(qemu) > 50
    assert simulated_refcount_sequence(img, cmds) == qemu


def test_new_refcount_blocks_and_a_small_refcount_cache_match_qemu(tmp_path):
    # 4 KiB clusters: a refcount block covers 8 MiB of file. The image spans more refcount blocks
    # than the 4-entry cache holds, so the scans from cluster 0 evict; the writes outgrow the file's
    # blocks (alloc_refcount_block: qcow2_cache_get_empty, -EAGAIN, the retried search)
    img = make_qcow2(tmp_path / "small.qcow2", size="1G", options={"cluster_size": "4k"},
                     io=["write -P 1 0 30M", "write -P 2 500M 8M"])
    cmds = random_cmds(5, 200, GiB, ops=("write", "write", "read"), sizes=(4096, 65536, 1 << 20), align=512)
    qemu, log = _qemu_refcount_and_log(img, cmds, tmp_path, extra=",refcount-cache-size=16384")
    blocks = {off for off, _hit in qemu}
    assert sum(1 for _o, hit in qemu if not hit) > len(blocks) > 4  # evictions
    assert any("is_l2_cache 0" in line and "read_from_disk 0" in line for line in log.splitlines())  # new blocks
    assert simulated_refcount_sequence(img, cmds, refcount_cache_size=16384) == qemu


@pytest.mark.parametrize(
    "io",
    [["write -c -P 3 0 4M", "write -P 1 8M 1M"], ["write -P 1 0 8M", "discard 1M 2M", "write -z 4M 1M"]],
    ids=["compressed", "discarded"],
)
def test_writes_over_compressed_or_discarded_clusters_match_qemu(tmp_path, io):
    # writes over compressed clusters allocate new ones and free the old (update_refcount
    # decreasing, free_cluster_index moving back); discarded clusters are found again first fit
    img = make_qcow2(tmp_path / "odd.qcow2", size="1G", io=io)
    cmds = random_cmds(10, 60, 16 * MiB, ops=("write",), sizes=(4096, 65536), align=512)
    qemu = _qemu_refcount(img, cmds, tmp_path)
    assert len(qemu) > 100
    assert simulated_refcount_sequence(img, cmds) == qemu


def test_sparse_image_stops_the_preallocation_scan_where_qemu_does(tmp_path):
    # an image copied sparse (cp --sparse=always) occupies fewer host blocks than it has
    # referenced clusters, so qcow2_detect_metadata_preallocation stops early: at the cluster
    # where the referenced ones reach max(real * 10 / 9, real + 2); QEMU works on a sparse copy too
    import os
    import subprocess

    img = make_qcow2(tmp_path / "zeros.qcow2", size="1G", io=["write -P 0 0 8M", "write -P 1 8M 1M"])
    sparse = tmp_path / "sparse.qcow2"
    subprocess.run(["cp", "--sparse=always", str(img), str(sparse)], check=True)
    work = tmp_path / "work.qcow2"
    subprocess.run(["cp", "--sparse=always", str(sparse), str(work)], check=True)
    if os.stat(work).st_blocks * 512 >= os.stat(work).st_size:  # a real condition: no holes on this file system
        pytest.skip("the file system under the test's tmp_path does not keep holes")
    cmds = random_cmds(11, 50, GiB, ops=("write",), sizes=(4096, 65536), align=512)
    _l2, out = qemu_io_trace(work, cmds)
    qemu = refcount_trace(out)
    dense = _qemu_refcount(img, cmds, tmp_path)  # the same image, not sparse: QEMU scans the whole file
    assert len(qemu) < len(dense)
    assert simulated_refcount_sequence(img, cmds) == dense
    assert simulated_refcount_sequence(sparse, cmds) == qemu
