"""A structure-aware mutator for qcow2 images.

It knows where the structures of a real image are (header fields, header extensions and the feature
name table, L1 and L2 entries, the refcount table and blocks, the snapshot table, the bitmap
directory and bitmap tables) and changes them the way hostile images do: boundary values, bits
flipped, offsets past the end of the file, unaligned, pointing at other metadata or at each other,
sizes that are too big; it also truncates and extends the file. Each mutant records what was done,
so a finding can be rebuilt from its seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

# (offset, size, name) of the header fields (docs/interop/qcow2.txt)
HEADER_FIELDS = [
    (4, 4, "version"), (8, 8, "backing_file_offset"), (16, 4, "backing_file_size"), (20, 4, "cluster_bits"),
    (24, 8, "size"), (32, 4, "crypt_method"), (36, 4, "l1_size"), (40, 8, "l1_table_offset"),
    (48, 8, "refcount_table_offset"), (56, 4, "refcount_table_clusters"), (60, 4, "nb_snapshots"),
    (64, 8, "snapshots_offset"), (72, 8, "incompatible_features"), (80, 8, "compatible_features"),
    (88, 8, "autoclear_features"), (96, 4, "refcount_order"), (100, 4, "header_length"), (104, 1, "compression_type"),
]
L2_OFFSET_MASK = 0x00FFFFFFFFFFFE00


@dataclass
class Layout:
    """Where the structures of one image are (offsets of 8-byte entries, and regions)."""

    size: int
    cluster_size: int
    entries: dict[str, list[int]] = field(default_factory=dict)  # kind -> file offsets of 8-byte entries
    regions: dict[str, tuple[int, int]] = field(default_factory=dict)  # kind -> (offset, length)
    metadata: list[int] = field(default_factory=list)  # cluster offsets holding metadata


def _u(b: bytes, off: int, n: int) -> int:
    return int.from_bytes(b[off : off + n], "big") if off + n <= len(b) else 0


def layout(data: bytes) -> Layout:
    """Find the structures of a (valid) image, without trusting anything past the file."""
    cb = _u(data, 20, 4)
    cs = 1 << cb if 9 <= cb <= 21 else 65536
    lay = Layout(len(data), cs)
    version = _u(data, 4, 4)
    hlen = _u(data, 100, 4) if version == 3 else 72
    ext_l2 = version == 3 and _u(data, 72, 8) & 16
    ent = lay.entries

    def add(kind: str, off: int) -> None:
        if 0 <= off and off + 8 <= len(data):
            ent.setdefault(kind, []).append(off)

    # header extensions
    pos = hlen
    while pos + 8 <= min(cs, len(data)):
        typ, n = _u(data, pos, 4), _u(data, pos + 4, 4)
        if typ == 0 or pos + 8 + n > cs:
            break
        ent.setdefault("extension", []).append(pos)
        if typ == 0x6803F857:
            lay.regions["feature-table"] = (pos + 8, n)
        if typ == 0x23852875 and n >= 24:
            lay.regions["bitmaps-ext"] = (pos + 8, n)
        pos += 8 + (n + 7) // 8 * 8
    l1_off, l1_n = _u(data, 40, 8), _u(data, 36, 4)
    lay.metadata += [0, l1_off - l1_off % cs]
    for i in range(min(l1_n, 4096)):
        add("l1", l1_off + 8 * i)
    step = 16 if ext_l2 else 8
    for i in range(min(l1_n, 64)):
        l2 = _u(data, l1_off + 8 * i, 8) & L2_OFFSET_MASK
        if l2 and l2 + cs <= len(data):
            lay.metadata.append(l2)
            for j in range(0, cs, step):
                if _u(data, l2 + j, 8):
                    add("l2", l2 + j)
                    if ext_l2:
                        add("l2-bitmap", l2 + j + 8)
    rt_off, rt_n = _u(data, 48, 8), _u(data, 56, 4) * cs // 8
    lay.metadata.append(rt_off)
    order = _u(data, 96, 4) if version == 3 else 4
    for i in range(min(rt_n, 4096)):
        e = _u(data, rt_off + 8 * i, 8)
        if e:
            add("reftable", rt_off + 8 * i)
            blk = e & ~0x1FF
            if blk + cs <= len(data):
                lay.metadata.append(blk)
                lay.regions.setdefault("refblock", (blk, cs))
                lay.regions["refcount-order"] = (order, 0)
    sn_off, sn_n = _u(data, 64, 8), _u(data, 60, 4)
    pos = sn_off
    for _ in range(min(sn_n, 64)):
        if pos + 40 > len(data):
            break
        ent.setdefault("snapshot", []).append(pos)
        add("snapshot-l1", _u(data, pos, 8))
        pos += 40 + _u(data, pos + 36, 4) + _u(data, pos + 12, 2) + _u(data, pos + 14, 2)
        pos = (pos + 7) // 8 * 8
    if "bitmaps-ext" in lay.regions:
        off = lay.regions["bitmaps-ext"][0]
        nb, d_off = _u(data, off, 4), _u(data, off + 16, 8)
        pos = d_off
        for _ in range(min(nb, 64)):
            if pos + 24 > len(data):
                break
            ent.setdefault("bitmap-dir", []).append(pos)
            t_off, t_n = _u(data, pos, 8), _u(data, pos + 8, 4)
            for i in range(min(t_n, 64)):
                add("bitmap-table", t_off + 8 * i)
            pos += (24 + _u(data, pos + 18, 2) + _u(data, pos + 20, 4) + 7) // 8 * 8
    return lay


class Mutator:
    """Mutants of one seed image (bytes), each with the list of what was changed."""

    def __init__(self, seed: bytes, rnd: random.Random) -> None:
        self.seed = seed
        self.lay = layout(seed)
        self.rnd = rnd

    # -- values
    def _interesting(self, nbits: int, data: bytearray) -> int:
        r = self.rnd
        m = (1 << nbits) - 1
        cs = self.lay.cluster_size
        size = len(data)
        choices = [
            0, 1, m, m >> 1, (m >> 1) + 1, r.getrandbits(nbits), 1 << r.randrange(nbits),
            size & m, (size + cs) & m, (size * 1000) & m, (size - 8) & m, (cs * r.randrange(1, 64)) & m,
            (r.choice(self.lay.metadata or [0]) + r.choice([0, 8, 0x200, 0x2A00])) & m,
            (1 << 62) & m, 0x8000000000000000 & m, 0x7FFFFFFFFFFF0000 & m, 0xFF000001 & m, 0x00FFFFFF & m,
        ]
        return r.choice(choices)

    def _put(self, data: bytearray, off: int, n: int, value: int) -> None:
        if 0 <= off and off + n <= len(data):
            data[off : off + n] = (value & ((1 << (8 * n)) - 1)).to_bytes(n, "big")

    def _get(self, data: bytearray, off: int, n: int) -> int:
        return int.from_bytes(data[off : off + n], "big") if 0 <= off and off + n <= len(data) else 0

    # -- one mutation
    def mutate_once(self, data: bytearray) -> str:
        r = self.rnd
        if len(data) < 8:  # an earlier mutation of this mutant cut the file: make some bytes again
            data.extend(self.seed[len(data) : 4096])
        kinds = ["header", "header", "bitflip", "truncate"] + [k for k in self.lay.entries for _ in range(2)]
        if "refblock" in self.lay.regions:
            kinds += ["refcount", "refcount"]
        if "feature-table" in self.lay.regions:
            kinds.append("feature-name")
        kind = r.choice(kinds)
        if kind == "header":
            off, n, name = r.choice(HEADER_FIELDS)
            v = self._interesting(8 * n, data)
            if name.endswith("_features") and r.random() < 0.6:
                v = self._get(data, off, n) ^ (1 << r.randrange(64))
            self._put(data, off, n, v)
            return f"header.{name}={v:#x}"
        if kind == "bitflip":
            off = r.randrange(min(len(data), 4 * self.lay.cluster_size))
            data[off] ^= 1 << r.randrange(8)
            return f"bitflip@{off:#x}"
        if kind == "truncate":
            cut = r.choice([r.randrange(len(data)), len(data) - self.lay.cluster_size,
                            r.choice(self.lay.metadata or [0]) + r.choice([0, 8, 512])])
            cut = max(0, min(len(data), cut))
            del data[cut:]
            if r.random() < 0.3:
                data.extend(bytes(r.randrange(1, 3 * self.lay.cluster_size)))
            return f"truncate@{cut:#x}"
        if kind == "refcount":
            blk, cs = self.lay.regions["refblock"]
            order = self.lay.regions.get("refcount-order", (4, 0))[0]
            width = max(1, (1 << order) // 8)
            off = blk + r.randrange(cs // width) * width
            v = r.choice([0, 1, 2, (1 << (8 * width)) - 1, r.getrandbits(8 * width)])
            self._put(data, off, width, v)
            return f"refcount@{off:#x}={v:#x}"
        if kind == "feature-name":
            off, n = self.lay.regions["feature-table"]
            e = off + 48 * r.randrange(max(1, n // 48))
            self._put(data, e, 1, r.choice([0, 1, 2, 3, 255]))
            self._put(data, e + 1, 1, r.choice([0, 4, 5, 63, 64, 200]))
            return f"feature-table@{e:#x}"
        off = r.choice(self.lay.entries[kind])
        if kind in ("snapshot", "bitmap-dir", "extension"):
            fields = {"snapshot": [(0, 8), (8, 4), (12, 2), (14, 2), (32, 4), (36, 4)],
                      "bitmap-dir": [(0, 8), (8, 4), (12, 4), (16, 1), (17, 1), (18, 2), (20, 4)],
                      "extension": [(0, 4), (4, 4)]}[kind]
            fo, n = r.choice(fields)
            v = self._interesting(8 * n, data)
            self._put(data, off + fo, n, v)
            return f"{kind}@{off:#x}+{fo}={v:#x}"
        old = self._get(data, off, 8)
        how = r.choice(["value", "flip", "offset", "dup", "flags"])
        if how == "value":
            v = self._interesting(64, data)
        elif how == "flip":
            v = old ^ (1 << r.randrange(64))
        elif how == "offset":
            target = r.choice([len(data), len(data) + self.lay.cluster_size * r.randrange(1, 1 << 20),
                               r.choice(self.lay.metadata or [0]), r.randrange(max(1, len(data))) & ~0x1FF])
            v = (old & ~L2_OFFSET_MASK) | (target & L2_OFFSET_MASK)
        elif how == "dup":
            v = self._get(data, r.choice(self.lay.entries[kind]), 8)
        else:
            v = old ^ r.choice([1 << 63, 1 << 62, 1, 0x1FE, 0x3F << 56])
        self._put(data, off, 8, v)
        return f"{kind}@{off:#x}:{how}={v:#x}"

    def mutant(self) -> tuple[bytes, list[str]]:
        data = bytearray(self.seed)
        done = [self.mutate_once(data) for _ in range(self.rnd.choice([1, 1, 1, 2, 2, 3]))]
        return bytes(data), done


def read_seed(path: Path) -> bytes:
    return path.read_bytes()


__all__ = ["HEADER_FIELDS", "Layout", "Mutator", "layout", "read_seed"]
