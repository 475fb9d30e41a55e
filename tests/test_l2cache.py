"""The L2-cache simulator held to real QEMU: Debian's qemu-io with -T 'qcow2_cache_*' on images made
by qemu-img/qemu-io. Reads and overwrites must match the trace lookup for lookup (slice offset,
cache entry, hit or miss); allocating writes must predict QEMU's L2 misses within 1%."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import make_qcow2, sha256
from l2cache_util import (
    qemu_io_trace,
    random_cmds,
    sequence,
    simulate_then_run,
    trace_misses,
    trace_sequence,
)

from qemu_ext.l2cache import options as O
from qemu_ext.l2cache import sim

if shutil.which("qemu-io") is None:  # a real user condition: QEMU's tools not installed
    pytest.skip("qemu-io is not installed (apt-get install qemu-utils)", allow_module_level=True)

GiB = 1 << 30
MiB = 1 << 20

# data written into the "used" image: several L2 tables, holes inside tables, holes between
USED_REGIONS = [(0, 48 * MiB), (200 * MiB, 16 * MiB), (530 * MiB, 40 * MiB), (900 * MiB, 8 * MiB)]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("l2img")
    io = [f"write -P 0x5a {s} {n}" for s, n in USED_REGIONS]
    return {
        "used64k": make_qcow2(d / "used64k.qcow2", size="1G", io=io),
        "used2m": make_qcow2(d / "used2m.qcow2", size="4G", options={"cluster_size": "2M"},
                             io=["write -P 1 0 64M", "write -P 2 1G 32M", "write -P 3 3G 6M"]),
        "ext": make_qcow2(d / "ext.qcow2", size="1G", options={"extended_l2": "on", "cluster_size": "64k"},
                          io=["write -P 7 0 4k", "write -P 7 1M 200k", "write -P 7 600M 3M", "write -P 7 17k 2k"]),
    }


@pytest.mark.parametrize(
    "l2size,entry",
    [(12288, 4096), (65536, 4096), (131072, 65536), (2048, 1024)],
    ids=["3x4k", "16x4k", "2x64k", "2x1k"],
)
def test_random_reads_match_qemu_lookup_for_lookup(images, tmp_path, l2size, entry):
    img = images["used64k"]
    before = sha256(img)
    cmds = random_cmds(1, 400, GiB, ops=("read",), sizes=(512, 4096, 65536, 200704))
    cmds += random_cmds(2, 300, GiB, ops=("read",), sizes=(4096, 131072), regions=USED_REGIONS)
    res, trace = simulate_then_run(img, cmds, l2size, entry, tmp_path)
    assert sha256(img) == before  # the simulator opened the image read-only
    assert res["cache"]["l2-cache-entries"] == l2size // entry
    assert res["misses"] == trace_misses(trace)
    assert sequence(res) == trace_sequence(trace)
    assert res["lookups"] == len(trace) > 100


def test_reads_and_overwrites_match_each_qemu(images, tmp_path, qemu_build):
    """The same comparison with each QEMU's own qemu-io (7.2 and 10.0): lookup for lookup."""
    cmds = random_cmds(21, 300, GiB, ops=("read",), sizes=(4096, 65536, 200704))
    cmds += random_cmds(22, 200, GiB, ops=("read", "write"), sizes=(4096, 65536), regions=USED_REGIONS)
    res, trace = simulate_then_run(images["used64k"], cmds, 16384, 4096, tmp_path, build=qemu_build)
    assert res["misses"] == trace_misses(trace) and res["lookups"] == len(trace) > 300
    assert sequence(res) == trace_sequence(trace)


@pytest.mark.parametrize("l2size,entry", [(16384, 4096), (262144, 65536)], ids=["4x4k", "4x64k"])
def test_overwrites_and_reads_match_qemu_lookup_for_lookup(images, tmp_path, l2size, entry):
    # every write lands inside allocated clusters: in-place overwrites (handle_copied only)
    cmds = random_cmds(3, 500, GiB, ops=("read", "write"), sizes=(512, 4096, 65536, 196608), regions=USED_REGIONS)
    res, trace = simulate_then_run(images["used64k"], cmds, l2size, entry, tmp_path)
    assert res["misses"] == trace_misses(trace)
    assert sequence(res) == trace_sequence(trace)


@pytest.mark.parametrize(
    "l2size,entry,align",
    [(32768, 4096, 65536), (16384, 4096, 512), (196608, 65536, 4096)],
    ids=["8x4k-aligned", "4x4k-unaligned", "3x64k"],
)
def test_allocating_writes_predict_qemu_misses_within_1_percent(tmp_path, l2size, entry, align):
    img = make_qcow2(tmp_path / "fresh.qcow2", size="8G")
    cmds = random_cmds(4, 500, 8 * GiB, ops=("write", "write", "read"), sizes=(4096, 65536, 1 << 20, 3 << 20), align=align)
    res, trace = simulate_then_run(img, cmds, l2size, entry, tmp_path)
    qm = trace_misses(trace)
    assert qm > 200
    assert res["lookups"] == len(trace)  # the same lookups, in an order that may differ slightly
    assert abs(res["misses"] - qm) <= 0.01 * qm, (res["misses"], qm)
    # new L2 tables are taken with qcow2_cache_get_empty: misses that read nothing
    assert res["misses-reading-disk"] < res["misses"]
    assert sum(1 for t in trace if not t.hit and t.read_from_disk) == pytest.approx(res["misses-reading-disk"], rel=0.01)
    # allocations go through the refcount cache (qcow2_get_refcount per probed cluster,
    # update_refcount, the first block-status call's scan of the file): the same lookups
    assert res["refcount-cache"]["lookups"] == res["_qemu_refcount_lookups"]


@pytest.mark.parametrize("l2size,entry", [(16384, 4096), (4 << 20, 2 << 20)], ids=["4x4k", "2x2M"])
def test_2m_clusters_match_qemu(images, tmp_path, l2size, entry):
    cmds = random_cmds(5, 300, 4 * GiB, ops=("read",), sizes=(4096, 1 << 20, 5 << 20))
    cmds += random_cmds(6, 200, 4 * GiB, ops=("read", "write"), sizes=(4096, 65536),
                        regions=[(0, 64 * MiB), (GiB, 32 * MiB), (3 * GiB, 6 * MiB)])
    res, trace = simulate_then_run(images["used2m"], cmds, l2size, entry, tmp_path)
    assert res["misses"] == trace_misses(trace)
    assert sequence(res) == trace_sequence(trace)


@pytest.mark.parametrize("l2size,entry", [(8192, 4096), (65536, 16384)], ids=["2x4k", "4x16k"])
def test_extended_l2_subclusters_match_qemu(images, tmp_path, l2size, entry):
    # reads across allocated / unallocated subclusters split into pieces per subcluster run;
    # writes inside allocated clusters allocate subclusters (an L2 update per write)
    cmds = random_cmds(7, 300, GiB, ops=("read",), sizes=(2048, 8192, 65536, 300000))
    cmds += random_cmds(8, 200, GiB, ops=("read", "write"), sizes=(2048, 4096, 8192),
                        regions=[(0, 64 * 1024), (MiB, 256 * 1024), (600 * MiB, 3 * MiB)], align=2048)
    res, trace = simulate_then_run(images["ext"], cmds, l2size, entry, tmp_path)
    assert res["cache"]["l2-entry-size"] == 16
    assert res["misses"] == trace_misses(trace)
    assert sequence(res) == trace_sequence(trace)


def _capacity_and_entry(image: Path, extra: str, build) -> tuple[int, int, int]:
    """QEMU's L2 cache: capacity (highest entry index + 1), distinct slices touched, and the
    slice granularity of the offsets, from reads that touch every slice of the image."""
    cmds = [f"read {i * 2 * MiB} 512" for i in range(512)]  # 1 GiB in 2 MiB steps
    trace, _ = qemu_io_trace(image, cmds, extra=extra, build=build)
    gran = 0
    for t in trace:
        gran |= t.offset
    return max(t.index for t in trace) + 1, len({t.offset for t in trace}), gran & -gran


@pytest.mark.parametrize(
    "extra,kw",
    [
        ("", {}),
        (",l2-cache-size=40000", {"l2_cache_size": 40000}),
        (",l2-cache-size=1", {"l2_cache_size": 1}),
        (",cache-size=300000", {"cache_size": 300000}),
        (",l2-cache-size=100000,l2-cache-entry-size=8192", {"l2_cache_size": 100000, "l2_cache_entry_size": 8192}),
        (",refcount-cache-size=262144,cache-size=327680", {"refcount_cache_size": 262144, "cache_size": 327680}),
    ],
    ids=["defaults", "l2-size-only", "below-minimum", "cache-size-only", "size+entry", "refcount+cache-size"],
)
def test_option_resolution_matches_qemu(images, extra, kw, qemu_build):
    """options.resolve's rules against each real QEMU: what marks 7.2 and 'current' (10.0)
    verified in options.VERIFIED."""
    version = "current" if qemu_build.series == "10.0" else "7.2"
    assert O.VERIFIED[version] is not None
    cap, distinct, gran = _capacity_and_entry(images["used64k"], extra, qemu_build)
    cfg = O.resolve(65536, GiB, False, qemu_version=version, **kw)
    e = cfg.l2_cache_entry_size
    assert cap == min(cfg.l2_cache_entries, distinct)
    assert distinct == 2 * 65536 // e  # the image has two L2 tables
    assert gran % e == 0 and (e == 65536 or gran == e)


def test_option_errors_are_qemus(images, qemu_build):
    import subprocess

    img = images["used64k"]
    for extra, kw in [
        (",cache-size=1M,l2-cache-size=512k,refcount-cache-size=256k",
         {"cache_size": MiB, "l2_cache_size": 512 << 10, "refcount_cache_size": 256 << 10}),
        (",cache-size=256k,l2-cache-size=512k", {"cache_size": 256 << 10, "l2_cache_size": 512 << 10}),
        (",l2-cache-entry-size=3000", {"l2_cache_entry_size": 3000}),
    ]:
        cp = subprocess.run([qemu_build.io, "--image-opts", f"driver=qcow2,file.filename={img}{extra}", "-c", "quit"],
                            capture_output=True, text=True, env=qemu_build.env())
        assert cp.returncode != 0
        with pytest.raises(Exception) as ei:
            O.resolve(65536, GiB, False, **kw)
        # the simulator refuses with QEMU's own message
        assert str(ei.value).split("(")[0].strip() in cp.stderr


def test_slice_trace_replay_and_curve_agree_with_qemu(images, tmp_path):
    """A captured trace replayed at the size it was captured with reproduces QEMU's misses, and
    the curve (stack distances) gives the same number at that size and at another size QEMU ran."""
    img = images["used64k"]
    cmds = random_cmds(9, 600, GiB, ops=("read",), sizes=(4096, 65536))
    runs = {}
    for l2size in (8192, 40960):
        work = tmp_path / f"c{l2size}.qcow2"
        shutil.copyfile(img, work)
        trace, out = qemu_io_trace(work, cmds, l2size, 4096)
        runs[l2size] = (trace, out)
    log = tmp_path / "qemu-io-stderr.log"
    log.write_text(runs[8192][1])
    disk = sim.Disk(virtual_size=GiB)
    wl = sim.load_workload(trace=str(log))
    for l2size, (trace, _out) in runs.items():
        res = sim.simulate(disk, sim.Settings(l2_cache_size=l2size, l2_cache_entry_size=4096), wl)
        assert res["misses"] == trace_misses(trace)
    cv = sim.curve(disk, sim.Settings(l2_cache_size=8192, l2_cache_entry_size=4096), wl, entry_sizes=[4096])
    c = cv["curves"][0]["_curve"]
    for l2size, (trace, _out) in runs.items():
        assert c.lookups - c.hits(l2size // 4096) == trace_misses(trace)


def test_simpletrace_file_from_debug_qemu_io(images, tmp_path, debug_src):
    """The debug build writes a simpletrace file (and the same events as log text on stderr):
    replaying the file gives QEMU's misses, and the image-based simulation agrees."""
    import subprocess

    img = tmp_path / "st.qcow2"
    shutil.copyfile(images["used64k"], img)
    cmds = random_cmds(13, 300, GiB, ops=("read",), sizes=(4096, 65536))
    binfile = tmp_path / "trace.bin"
    cp = subprocess.run(
        [str(debug_src / "build" / "qemu-io"), "-T", f"enable=qcow2_cache_*,file={binfile}", "--image-opts",
         f"driver=qcow2,file.filename={img},l2-cache-size=12288,l2-cache-entry-size=4096"],
        input="\n".join([*cmds, "quit"]) + "\n", capture_output=True, text=True, timeout=120,
    )
    assert cp.returncode == 0, cp.stderr
    from qemu_ext.l2cache import workloads as W

    log_trace = [t for t in W.parse_cache_trace(W.log_records((cp.stdout + cp.stderr).splitlines())) if t.is_l2]
    disk = sim.Disk(virtual_size=GiB)
    settings = sim.Settings(l2_cache_size=12288, l2_cache_entry_size=4096)
    res = sim.simulate(disk, settings, sim.load_workload(trace=str(binfile)), detailed=True)
    assert res["lookups"] == len(log_trace) > 100
    assert res["misses"] == trace_misses(log_trace)
    assert sequence(res) == trace_sequence(log_trace)
    cmdfile = tmp_path / "c.txt"
    cmdfile.write_text("\n".join(cmds) + "\n")
    res2 = sim.simulate(sim.Disk(image=str(images["used64k"])), settings, sim.load_workload(qemu_io=str(cmdfile)))
    assert res2["misses"] == res["misses"]


def test_cache_clean_interval_in_a_running_vm(images, tmp_path, qemu_factory):
    """cache-clean-interval runs on the virtual clock, which only ticks in a running VM (qemu-io
    and qemu-img never start it). Reads through HMP qemu-io with pauses in between; the
    simulator, given the same pauses as `sleep` in a qemu-io command file, predicts the misses."""
    import time

    img = tmp_path / "clean.qcow2"
    shutil.copyfile(images["used64k"], img)
    qp = qemu_factory(name="l2clean", extra_args=["-trace", "qcow2_cache_get*"])
    client = qp.qmp()
    client.cmd(
        "blockdev-add",
        **{"driver": "qcow2", "node-name": "cc", "l2-cache-size": 16384, "l2-cache-entry-size": 4096,
           "cache-clean-interval": 1, "file": {"driver": "file", "filename": str(img)}},
    )
    t0 = time.monotonic()  # the clean timer is armed when the node opens
    # the pauses the simulator is given are the ones that really happened (a busy machine delays
    # the HMP commands): each command's time is taken when it returns, the timer fires at whole
    # seconds after t0, and the plan keeps every command well away from those
    script: list[str] = []
    last_ms = 0
    plan = [(0.0, ["read 0 4k", "read 300M 4k", "read 100M 4k"]), (1.5, ["read 0 4k"]),
            (2.4, ["read 0 4k", "read 300M 4k", "read 100M 4k"])]
    for at, cmds in plan:
        time.sleep(max(0.0, t0 + at - time.monotonic()))
        for c in cmds:
            qp.hmp(f'qemu-io cc "{c}"')
            now_ms = int((time.monotonic() - t0) * 1000)
            if now_ms > last_ms:
                script.append(f"sleep {now_ms - last_ms}")
                last_ms = now_ms
            script.append(c)
    text = qp.stderr_text()
    from qemu_ext.l2cache import workloads as W

    trace = [t for t in W.parse_cache_trace(W.log_records(text.splitlines())) if t.is_l2]
    assert len(trace) == 7
    f = tmp_path / "cmds.txt"
    f.write_text("\n".join(script) + "\n")
    wl = sim.load_workload(qemu_io=str(f))
    with_clean = sim.simulate(sim.Disk(image=str(images["used64k"])),
                              sim.Settings(l2_cache_size=16384, l2_cache_entry_size=4096, cache_clean_interval=1), wl)
    without = sim.simulate(sim.Disk(image=str(images["used64k"])),
                           sim.Settings(l2_cache_size=16384, l2_cache_entry_size=4096, cache_clean_interval=0), wl)
    assert with_clean["misses"] == trace_misses(trace)
    assert without["misses"] < with_clean["misses"]  # the test does exercise the cleaning

