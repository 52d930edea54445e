"""The VSM store: two slots per unit, a map saying which is saved, O(1) SAVE and RESTORE.

Every unit has a 32-bit map record (store_format): the VSM bit, a "holds data" bit per slot,
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
spread over several files. The gate (io_gate), the map (unit_map), the history (history_ring)
and the format (store_format) live apart.
"""

from __future__ import annotations

import fcntl
import threading
import time
import uuid as uuidlib
from collections.abc import Iterator
from contextlib import contextmanager

from appliance.backing import Backing, FileBacking
from appliance.history_ring import HistoryRing
from appliance.io_gate import IoGate
from appliance.store_errors import (
    CorruptStoreError,
    FormatVersionError,
    NotAStoreError,
    OutOfRangeError,
    StoreError,
    StoreIOError,
)
from appliance.store_format import (
    FLAG_HOST_SYNCED,
    HAS0_BIT,
    HAS1_BIT,
    MAX_EPOCH,
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
from appliance.store_init import InitError, create_store
from appliance.unit_map import UnitMap, word_index

__all__ = ["Store", "create_store", "InitError", "StoreError", "NotAStoreError",
           "FormatVersionError", "CorruptStoreError", "OutOfRangeError", "StoreIOError"]

HAS = (HAS0_BIT, HAS1_BIT)
_STRIPES = 64


class Store:
    """A store opened for I/O. Thread-safe; see store_api in the docs for the contract."""

    def __init__(self, backing: Backing, readonly: bool = False) -> None:
        self._b = backing
        self.readonly = readonly
        self.sb = self._read_superblock()
        g = self.geo = self.sb.geometry
        if backing.size < g.total_size:
            raise CorruptStoreError(
                f"the store needs {g.total_size} bytes but its target has only {backing.size}; "
                "it was truncated or copied incompletely")
        self.size, self.unit_size, self.epoch = g.logical_size, g.unit_size, self.sb.epoch
        self.map = UnitMap(backing, g)
        self.ring = HistoryRing(backing, g)
        self._gate = IoGate()
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]
        self._flush_lock = threading.Lock()
        self._zero_unit = bytes(self.unit_size)
        self._pass_pos = 0
        self._pass_start = self.epoch
        self._pending = 0
        self.dirty_units, self.dirty_bytes = self.sb.dirty_units, self.sb.dirty_bytes
        self._closed = False
        self._unsynced = False  # data written since the last sync
        self.ring.repair(self.sb.last_record, writable=not readonly)
        self.ring.index(self.sb.resolved_below, self.epoch)
        self._pending = self.sb.pending_units

    # ----- opening --------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str, readonly: bool = False) -> Store:
        try:
            backing = FileBacking(path, readonly=readonly)
        except FileNotFoundError:
            raise NotAStoreError(f"{path} does not exist; create it with `savepoint init "
                                 f"{path} --size SIZE`") from None
        try:
            fcntl.flock(backing.fd, (fcntl.LOCK_SH if readonly else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            if not readonly:
                backing.close()
                raise StoreError(f"{path} is in use by another Savepoint process; stop it "
                                 "first (or talk to it with the savepoint CLI)") from None
        try:
            return cls(backing, readonly=readonly)
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
            raise FormatVersionError(f"this store was written by a newer Savepoint ({problems}); "
                                     "upgrade Savepoint to use it")
        if all(p == "no Savepoint magic" for p in problems):
            raise NotAStoreError("this is not a Savepoint store (no Savepoint signature found); "
                                 "create one with `savepoint init`")
        raise CorruptStoreError(f"both superblock copies are damaged ({'; '.join(problems)}); "
                                "the store cannot be trusted. `savepoint inspect --check` "
                                "shows more")

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
            raise OutOfRangeError(f"request at {offset}+{length} is outside the disk "
                                  f"(0..{self.size})")

    @contextmanager
    def _io(self) -> Iterator[None]:
        self._gate.enter()
        try:
            yield
        except OSError as e:
            raise StoreIOError(f"I/O error on the backing storage: {e}") from e
        finally:
            self._gate.leave()

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
        if end_unit - first == 1 or (end_unit - first > 2 and
                                     self.map.uniform(first, end_unit) is not None):
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
                buf[dst:dst + n] = self._zero_unit[:n]
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
            if 0 < n and within + n <= self.unit_size:
                self._write_in_unit(unit, within, data)
            else:
                self._write_locked(offset, memoryview(data))
            with self.map.lock:
                self.dirty_bytes += n
        except OSError as e:
            raise StoreIOError(f"I/O error on the backing storage: {e}") from e
        finally:
            self._gate.leave()
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
            if self._write_run(first, end_unit, view[head:len(view) - tail]):
                if head:
                    self._write_units(offset, view[:head])
                if tail:
                    self._write_units(end_unit * us, view[len(view) - tail:])
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
            self._write_data(view, self.geo.slot_off[sec] + first * self.unit_size)
            with self.map.lock:  # data written first, records after: see the module docstring
                w = raw & WEPOCH_MASK
                if w and w < self.epoch:
                    self._pending -= end - first
                if w != self.epoch:
                    self.dirty_units += end - first
                self.map.fill(first, end, new)
        return True

    @contextmanager
    def _stripes_for(self, first: int, end: int) -> Iterator[None]:
        """Hold the stripe locks of units first..end-1, taken in one global order."""
        locks = self._stripes if end - first >= _STRIPES else \
            [self._stripes[i] for i in sorted({u % _STRIPES for u in range(first, end)})]
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
            self._write_in_unit(unit, within, view[pos - offset:pos - offset + n])
            pos += n

    def _write_data(self, data: bytes | bytearray | memoryview, phys: int) -> None:
        self._b.pwrite(data, phys)
        # Only after the write returned: a flush that clears this flag syncs after it.
        self._unsynced = True

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
                    self._b.pread_into(memoryview(whole), self.geo.slot_off[prim] +
                                       unit * self.unit_size)
                whole[within:within + len(chunk)] = chunk
                self._write_data(whole, phys)
            else:
                self._write_data(chunk, phys)
            with self.map.lock:
                self._mark_written(unit, rec, (rec & ~WEPOCH_MASK) | HAS[sec] | self.epoch)

    def _mark_written(self, unit: int, old: int, new: int) -> None:
        """Caller holds map.lock. old is the normalised record the write started from."""
        raw = self.map.words[word_index(unit)] & WEPOCH_MASK  # loaded: the caller read it
        if raw and raw < self.epoch:
            self._pending -= 1
        if (old & WEPOCH_MASK) != self.epoch:
            self.dirty_units += 1
        self.map.set(unit, new)

    def trim(self, offset: int, length: int) -> None:
        """Working state reads zeros until RESTORE; the saved copy is untouched."""
        self.write_zeroes(offset, length, punch=True)

    def write_zeroes(self, offset: int, length: int, fua: bool = False,
                     punch: bool = False) -> None:
        self._refuse_readonly()
        self._check_range(offset, length)
        us = self.unit_size
        first_full, end_full = -(-offset // us), (offset + length) // us
        with self._io():
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
                    self._b.discard(g.slot_off[sec] + unit * us, us)
                    self._unsynced = True
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
        with self._flush_lock:
            with self.map.lock:  # snapshot: these records only describe completed writes
                runs = self.map.take_dirty()
                counters = {"dirty_units": self.dirty_units, "dirty_bytes": self.dirty_bytes,
                            "pending_units": max(self._pending, 0)}
            if self._unsynced:
                self._unsynced = False
                self._b.sync()  # data first: a durable record never points at unwritten data
            stale = any(getattr(self.sb, k) != v for k, v in counters.items())
            if not runs and advance_resolved is None and not stale:
                return
            for start, blob in runs:
                self._b.pwrite(blob, self.geo.meta_off + start * SECTOR)
            if advance_resolved is not None:
                self._b.sync()  # normalised records durable before the ring may forget epochs
            changes: dict[str, object] = dict(counters)
            if advance_resolved is not None:
                changes["resolved_below"] = advance_resolved
            self._write_superblock(self.sb.next(**changes))

    def _write_superblock(self, sb: Superblock) -> None:
        self._b.pwrite(sb.pack(), SB_OFFSETS[sb.seq % 2])
        self._b.sync()
        self.sb = sb

    # ----- SAVE and RESTORE -------------------------------------------------------------------

    def save(self, source: str, host_synced: bool = False,
             settle: tuple[int, int] | None = None) -> dict[str, object]:
        """The working copies become the saved state: one history record, one epoch bump.
        `settle` is (flag bits, quiet deciseconds) from the wait for a quiet host."""
        bits, quiet = settle or (0, 0)
        return self._commit(SAVE, source, bits | (FLAG_HOST_SYNCED if host_synced else 0), quiet)

    def restore(self, source: str) -> dict[str, object]:
        """Forget everything written since the last SAVE/RESTORE: one record, one epoch bump."""
        return self._commit(RESTORE, source, 0)

    def _commit(self, action: int, source: str, flags: int, quiet: int = 0) -> dict[str, object]:
        self._refuse_readonly()
        with self._gate.exclusive():
            try:
                if self.epoch + 1 - self.sb.resolved_below >= self.geo.hist_cap:
                    self._finish_pass_now()  # the ring is about to forget an epoch still in use
                if self.epoch >= MAX_EPOCH:
                    raise StoreError("the store has used every epoch number; re-create it")
                if action == SAVE:
                    self._flush_locked()
                return self._append_history(action, source, flags, quiet).as_dict()
            except OSError as e:
                raise StoreIOError(f"I/O error during {source} command: {e}") from e

    def _append_history(self, action: int, source: str, flags: int,
                        quiet: int = 0) -> HistoryRecord:
        now = time.time_ns()
        rec = HistoryRecord(self.epoch, action, now, self.dirty_units, self.dirty_bytes,
                            source, flags, quiet)
        raw = self.ring.write(rec)
        stamp = {"last_save_ns": now} if action == SAVE else {"last_restore_ns": now}
        # The superblock is the commit point; it carries the record in case the ring write tore.
        pending = max(self._pending, 0) + self.dirty_units
        self._write_superblock(self.sb.next(epoch=self.epoch + 1, dirty_units=0, dirty_bytes=0,
                                            pending_units=pending, last_record=raw, **stamp))
        self.ring.committed(rec)
        self._pending = pending
        self.epoch += 1
        self.dirty_units = self.dirty_bytes = 0
        return rec

    # ----- the background pass (claims 19-20) -------------------------------------------------

    def background_step(self, max_units: int = 65536) -> bool:
        """Normalise up to max_units map records; True while work remains. Call when idle."""
        if self.readonly or self.sb.resolved_below >= self.epoch:
            return False
        with self._io():
            if self._pass_pos == 0:
                self._pass_start = self.epoch
            self._pass_pos = self._normalise(self._pass_pos, max_units)
            if self._pass_pos < self.geo.unit_count:
                return True
            self._pass_pos = 0
            self._flush_locked(advance_resolved=self._pass_start)
            if self.sb.resolved_below >= self.epoch:
                self._pending = 0
            return self.sb.resolved_below < self.epoch

    def _normalise(self, unit: int, budget: int) -> int:
        """Normalise records from `unit` on; returns where to continue."""
        count, epoch = self.geo.unit_count, self.epoch
        while unit < count and budget > 0:
            page = unit // UNITS_PER_PAGE
            page_end = min((page + 1) * UNITS_PER_PAGE, count)
            if not self.map.loaded[page]:
                self.map.load_page(page)
            with self.map.lock:
                for u in range(unit, page_end):
                    raw = self.map.words[word_index(u)]
                    w = raw & WEPOCH_MASK
                    if w and w < epoch and u // RECS_PER_SECTOR not in self.map.bad_sectors:
                        self.map.set(u, self._record(u))
                        self._pending -= 1
            budget -= page_end - unit
            unit = page_end
        return unit

    def _finish_pass_now(self) -> None:
        self._pass_start, self._pass_pos = self.epoch, 0
        self._normalise(0, self.geo.unit_count)
        self._flush_locked(advance_resolved=self._pass_start)

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
            "last_save": self.sb.last_save_ns / 1e9 or None,
            "last_restore": self.sb.last_restore_ns / 1e9 or None,
            "uuid": str(uuidlib.UUID(bytes=self.sb.uuid)),
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
