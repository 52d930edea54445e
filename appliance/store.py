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
"""

from __future__ import annotations

import fcntl
import mmap
import threading
import time
import uuid as uuidlib
from collections.abc import Iterator
from contextlib import contextmanager

from appliance.backing import Backing, FileBacking
from appliance.store_format import (
    FLAG_HOST_SYNCED,
    HAS0_BIT,
    HAS1_BIT,
    HIST_REC,
    MAX_EPOCH,
    PAGE,
    RECS_PER_SECTOR,
    RESTORE,
    SAVE,
    SB_OFFSETS,
    SB_SIZE,
    SECTOR,
    SECTORS_PER_PAGE,
    UNITS_PER_PAGE,
    VSM_BIT,
    WEPOCH_MASK,
    WORDS_PER_SECTOR,
    FormatError,
    HistoryRecord,
    Superblock,
    seal_sector,
    sector_ok,
    unpack_history,
    unpack_superblock,
)

HAS = (HAS0_BIT, HAS1_BIT)
_STRIPES = 64


class StoreError(Exception):
    """Base of every store error; the message says what happened and what to do."""


class NotAStoreError(StoreError):
    pass


class FormatVersionError(StoreError):
    pass


class CorruptStoreError(StoreError):
    pass


class OutOfRangeError(StoreError):
    pass


class StoreIOError(StoreError):
    pass


class _Gate:
    """Many I/O requests at once, or one SAVE/RESTORE alone; a waiting command goes first."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.active = 0
        self._exclusive = False
        self._waiting = 0

    def enter(self) -> None:
        with self._cond:
            while self._exclusive or self._waiting:
                self._cond.wait()
            self.active += 1

    def leave(self) -> None:
        with self._cond:
            self.active -= 1
            if not self.active:
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._exclusive or self.active:
                self._cond.wait()
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


def _word(unit: int) -> int:
    """Index of a unit's record in the map viewed as u32 words (2 header words per sector)."""
    s, i = divmod(unit, RECS_PER_SECTOR)
    return s * WORDS_PER_SECTOR + 2 + i


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
        # Anonymous mmap: zero pages cost no RAM until a map page is loaded from disk.
        self._meta = mmap.mmap(-1, g.meta_len)
        self._words = memoryview(self._meta).cast("I")
        self._loaded = bytearray(g.meta_len // PAGE)
        self._bad_sectors: set[int] = set()
        self._dirty: set[int] = set()
        self._ring = bytearray(g.hist_cap * HIST_REC)
        self._b.pread_into(memoryview(self._ring), g.hist_off)
        self._saved_epochs = bytearray(g.hist_cap)  # 1 where epoch e % cap ended with SAVE
        self._gate = _Gate()
        self._meta_lock = threading.Lock()
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]
        self._flush_lock = threading.Lock()
        self._zero_unit = bytes(self.unit_size)
        self._pass_pos = 0
        self._pass_start = self.epoch
        self._pending = 0
        self.dirty_units, self.dirty_bytes = self.sb.dirty_units, self.sb.dirty_bytes
        self._closed = False
        self._unsynced = False  # data written since the last sync
        self._load_history()

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
        found: list[Superblock] = []
        problems: list[str] = []
        for off in SB_OFFSETS:
            raw = bytearray(SB_SIZE)
            self._b.pread_into(memoryview(raw), off)
            try:
                found.append(unpack_superblock(bytes(raw)))
            except FormatError as e:
                problems.append(str(e))
        if found:
            return max(found, key=lambda sb: sb.seq)
        if any("newer" in p for p in problems):
            raise FormatVersionError(f"this store was written by a newer Savepoint ({problems}); "
                                     "upgrade Savepoint to use it")
        if all(p == "no Savepoint magic" for p in problems):
            raise NotAStoreError("this is not a Savepoint store (no Savepoint signature found); "
                                 "create one with `savepoint init`")
        raise CorruptStoreError(f"both superblock copies are damaged ({'; '.join(problems)}); "
                                "the store cannot be trusted. `savepoint inspect --check` "
                                "shows more")

    def _load_history(self) -> None:
        """Index how each recent epoch ended; repair the newest ring record from the superblock."""
        last = unpack_history(self.sb.last_record)
        if last is not None and self._ring_record(last.epoch) != last:
            off = self._ring_off(last.epoch)
            self._ring[off:off + HIST_REC] = self.sb.last_record  # a slice of a slice is a copy
            if not self.readonly:
                self._b.pwrite(self.sb.last_record, self.geo.hist_off + self._ring_off(last.epoch))
                self._b.sync()
        for e in range(self.sb.resolved_below, self.epoch):
            rec = self._ring_record(e)
            if rec is None:
                raise CorruptStoreError(f"history record of epoch {e} is missing or damaged, and "
                                        "units still depend on it; run `savepoint inspect --check`")
            self._saved_epochs[e % self.geo.hist_cap] = rec.action == SAVE
        self._pending = self.sb.pending_units

    def _ring_off(self, epoch: int) -> int:
        return (epoch % self.geo.hist_cap) * HIST_REC

    def _ring_record(self, epoch: int) -> HistoryRecord | None:
        off = self._ring_off(epoch)
        rec = unpack_history(memoryview(self._ring)[off:off + HIST_REC])
        return rec if rec is not None and rec.epoch == epoch else None

    # ----- the map ----------------------------------------------------------------------------

    def _load_page(self, page: int) -> None:
        with self._meta_lock:
            if self._loaded[page]:
                return
            view = memoryview(self._meta)[page * PAGE:(page + 1) * PAGE]
            self._b.pread_into(view, self.geo.meta_off + page * PAGE)
            for s in range(page * SECTORS_PER_PAGE, (page + 1) * SECTORS_PER_PAGE):
                if not sector_ok(self._meta, s):
                    self._bad_sectors.add(s)
            self._loaded[page] = 1

    def _record(self, unit: int) -> int:
        """The unit's record, normalised to the current epoch (not written back)."""
        if not self._loaded[unit // UNITS_PER_PAGE]:
            self._load_page(unit // UNITS_PER_PAGE)
        rec = self._words[_word(unit)]
        if self._bad_sectors and unit // RECS_PER_SECTOR in self._bad_sectors:
            self._raise_bad(unit)  # a record that failed its checksum is never trusted
        w = rec & WEPOCH_MASK
        if w and w != self.epoch:
            if self._saved_epochs[w % self.geo.hist_cap]:
                rec ^= VSM_BIT
            rec &= ~WEPOCH_MASK
        return rec

    def _raise_bad(self, unit: int) -> None:
        raise StoreIOError(f"map sector {unit // RECS_PER_SECTOR} (units of bytes from "
                           f"{unit // RECS_PER_SECTOR * RECS_PER_SECTOR * self.unit_size}) failed "
                           "its checksum; run `savepoint inspect --check`")

    def _set_record(self, unit: int, rec: int) -> None:
        """Caller holds _meta_lock."""
        if unit // RECS_PER_SECTOR in self._bad_sectors:
            self._raise_bad(unit)
        self._words[_word(unit)] = rec
        self._dirty.add(unit // RECS_PER_SECTOR)

    def _route(self, rec: int) -> tuple[int, bool]:
        """(slot to read, whether that slot holds data) for a normalised record."""
        slot = (rec >> 31) ^ ((rec & WEPOCH_MASK) == self.epoch)
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
        self._check_range(offset, len(buf))
        self._gate.enter()
        try:
            self._read_locked(offset, buf)
        except OSError as e:
            raise StoreIOError(f"I/O error on the backing storage: {e}") from e
        finally:
            self._gate.leave()

    def _uniform(self, first: int, end: int) -> int | None:
        """The raw record shared by units first..end-1 (compared in C), or None if they differ.

        Sequential I/O mostly meets runs of identical records: never written, all written in
        one epoch, or all normalised. One comparison per map sector replaces a Python loop.
        """
        for page in range(first // UNITS_PER_PAGE, (end - 1) // UNITS_PER_PAGE + 1):
            if not self._loaded[page]:
                self._load_page(page)
        w0 = _word(first)
        raw = self._words[w0]
        pattern = raw.to_bytes(4, "little")
        unit = first
        while unit < end:
            n = min(RECS_PER_SECTOR - unit % RECS_PER_SECTOR, end - unit)
            w = _word(unit) * 4
            if self._meta[w:w + 4 * n] != pattern * n:
                return None
            unit += n
        if self._bad_sectors and not self._bad_sectors.isdisjoint(
                range(first // RECS_PER_SECTOR, (end - 1) // RECS_PER_SECTOR + 1)):
            return None  # every sector of the run, not only its ends
        return raw

    def _read_locked(self, offset: int, buf: memoryview, saved: bool = False) -> None:
        """Fill buf from the visible disk, or from the saved image when saved=True."""
        us, g = self.unit_size, self.geo
        first, end_unit = offset // us, -(-(offset + len(buf)) // us)
        if end_unit - first > 2 and self._uniform(first, end_unit) is not None:
            rec = self._record(first)
            slot, has = self._route(rec)
            if saved:
                slot = rec >> 31
                has = bool(rec & HAS[slot])
            if has:
                self._b.pread_into(buf, g.slot_off[slot] + offset)
            else:
                buf[:] = bytes(len(buf))
            return
        pos, end = offset, offset + len(buf)
        run_phys, run_start = -1, 0  # coalesce reads that are contiguous on disk
        while pos < end:
            unit, within = divmod(pos, us)
            n = min(us - within, end - pos)
            rec = self._record(unit)
            slot, has = self._route(rec)
            if saved:
                slot = rec >> 31
                has = bool(rec & HAS[slot])
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
        self._refuse_readonly()
        view = memoryview(data)
        self._check_range(offset, len(view))
        with self._io():
            self._write_locked(offset, view)
            with self._meta_lock:
                self.dirty_bytes += len(view)
        if fua:
            self.flush()

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
        raw = self._uniform(first, end)
        if raw is None:
            return False
        rec = self._record(first)
        sec = (rec >> 31) ^ 1
        self._write_data(view, self.geo.slot_off[sec] + first * self.unit_size)
        new = (rec & ~WEPOCH_MASK) | HAS[sec] | self.epoch
        if raw == new:
            return True
        pattern = new.to_bytes(4, "little")
        with self._meta_lock:  # data written first, records after: see the module docstring
            w = raw & WEPOCH_MASK
            if w and w < self.epoch:
                self._pending -= end - first
            if w != self.epoch:
                self.dirty_units += end - first
            unit = first
            while unit < end:
                n = min(RECS_PER_SECTOR - unit % RECS_PER_SECTOR, end - unit)
                b = _word(unit) * 4
                self._meta[b:b + 4 * n] = pattern * n
                self._dirty.add(unit // RECS_PER_SECTOR)
                unit += n
        return True

    def _write_units(self, offset: int, view: memoryview) -> None:
        us, g, epoch = self.unit_size, self.geo, self.epoch
        pos, end = offset, offset + len(view)
        while pos < end:
            unit, within = divmod(pos, us)
            n = min(us - within, end - pos)
            rec = self._record(unit)
            sec = (rec >> 31) ^ 1
            fresh = (rec & WEPOCH_MASK) != epoch
            if fresh or not rec & HAS[sec]:
                self._first_write(unit, within, view[pos - offset:pos - offset + n])
            else:
                self._write_data(view[pos - offset:pos - offset + n],
                                 g.slot_off[sec] + unit * us + within)
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
            with self._meta_lock:
                self._mark_written(unit, rec, (rec & ~WEPOCH_MASK) | HAS[sec] | self.epoch)

    def _mark_written(self, unit: int, old: int, new: int) -> None:
        """Caller holds _meta_lock. old is the normalised record the write started from."""
        raw = self._words[_word(unit)] & WEPOCH_MASK
        if raw and raw < self.epoch:
            self._pending -= 1
        if (old & WEPOCH_MASK) != self.epoch:
            self.dirty_units += 1
        self._set_record(unit, new)

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
            with self._meta_lock:
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
                with self._meta_lock:
                    self._mark_written(unit, rec, (rec & ~WEPOCH_MASK & ~HAS[sec]) | self.epoch)

    def block_status(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """Runs of (offset, length, reads_as_zero) covering the range, for NBD BLOCK_STATUS."""
        self._check_range(offset, length)
        runs: list[tuple[int, int, bool]] = []
        pos, end, us = offset, offset + length, self.unit_size
        with self._io():
            while pos < end:
                unit, within = divmod(pos, us)
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
            with self._meta_lock:  # snapshot: these records only describe completed writes
                sectors = sorted(self._dirty)
                self._dirty.clear()
                for s in sectors:
                    seal_sector(self._meta, s)
                image = {s: bytes(self._meta[s * SECTOR:(s + 1) * SECTOR]) for s in sectors}
                counters = {"dirty_units": self.dirty_units, "dirty_bytes": self.dirty_bytes,
                            "pending_units": max(self._pending, 0)}
            if self._unsynced:
                self._unsynced = False
                self._b.sync()  # data first: a durable record never points at unwritten data
            stale = any(getattr(self.sb, k) != v for k, v in counters.items())
            if not sectors and advance_resolved is None and not stale:
                return
            for start, blob in _coalesce(image):
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

    def save(self, source: str, host_synced: bool = False) -> dict[str, object]:
        """The working copies become the saved state: one history record, one epoch bump."""
        return self._commit(SAVE, source, FLAG_HOST_SYNCED if host_synced else 0)

    def restore(self, source: str) -> dict[str, object]:
        """Forget everything written since the last SAVE/RESTORE: one record, one epoch bump."""
        return self._commit(RESTORE, source, 0)

    def _commit(self, action: int, source: str, flags: int) -> dict[str, object]:
        self._refuse_readonly()
        with self._gate.exclusive():
            try:
                if self.epoch + 1 - self.sb.resolved_below >= self.geo.hist_cap:
                    self._finish_pass_now()  # the ring is about to forget an epoch still in use
                if self.epoch >= MAX_EPOCH:
                    raise StoreError("the store has used every epoch number; re-create it")
                if action == SAVE:
                    self._flush_locked()
                return self._append_history(action, source, flags).as_dict()
            except OSError as e:
                raise StoreIOError(f"I/O error during {source} command: {e}") from e

    def _append_history(self, action: int, source: str, flags: int) -> HistoryRecord:
        now = time.time_ns()
        rec = HistoryRecord(self.epoch, action, now, self.dirty_units, self.dirty_bytes,
                            source, flags)
        raw = rec.pack()
        off = self._ring_off(self.epoch)
        self._b.pwrite(raw, self.geo.hist_off + off)
        stamp = {"last_save_ns": now} if action == SAVE else {"last_restore_ns": now}
        # The superblock is the commit point; it carries the record in case the ring write tore.
        pending = max(self._pending, 0) + self.dirty_units
        self._write_superblock(self.sb.next(epoch=self.epoch + 1, dirty_units=0, dirty_bytes=0,
                                            pending_units=pending, last_record=raw, **stamp))
        self._ring[off:off + HIST_REC] = raw
        self._saved_epochs[self.epoch % self.geo.hist_cap] = action == SAVE
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
            if not self._loaded[page]:
                self._load_page(page)
            with self._meta_lock:
                for u in range(unit, page_end):
                    raw = self._words[_word(u)]
                    w = raw & WEPOCH_MASK
                    if w and w < epoch and u // RECS_PER_SECTOR not in self._bad_sectors:
                        self._set_record(u, self._record(u))
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
        recs = (self._ring_record(e) for e in range(first, self.epoch))
        return [r.as_dict() for r in recs if r is not None]

    @property
    def io_active(self) -> int:
        return self._gate.active

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


def _coalesce(image: dict[int, bytes]) -> Iterator[tuple[int, bytes]]:
    """Join consecutive sectors so a flush issues few large writes."""
    run: list[bytes] = []
    start = prev = -2
    for s in sorted(image):
        if s != prev + 1 and run:
            yield start, b"".join(run)
            run = []
        if not run:
            start = s
        run.append(image[s])
        prev = s
    if run:
        yield start, b"".join(run)

from appliance.store_init import InitError, create_store  # noqa: E402,F401  (re-export)
