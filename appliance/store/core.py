"""The VSM store: two slots per unit, a map saying which is saved, O(1) SAVE and RESTORE.

Every unit has a 32-bit map record (store/format.py): the VSM bit, a "holds data" bit per slot,
and the epoch of the last write to its secondary slot (wepoch). A unit is in the DDM (written
since the last SAVE/RESTORE) when wepoch == epoch. A record with 0 < wepoch < epoch is brought
up to date lazily: if epoch `wepoch` ended with SAVE its secondary became primary (VSM flips),
if it ended with RESTORE the secondary is forgotten. So a command only appends one history
record and bumps the epoch; `background_step` and the next write normalise the map later.

Crash safety rests on three orders (docs/format.md has the proofs):
- a unit's record is changed in RAM only after its data write returned, and flush() syncs the
  data before it writes map sectors, so a durable record never points at unwritten data;
- the superblock is the commit point of SAVE/RESTORE and embeds the history record it adds;
- saved slots are never written: writes go to the secondary slot only.

This module is longer than the project's ~400-line norm on purpose: the write, flush, commit
and background paths share those orders and the stripe/map locks, and one proof should not be
spread over several files. The gate (io_gate.py), the map (unit_map.py), the history
(history_ring.py) and the format (format.py) live apart, beside it in appliance/store/.
"""

from __future__ import annotations

import fcntl
import logging
import threading
import time
import uuid as uuidlib
from collections.abc import Iterator
from contextlib import contextmanager

from appliance.store import cache as store_cache
from appliance.store.backing import Backing, FileBacking
from appliance.store.errors import (
    CorruptStoreError,
    FormatVersionError,
    NotAStoreError,
    OutOfRangeError,
    StoreError,
    StoreFullError,
    StoreIOError,
)
from appliance.store.format import (
    FLAG_HOST_SYNCED,
    HAS0_BIT,
    HAS1_BIT,
    MAX_EPOCH,
    PAGE,
    RECS_PER_SECTOR,
    RESTORE,
    SAVE,
    SB_OFFSETS,
    SB_SIZE,
    SECTOR,
    UNITS_PER_PAGE,
    VSM_BIT,
    WEPOCH_MASK,
    HistoryRecord,
    Superblock,
    superblock_copies,
)
from appliance.store.history_ring import HistoryRing
from appliance.store.init import InitError, create_store
from appliance.store.io_gate import IoGate
from appliance.store.space import StoreSpace
from appliance.store.unit_map import UnitMap, word_index

__all__ = [
    "Store",
    "create_store",
    "InitError",
    "StoreError",
    "NotAStoreError",
    "FormatVersionError",
    "CorruptStoreError",
    "OutOfRangeError",
    "StoreIOError",
    "StoreFullError",
]

HAS = (HAS0_BIT, HAS1_BIT)
_STRIPES = 64
PASS_SLICE = 8192  # units per background step a waiting command runs: a few ms of map work
# The pass writes what it normalised when its pages pass a quarter of the map cache (2,048
# pages by default: all of an 8 GiB store's map, so one flush at the end) or, once it changed
# PASS_FLUSH_MIN sectors, the cache's low mark: each flush's syncs stall allocating writes.
PASS_FLUSH_MIN = 1024  # map sectors (128 pages)
PASS_FLUSH_SECTORS = 65536  # and at the latest every 32 MiB of map sectors it changed
PASS_RESIDENT_PAGES = 8192  # map pages the pass may keep loaded beyond what I/O loaded, at most
PASS_DROP_WAIT = 0.02  # seconds the pass waits for an idle moment to drop its pages
FLUSH_SEAL_CHUNK = 64  # map sectors a flush seals per map-lock hold (writers wait for it)
log = logging.getLogger("savepoint.store")


class Store:
    """A store opened for I/O. Thread-safe; see store_api in the docs for the contract."""

    def __init__(
        self, backing: Backing, readonly: bool = False, map_cache: int | None = None
    ) -> None:
        """map_cache: the map cache's budget in bytes (None: store_cache.DEFAULT_BUDGET)."""
        self._b = backing
        self.readonly = readonly
        self.sb = self._read_superblock()
        g = self.geo = self.sb.geometry
        if backing.size < g.total_size:
            raise CorruptStoreError(
                f"the store needs {g.total_size} bytes but its target has only {backing.size}; "
                "it was truncated or copied incompletely"
            )
        self.size, self.unit_size, self.epoch = g.logical_size, g.unit_size, self.sb.epoch
        self.map = UnitMap(
            backing, g, store_cache.DEFAULT_BUDGET if map_cache is None else map_cache
        )
        self.ring = HistoryRing(backing, g)
        self._gate = IoGate()
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]
        self._flush_lock = threading.Lock()
        self._shrink_lock = threading.Lock()  # one request makes room in the map cache
        self._zero_unit = bytes(self.unit_size)
        self._pass_pos = 0
        self._pass_start = self.epoch
        self._pass_lock = threading.Lock()  # one pass step at a time (daemon or a command)
        self._pass_dirtied = 0  # map sectors the pass changed since it last flushed
        # The pass also counts the map: behind its cursor (_c_pos, moved under map.lock) it
        # knows the written (_c_ddm) and pending (_c_pend) units exactly, and writes behind
        # it adjust both. At its end the counters become exact again (after a power cut they
        # are as of the last flush), so every read-write open starts with a counting pass.
        self._c_pos = self._c_ddm = self._c_pend = 0
        self._c_live = False
        self._count_due = not readonly
        self.waiting: str | None = None  # what a command waits for, for status
        self._pending = 0
        self.dirty_units, self.dirty_bytes = self.sb.dirty_units, self.sb.dirty_bytes
        self._closed = False
        self._unsynced = False  # data written since the last sync
        # A superblock write failed: its slot may hold a copy we did not mean (a command that
        # may yet commit). Nothing is written until a new superblock there settled it.
        self._unsettled = False
        self.ring.repair(self.sb.last_record, writable=not readonly)
        self.ring.index(self.sb.resolved_below, self.epoch)
        self._pending = self.sb.pending_units
        self.space = StoreSpace(backing, g, readonly)  # [space] allocation, punching, full

    # ----- opening --------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str, readonly: bool = False, map_cache: int | None = None) -> Store:
        try:
            backing = FileBacking(path, readonly=readonly)
        except FileNotFoundError:
            raise NotAStoreError(
                f"{path} does not exist; create it with `savepoint init {path} --size SIZE`"
            ) from None
        try:
            fcntl.flock(backing, (fcntl.LOCK_SH if readonly else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            if not readonly:
                backing.close()
                raise StoreError(
                    f"{path} is in use by another Savepoint process; stop it "
                    "first (or talk to it with the savepoint CLI)"
                ) from None
        try:
            return cls(backing, readonly=readonly, map_cache=map_cache)
        except BaseException:
            backing.close()
            raise

    def _read_superblock(self) -> Superblock:
        head = bytearray(2 * SB_SIZE)
        self._b.pread_into(memoryview(head), 0)
        copies = superblock_copies(bytes(head))
        found = [c for c in copies if isinstance(c, Superblock)]
        if found:
            return max(found, key=lambda sb: sb.seq)
        problems = [str(c) for c in copies]
        if any("newer" in p for p in problems):
            raise FormatVersionError(
                f"this store was written by a newer Savepoint ({problems}); "
                "upgrade Savepoint to use it"
            )
        if all(p == "no Savepoint magic" for p in problems):
            raise NotAStoreError(
                "this is not a Savepoint store (no Savepoint signature found); "
                "create one with `savepoint init`"
            )
        raise CorruptStoreError(
            f"both superblock copies are damaged ({'; '.join(problems)}); "
            "the store cannot be trusted. `savepoint inspect --check` "
            "shows more"
        )

    # ----- the map ----------------------------------------------------------------------------

    def _record(self, unit: int) -> int:
        """The unit's record, normalised to the current epoch (not written back)."""
        rec = self.map.raw(unit)
        w = rec & WEPOCH_MASK
        if w and w != self.epoch:
            if self.ring.ended_by_save(w):
                rec ^= VSM_BIT
            rec &= ~WEPOCH_MASK
        return rec

    def _route(self, rec: int, saved: bool = False) -> tuple[int, bool]:
        """(slot to read, whether that slot holds data) for a normalised record: the working
        copy if the unit was written this epoch, else (or when saved=True) the saved copy."""
        slot = (rec >> 31) ^ (not saved and (rec & WEPOCH_MASK) == self.epoch)
        return slot, bool(rec & HAS[slot])

    # ----- I/O ----------------------------------------------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfRangeError(
                f"request at {offset}+{length} is outside the disk (0..{self.size})"
            )

    @contextmanager
    def _io(self) -> Iterator[None]:
        self._gate.enter()
        try:
            yield
        except OSError as e:
            raise self.space.io_error(e) from e  # [space] ENOSPC: StoreFullError
        finally:
            self._gate.leave()
        if self.map.cache.over():
            self._shrink()

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(offset, memoryview(buf))
        return bytes(buf)

    def readinto(self, offset: int, buf: memoryview) -> None:
        n = len(buf)
        self._check_range(offset, n)
        unit, within = divmod(offset, self.unit_size)
        self._gate.enter()
        try:
            if 0 < n and within + n <= self.unit_size:  # the hot path of small random reads
                self._read_run(unit, offset, buf)
            else:
                self._read_locked(offset, buf)
        except OSError as e:
            raise StoreIOError(f"I/O error on the backing storage: {e}") from e
        finally:
            self._gate.leave()
        if self.map.cache.over():
            self._shrink()

    def _read_run(self, unit: int, offset: int, buf: memoryview, saved: bool = False) -> None:
        """Fill buf from units whose records equal `unit`'s: one slot, one contiguous read."""
        slot, has = self._route(self._record(unit), saved)
        if has:
            self._b.pread_into(buf, self.geo.slot_off[slot] + offset)
        else:
            buf[:] = bytes(len(buf))

    def _read_locked(self, offset: int, buf: memoryview, saved: bool = False) -> None:
        """Fill buf from the visible disk, or from the saved image when saved=True."""
        us, g = self.unit_size, self.geo
        first, end_unit = offset // us, -(-(offset + len(buf)) // us)
        if end_unit - first == 1 or (
            end_unit - first > 2 and self.map.uniform(first, end_unit) is not None
        ):
            return self._read_run(first, offset, buf, saved)
        pos, end = offset, offset + len(buf)
        run_phys, run_start = -1, 0  # coalesce reads that are contiguous on disk
        while pos < end:
            unit, within = divmod(pos, us)
            n = min(us - within, end - pos)
            rec = self._record(unit)
            slot, has = self._route(rec, saved)
            dst = pos - offset
            if has:
                phys = g.slot_off[slot] + unit * us + within
                if phys != run_phys + (dst - run_start) or run_phys < 0:
                    if run_phys >= 0:
                        self._b.pread_into(buf[run_start:dst], run_phys)
                    run_phys, run_start = phys, dst
            else:
                if run_phys >= 0:
                    self._b.pread_into(buf[run_start:dst], run_phys)
                    run_phys = -1
                buf[dst : dst + n] = self._zero_unit[:n]
            pos += n
        if run_phys >= 0:
            self._b.pread_into(buf[run_start:], run_phys)

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        # The hot path of small random writes: no context managers, one record lookup.
        self._refuse_readonly()
        n = len(data)
        self._check_range(offset, n)
        unit, within = divmod(offset, self.unit_size)
        self._gate.enter()
        try:
            if self._unsettled:
                self._settle()
            if 0 < n and within + n <= self.unit_size:
                self._write_in_unit(unit, within, data)
            else:
                self._write_locked(offset, memoryview(data))
            with self.map.lock:
                self.dirty_bytes += n
        except OSError as e:
            raise self.space.io_error(e) from e  # [space] ENOSPC: StoreFullError
        finally:
            self._gate.leave()
        if self.map.cache.over():
            self._shrink()
        if fua:
            self.flush()

    def _write_in_unit(self, unit: int, within: int, data: bytes | bytearray | memoryview) -> None:
        rec = self._record(unit)
        sec = (rec >> 31) ^ 1
        if (rec & WEPOCH_MASK) == self.epoch and rec & HAS[sec]:
            self._write_data(data, self.geo.slot_off[sec] + unit * self.unit_size + within)
        else:
            self._first_write(unit, within, memoryview(data))

    def _write_locked(self, offset: int, view: memoryview) -> None:
        us = self.unit_size
        first, end_unit = -(-offset // us), (offset + len(view)) // us
        if end_unit - first > 2:  # whole units in the middle: try one write for all of them
            head, tail = first * us - offset, (offset + len(view)) - end_unit * us
            if self._write_run(first, end_unit, view[head : len(view) - tail]):
                if head:
                    self._write_units(offset, view[:head])
                if tail:
                    self._write_units(end_unit * us, view[len(view) - tail :])
                return
        self._write_units(offset, view)

    def _write_run(self, first: int, end: int, view: memoryview) -> bool:
        """Write whole units first..end-1 with one pwrite if their records are uniform."""
        raw = self.map.uniform(first, end)
        if raw is None:
            return False
        rec = self._record(first)
        sec = (rec >> 31) ^ 1
        new = (rec & ~WEPOCH_MASK) | HAS[sec] | self.epoch
        if raw == new:  # rewriting this epoch's copies: no copy-up can race with it
            self._write_data(view, self.geo.slot_off[sec] + first * self.unit_size)
            return True
        with self._stripes_for(first, end):  # a partial write's copy-up must not overwrite us
            if self.map.uniform(first, end) != raw:
                return False
            self._write_fresh(view, self.geo.slot_off[sec] + first * self.unit_size)
            with self.map.lock:  # data written first, records after: see the module docstring
                w = raw & WEPOCH_MASK
                behind = max(0, min(end, self._c_pos) - first)
                if w and w < self.epoch:  # the pass may have normalised some meanwhile
                    uniform = self.map.uniform_loaded(first, end, raw)
                    self._pending -= (
                        end - first if uniform else self.map.count_stale(first, end, self.epoch)
                    )
                    if behind:
                        self._c_pend -= (
                            behind
                            if uniform
                            else self.map.count_stale(first, first + behind, self.epoch)
                        )
                if w != self.epoch:
                    self.dirty_units += end - first
                    self._c_ddm += behind
                self.map.fill(first, end, new)
        return True

    @contextmanager
    def _stripes_for(self, first: int, end: int) -> Iterator[None]:
        """Hold the stripe locks of units first..end-1, taken in one global order."""
        locks = (
            self._stripes
            if end - first >= _STRIPES
            else [self._stripes[i] for i in sorted({u % _STRIPES for u in range(first, end)})]
        )
        for lock in locks:
            lock.acquire()
        try:
            yield
        finally:
            for lock in reversed(locks):
                lock.release()

    def _write_units(self, offset: int, view: memoryview) -> None:
        us = self.unit_size
        pos, end = offset, offset + len(view)
        while pos < end:
            unit, within = divmod(pos, us)
            n = min(us - within, end - pos)
            self._write_in_unit(unit, within, view[pos - offset : pos - offset + n])
            pos += n

    def _write_data(self, data: bytes | bytearray | memoryview, phys: int) -> None:
        try:
            self._b.pwrite(data, phys)
        finally:  # only once the write returned (or failed half-way): a flush that clears
            self._unsynced = True  # this flag syncs after it

    def _write_fresh(self, data: bytes | bytearray | memoryview, phys: int) -> None:
        """_write_data into a slot no record names yet (caller holds its stripe locks)."""
        try:
            self._write_data(data, phys)
        except OSError:
            self.space.undo_write(phys, len(data))  # [space] a failed write keeps no blocks
            raise

    def _first_write(self, unit: int, within: int, chunk: memoryview) -> None:
        """Write into a secondary slot that holds nothing of this epoch yet (copy-up if partial)."""
        with self._stripes[unit % _STRIPES]:
            rec = self._record(unit)  # again, under the stripe lock: another writer may have won
            prim = rec >> 31
            sec = prim ^ 1
            current = (rec & WEPOCH_MASK) == self.epoch
            phys = self.geo.slot_off[sec] + unit * self.unit_size
            if current and rec & HAS[sec]:
                self._write_data(chunk, phys + within)
                return
            if len(chunk) < self.unit_size:
                whole = bytearray(self.unit_size)
                if not current and rec & HAS[prim]:  # copy-up: the rest comes from the saved copy
                    self._b.pread_into(
                        memoryview(whole), self.geo.slot_off[prim] + unit * self.unit_size
                    )
                whole[within : within + len(chunk)] = chunk
                self._write_fresh(whole, phys)
            else:
                self._write_fresh(chunk, phys)
            with self.map.lock:
                self._mark_written(unit, rec, (rec & ~WEPOCH_MASK) | HAS[sec] | self.epoch)

    def _mark_written(self, unit: int, old: int, new: int) -> None:
        """Caller holds map.lock. old is the normalised record the write started from."""
        raw = self.map.record_locked(unit) & WEPOCH_MASK  # loaded or parked: read it again
        behind = unit < self._c_pos
        if raw and raw < self.epoch:
            self._pending -= 1
            self._c_pend -= behind
        if (old & WEPOCH_MASK) != self.epoch:
            self.dirty_units += 1
            self._c_ddm += behind
        self.map.set(unit, new)

    def trim(self, offset: int, length: int) -> None:
        """Working state reads zeros until RESTORE; the saved copy is untouched."""
        self.write_zeroes(offset, length, punch=True)

    def write_zeroes(
        self, offset: int, length: int, fua: bool = False, punch: bool = False
    ) -> None:
        self._refuse_readonly()
        self._check_range(offset, length)
        us = self.unit_size
        first_full, end_full = -(-offset // us), (offset + length) // us
        with self._io():
            if self._unsettled:
                self._settle()
            if first_full >= end_full:
                self._write_locked(offset, memoryview(bytes(length)))
            else:
                head, tail = first_full * us - offset, offset + length - end_full * us
                if head:
                    self._write_locked(offset, memoryview(bytes(head)))
                if tail:
                    self._write_locked(end_full * us, memoryview(bytes(tail)))
                self._zero_units(first_full, end_full, punch)
            with self.map.lock:
                self.dirty_bytes += length
        if fua:
            self.flush()

    def _zero_units(self, first: int, end: int, punch: bool) -> None:
        """Mark whole units as zero in their secondary slot: a map change, no data written."""
        g, us = self.geo, self.unit_size
        for unit in range(first, end):
            with self._stripes[unit % _STRIPES]:
                rec = self._record(unit)
                sec = (rec >> 31) ^ 1
                if punch and rec & HAS[sec]:
                    try:  # [space] a failed punch is a fault, not an error: the record says
                        self.space.give_back(g.slot_off[sec] + unit * us, us)  # "no data"
                    finally:  # as in _write_data: a punch that failed half-way zeroed some
                        self._unsynced = True  # of the slot, so the next flush syncs it
                with self.map.lock:
                    self._mark_written(unit, rec, (rec & ~WEPOCH_MASK & ~HAS[sec]) | self.epoch)

    def block_status(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """Runs of (offset, length, reads_as_zero) covering the range, for NBD BLOCK_STATUS."""
        self._check_range(offset, length)
        runs: list[tuple[int, int, bool]] = []
        pos, end, us = offset, offset + length, self.unit_size
        end_unit = -(-end // us)
        with self._io():
            while pos < end:
                unit, within = divmod(pos, us)
                # Units of one map sector with identical records answer alike: one lookup.
                stop = min((unit // RECS_PER_SECTOR + 1) * RECS_PER_SECTOR, end_unit)
                if stop - unit > 1 and self.map.uniform(unit, stop) is not None:
                    n = min(stop * us, end) - pos
                else:
                    n = min(us - within, end - pos)
                zero = not self._route(self._record(unit))[1]
                if runs and runs[-1][2] == zero:
                    runs[-1] = (runs[-1][0], runs[-1][1] + n, zero)
                else:
                    runs.append((pos, n, zero))
                pos += n
                if self.map.cache.over() and pos < end:
                    break  # a shorter answer is allowed: the cache stays within its budget
        return runs

    def read_saved(self, offset: int, length: int) -> bytes:
        """The last saved image, whatever was written since (for inspection and tests)."""
        self._check_range(offset, length)
        buf = bytearray(length)
        with self._io():
            self._read_locked(offset, memoryview(buf), saved=True)
        return bytes(buf)

    # ----- durability ---------------------------------------------------------------------------

    def flush(self) -> None:
        """Make every write acknowledged before this call durable."""
        if self.readonly:
            return
        with self._io():
            self._flush_locked()

    def _flush_locked(self, advance_resolved: int | None = None) -> None:
        """Pending work (dirty sectors, unsynced data) is forgotten only once it is durable:
        if any step fails, the next flush does it all again."""
        with self._flush_lock:
            runs = self.map.take_dirty(FLUSH_SEAL_CHUNK)  # records of completed writes only
            with self.map.lock:
                counters = {
                    "dirty_units": self.dirty_units,
                    "dirty_bytes": self.dirty_bytes,
                    "pending_units": max(self._pending, 0),
                }
            try:
                self._flush_runs(runs, counters, advance_resolved)
            except BaseException:
                with self.map.lock:
                    self.map.redirty(runs)
                raise
            self.map.flushed()

    def _flush_runs(
        self, runs: list[tuple[int, bytes]], counters: dict[str, int], advance_resolved: int | None
    ) -> None:
        if self._unsynced:
            self._unsynced = False  # cleared first: a write returning meanwhile sets it again
            try:
                self._b.sync()  # data first: a durable record never points at unwritten data
            except BaseException:
                self._unsynced = True
                raise
        stale = self._unsettled or any(getattr(self.sb, k) != v for k, v in counters.items())
        if not runs and not self.map.writing_parked() and advance_resolved is None and not stale:
            return
        for start, blob in runs:
            self._b.pwrite(blob, self.geo.meta_off + start * SECTOR)
        for start, blob in self.map.flying_runs():  # parked sectors, made one run at a time
            self._b.pwrite(blob, self.geo.meta_off + start * SECTOR)
        if advance_resolved is not None:
            self._b.sync()  # normalised records durable before the ring may forget epochs
        changes: dict[str, object] = dict(counters)
        if advance_resolved is not None:
            changes["resolved_below"] = advance_resolved
        self._write_superblock(self.sb.next(**changes))

    def _write_superblock(self, sb: Superblock) -> None:
        try:
            self._b.pwrite(sb.pack(), SB_OFFSETS[sb.seq % 2])
            self._b.sync()
        except BaseException:
            self._unsettled = True
            raise
        self.sb = sb
        self._unsettled = False

    def _settle(self) -> None:
        """Caller is inside the gate. After a failed superblock write (maybe a SAVE/RESTORE
        that may yet commit if the power goes), write the state we are in over it before any
        new write, so a cut can never join later writes to that command."""
        self._gate.leave()
        try:
            with self._gate.exclusive():
                if self._unsettled:
                    self._flush_locked()
        finally:
            self._gate.enter()

    def _shrink(self) -> None:
        """The map cache is over its high-water mark: unload pages, least recently used first,
        parking the changed sectors of dirty ones (a compact copy, written by the next flush).
        When parked sectors reach their limit and keep it over, flush (data synced, then the
        map sectors: flush's own order, with requests going on as during FLUSH) and unload
        again. Unloading is done alone in the gate: no request is between its check of a
        page and its use. One request makes room at a time; the others go on unless the
        cache is at its hard limit, where they wait for it."""
        m, cache = self.map, self.map.cache
        if not self._shrink_lock.acquire(blocking=cache.used() > cache.limit):
            return
        try:
            if not cache.over():
                return
            with self._gate.exclusive():
                if m.evict(cache.low) <= cache.low or self.readonly or not (m.dirty or m.parked):
                    return  # (damaged sectors pin their pages: a few, until a check)
            self._gate.enter()
            try:
                self._flush_locked()
            except OSError as e:  # the request that got here succeeded: do not fail it
                log.warning(
                    "the map cache is over its budget and the flush that would make "
                    "room failed (%s); retrying at the next request",
                    e,
                )
                return
            finally:
                self._gate.leave()
            with self._gate.exclusive():
                m.evict(cache.low)
        finally:
            self._shrink_lock.release()

    # ----- SAVE and RESTORE -------------------------------------------------------------------

    def save(
        self, source: str, host_synced: bool = False, settle: tuple[int, int] | None = None
    ) -> dict[str, object]:
        """The working copies become the saved state: one history record, one epoch bump.
        `settle` is (flag bits, quiet deciseconds) from the wait for a quiet host."""
        bits, quiet = settle or (0, 0)
        return self._commit(SAVE, source, bits | (FLAG_HOST_SYNCED if host_synced else 0), quiet)

    def restore(self, source: str) -> dict[str, object]:
        """Forget everything written since the last SAVE/RESTORE: one record, one epoch bump."""
        return self._commit(RESTORE, source, 0)

    def _commit(self, action: int, source: str, flags: int, quiet: int = 0) -> dict[str, object]:
        self._refuse_readonly()
        while True:
            self._wait_for_ring(action)
            with self._gate.exclusive():
                if not self._ring_full():  # else a pass restarted by a racing command
                    return self._commit_locked(action, source, flags, quiet)

    def ring_free(self) -> int:
        """Commands that can commit before the background pass must have finished."""
        return self.geo.hist_cap - 1 - (self.epoch - self.sb.resolved_below)

    def pass_urgent(self) -> bool:
        """Few history records are left: the pass should run even while I/O is going on."""
        return self.sb.resolved_below < self.epoch and self.ring_free() <= max(
            1, self.geo.hist_cap // 8
        )

    def _ring_full(self) -> bool:
        return self.ring_free() <= 0

    def _wait_for_ring(self, action: int) -> None:
        """The next record would overwrite one that map records still need: finish the pass
        first, in slices, with I/O flowing between them (never the whole pass under the gate)."""
        what = "SAVE" if action == SAVE else "RESTORE"
        try:
            while self._ring_full():
                self.waiting = (
                    f"{what} waits for the background pass "
                    f"({100 * self._pass_pos // self.geo.unit_count}% done): the "
                    "history ring is full"
                )
                self.background_step(PASS_SLICE)
        finally:
            self.waiting = None

    def _commit_locked(
        self, action: int, source: str, flags: int, quiet: int = 0
    ) -> dict[str, object]:
        try:
            if self.epoch >= MAX_EPOCH:
                raise StoreError("the store has used every epoch number; re-create it")
            if self._unsettled:  # one command in doubt at a time: settle the last one
                self._flush_locked()
            if action == SAVE:
                self._flush_locked()
            rec = self._append_history(action, source, flags, quiet)
            if action == RESTORE:
                self.space.restored()  # [space] durable now: reclaim the discarded writes
            return rec.as_dict()
        except OSError as e:
            raise self.space.io_error(e, f"I/O error during {source} command") from e

    def _append_history(
        self, action: int, source: str, flags: int, quiet: int = 0
    ) -> HistoryRecord:
        now = time.time_ns()
        rec = HistoryRecord(
            self.epoch, action, now, self.dirty_units, self.dirty_bytes, source, flags, quiet
        )
        raw = self.ring.write(rec)
        stamp = {"last_save_ns": now} if action == SAVE else {"last_restore_ns": now}
        # The superblock is the commit point; it carries the record in case the ring write tore.
        pending = max(self._pending, 0) + self.dirty_units
        self._write_superblock(
            self.sb.next(
                epoch=self.epoch + 1,
                dirty_units=0,
                dirty_bytes=0,
                pending_units=pending,
                last_record=raw,
                **stamp,
            )
        )
        self.ring.committed(rec)
        self._pending = pending
        self._c_pend, self._c_ddm = self._c_pend + self._c_ddm, 0  # behind the cursor
        self.epoch += 1
        self.dirty_units = self.dirty_bytes = 0
        return rec

    # ----- the background pass (docs/format.md "Unit map") ---------------------------------------

    def background_step(self, max_units: int = 65536) -> bool:
        """Normalise up to max_units map records; True while work remains. Call when idle, or
        in a loop when pass_urgent(): I/O goes on between (and during) steps."""
        if self.readonly or not (self._pass_due() or self.space.retry_due()):
            return False
        with self._pass_lock:
            try:
                with self._io():
                    return self._pass_step(max_units)
            finally:
                if self.map.transient_pages() > self._pass_share() or not self._pass_pos:
                    # no reader between its check and use of a page; never hold I/O back
                    with self._gate.exclusive_if_idle(PASS_DROP_WAIT) as alone:
                        if alone:
                            self.map.drop_transient()

    def _pass_due(self) -> bool:
        return self.sb.resolved_below < self.epoch or self._count_due

    def _pass_step(self, max_units: int) -> bool:
        self.space.reclaim_step(self, max_units)  # [space] after RESTORE: RAM pages first
        if not self._pass_due():  # [space] then units whose punch failed or had to wait
            return self.space.retry_step(self, max_units) and self.space.retry_due()
        if self._pass_pos == 0:
            self._pass_start = self.epoch
            with self.map.lock:
                self._c_pos = self._c_ddm = self._c_pend = 0
                self._c_live = True
        self._pass_pos = self._normalise(self._pass_pos, max_units)  # may stop early: cache
        if self._pass_pos < self.geo.unit_count:
            if self._pass_flush_due():
                self._sync_outside_gate()
                self._flush_locked()  # a bounded write now (not the whole map at the end),
                self._pass_dirtied = 0  # after which the pages the pass loaded can be dropped
            return True
        self._sync_outside_gate()
        with self.map.lock:
            if self._c_live:  # the whole map is behind the cursor: the counts are exact
                self.dirty_units, self._pending = self._c_ddm, self._c_pend
                self._c_live, self._c_pos = False, 0
        self._flush_locked(advance_resolved=self._pass_start)
        self._pass_pos = 0  # only now: if the flush failed, the next step retries it
        self._count_due = False
        if self.sb.resolved_below >= self.epoch:
            self._pending = 0
        # Punches the pass owed (a nearly full ring defers them) are work too.
        return self.sb.resolved_below < self.epoch or self.space.retry_due()

    def _pass_share(self) -> int:
        """Map pages the pass may keep loaded beyond what I/O loaded: a quarter of the cache
        (whose limit counts memory pages: four map pages each on a 16 KiB-page kernel)."""
        cache = self.map.cache
        return min(PASS_RESIDENT_PAGES, cache.limit * cache.group_bytes // PAGE // 4)

    def _pass_flush_due(self) -> bool:
        """Flush seldom (each flush's syncs hold allocating writes back on ext4), but before
        the pass's pages crowd the cache: past its low mark a request would make room itself."""
        if self._pass_dirtied >= PASS_FLUSH_SECTORS:
            return True
        cache = self.map.cache
        return self.map.transient_pages() > self._pass_share() or (
            self._pass_dirtied >= PASS_FLUSH_MIN and cache.used() >= cache.low
        )

    def _sync_outside_gate(self) -> None:
        """Caller is inside the gate (a pass step) and about to flush. Sync the data written
        so far with the gate left first: a SAVE or RESTORE arriving meanwhile (and the I/O
        queued behind it) then waits for the flush's short rest, not for a sync of all the
        host wrote since the last one. An extra sync orders and forgets nothing."""
        if not self._unsynced:
            return
        self._gate.leave()
        try:
            self._b.sync()
        finally:
            self._gate.enter()

    def _normalise(self, unit: int, budget: int) -> int:
        """Normalise records from `unit` on; returns where to continue."""
        count, epoch = self.geo.unit_count, self.epoch
        while unit < count and budget > 0:
            page = unit // UNITS_PER_PAGE
            page_end = min((page + 1) * UNITS_PER_PAGE, count)
            if not self.map.loaded[page]:
                self.map.load_page(page, transient=True)
            if self._normalise_page(unit, page_end, epoch):  # [space] give back the dead
                self.space.punch_dead(self, unit, page_end, later=self.pass_urgent())  # slots
            budget -= page_end - unit
            unit = page_end
            if self.map.cache.over():
                break  # background_step makes room (flushing if it must) before the next
        return unit

    def _normalise_page(self, unit: int, end: int, epoch: int) -> int:
        """Normalise the records of one loaded page; returns how many changed. map.lock is
        taken per map sector (126 records), never for the page: on a loaded machine a thread
        can lose the CPU while it holds the lock, and every writer then waits for it."""
        m, changed = self.map, 0
        while unit < end:
            stop = min((unit // RECS_PER_SECTOR + 1) * RECS_PER_SECTOR, end)
            with m.lock:  # the page stays loaded between sectors: unloading needs the gate
                changed += self._normalise_sector(unit, stop, epoch)
            unit = stop
        return changed

    def _normalise_sector(self, unit: int, stop: int, epoch: int) -> int:
        """Caller holds map.lock; unit..stop-1 lie in one sector. A sector of identical records
        (the common case: written together, or never) takes one comparison and one fill."""
        m, before = self.map, self._pending
        if unit // RECS_PER_SECTOR in m.bad_sectors:
            return 0
        raw = m.words[word_index(unit)]
        if m.uniform_loaded(unit, stop, raw):
            w = raw & WEPOCH_MASK
            if w and w < epoch:
                m.fill(unit, stop, self._record(unit))
                self._pending -= stop - unit
        else:
            for u in range(unit, stop):
                w = m.words[word_index(u)] & WEPOCH_MASK
                if w and w < epoch:
                    m.set(u, self._record(u))
                    self._pending -= 1
        self._pass_dirtied += self._pending != before
        # Count each sector once (a step may be retried), and only at the cursor: the
        # reclaim after RESTORE normalises loaded pages ahead of it, and skipping to them
        # would leave the sectors between uncounted. In the same hold as the normalising:
        # a writer behind the cursor adjusts the counts itself.
        if unit <= self._c_pos < stop:
            self._count_sector(unit, stop, epoch)
        return before - self._pending

    def _count_sector(self, unit: int, stop: int, epoch: int) -> None:
        """Caller holds map.lock; units unit..stop-1 were just normalised."""
        m, raw = self.map, self.map.words[word_index(unit)]
        if m.uniform_loaded(unit, stop, raw):
            w = raw & WEPOCH_MASK
            self._c_ddm += (stop - unit) * (w == epoch)
            self._c_pend += (stop - unit) * (0 < w < epoch)
        else:
            for u in range(unit, stop):
                w = m.words[word_index(u)] & WEPOCH_MASK
                self._c_ddm += w == epoch
                self._c_pend += 0 < w < epoch
        self._c_pos = stop

    # ----- reporting --------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        pending = max(self._pending, 0) if self.sb.resolved_below < self.epoch else 0
        return {
            "size": self.size,
            "unit_size": self.unit_size,
            "units": self.geo.unit_count,
            "epoch": self.epoch,
            "dirty_units": self.dirty_units,
            "dirty_bytes": self.dirty_bytes,
            "pending_units": pending,
            "background_progress": (self._pass_pos / self.geo.unit_count) if pending else 1.0,
            "ring_free": self.ring_free(),
            "waiting": self.waiting,
            "last_save": self.sb.last_save_ns / 1e9 or None,
            "last_restore": self.sb.last_restore_ns / 1e9 or None,
            "uuid": str(uuidlib.UUID(bytes=self.sb.uuid)),
            "space": self.space.status(),  # [space]
            "map_cache": self.map.cache.status(),
        }

    def history(self, limit: int | None = None) -> list[dict[str, object]]:
        """History records, oldest first (at most hist_cap of them are kept)."""
        first = max(1, self.epoch - self.geo.hist_cap)
        if limit is not None:
            first = max(first, self.epoch - limit)
        return [r.as_dict() for r in self.ring.records(first, self.epoch)]

    def _refuse_readonly(self) -> None:
        if self.readonly:
            raise StoreError("the store is open read-only")

    def close(self) -> None:
        if self._closed:
            return
        if not self.readonly:
            self.flush()
        self._closed = True
        self._b.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
