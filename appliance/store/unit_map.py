"""The unit map in RAM: one u32 record per unit, mirroring the on-disk map sectors.

Pages are loaded from disk on first use, so opening a 1 TiB store reads nothing but its
superblock and history. Changed sectors are remembered and written out by flush. Pages are
unloaded again, least recently used first, when the map cache (cache.py) is over its budget.
A page with changed sectors is unloaded too: those sectors are *parked* first, a compact copy
of their records (5 bytes per non-zero record, or the whole sector), until a flush writes
them. Random writes over a large disk change one record per page; parked, it costs about
100 bytes instead of a memory page, so the cache does not force a data sync every few
thousand writes (docs/format.md, "Map cache"). Once the cache is full, a write that misses
a page never written on disk parks its record without loading the page at all, and a lookup
of an unloaded page's unit answers from its sector's parked copy (or 0 on such a page).
"""

from __future__ import annotations

import mmap
import threading

from appliance.store.backing import Backing
from appliance.store.cache import (
    DEFAULT_BUDGET,
    PARK_OVERHEAD,
    MapCache,
    decode_parked,
    encode_parked,
    park_record,
    parked_record,
)
from appliance.store.errors import StoreIOError
from appliance.store.format import (
    PAGE,
    RECS_PER_SECTOR,
    SECTOR,
    SECTORS_PER_PAGE,
    UNITS_PER_PAGE,
    WEPOCH_MASK,
    WORDS_PER_SECTOR,
    Geometry,
    sector_ok,
)
from appliance.store.map_flush import _DATA, _UNKNOWN, _ZERO, MapFlush

_ZERO_PAGE = bytes(PAGE)
MEMORY_PAGE = mmap.PAGESIZE  # what madvise frees: 4 KiB, or 16 KiB on a Pi 5 (tests vary it)
_RECS = RECS_PER_SECTOR * 4  # record bytes of a sector, after its 8 header bytes
_ZERO_RECS = bytes(_RECS)
READ_TRIES = 4  # reads of a missing page without the lock before one under it


def word_index(unit: int) -> int:
    """Index of a unit's record in the map viewed as u32 words (2 header words per sector)."""
    s, i = divmod(unit, RECS_PER_SECTOR)
    return s * WORDS_PER_SECTOR + 2 + i


class UnitMap(MapFlush):
    def __init__(self, backing: Backing, geo: Geometry, budget: int = DEFAULT_BUDGET) -> None:
        self._b, self._geo = backing, geo
        # Anonymous mmap: zero pages cost no RAM until a map page is loaded from disk.
        # Private: madvise(MADV_DONTNEED) then frees a page and it reads as zeros again.
        self._meta = mmap.mmap(-1, geo.meta_len, flags=mmap.MAP_PRIVATE)
        self.words = memoryview(self._meta).cast("I")
        self.loaded = bytearray(geo.meta_len // PAGE)
        # Per map page, _UNKNOWN/_ZERO/_DATA: a 1 TiB disk's map is mostly holes, and a random
        # write misses a page never written: skipping its read saves a pread (and a page of
        # page cache) per miss. Set under lock; a flush marks the pages it writes _DATA first.
        self._disk = bytearray(len(self.loaded))
        self.bad_sectors: set[int] = set()
        self.dirty: set[int] = set()
        self._transient: set[int] = set()  # pages only the background pass has loaded
        self.lock = threading.Lock()  # guards every record change and the dirty set
        self._step = max(1, MEMORY_PAGE // PAGE)  # madvise works in whole memory pages
        self.cache = MapCache(budget, self._step * PAGE)
        # Bumped (under lock) whenever what a page read without the lock would miss may have
        # changed: parked sectors written by a flush (or given back by a failed one), parked.
        self._gen = 0
        # Sectors of unloaded pages whose records are not on disk yet: sector -> encoding.
        # A flush swaps the dict for an empty one (_flying) and forgets it once written; no
        # page is unloaded meanwhile (unloading needs the store's gate alone, a flush is in it).
        self.parked: dict[int, bytes] = {}
        self._flying: dict[int, bytes] = {}

    def load_page(self, page: int, transient: bool = False) -> None:
        """transient: loaded by the background pass only, so drop_transient may unload it.

        The page is read without the lock (writers of other pages go on meanwhile) and
        installed under it only if no flush wrote parked sectors and nothing was parked in
        between (`_gen`): else the read may predate records that are now only on disk.
        A page known to be zeros on disk is not read (the same rule holds for that knowledge)."""
        buf = bytearray(PAGE)
        for _ in range(READ_TRIES):
            gen = self._gen  # before the read (one attribute load: atomic under the GIL)
            zero = self._zero_on_disk(page)
            if not zero:
                self._b.pread_into(memoryview(buf), self._geo.meta_off + page * PAGE)
            with self.lock:
                if self.loaded[page]:
                    return  # another request loaded it meanwhile
                if gen == self._gen:
                    self._install(page, None if zero else buf, transient)
                    return
        with self.lock:  # the map kept changing: read under the lock, as a flush cannot
            if not self.loaded[page]:
                self._load_locked(page, transient)

    def _load_locked(self, page: int, transient: bool = False) -> None:
        """Caller holds lock: read and install the page (rare: the lock waits for a pread)."""
        buf = bytearray(PAGE)
        self._b.pread_into(memoryview(buf), self._geo.meta_off + page * PAGE)
        self._install(page, buf, transient)

    def _zero_on_disk(self, page: int) -> bool:
        """Whether the page reads as zeros on disk: asked of the backing once (its holes,
        lseek SEEK_DATA), which also answers for the pages after it up to its next data."""
        state = self._disk[page]
        if state == _UNKNOWN:
            off, end = self._geo.meta_off + page * PAGE, self._geo.meta_off + self._geo.meta_len
            next_data = getattr(self._b, "next_data", None)  # optional: else every page is read
            holes_end = page if next_data is None else (min(next_data(off), end) - off) // PAGE
            with self.lock:  # only unknown pages change: a flush's _DATA must stay
                if holes_end > 0:
                    stop = page + holes_end
                    self._disk[page:stop] = self._disk[page:stop].replace(b"\0", b"\1")
                elif not self._disk[page]:
                    self._disk[page] = _DATA
                state = self._disk[page]
        return state == _ZERO

    def _install(self, page: int, buf: bytearray | None, transient: bool) -> None:
        """Caller holds lock; buf is the page as on disk now (None: zeros). Parked sectors go
        back in."""
        sectors = range(page * SECTORS_PER_PAGE, (page + 1) * SECTORS_PER_PAGE)
        if buf is not None and buf != _ZERO_PAGE:  # zero pages stay unbacked zeros: no RAM
            self._meta[page * PAGE : (page + 1) * PAGE] = buf
            for s in sectors:
                if not sector_ok(self._meta, s) and not self._has_parked(s):
                    self.bad_sectors.add(s)
        parked, flying = self.parked, self._flying
        if parked or flying:
            for s in sectors:
                if s in parked or s in flying:
                    self._unpark(s)
        group = page // self._step
        if group in self.cache:
            self.cache.touch(group)
        else:
            self.cache.add(group, cold=transient)
        self.loaded[page] = 1  # after the cache knows it: a lock-free reader touches it
        if transient:
            self._transient.add(page)

    def _has_parked(self, sector: int) -> bool:
        return sector in self.parked or sector in self._flying

    def _parked_enc(self, sector: int) -> bytes | None:
        """Caller holds lock. The newest copy of an unloaded page's sector not yet on disk:
        parked (changed since the flush that is writing it took it), else being written."""
        enc = self.parked.get(sector)
        return self._flying.get(sector) if enc is None else enc

    def _unloaded_record(self, unit: int, page: int) -> int | None:
        """A record on an unloaded page, when RAM knows it: its sector's parked copy, or 0
        on a page that is zeros on disk. None: the page must be read. Random writes over a
        large disk meet pages never written: answered so, they cost no page and no eviction."""
        self._zero_on_disk(page)  # learn it once (one lseek for a run of holes)
        with self.lock:
            if self.loaded[page]:
                return None  # another request loaded it: read it there
            enc = self._parked_enc(unit // RECS_PER_SECTOR)
            if enc is None and self._disk[page] != _ZERO:
                return None
        self.cache.hits += 1  # answered without a read: a hit, as a loaded page's would be
        return 0 if enc is None else parked_record(enc, unit % RECS_PER_SECTOR)

    def record_locked(self, unit: int) -> int:
        """Caller holds lock: the unit's raw record, loaded or not (a page is read, under
        the lock, only if a flush wrote its parked sector since the caller looked)."""
        page = unit // UNITS_PER_PAGE
        if not self.loaded[page]:
            enc = self._parked_enc(unit // RECS_PER_SECTOR)
            if enc is not None:
                return parked_record(enc, unit % RECS_PER_SECTOR)
            if self._disk[page] == _ZERO:
                return 0
            self._load_locked(page)
        if self.bad_sectors and unit // RECS_PER_SECTOR in self.bad_sectors:
            self.raise_bad(unit)
        return self.words[word_index(unit)]

    def _set_unloaded(self, unit: int, page: int, rec: int) -> bool:
        """Caller holds lock; the unit's page is unloaded. Park the record in its sector's
        compact copy (True), or load the page for set to change (False): a zero page while
        the cache has room (it is cheaper to change in place from then on), a page whose
        sector is on disk only."""
        s = unit // RECS_PER_SECTOR
        old = self.parked.get(s)
        enc = self._flying.get(s) if old is None else old
        if self._disk[page] == _ZERO and self.cache.used() < self.cache.low:
            self._install(page, None, False)  # zeros and the parked sectors: no read
            return False
        if enc is None:
            if self._disk[page] != _ZERO:
                self._load_locked(page)
                return False
            enc = b""
        new = self.parked[s] = park_record(enc, unit % RECS_PER_SECTOR, rec)
        self.cache.parked += len(new) - (len(old) if old is not None else -PARK_OVERHEAD)
        return True

    def _unpark(self, sector: int) -> None:
        """Caller holds lock; the sector's page is being loaded. Its parked records are newer
        than the disk's: they go back into the page, and the sector is dirty again."""
        enc = self.parked.pop(sector, None)
        if enc is None:
            enc = self._flying.get(sector)  # being written: the flush keeps its copy
            if enc is None:
                return
        else:
            self.cache.parked -= len(enc) + PARK_OVERHEAD
        base = sector * SECTOR + 8
        self._meta[base : base + _RECS] = decode_parked(enc)
        self.dirty.add(sector)

    def _park(self, sectors: range) -> None:
        """Caller holds lock. Copy a group's changed sectors out before it is unloaded."""
        self._gen += 1
        changed = self.dirty.intersection(sectors)
        self.dirty -= changed
        added = 0
        for s in changed:
            base = s * SECTOR + 8
            enc = self.parked[s] = encode_parked(self._meta[base : base + _RECS])
            added += len(enc) + PARK_OVERHEAD
        self.cache.parked += added

    def transient_pages(self) -> int:
        return len(self._transient)

    def drop_transient(self) -> None:
        """Unload the clean pages the pass loaded (their records are on disk), so a pass over
        the whole map keeps a bounded number resident. The caller guarantees that no request
        is reading records (the store holds its I/O gate exclusively)."""
        with self.lock:
            for group in sorted({p // self._step for p in self._transient}):
                if not self._pinned(group):
                    self._unload(group)  # else not on disk yet: a later flush writes it
            self._transient.clear()

    def evict(self, keep: int) -> int:
        """Unload groups, least recently used first, until the cache uses at most `keep`
        groups' worth (parked sectors included); returns what it uses then. Dirty sectors are
        parked while the parked ones stay within the cache's park limit; past it dirty pages
        stay, as damaged ones do, until a flush. The caller guarantees that no request is
        reading records (the store holds its I/O gate exclusively)."""
        cache = self.cache
        with self.lock:
            for group in cache.coldest():
                if cache.used() <= keep:
                    break
                pages = self._pages(group)
                sectors = range(pages.start * SECTORS_PER_PAGE, pages.stop * SECTORS_PER_PAGE)
                if self.bad_sectors and not self.bad_sectors.isdisjoint(sectors):
                    continue
                if not self.dirty.isdisjoint(sectors):
                    worst = len(sectors) * (_RECS + PARK_OVERHEAD)  # bound first: cheap
                    if cache.parked + worst > cache.park_limit:
                        worst = sum(s in self.dirty for s in sectors) * (_RECS + PARK_OVERHEAD)
                        if cache.parked + worst > cache.park_limit:
                            continue
                    self._park(sectors)
                self._unload(group, pages)
            return cache.used()

    def _pages(self, group: int) -> range:
        return range(group * self._step, min((group + 1) * self._step, len(self.loaded)))

    def _pinned(self, group: int) -> bool:
        """Caller holds lock. A page whose records are not on disk (or not trusted) stays."""
        pages = self._pages(group)
        sectors = range(pages.start * SECTORS_PER_PAGE, pages.stop * SECTORS_PER_PAGE)
        return not (self.dirty.isdisjoint(sectors) and self.bad_sectors.isdisjoint(sectors))

    def _unload(self, group: int, pages: range | None = None) -> None:
        """Caller holds lock. Give the memory back; the next use reads the page again."""
        pages = self._pages(group) if pages is None else pages
        self.loaded[pages.start : pages.stop] = bytes(len(pages))
        self._meta.madvise(mmap.MADV_DONTNEED, pages.start * PAGE, len(pages) * PAGE)
        self.cache.forget(group)

    def raw(self, unit: int) -> int:
        """The record as stored; a record whose sector failed its checksum is never trusted."""
        page = unit // UNITS_PER_PAGE
        if self.loaded[page]:
            self.cache.hits += 1  # unlocked: a lost count only blurs the hit rate
            self.cache.touch(page // self._step)
        else:
            rec = self._unloaded_record(unit, page)
            if rec is not None:
                return rec
            self.load_page(page)
        s, i = divmod(unit, RECS_PER_SECTOR)  # word_index, inlined: this is the hot path
        if self.bad_sectors and s in self.bad_sectors:
            self.raise_bad(unit)
        return self.words[s * WORDS_PER_SECTOR + 2 + i]

    def raise_bad(self, unit: int) -> None:
        sector = unit // RECS_PER_SECTOR
        raise StoreIOError(
            f"map sector {sector} (units from byte "
            f"{sector * RECS_PER_SECTOR * self._geo.unit_size}) failed its "
            "checksum; run `savepoint inspect --check`"
        )

    def set(self, unit: int, rec: int) -> None:
        """Caller holds lock. A unit on an unloaded page is parked when it can be (no page,
        no eviction later): see _set_unloaded."""
        page = unit // UNITS_PER_PAGE
        if not self.loaded[page] and self._set_unloaded(unit, page, rec):
            return  # (an unloaded page has no damaged sector: those pin their page)
        if unit // RECS_PER_SECTOR in self.bad_sectors:
            self.raise_bad(unit)
        self.words[word_index(unit)] = rec
        self.dirty.add(unit // RECS_PER_SECTOR)

    def fill(self, first: int, end: int, rec: int) -> None:
        """Set units first..end-1 to one record. Caller holds lock."""
        pattern = rec.to_bytes(4, "little")
        unit = first
        while unit < end:
            n = min(RECS_PER_SECTOR - unit % RECS_PER_SECTOR, end - unit)
            b = word_index(unit) * 4
            self._meta[b : b + 4 * n] = pattern * n
            self.dirty.add(unit // RECS_PER_SECTOR)
            unit += n

    def uniform(self, first: int, end: int) -> int | None:
        """The raw record shared by units first..end-1 (compared in C), or None if they differ.

        Sequential I/O mostly meets runs of identical records: never written, all written in
        one epoch, or all normalised. One comparison per map sector replaces a Python loop.
        """
        s, i = divmod(first, RECS_PER_SECTOR)
        n = end - first
        if (
            n <= RECS_PER_SECTOR - i
            and self.loaded[first // UNITS_PER_PAGE]
            and not self.bad_sectors
        ):  # the common case: one sector, already loaded
            self.cache.hits += 1
            self.cache.touch(first // UNITS_PER_PAGE // self._step)
            w = (s * WORDS_PER_SECTOR + 2 + i) * 4
            raw4 = self._meta[w : w + 4]
            return int.from_bytes(raw4, "little") if self._meta[w : w + 4 * n] == raw4 * n else None
        for page in range(first // UNITS_PER_PAGE, (end - 1) // UNITS_PER_PAGE + 1):
            if not self.loaded[page]:
                self.load_page(page)
            else:
                self.cache.touch(page // self._step)
        if self.bad_sectors and any(
            s in self.bad_sectors
            for s in range(first // RECS_PER_SECTOR, (end - 1) // RECS_PER_SECTOR + 1)
        ):
            return None
        raw = self.words[word_index(first)]
        return raw if self.uniform_loaded(first, end, raw) else None

    def uniform_loaded(self, first: int, end: int, raw: int) -> bool:
        """Whether units first..end-1 (loaded) all hold `raw`. Lock-free: no page loads."""
        pattern = raw.to_bytes(4, "little")
        unit = first
        while unit < end:
            n = min(RECS_PER_SECTOR - unit % RECS_PER_SECTOR, end - unit)
            w = word_index(unit) * 4
            if self._meta[w : w + 4 * n] != pattern * n:
                return False
            unit += n
        return True

    def count_stale(self, first: int, end: int, epoch: int) -> int:
        """Records of units first..end-1 with 0 < wepoch < epoch (loaded). Caller holds lock."""
        n = 0
        for u in range(first, end):
            w = self.words[word_index(u)] & WEPOCH_MASK
            n += 0 < w < epoch
        return n
