"""QEMU's memory tree through HMP ``info mtree``: which region and device own an address, and the tree.

- ``await mtree_lookup(session, address, space="io") -> MtreeMatch``: the region and device that
  own an I/O port or a guest-physical address, chosen as QEMU dispatches (the highest priority
  among siblings; memory_region_find / flatview lookup in softmmu/memory.c, 7.2 and 10.0).
- ``await mtree(session, spaces=None) -> dict[address-space name, list[Region]]``: the regions of
  each address space in ``info mtree -o`` order, with depth and owner.

Parsed from ``info mtree -o`` (owners, mtree_expand_owner() in softmmu/memory.c 7.2 / system/memory.c
10.0) and ``info mtree -f -o`` (the flat view).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

from qemu_ext.errors import BadInputError
from qemu_ext.qmp.client import QmpSession
from qemu_ext.qmp.errors import HmpError, NoMatchError, QmpCommandError

SPACES = {"io": "I/O", "memory": "memory"}


@dataclass
class Region:
    start: int
    end: int
    priority: int
    kind: str  # i/o, ram, rom, romd, container, ...
    name: str
    depth: int
    owner: str = ""  # QOM path of the owning device/object
    alias_of: str = ""
    enabled: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "priority": self.priority, "kind": self.kind,
                "name": self.name, "depth": self.depth, "owner": self.owner, "alias-of": self.alias_of,
                "enabled": self.enabled}


@dataclass
class MtreeMatch:
    address: int
    space: str  # io | memory
    address_space: str  # "I/O" | "memory"
    region: str  # the outermost region of the owning device that contains the address (port 0x70 -> rtc)
    leaf: str  # the innermost region (rtc-index)
    chain: list[str]  # root ... leaf
    start: int
    end: int
    owner: str  # QOM path
    device_type: str  # QOM type of the owner (mc146818rtc)
    device_id: str  # the device's id= when it has one
    flat_region: str  # what the flat view dispatches the address to
    claimed: bool = True  # False when only the address space's root container covers the address
    chain_regions: list[Region] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"address": self.address, "space": self.space, "address-space": self.address_space,
                "region": self.region, "leaf": self.leaf, "chain": self.chain, "start": self.start,
                "end": self.end, "owner": self.owner, "device-type": self.device_type,
                "device-id": self.device_id, "flat-region": self.flat_region, "claimed": self.claimed}


_MTREE_LINE = re.compile(
    r"^(?P<indent>\s*)(?P<start>[0-9a-f]+)-(?P<end>[0-9a-f]+) \(prio (?P<prio>-?\d+), (?P<kind>[^)]+)\): "
    r"(?P<rest>.*)$"
)
# mtree_expand_owner(): " owner:{dev id=ID}" (devices with id=, at /machine/peripheral/ID),
# " owner:{dev path=QOM-PATH}", " owner:{obj type=TYPE}"; " parent:{...}" when the owner differs
_OWNER = re.compile(r"\s(?:owner|parent):\{(?:dev|obj)(?: id=(?P<id>[^}\s]+))?(?: path=(?P<path>[^}]+))?"
                    r"(?: type=(?P<type>[^}\s]+))?\}")


def _split_owner(rest: str) -> tuple[str, str]:
    """An `info mtree -o` line's tail -> (region text, owner QOM path or "")."""
    om = _OWNER.search(rest)
    if not om:
        return rest, ""
    if om["path"]:
        owner = om["path"]
    elif om["id"]:
        owner = f"/machine/peripheral/{om['id']}"
    else:
        owner = ""
    return rest[: om.start()], owner


def parse_mtree(text: str) -> dict[str, list[Region]]:
    """``info mtree -o`` -> {address-space name: regions in print order (with depth)}."""
    spaces: dict[str, list[Region]] = {}
    cur: Optional[list[Region]] = None
    for line in text.splitlines():
        if line.startswith("address-space: "):
            cur = spaces.setdefault(line[len("address-space: "):].strip(), [])
            continue
        if line.startswith(("memory-region: ", "FlatView")):
            cur = None
            continue
        m = _MTREE_LINE.match(line)
        if not m or cur is None:
            continue
        rest, owner = _split_owner(m["rest"])
        enabled = "[disabled]" not in rest
        rest = rest.replace("[disabled]", "").strip()
        alias_of = ""
        if rest.startswith("alias "):
            parts = rest.split()
            rest = parts[1]
            alias_of = parts[2].lstrip("@") if len(parts) > 2 else ""
        name = rest.split(" ")[0] if rest else ""  # "name KVM" style suffixes are not part of the name
        cur.append(Region(int(m["start"], 16), int(m["end"], 16), int(m["prio"]), m["kind"].strip(), name,
                          len(m["indent"]) // 2, owner, alias_of, enabled))
    return spaces


def parse_flatview(text: str) -> dict[str, list[Region]]:
    """``info mtree -f -o`` -> {address-space name: flat ranges}; each AS listed under its FlatView."""
    out: dict[str, list[Region]] = {}
    names: list[str] = []
    ranges: list[Region] = []
    for line in text.splitlines():
        if line.startswith("FlatView"):
            names, ranges = [], []
            continue
        m = re.match(r'^\s*AS "(?P<name>[^"]+)"', line)
        if m:
            names.append(m["name"])
            out[m["name"]] = ranges
            continue
        m = _MTREE_LINE.match(line)
        if m and names:
            rest, owner = _split_owner(m["rest"])
            name = rest.strip().split(" ")[0] if rest.strip() else ""
            ranges.append(Region(int(m["start"], 16), int(m["end"], 16), int(m["prio"]), m["kind"].strip(),
                                 name, 0, owner))
    return out


def _lookup_chain(regions: list[Region], addr: int) -> list[Region]:
    """Containment chain root -> leaf, as QEMU dispatches: among sibling regions containing the
    address the highest priority wins (``info mtree`` prints siblings by address, not priority)."""
    children: dict[int, list[int]] = {-1: []}
    stack: list[int] = []
    for i, r in enumerate(regions):
        while stack and regions[stack[-1]].depth >= r.depth:
            stack.pop()
        children.setdefault(stack[-1] if stack else -1, []).append(i)
        children.setdefault(i, [])
        stack.append(i)
    chain: list[Region] = []
    cur = -1
    while True:
        best: Optional[int] = None
        for i in children.get(cur, []):
            r = regions[i]
            if r.enabled and r.start <= addr <= r.end and (best is None or r.priority > regions[best].priority):
                best = i
        if best is None:
            return chain
        chain.append(regions[best])
        cur = best


def parse_address_arg(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        try:
            v = int(text, 16)
        except ValueError:
            raise BadInputError(f"not an address: {text!r} (use 0x70 or 112)") from None
    if v < 0 or v >= 1 << 64:
        raise BadInputError(f"address out of range: {text}")
    return v


async def mtree(s: QmpSession, spaces: Optional[list[str]] = None) -> dict[str, list[Region]]:
    """The regions of each address space (``spaces``: names as ``info mtree`` prints them, or io/memory)."""
    tree = parse_mtree(await s.hmp("info mtree -o"))
    if not spaces:
        return tree
    out = {}
    for sp in spaces:
        name = SPACES.get(sp, sp)
        if name not in tree:
            raise NoMatchError("address space", sp, "the address spaces are " + ", ".join(tree))
        out[name] = tree[name]
    return out


async def mtree_lookup(s: QmpSession, address: int | str, space: str = "io") -> MtreeMatch:
    """Name the memory region and device that own an I/O port (space io) or a guest-physical address."""
    addr = parse_address_arg(address) if isinstance(address, str) else int(address)
    as_name = SPACES.get(space)
    if as_name is None:
        raise BadInputError(f"space must be io or memory, not {space!r}")
    tree = parse_mtree(await s.hmp("info mtree -o"))
    regions = tree.get(as_name)
    if not regions:
        raise HmpError(f"'info mtree' shows no address space {as_name!r}")
    chain = _lookup_chain(regions, addr)
    if not chain:
        raise BadInputError(f"{space} address {addr:#x} is outside the {as_name} address space")
    flat = parse_flatview(await s.hmp("info mtree -f -o")).get(as_name, [])
    flat_name = next((r.name for r in flat if r.start <= addr <= r.end), "")
    leaf = chain[-1]
    if len(chain) == 1:  # nothing below the root: no device claims this address
        return MtreeMatch(addr, space, as_name, leaf.name, leaf.name, [leaf.name], leaf.start, leaf.end, "", "", "",
                          flat_name, claimed=False, chain_regions=chain)
    owner = leaf.owner
    # the owning region: the outermost region in the chain owned by the same device as the leaf
    region = chain[1]
    if owner:
        region = next((r for r in chain[1:] if r.owner == owner), leaf)
    dev_type = dev_id = ""
    if owner.startswith("/"):
        try:
            dev_type = str(await s.execute("qom-get", {"path": owner, "property": "type"}))
        except QmpCommandError:
            dev_type = ""
        if owner.startswith("/machine/peripheral/"):
            dev_id = owner.rsplit("/", 1)[1]
    names = [f"{r.name}@{r.alias_of}" if r.alias_of else r.name for r in chain]
    return MtreeMatch(addr, space, as_name, region.name, leaf.name, names, region.start, region.end, owner,
                      dev_type, dev_id, flat_name, chain_regions=chain)
