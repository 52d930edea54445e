"""An in-memory Backing that can lose power: the crash-testing layer for the store.

`CrashBacking` (a `MemoryBacking` of tests/support.py) behaves like a regular file behind a page
cache. Every pwrite and discard
lands at once in `image` (what reads see) but stays *volatile* until the next sync. A
power cut (`power_cut`) keeps everything synced and treats each volatile write
independently: lost, applied, or torn (a random subset of its 512-byte sectors applied),
the survivors applied in random order. A sector therefore ends up holding its synced content
or the content it had right after one of the volatile writes, exactly as writeback of a page
cache can leave it (a sub-sector write carries the whole sector as it was in the cache).

`cut_at=k` makes the k-th backing operation (pwrite, discard or sync) the moment the power
goes: a pwrite/discard is still recorded (volatile, so the cut may keep or drop it), a sync is
not performed, and PowerCut is raised, so the cut can land in the middle of a store command.
Every later operation raises PowerCut too: the process is dead.

`inject` makes an operation fail with an OSError (EIO, ENOSPC...) instead, once or until
`heal`: a failed pwrite/discard leaves a random subset of its sectors applied (volatile, as a
short write or a half-done writeback would), a failed sync makes nothing durable (the writes
stay volatile; a later sync makes them durable), a failed pread leaves the buffer untouched.
The process lives on: the store sees the error and the test goes on with retries.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from appliance.store.format import DEFAULT_HIST_CAP
from tests.support import MemoryBacking, new_store_image

SECTOR = 512
Guard = Callable[[str, int, int], None]  # (kind, offset, length), called before each write


class PowerCut(Exception):
    """The simulated power went away; the store object that saw it must be dropped."""


OPS = ("pread", "pwrite", "sync", "discard")


@dataclass
class Fault:
    """Fail the `after`-th matching operation from now on (and every later one if persistent)."""

    kinds: frozenset[str]
    err: int = errno.EIO
    after: int = 1
    persistent: bool = False
    fired: int = 0  # operations failed so far

    def hits(self, kind: str) -> bool:
        if kind not in self.kinds:
            return False
        if self.after > 1:
            self.after -= 1
            return False
        if self.fired and not self.persistent:
            return False
        self.fired += 1
        return True


class CrashBacking(MemoryBacking):
    """Byte-addressed storage in a bytearray with page-cache-like volatility (fd = None)."""

    def __init__(
        self, image: bytearray, cut_at: int | None = None, guard: Guard | None = None
    ) -> None:
        super().__init__(image)
        self.cut_at = cut_at
        self.guard = guard
        self.ops = 0  # pwrite + discard + sync calls so far
        self.writes = 0
        self.syncs = 0
        self.dead = False
        self._base: dict[int, bytes] = {}  # sector -> synced content, for sectors touched since
        self._pending: list[tuple[int, bytes]] = []  # (first sector, sectors right after write)
        self.fault: Fault | None = None
        self.rng = random.Random(0)  # which sectors of a failed write land

    # ----- faults -----------------------------------------------------------------------------

    def inject(
        self,
        kinds: Iterable[str] = OPS,
        err: int = errno.EIO,
        after: int = 1,
        persistent: bool = False,
    ) -> Fault:
        self.fault = Fault(frozenset(kinds), err, after, persistent)
        return self.fault

    def heal(self) -> None:
        self.fault = None

    def _failing(self, kind: str) -> OSError | None:
        """Caller holds the lock."""
        if self.fault is None or not self.fault.hits(kind):
            return None
        return OSError(self.fault.err, f"simulated {os.strerror(self.fault.err)} on {kind}")

    def _apply_some(self, data: bytes, offset: int) -> None:
        """A failed write: each sector of it may have landed (volatile) or not."""
        for s in range(offset // SECTOR, -(-(offset + len(data)) // SECTOR)):
            if self.rng.random() < 0.5:
                a, b = max(offset, s * SECTOR), min(offset + len(data), (s + 1) * SECTOR)
                self._apply(data[a - offset : b - offset], a)

    # ----- the Backing protocol ---------------------------------------------------------------

    def _read_fault(self) -> None:
        """Caller holds _lock: raise what a read meets now (a cut, or an injected fault)."""
        if self.dead:
            raise PowerCut("read after the power cut")
        err = self._failing("pread")
        if err:
            raise err

    def pread_into(self, buf: memoryview, offset: int) -> None:
        with self._lock:
            self._read_fault()
            self._read(buf, offset)

    def next_data(self, offset: int) -> int:
        """Fails as a read does (the map's miss asks it instead of reading a zero page)."""
        with self._lock:
            self._read_fault()
        return super().next_data(offset)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        with self._lock:
            cut = self._tick()
            self.writes += 1
            if self.guard:
                self.guard("pwrite", offset, len(data))
            err = None if cut else self._failing("pwrite")
            if err:
                self._apply_some(bytes(data), offset)
                raise err
            self._apply(bytes(data), offset)
        if cut:
            raise PowerCut(f"power cut during pwrite #{self.ops} at {offset}+{len(data)}")

    def discard(self, offset: int, length: int) -> None:
        """Punch a hole: reads as zeros at once, durable only after a sync (like pwrite)."""
        with self._lock:
            cut = self._tick()
            if self.guard:
                self.guard("discard", offset, length)
            err = None if cut else self._failing("discard")
            if err:
                self._apply_some(bytes(length), offset)
                raise err
            if length > 0:
                self._apply(bytes(length), offset)
        if cut:
            raise PowerCut(f"power cut during discard #{self.ops} at {offset}+{length}")

    def sync(self) -> None:
        with self._lock:
            cut = self._tick()
            err = None if cut else self._failing("sync")
            if err:
                raise err
            if not cut:
                self.syncs += 1
                self._base.clear()
                self._pending.clear()
        if cut:
            raise PowerCut(f"power cut during sync #{self.ops}")

    # ----- crashing ---------------------------------------------------------------------------

    def _tick(self) -> bool:
        if self.dead:
            raise PowerCut("the power is already off")
        self.ops += 1
        if self.cut_at is not None and self.ops >= self.cut_at:
            self.dead = True
            return True
        return False

    def _apply(self, data: bytes, offset: int) -> None:
        if offset < 0 or offset + len(data) > self.size:
            raise OSError(f"write at {offset}+{len(data)} beyond the {self.size}-byte backing")
        first, end = offset // SECTOR, -(-(offset + len(data)) // SECTOR)
        for s in range(first, end):
            if s not in self._base:
                self._base[s] = bytes(self.image[s * SECTOR : (s + 1) * SECTOR])
        super()._apply(data, offset)
        self._pending.append((first, bytes(self.image[first * SECTOR : end * SECTOR])))

    @property
    def volatile_writes(self) -> int:
        return len(self._pending)

    def power_cut(self, rng: random.Random) -> CrashBacking:
        """The image a power cut leaves now, as a fresh backing with nothing volatile."""
        image = bytearray(self.image)
        for s, content in self._base.items():
            image[s * SECTOR : (s + 1) * SECTOR] = content
        pending = list(self._pending)
        rng.shuffle(pending)
        for first, blob in pending:
            fate = rng.random()
            if fate < 1 / 3:
                continue  # lost
            count = len(blob) // SECTOR
            for i in range(count):
                if fate < 2 / 3 or rng.random() < 0.5:  # applied whole, or torn
                    s = first + i
                    image[s * SECTOR : (s + 1) * SECTOR] = blob[i * SECTOR : (i + 1) * SECTOR]
        return CrashBacking(image)

    def durable_image(self) -> bytearray:
        """What is guaranteed to survive: the image as of the last sync."""
        image = bytearray(self.image)
        for s, content in self._base.items():
            image[s * SECTOR : (s + 1) * SECTOR] = content
        return image


def new_backing(
    size: int, unit: int = 4096, hist_cap: int = DEFAULT_HIST_CAP, **kwargs: object
) -> CrashBacking:
    return CrashBacking(new_store_image(size, unit, hist_cap), **kwargs)  # type: ignore[arg-type]
