"""The vectorized lookups of a fully written bare disk (requests.full_disk_l2_lookups) equal the
request model's (requests.ImageState, itself held to qemu-io traces in test_l2cache.py), lookup
for lookup, for reads and in-place writes, on every geometry the fast path serves."""

from __future__ import annotations

import numpy as np
import pytest

from qemu_ext.l2cache import requests as R


@pytest.mark.parametrize(
    "cluster_bits,vsize,ext,entry",
    [(16, (8 << 30) + 12345 * 512, False, 4096), (16, 8 << 30, False, 65536), (21, 64 << 30, False, 8192),
     (16, 3 << 30, True, 16384), (9, 64 << 20, False, 512), (14, 1 << 30, True, 1024)],
    ids=["64k-odd-size", "64k-whole", "2M", "64k-ext", "512", "16k-ext"],
)
def test_full_disk_fast_path_equals_the_model(cluster_bits, vsize, ext, entry):
    g = R.Geometry(cluster_bits, vsize, ext)
    rng = np.random.default_rng(cluster_bits + entry)
    n = 1000
    lens = rng.choice([512, 4096, 65536, 1 << 20, 5 << 20, 300 * 512], n).astype(np.int64)
    lens = np.minimum(lens, min(vsize, 1 << (cluster_bits + 7)))  # the model is slow on many-slice requests
    offs = (rng.integers(0, (vsize - lens) // 512 + 1) * 512).astype(np.int64)
    offs[:5] = vsize - lens[:5]  # the last clusters of the disk
    writes = rng.random(n) < 0.4
    st = R.ImageState.from_geometry(g, entry, "full")
    ops = [("w" if w else "r", o, ln) for w, o, ln in zip(writes.tolist(), offs.tolist(), lens.tolist())]
    lk = R.lookups_for(st, ops)
    assert set(lk.cache) == {R.L2_CACHE}  # no allocation, no refcount lookup on a full disk
    fast, req = R.full_disk_l2_lookups(g, entry, offs, lens)
    assert fast.tolist() == lk.offset
    assert req.tolist() == lk.request
