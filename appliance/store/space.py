"""Space on the store's backing file: allocation, punching dead slots, and "storage full".

The rules (docs/format.md, "Allocation and punching"): everything a command writes is
allocated at init (and on a read-write open of an older store), so a full file system fails
data writes only and SAVE/RESTORE always work. A slot is *dead* when its unit's normalised
record does not route to it; the background pass punches (gives back) the dead slot of every
record it normalises, and after a RESTORE the pages in RAM are reclaimed first, so a store
that filled its disk recovers with one RESTORE. A punch only gives space back: one that fails
is logged once per errno, counted and shown as a fault, and its span is owed (one range of
units, bounded) for a later step to walk again after a back-off. A data write that meets
ENOSPC raises StoreFullError (NBD answers ENOSPC) and sets the "full" state, which clears by
itself once the file system has room again (`poll`).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from appliance.store.backing import Backing
from appliance.store.errors import StoreFullError, StoreIOError
from appliance.store.filesystem import (
    FULL_HINT,
    NO_FALLOCATE,
    PUNCH_HINT,
    allocate_metadata,
    allocated,
    fs_free,
    human,
)
from appliance.store.format import RECS_PER_SECTOR, UNITS_PER_PAGE, WEPOCH_MASK, Geometry

if TYPE_CHECKING:
    from appliance.store import Store

log = logging.getLogger("savepoint.store")

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
RESUME_FREE = 16 << 20  # free bytes that end the "full" state: room for a burst of writes
QUIET = 2.0  # seconds without ENOSPC before the state may end (no flapping under a quota)
PUNCH_RETRY, PUNCH_RETRY_MAX = 30.0, 3600.0  # seconds before a failed punch is tried again


class StoreSpace:
    """The space side of one open store: allocation report, punching, the "full" state."""

    def __init__(self, backing: Backing, geo: Geometry, readonly: bool) -> None:
        self._b, self._geo = backing, geo
        fd = backing.fd
        self.kind = (
            "memory" if fd is None else ("file" if stat.S_ISREG(os.fstat(fd).st_mode) else "block")
        )
        # Block devices have nothing to give back; simulated backings punch like files.
        self.punching = self.kind != "block" and not readonly
        self.punched_bytes = 0  # given back since the store was opened
        self.full_reason = ""  # non-empty while the backing storage is full
        self.full_since: float | None = None
        self.clock: Callable[[], float] = time.monotonic
        self._last_full = 0.0  # clock() of the last ENOSPC
        self.listeners: list[Callable[[], None]] = []  # told when the full state changes
        self._lock = threading.Lock()
        self._reclaim_page: int | None = None  # next map page to reclaim after a RESTORE
        self._reclaiming = False  # reclaim_step punches whole pages itself
        # [lo, hi): units whose dead slots a failed (or overflowing) punch may have left
        self._owed: tuple[int, int] | None = None
        self._walk: list[int] | None = None  # [next, end] of the walk through an owed range
        self._walk_failed = False
        self._retry_at = 0.0  # clock() when the owed range may be walked
        self._retry_delay = PUNCH_RETRY
        self.punch_fault = ""  # non-empty while a punch failed and its span is still owed
        self.punch_failures = 0
        self._punch_logged: set[int] = set()  # errnos already logged
        if self.kind == "file" and not readonly:
            self._allocate_on_open()

    def _allocate_on_open(self) -> None:
        """An in-place upgrade of a store created before metadata was preallocated."""
        fd = self._b.fd
        assert fd is not None
        try:
            grown = allocate_metadata(fd, self._geo)
        except OSError as e:
            if e.errno in NO_FALLOCATE:
                log.warning(
                    "this file system cannot preallocate the store's metadata: a full "
                    "file system could stop SAVE (RESTORE still works)"
                )
            else:  # never refuse to open: RESTORE is how a full disk recovers
                log.warning(
                    "could not allocate the store's metadata (%s): SAVE may fail "
                    "until the file system has room; RESTORE still works",
                    e,
                )
            return
        if grown:
            log.info(
                "allocated %s for the store's superblocks, history and map, so a full "
                "file system cannot stop SAVE or RESTORE (in-place upgrade of a store "
                "created by an older Savepoint)",
                human(grown),
            )

    # ----- errors -------------------------------------------------------------------------

    def io_error(self, e: OSError, what: str = "I/O error on the backing storage") -> StoreIOError:
        """The store error for an OSError; ENOSPC also enters the "full" state."""
        if e.errno not in FULL_ERRNOS:
            return StoreIOError(f"{what}: {e}")
        free = self._free()
        reason = (
            f"backing storage full: {human(free) if free is not None else 'no space'} "
            "free on the file system of the store"
        )
        with self._lock:
            changed = not self.full_reason
            self.full_reason, self.full_since = reason, self.full_since or time.time()
            self._last_full = self.clock()
        if changed:
            log.warning("%s; writes fail with ENOSPC until space is freed: %s", reason, FULL_HINT)
            self._tell()
        return StoreFullError(f"{reason} ({e}); {FULL_HINT}")

    def poll(self) -> bool:
        """End the "full" state once the file system has room again; True if it is full.

        A file: RESUME_FREE bytes free and no ENOSPC for QUIET seconds. Anything else (a
        thin-provisioned device, a simulator) cannot say how much is free: QUIET seconds
        without ENOSPC end it, and the next ENOSPC starts it again.
        """
        if not self.full_reason or self.clock() - self._last_full < QUIET:
            return bool(self.full_reason)
        free = self._free()
        if free is not None and free < RESUME_FREE:
            return True
        with self._lock:
            self.full_reason, self.full_since = "", None
        log.info(
            "backing storage has room again%s: writes work again",
            f" ({human(free)} free)" if free is not None else "",
        )
        self._tell()
        return False

    def _tell(self) -> None:
        for listener in list(self.listeners):
            try:
                listener()
            except Exception:  # a listener's bug must not fail the store's I/O
                log.exception("storage listener failed")

    def _free(self) -> int | None:
        if self.kind != "file" or self._b.fd is None:
            return None
        try:
            return fs_free(self._b.fd)
        except OSError:
            return None

    # ----- punching -----------------------------------------------------------------------

    def punch_dead(self, store: Store, first: int, end: int, later: bool = False) -> None:
        """Give back the dead slots of units first..end-1, a range the pass just normalised
        records in: the secondary of every unit not written this epoch is dead (normalised
        now or long ago), so one call covers a run of units sharing the dead slot.

        The store's stripe locks are held from the check to the punch: a unit becomes
        "written this epoch" only under its stripe lock, and only such a unit's secondary is
        live, so no write can land in a slot between the check and its punch. The caller is
        inside the store's I/O gate, so the epoch cannot change meanwhile either. A span with a
        stripe a writer holds is owed, never waited for (the pass must not slow I/O down, and
        may run inside a write in tests), as is a span whose punch failed: retry_step walks it
        again later, checked at whatever the epoch is by then.

        later: the pass runs under load (a nearly full history ring), so the span is owed too
        unless the storage is full: a punch can hold every writer of the file back for as
        long as the disk takes (stripe locks; ext4 also takes the file's inode lock).
        """
        if not self.punching or first >= end or self._reclaiming:
            return
        if later and not self.full_reason:
            self._owe(first, end)
            return
        if not self._locked_punch(store, first, end):
            self._owe(first, end)  # a writer holds a stripe: a later step walks it again

    def _locked_punch(self, store: Store, first: int, end: int) -> bool:
        """False if a writer holds one of the span's stripes (nothing was punched)."""
        stripes = store._stripes
        locks = (
            stripes
            if end - first >= len(stripes)
            else [stripes[i] for i in sorted({u % len(stripes) for u in range(first, end)})]
        )
        taken = []
        try:
            for lock in locks:
                if not lock.acquire(blocking=False):
                    return False
                taken.append(lock)
            if not self._punch_run(store, first, end):
                self._owe(first, end, failed=True)
            return True
        finally:
            for lock in reversed(taken):
                lock.release()

    def _punch_run(self, store: Store, first: int, end: int) -> bool:
        """Punch the dead slots of first..end-1; False if a punch failed (the rest is left)."""
        epoch, us, slot_off = store.epoch, store.unit_size, self._geo.slot_off
        if end - first > 1 and store.map.uniform(first, end) is not None:
            slot = self._dead_slot(store._record(first), epoch)  # sequential writes: one check
            return slot < 0 or self._discard(slot_off[slot] + first * us, (end - first) * us)
        run_slot, run_start, bad = -1, first, store.map.bad_sectors
        for u in range(first, end + 1):
            slot = -1
            if u < end and not (bad and u // RECS_PER_SECTOR in bad):  # untrusted: leave it
                slot = self._dead_slot(store._record(u), epoch)
            if slot != run_slot:
                if run_slot >= 0 and not self._discard(
                    slot_off[run_slot] + run_start * us, (u - run_start) * us
                ):
                    return False
                run_slot, run_start = slot, u
        return True

    def undo_write(self, offset: int, length: int) -> None:
        """Give back what a failed write into a dead slot allocated (ENOSPC half-way): no
        record names the slot (the caller holds its stripe locks), so nothing reads it."""
        if self.punching:
            self.give_back(offset, length)

    def give_back(self, offset: int, length: int) -> bool:
        """Punch a byte range of a slot that reads no longer need (a failed write's blocks, a
        trimmed working copy); a failure is a fault and owes the units, never an error."""
        if self._discard(offset, length):
            return True
        us, n = self._geo.unit_size, self._geo.unit_count
        for base in self._geo.slot_off:
            if base <= offset < base + n * us:
                self._owe((offset - base) // us, -(-(offset + length - base) // us), failed=True)
        return False

    # ----- punch faults and the owed range ------------------------------------------------

    def _discard(self, offset: int, length: int) -> bool:
        """The backing's hole punch; False (logged, counted, a fault) if it failed."""
        try:
            self._b.discard(offset, length)
        except OSError as e:
            self._punch_failed(e)
            return False
        self.punched_bytes += length
        return True

    def _punch_failed(self, e: OSError) -> None:
        code = e.errno or 0
        reason = (
            f"backing cannot free space: {errno.errorcode.get(code, code)} ({e.strerror or e}); "
            "the store still works, its file may grow"
        )
        with self._lock:
            self.punch_failures += 1
            changed, self.punch_fault = reason != self.punch_fault, reason
            first = code not in self._punch_logged
            self._punch_logged.add(code)
        if first:
            log.warning("%s: %s", reason, PUNCH_HINT)
        if changed:
            self._tell()

    def _owe(self, first: int, end: int, failed: bool = False) -> None:
        """Remember units whose dead slots may still hold blocks: one range, so bounded (a
        walk may then visit units that need nothing; punching those again changes nothing)."""
        with self._lock:
            lo, hi = self._owed or (first, end)
            self._owed = (min(lo, first), max(hi, end))
            if failed:  # else due at the next step (after a failure's back-off, if any)
                self._retry_at = max(self._retry_at, self.clock() + self._retry_delay)
                self._walk_failed = True

    def retry_due(self) -> bool:
        """Whether retry_step has work now: a walk under way, or an owed range, backed off."""
        return self.punching and (
            self._walk is not None or (self._owed is not None and self.clock() >= self._retry_at)
        )

    def retry_step(self, store: Store, budget: int) -> bool:
        """Walk about `budget` units of the owed range (in map pages the pass may drop again),
        punching their dead slots; False if there was nothing to do. The caller is inside
        the store's I/O gate with the pass lock held, as for the pass itself."""
        if not self.retry_due():
            return False
        if self._walk is None:
            with self._lock:
                assert self._owed is not None
                self._walk, self._owed, self._walk_failed = list(self._owed), None, False
        walk = self._walk
        while walk[0] < walk[1] and budget > 0:
            page = walk[0] // UNITS_PER_PAGE
            stop = min((page + 1) * UNITS_PER_PAGE, walk[1])
            if not store.map.loaded[page]:
                store.map.load_page(page, transient=True)
            self.punch_dead(store, walk[0], stop)
            budget -= stop - walk[0]
            walk[0] = stop
            if store.map.cache.over():
                break
        if walk[0] >= walk[1]:
            self._walked()
        return True

    def _walked(self) -> None:
        """A walk through the owed range ended: clear the fault, or back off further."""
        self._walk = None
        with self._lock:
            if self._walk_failed:
                self._retry_delay = min(2 * self._retry_delay, PUNCH_RETRY_MAX)
                self._retry_at = self.clock() + self._retry_delay
                return
            self._retry_delay = PUNCH_RETRY
            cleared = self._owed is None and bool(self.punch_fault)
            if cleared:
                self.punch_fault = ""
        if cleared:
            log.info("the backing frees space again: the store's file shrinks back")
            self._tell()

    @staticmethod
    def _dead_slot(rec: int, epoch: int) -> int:
        """The slot of a normalised record to punch, or -1: the secondary of a unit not
        written this epoch (whatever its "holds data" bit says: a write-zeroes or a failed
        write leaves blocks that no bit records)."""
        return -1 if (rec & WEPOCH_MASK) == epoch else (rec >> 31) ^ 1

    def restored(self) -> None:
        """A RESTORE committed (durably): reclaim the map pages in RAM before the full pass."""
        self._reclaim_page = 0

    def reclaim_step(self, store: Store, budget: int) -> bool:
        """Normalise (and so punch) about `budget` units of loaded map pages; False if none.

        Every unit written since the store was opened sits in a loaded page, so this finds
        the discarded writes of a RESTORE without reading the whole map; units written before
        the daemon started are reclaimed by the ordinary pass. Every unit of such a page not
        written this epoch gets its secondary punched, not only the ones just normalised: a
        write that failed half-way (ENOSPC) left data in slots its records never named.
        """
        page = self._reclaim_page
        if page is None or not self.punching:
            return False
        loaded, count = store.map.loaded, self._geo.unit_count
        page = loaded.find(1, page)
        did = False
        while page >= 0 and budget > 0:
            first = page * UNITS_PER_PAGE
            n = min(UNITS_PER_PAGE, count - first)
            self._reclaiming = True
            try:
                store._normalise(first, n)
            finally:
                self._reclaiming = False
            self.punch_dead(store, first, first + n)
            budget -= UNITS_PER_PAGE
            did = True
            page = loaded.find(1, page + 1)
        self._reclaim_page = None if page < 0 else page
        return did

    # ----- reporting ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Allocation and free space; `margin` < 0 means the store may outgrow its file system."""
        self.poll()
        full = self._geo.total_size
        info: dict[str, Any] = {
            "backing": self.kind,
            "full_size": full,
            "full": bool(self.full_reason),
            "full_reason": self.full_reason,
            "punched_bytes": self.punched_bytes,
            "punch_fault": self.punch_fault,
            "punch_failures": self.punch_failures,
        }
        fd = self._b.fd
        if self.kind == "file" and fd is not None:
            used, free = allocated(fd), fs_free(fd)
            info.update(
                allocated_bytes=used, fs_free_bytes=free, margin_bytes=free - max(0, full - used)
            )
        elif self.kind == "block":
            info.update(allocated_bytes=full)
        return info
