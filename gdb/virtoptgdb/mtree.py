"""`virtopt mtree [AS] [--flat]` and `virtopt mtree lookup ADDR`: QEMU's memory map, from memory."""

from __future__ import annotations

import argparse
from typing import Any

from qemu_ext.introspect import mtree as mtree_view
from qemu_ext.introspect import render

from . import command, utils


def _as_names() -> list[str]:
    return [a.deref()["name"].cstring() for a in mtree_view.address_spaces(utils.target())]


class MtreeCommand(command.VirtoptCommand):
    name = "mtree"
    summary = "QEMU's memory region tree (or its flat view) per address space; works on QEMU 7.2."
    epilog = ("examples:\n  virtopt mtree\n  virtopt mtree memory --flat\n  virtopt mtree I/O --json\n"
              "  virtopt mtree lookup 0xfee00000")
    prefix = True

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("address_space", nargs="?", metavar="ADDRESS-SPACE",
                       help="address space name (memory, I/O, cpu-memory-0, ...); default all")
        p.add_argument("--flat", action="store_true", help="the flat view QEMU dispatches with (info mtree -f)")
        p.add_argument("--disabled", action="store_true", help="also show disabled regions (info mtree -D)")

    def view_args(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"address_space": args.address_space, "flat_view": args.flat}

    def candidates(self) -> list[str]:
        return ["lookup", *_as_names()]

    def render(self, data: Any, args: argparse.Namespace) -> str:
        return render.mtree(data, args.disabled)


class MtreeLookupCommand(command.VirtoptCommand):
    name = "mtree lookup"
    summary = "Which memory region answers at an address (from QEMU's flat view)."
    epilog = "examples:\n  virtopt mtree lookup 0xfee00000\n  virtopt mtree lookup 0x3f8 --as I/O --json"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("addr", metavar="ADDR", help="guest physical address (hex or a gdb expression)")
        p.add_argument("--as", dest="address_space", default="memory", help="address space (default memory)")

    def view_args(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"addr": str(utils.parse_int(args.addr)), "address_space": args.address_space}

    def candidates(self) -> list[str]:
        return _as_names()

    def render(self, d: Any, args: argparse.Namespace) -> str:
        return render.mtree_lookup(d)


def register() -> None:
    MtreeCommand()
    MtreeLookupCommand()
