"""`virtopt qcow2 [NODE]`: the live L2-table and refcount-block caches of each qcow2 node."""

from __future__ import annotations

import argparse
from typing import Any

from qemu_ext.introspect import block, render

from . import command, utils


class Qcow2Command(command.VirtoptCommand):
    name = "qcow2"
    summary = "Live L2-table and refcount-block cache state of each qcow2 node (size, use, dirty, coverage)."
    epilog = "examples:\n  virtopt qcow2\n  virtopt qcow2 drive0 --slices\n  virtopt qcow2 --json"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("node", nargs="?", metavar="NODE", help="node name, -drive id, or image file name")
        p.add_argument("--slices", action="store_true", help="list every cached slice (offset, LRU, ref, dirty)")

    def view_args(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"node": args.node}

    def candidates(self) -> list[str]:
        t = utils.target()
        nodes = [bs.deref()["node_name"].cstring() for bs in block.bdrv_states(t)]
        return [n for n in nodes if n] + [d for d in block.backends(t).values() if d]

    def render(self, d: Any, args: argparse.Namespace) -> str:
        return render.qcow2(d, args.slices)


def register() -> None:
    Qcow2Command()
