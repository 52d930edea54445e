"""The unit map's side of a flush: the changed sectors sealed for writing, the parked ones
written in runs, and what becomes of both when the flush succeeds or fails. A mixin of
unit_map.UnitMap (whose state it uses), split out to keep that module readable."""

from __future__ import annotations

import mmap
import struct
import threading
from collections.abc import Iterator

import crc32c

from appliance.store.cache import PARK_OVERHEAD, MapCache, decode_parked
from appliance.store.format import SECTOR, SECTORS_PER_PAGE, seal_sector

FLUSH_RUN = 256  # sectors per map write a flush coalesces at most (128 KiB)
# What a map page holds on disk, as far as the map knows: unknown (ask the backing), zeros (a
# hole, or never written: a miss need not read it), or data (read it on a miss).
_UNKNOWN, _ZERO, _DATA = 0, 1, 2


class MapFlush:
    """UnitMap's flush methods; the attributes are UnitMap's (unit_map.py documents them)."""

    lock: threading.Lock
    dirty: set[int]
    parked: dict[int, bytes]
    _flying: dict[int, bytes]
    _disk: bytearray
    _meta: mmap.mmap
    loaded: bytearray
    cache: MapCache
    _gen: int

    def take_dirty(self, chunk: int = 512) -> list[tuple[int, bytes]]:
        """Seal and copy the changed sectors as (first sector, bytes) runs. Takes the lock
        itself, `chunk` sectors at a time, so a flush of a large map never holds writers
        back for long: a sector changed meanwhile is dirty again and goes in the next flush."""
        with self.lock:
            todo = sorted(self.dirty)
            self.dirty.clear()
            assert not self._flying, "one flush at a time (the store's flush lock)"
            self._flying, self.parked = self.parked, {}
            disk = self._disk  # written from now on: a later miss reads them
            for s in todo:
                disk[s // SECTORS_PER_PAGE] = _DATA
            for s in self._flying:
                disk[s // SECTORS_PER_PAGE] = _DATA
        out: list[tuple[int, bytes]] = []
        for i in range(0, len(todo), chunk):
            runs: list[tuple[int, int]] = []  # [first, end) sector ranges
            with self.lock:
                for s in todo[i : i + chunk]:
                    seal_sector(self._meta, s)
                    if runs and runs[-1][1] == s:
                        runs[-1] = (runs[-1][0], s + 1)
                    else:
                        runs.append((s, s + 1))
                out += [(a, self._meta[a * SECTOR : b * SECTOR]) for a, b in runs]
        return out

    def flying_runs(self) -> Iterator[tuple[int, bytes]]:
        """The parked sectors take_dirty took, sealed, as (first sector, bytes) runs of
        adjacent sectors in disk order, made as they are written (memory: one run)."""
        todo = sorted(self._flying)
        i = 0
        while i < len(todo):
            j = i + 1
            while j < len(todo) and todo[j] == todo[j - 1] + 1 and j - i < FLUSH_RUN:
                j += 1
            blob = bytearray((j - i) * SECTOR)
            for k in range(i, j):
                base = (k - i) * SECTOR
                blob[base + 8 : base + SECTOR] = decode_parked(self._flying[todo[k]])
                struct.pack_into("<I", blob, base + 4, todo[k])  # seal_sector, numbered
                crc = crc32c.crc32c(memoryview(blob)[base + 4 : base + SECTOR])
                struct.pack_into("<I", blob, base, crc)
            yield todo[i], bytes(blob)
            i = j

    def writing_parked(self) -> bool:
        return bool(self._flying)

    def flushed(self) -> None:
        """The flush that took the parked sectors wrote them: forget them."""
        with self.lock:
            self.cache.parked -= sum(len(e) + PARK_OVERHEAD for e in self._flying.values())
            self._flying = {}
            self._gen += 1  # a page read before this may hold neither the disk's nor these

    def redirty(self, runs: list[tuple[int, bytes]]) -> None:
        """Sectors taken by a flush that failed: the next flush writes them. Caller holds lock.
        Parked ones whose page is still unloaded are parked again; loaded ones are dirty."""
        for first, blob in runs:
            self.dirty.update(range(first, first + len(blob) // SECTOR))
        for s, enc in self._flying.items():
            if not self.loaded[s // SECTORS_PER_PAGE] and s not in self.parked:
                self.parked[s] = enc
            else:  # _unpark made it dirty, or a write parked a newer copy since
                self.cache.parked -= len(enc) + PARK_OVERHEAD
        self._flying = {}
        self._gen += 1
