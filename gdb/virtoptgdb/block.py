"""The block graph as gdb sees it: BlockDriverStates (all_bdrv_states) and BlockBackends."""

from __future__ import annotations

from typing import Optional

import gdb

from . import core


def bdrv_states() -> list[gdb.Value]:
    """Every BlockDriverState (pointer values), from all_bdrv_states (bs_list)."""
    return core.qtailq(core.value_of("all_bdrv_states"), "bs_list")


def backends() -> dict[int, str]:
    """BlockDriverState address -> name of the BlockBackend (the -drive id) whose root it is."""
    out: dict[int, str] = {}
    try:
        blks = core.qtailq(core.value_of("block_backends"), "link")
    except core.VirtoptGdbError:
        return out
    for blk in blks:
        root = blk["root"]
        if core.ptr(root):
            bs = core.ptr(root["bs"])
            if bs:
                out[bs] = core.cstr(blk["name"])
    return out


def format_name(bs: gdb.Value) -> Optional[str]:
    drv = bs["drv"]
    return core.cstr(drv["format_name"]) if core.ptr(drv) else None
