"""The block graph as QEMU keeps it: every BlockDriverState (all_bdrv_states, block.c) and the
BlockBackends (block_backends, block/block-backend.c), 7.2 and 10.0."""

from __future__ import annotations

from typing import Optional

from .target import IntrospectError, Target, Value, qlist


def bdrv_states(t: Target) -> list[Value]:
    """Every BlockDriverState (pointer Values), from all_bdrv_states (bs_list)."""
    return qlist(t.var("all_bdrv_states"), "bs_list")


def backends(t: Target) -> dict[int, str]:
    """BlockDriverState address -> name of the BlockBackend (the -drive id) whose root it is."""
    out: dict[int, str] = {}
    try:
        blks = qlist(t.var("block_backends"), "link")
    except IntrospectError:
        return out
    for blkp in blks:
        blk = blkp.deref()
        root = blk["root"]
        if root.ptr():
            bs = root.deref()["bs"].ptr()
            if bs:
                out[bs] = blk["name"].cstring()
    return out


def format_name(bs: Value) -> Optional[str]:
    drv = bs["drv"]
    return drv.deref()["format_name"].cstring() if drv.ptr() else None
