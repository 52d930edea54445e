"""The map cache's bookkeeping: which map memory is resident, in least-recently-used order.

The unit map (unit_map) keeps its records in an anonymous mmap the size of the whole on-disk
map; only the pages loaded from disk cost RAM. This module decides how many may stay: a fixed
budget in bytes, whatever the disk size, so a 2 TB disk behind a Pi Zero 2 W (512 MiB) never
grows the daemon past it. The cache counts memory pages (`group` = one `mmap.PAGESIZE` page,
holding one or more 4 KiB map pages), since that is what madvise gives back.

Eviction itself (unit_map.UnitMap.evict) parks the changed sectors of a dirty page (a compact
copy of their records, counted here in `parked` bytes) and unloads it; nothing is written, so
flush's order (data synced before the map sectors describing it) is untouched. Parked sectors
may use at most half the budget; past it dirty pages are pinned, and the store forces a flush
(store.Store._shrink) that writes them all.
encode_parked/decode_parked are that compact copy; parked_record/park_record read and change
one record of it in place of a page (a write that misses a page never written parks its record
directly: unit_map.UnitMap.set).
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Iterator

from appliance.store.format import RECS_PER_SECTOR

DEFAULT_BUDGET = 32 << 20  # bytes: fits a Pi Zero 2 W (512 MiB) whatever the disk size
MIN_GROUPS = 1  # the tests run with one: eviction (and the flushes it forces) all the time
_RECS = RECS_PER_SECTOR * 4  # record bytes of a sector, after its 8 header bytes
_SPARSE = struct.Struct("<BI")  # a parked record: index in its sector, record
_SPARSE_MAX = _RECS // _SPARSE.size  # more non-zero records than this: park the whole sector
PARK_OVERHEAD = 100  # bytes a parked sector costs beyond its encoding (dict slot, key, object)


class MapCache:
    """Resident map memory groups, coldest first; `budget` bytes at most between requests
    (a request that loads many pages, a BLOCK_STATUS or a pass step, may pass it briefly)."""

    def __init__(self, budget: int, group_bytes: int) -> None:
        self.budget, self.group_bytes = budget, group_bytes
        self.limit = max(MIN_GROUPS, budget // group_bytes)  # requests wait above it
        # Room is made from `high` on, down to `low`, while requests go on: one forced flush
        # and eviction serves many of them, and the cache stays under `limit` meanwhile.
        margin = self.limit // 4  # writes that go on during the flush that makes room
        self.high, self.low = self.limit - margin, self.limit - 2 * margin
        self._lru: OrderedDict[int, None] = OrderedDict()
        self.parked = 0  # bytes of parked sectors (unit_map): records not yet on disk
        self.park_limit = budget // 2  # the rest stays for pages, so lookups still hit
        self.hits = self.misses = self.evictions = 0
        # The hot path: a lookup of a resident page moves it to the warm end (C, no lock: the
        # GIL makes it atomic, and a group is only ever removed with the store's gate held).
        self.touch = self._lru.move_to_end

    def __contains__(self, group: int) -> bool:
        return group in self._lru

    def __len__(self) -> int:
        return len(self._lru)

    def used(self) -> int:
        """Groups' worth of memory in use: resident groups and parked sectors."""
        return len(self._lru) - (-self.parked // self.group_bytes)  # a part counts whole

    def over(self) -> bool:
        return self.used() > self.high

    def add(self, group: int, cold: bool = False) -> None:
        """A group became resident. cold: loaded by the background pass, so evicted first."""
        self.misses += 1
        self._lru[group] = None
        self._lru.move_to_end(group, last=not cold)

    def forget(self, group: int) -> None:
        if self._lru.pop(group, 0) is None:
            self.evictions += 1

    def coldest(self) -> Iterator[int]:
        """Resident groups, least recently used first (a copy: callers forget as they go)."""
        return iter(list(self._lru))

    def status(self) -> dict[str, object]:
        looked = self.hits + self.misses
        return {
            "size": len(self._lru) * self.group_bytes + self.parked,
            "parked": self.parked,
            "budget": self.budget,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "hit_rate": self.hits / looked if looked else 1.0,
        }


def encode_parked(recs: bytes) -> bytes:
    """A sector's record bytes, compactly: (index, record) per non-zero record, or all of
    them when most are set. The two never have the same length (504 is no multiple of 5)."""
    body = recs.lstrip(b"\0")  # the span of non-zero records, found at C speed
    if not body:
        return b""
    first, end = (len(recs) - len(body)) // 4, -(-len(recs.rstrip(b"\0")) // 4)
    if end - first == 1:  # one record: what random writes over a large disk leave
        return _SPARSE.pack(first, int.from_bytes(recs[first * 4 : end * 4], "little"))
    words = memoryview(recs).cast("I")[first:end].tolist()
    nonzero = [(first + i, r) for i, r in enumerate(words) if r]
    if len(nonzero) > _SPARSE_MAX:
        return bytes(recs)
    return b"".join([_SPARSE.pack(i, r) for i, r in nonzero])


def decode_parked(enc: bytes) -> bytes:
    if len(enc) == _RECS:
        return enc
    out = bytearray(_RECS)
    words = memoryview(out).cast("I")
    for i, r in _SPARSE.iter_unpack(enc):
        words[i] = r
    return bytes(out)


def _sparse_pos(enc: bytes, i: int) -> int:
    """Where record i is in a sparse encoding (entry number), or -1. The index bytes are
    every fifth byte: one C search, no Python loop."""
    return enc[:: _SPARSE.size].find(i)


def parked_record(enc: bytes, i: int) -> int:
    """Record i of a parked sector's encoding (0 if it holds none)."""
    if len(enc) == _RECS:
        return int.from_bytes(enc[i * 4 : i * 4 + 4], "little")
    pos = _sparse_pos(enc, i)
    return 0 if pos < 0 else _SPARSE.unpack_from(enc, pos * _SPARSE.size)[1]


def park_record(enc: bytes, i: int, rec: int) -> bytes:
    """The encoding with record i set to rec: a record is added, replaced or dropped (0);
    past _SPARSE_MAX records the encoding becomes the whole sector, as encode_parked makes."""
    if len(enc) == _RECS:
        return enc[: i * 4] + rec.to_bytes(4, "little") + enc[i * 4 + 4 :]
    pos, size = _sparse_pos(enc, i), _SPARSE.size
    if pos >= 0:
        tail = enc[(pos + 1) * size :]
        return enc[: pos * size] + (_SPARSE.pack(i, rec) if rec else b"") + tail
    if not rec:
        return enc
    if len(enc) // size < _SPARSE_MAX:
        return enc + _SPARSE.pack(i, rec)
    whole = bytearray(decode_parked(enc))
    whole[i * 4 : i * 4 + 4] = rec.to_bytes(4, "little")
    return bytes(whole)
