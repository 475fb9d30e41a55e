"""QEMU qcow2 L2-cache simulator and sizing advisor, held to real qemu-io traces (QEMU 7.2 and 10.0).

Public API::

    from qemu_ext.l2cache import sim
    disk = sim.Disk(image="disk.qcow2")            # or sim.Disk(virtual_size=1 << 40, cluster_size=65536)
    settings = sim.Settings(l2_cache_size=1 << 20, l2_cache_entry_size=4096, qemu_version="7.2")
    wl = sim.load_workload(qemu_io="cmds.txt")      # or trace="qemu.log" / synthetic={...}, virtual_size=...
    sim.simulate(disk, settings, wl, detailed=False)  # lookups, hits, misses, hit-ratio, ...
    sim.curve(disk, settings, wl, max_memory=None)    # hit ratio for every cache size, per entry size, marks
    sim.recommend(disk, settings, wl, target=0.99)    # smallest l2-cache-size, full coverage, option text

    qemu_ext.l2cache.node.node_caches(session, node)  # a running QEMU's qcow2 nodes and their caches
    qemu_ext.l2cache.node.size_node(info, trace)      # the one sizing from QEMU's own lookups
    qemu_ext.l2cache.tune.tune(session, node, ...)    # measure, recommend, apply, verify (async)
    qemu_ext.l2cache.tune.Watcher / watch(...)        # window after window in bounded memory
    qemu_ext.l2cache.domain.recommendation(...)       # on a libvirt domain: what its <metadata_cache> can keep

    qemu_ext.l2cache.options.resolve(...)     # QEMU's cache option resolution per version (VERIFIED)
    qemu_ext.l2cache.model.Qcow2Cache         # block/qcow2-cache.c's replacement policy
    qemu_ext.l2cache.stream.CurveStream       # the curve of a stream in chunks: exact, or SHARDS-sampled
    qemu_ext.l2cache.curve.lru_curve(offsets) # stack-distance curve of an in-memory lookup array
    qemu_ext.l2cache.requests.ImageState      # which lookups qcow2 makes per request
    qemu_ext.l2cache.geometry                 # bare geometry; vectorized lookups of a fully written disk
    qemu_ext.l2cache.workloads                # synthetic / qemu-io / trace workloads; normalise(records)
"""
