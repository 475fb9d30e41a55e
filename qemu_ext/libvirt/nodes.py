"""One block node from any name a user knows it by.

libvirt names nodes ``libvirt-N-format`` / ``libvirt-N-storage`` (-blockdev, libvirt 5.10+), gives
devices qdev ids ``virtio-disk0`` (the <alias>), and users know disks by their XML target (``vda``);
plain QEMU users know ``-drive id=drive0`` names or their own -blockdev node names. Wherever a node is
asked for (the shell's /l2cache, ``l2cache tune``), :func:`resolve_node` maps any of these to the node
the qcow2 driver runs in (its format node), from QMP's query-block answer (7.2 and 10.0: ``device``
is the drive name, "" for -blockdev; ``qdev`` the device's QOM path; ``inserted.node-name`` the
top (format) node; ``inserted.image`` the chain) and, for a libvirt domain, its disks (target ->
alias).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from qemu_ext.errors import BadInputError


@dataclass
class BlockNode:
    node_name: str  # the format node ("libvirt-1-format", "#block123" for an auto-named -drive node)
    device: Optional[str]  # -drive id ("drive0"), None for -blockdev
    qdev: Optional[str]  # "virtio-disk0" (the last element of the qdev path that is not a backend)
    target: Optional[str]  # libvirt's <target dev> ("vda")
    filename: Optional[str]
    format: Optional[str]
    names: list[str]  # every name this node answers to

    def to_dict(self) -> dict[str, Any]:
        return {"node-name": self.node_name, "device": self.device, "qdev": self.qdev, "target": self.target,
                "filename": self.filename, "format": self.format, "names": list(self.names)}


def _qdev_id(path: Optional[str]) -> Optional[str]:
    """"/machine/peripheral/virtio-disk0/virtio-backend" -> "virtio-disk0"; ids as given (no path) kept."""
    if not path:
        return None
    if "/" not in path:
        return path
    parts = [p for p in path.split("/") if p]
    if "peripheral" in parts:
        i = parts.index("peripheral")
        return parts[i + 1] if i + 1 < len(parts) else None
    return parts[-1]


def block_nodes(query_block: Sequence[dict[str, Any]], disks: Sequence[Any] = ()) -> list[BlockNode]:
    """Every inserted block device of query-block, with every name it is known by; ``disks``: a libvirt
    domain's disks (qemu_ext.libvirt.xml.Disk, from the live XML: target and alias)."""
    by_alias = {d.alias: d for d in disks if getattr(d, "alias", None)}
    by_source = {d.source: d for d in disks if getattr(d, "source", None)}
    out = []
    for b in query_block:
        ins = b.get("inserted")
        if not isinstance(ins, dict) or not ins.get("node-name"):
            continue
        qdev = _qdev_id(b.get("qdev"))
        image = ins.get("image") or {}
        disk = by_alias.get(qdev) or by_source.get(image.get("filename") or ins.get("file"))
        node = str(ins["node-name"])
        names = [node]
        device = b.get("device") or None
        for n in (device, qdev, getattr(disk, "target", None), b.get("qdev")):
            if n and n not in names:
                names.append(n)
        if node.endswith("-format"):  # libvirt's pair: the protocol node under the format node
            storage = node[: -len("-format")] + "-storage"
            names.append(storage)
        out.append(BlockNode(node, device, qdev, getattr(disk, "target", None),
                             image.get("filename") or ins.get("file"), image.get("format") or ins.get("drv"), names))
    return out


def resolve_node(name: str, query_block: Sequence[dict[str, Any]], disks: Sequence[Any] = ()) -> BlockNode:
    """The block node called ``name`` by any of its names (node name, libvirt-N-storage, drive id, qdev id or
    path, libvirt target such as ``vda``); BadInputError listing what there is when nothing matches."""
    nodes = block_nodes(query_block, disks)
    for n in nodes:
        if name in n.names:
            return n
    have = "; ".join(" = ".join(n.names[:4]) for n in nodes) or "no block device has a medium"
    raise BadInputError(f"no block node, drive or disk called {name!r} (there is: {have})")
