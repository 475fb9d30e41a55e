"""An exact model of QEMU's Qcow2Cache (block/qcow2-cache.c, QEMU 7.2; unchanged in this respect since 2.12).

What QEMU does (qcow2_cache_do_get / qcow2_cache_put):

* the cache has ``size`` entries of ``table_size`` bytes (an L2 slice, or a refcount block);
* a lookup scans the entries starting at ``(offset / table_size * 4) % size``; the first entry
  holding ``offset`` is a hit; while scanning it remembers the *unreferenced* entry with the
  strictly lowest ``lru_counter`` (so on ties the first one in scan order wins);
* on a miss that entry is replaced (``qcow2_cache_get_replace_entry`` + ``qcow2_cache_get_read``
  trace events, also for ``qcow2_cache_get_empty`` which does not read from disk);
* ``qcow2_cache_put`` sets ``lru_counter = ++c->lru_counter`` when the last reference drops.

Empty entries (never used, cleaned by cache-clean-interval, discarded) have ``lru_counter`` 0
and therefore go first: the first empty entry in scan order. Filled entries all have distinct
counters >= 1, so once the cache is full the victim is exactly the least recently *put* entry.
For the synchronous access pattern of qcow2 (every get is followed by its put before the next
get), that is plain LRU on the sequence of lookups; ``curve.py`` relies on it and the tests
check it against this model.

This module keeps the same state as QEMU (offset, lru_counter, ref per entry) but finds the
victim without the O(size) scan: a sorted list of empty indices and an insertion-ordered dict
of filled entries by last put.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np


@dataclass
class CacheEvent:
    """One qcow2_cache_get as the trace shows it."""

    offset: int
    index: int
    hit: bool
    read_from_disk: bool = True

    def as_dict(self) -> dict:
        return {"offset": self.offset, "index": self.index, "hit": self.hit, "read_from_disk": self.read_from_disk}


@dataclass
class CacheStats:
    lookups: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0  # misses that replaced a filled entry
    disk_reads: int = 0  # misses with read_from_disk (get_empty does not read)
    events: Optional[list[CacheEvent]] = field(default=None, repr=False)

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.lookups if self.lookups else 1.0


class Qcow2Cache:
    """Qcow2Cache with QEMU's replacement policy. ``detailed=True`` records every lookup."""

    def __init__(self, size: int, table_size: int, detailed: bool = False) -> None:
        if size <= 0:
            raise ValueError("cache size must be at least one entry")
        if table_size <= 0 or table_size & (table_size - 1):
            raise ValueError("table size must be a power of two")
        self.size = int(size)
        self.table_size = int(table_size)
        self.offset = [0] * self.size
        self.lru = [0] * self.size
        self.ref = [0] * self.size
        self.lru_counter = 0
        self.cache_clean_lru_counter = 0
        self._where: dict[int, int] = {}  # offset -> entry index
        self._empty: list[int] = list(range(self.size))  # sorted, entries with offset 0 and lru 0
        self._order: dict[int, None] = {}  # filled, unreferenced entries by increasing lru_counter
        self.stats = CacheStats(events=[] if detailed else None)

    # -- QEMU's API ---------------------------------------------------------------------------
    def get(self, offset: int, read_from_disk: bool = True) -> int:
        """qcow2_cache_get / qcow2_cache_get_empty: returns the entry index (referenced)."""
        if offset == 0 or offset % self.table_size:
            raise ValueError(f"unaligned or zero cache offset {offset:#x}")
        st = self.stats
        st.lookups += 1
        i = self._where.get(offset)
        if i is not None:
            st.hits += 1
            if self.ref[i] == 0:
                self._order.pop(i, None)
            self.ref[i] += 1
            if st.events is not None:
                st.events.append(CacheEvent(offset, i, True, read_from_disk))
            return i
        i = self._victim((offset // self.table_size * 4) % self.size)
        st.misses += 1
        if read_from_disk:
            st.disk_reads += 1
        old = self.offset[i]
        if old:
            st.evictions += 1
            del self._where[old]
            self._order.pop(i, None)
        else:
            k = bisect.bisect_left(self._empty, i)
            if k < len(self._empty) and self._empty[k] == i:
                del self._empty[k]
            else:  # an entry with offset 0 but a counter (cannot happen in QEMU's sync code)
                self._order.pop(i, None)
        self.offset[i] = offset
        self._where[offset] = i
        self.ref[i] += 1
        if st.events is not None:
            st.events.append(CacheEvent(offset, i, False, read_from_disk))
        return i

    def put(self, i: int) -> None:
        """qcow2_cache_put."""
        self.ref[i] -= 1
        if self.ref[i] < 0:
            raise AssertionError("cache entry put more often than got")
        if self.ref[i] == 0:
            self.lru_counter += 1
            self.lru[i] = self.lru_counter
            self._order[i] = None  # most recent at the end

    def lookup(self, offset: int, read_from_disk: bool = True) -> bool:
        """A get immediately followed by its put; returns True on a hit."""
        before = self.stats.hits
        self.put(self.get(offset, read_from_disk))
        return self.stats.hits != before

    def clean_unused(self) -> int:
        """qcow2_cache_clean_unused (the cache-clean-interval timer): returns entries dropped."""
        dropped = 0
        for i in range(self.size):
            if self.ref[i] == 0 and self.offset[i] and self.lru[i] <= self.cache_clean_lru_counter:
                self._drop(i)
                dropped += 1
        self.cache_clean_lru_counter = self.lru_counter
        return dropped

    def discard(self, offset: int) -> None:
        """qcow2_cache_discard for the entry holding offset (if cached)."""
        i = self._where.get(offset)
        if i is not None:
            self._drop(i)

    def empty(self) -> None:
        """qcow2_cache_empty."""
        for i in range(self.size):
            if self.offset[i]:
                self._drop(i)
        self.lru_counter = 0

    def contents(self) -> list[int]:
        """Offsets held per entry (0 = empty)."""
        return list(self.offset)

    # -- internals ----------------------------------------------------------------------------
    def _drop(self, i: int) -> None:
        del self._where[self.offset[i]]
        self._order.pop(i, None)
        self.offset[i] = 0
        self.lru[i] = 0
        bisect.insort(self._empty, i)

    def _victim(self, start: int) -> int:
        # Empty entries have lru_counter 0 (the minimum): the first unreferenced one at or after
        # `start`, wrapping around, is what QEMU's scan picks.
        if self._empty:
            k = bisect.bisect_left(self._empty, start)
            n = len(self._empty)
            for j in range(n):
                i = self._empty[(k + j) % n]
                if self.ref[i] == 0:
                    return i
        # All filled: the unreferenced entry with the lowest (unique) lru_counter.
        for i in self._order:
            if self.ref[i] == 0:
                return i
        # QEMU abort()s here ("This can't happen in current synchronous code")
        raise RuntimeError("every cache entry is referenced")


def replay(
    offsets: Iterable[int],
    size: int,
    table_size: int,
    read_from_disk: Optional[Iterable[bool]] = None,
    detailed: bool = False,
) -> CacheStats:
    """Run a sequence of synchronous lookups through one Qcow2Cache and return its statistics."""
    c = Qcow2Cache(size, table_size, detailed=detailed)
    offs = offsets.tolist() if isinstance(offsets, np.ndarray) else list(offsets)
    if read_from_disk is None:
        for o in offs:
            c.put(c.get(o))
    else:
        rfd = read_from_disk.tolist() if isinstance(read_from_disk, np.ndarray) else list(read_from_disk)
        for o, r in zip(offs, rfd):
            c.put(c.get(o, bool(r)))
    return c.stats
