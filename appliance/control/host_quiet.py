"""Is the host still writing? What a SAVE waits for, and what its history record says.

A SAVE in the middle of the host's writes captures the disk as if the host lost power then:
FAT can be left with a FAT and directories that disagree. So a SAVE waits until the host has
written nothing for `settle` seconds, at most `max_wait` seconds (docs/controls.md).

Where the host's writes are seen:
- off a Pi (`serve`), the NBD sessions count every WRITE, TRIM and WRITE_ZEROES (`wrote`);
- on a Pi the gadget's writes land in the Pi's page cache of /dev/nbdN seconds before they
  reach the NBD server, so the gadget sets `counter` to the mass-storage kernel thread's
  byte count (/proc/<pid>/io `wchar`, bumped by every WRITE(10) the host sends).
A FLUSH reaching the NBD server (`flushed`) is the host's SYNCHRONIZE CACHE (f_mass_storage
fsyncs its file for it, and for an eject or PREVENT ALLOW MEDIUM REMOVAL): the host synced
when no write came after it. The appliance's own syncs are not the host's (`own_flush`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

SAMPLE = 0.1  # seconds between looks at the counter while a SAVE waits
IDLE_SAMPLE = 0.25  # the same while nobody waits (so "quiet for" is known at any SAVE)


@dataclass(frozen=True)
class QuietReport:
    """What a SAVE knew when it committed."""

    quiet: float  # seconds since the host's last write (at least; since start-up if none)
    waited: float  # seconds the SAVE waited for it
    synced: bool | None  # SYNCHRONIZE CACHE / eject since the last write; None: cannot tell
    forced: bool = False  # a second press or --now cut the wait short
    busy: bool = False  # max_wait passed with the host still writing


class HostActivity:
    """Counters the NBD sessions bump (from their threads) and the SAVE reads."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.writes = 0  # NBD write requests, all sessions (only "did it change" matters)
        self.counter: Callable[[], int | None] = lambda: self.writes
        self.clock = clock
        self._last: int | None = None
        self._last_change = clock()
        self._synced_at: int | None = 0  # counter at the host's last flush
        self._own = 0

    def use(self, counter: Callable[[], int | None] | None) -> None:
        """Count the host's writes with `counter` (None: the NBD sessions' own count)."""
        self.counter = counter or (lambda: self.writes)
        self._last = None
        self._synced_at = self.counter()

    def wrote(self) -> None:
        self.writes += 1

    def flushed(self) -> None:
        if not self._own:
            self._synced_at = self.counter()

    @contextlib.contextmanager
    def own_flush(self) -> Iterator[None]:
        """The appliance's own sync (SAVE, RESTORE): its FLUSH is not the host's."""
        self._own += 1
        try:
            yield
        finally:
            self._own -= 1

    def sample(self) -> float:
        """Seconds the host has been quiet, as of now."""
        value, now = self.counter(), self.clock()
        if value != self._last:
            if self._last is not None:
                self._last_change = now
            self._last = value
        return now - self._last_change

    def synced(self) -> bool | None:
        value = self.counter()
        if value is None:
            return None
        return self._synced_at == value

    async def watch(self) -> None:
        """Sample forever, so a SAVE knows how long the host had been quiet before it came."""
        while True:
            self.sample()
            await asyncio.sleep(IDLE_SAMPLE)

    async def wait_quiet(self, settle: float, max_wait: float, hurry: asyncio.Event) -> QuietReport:
        """Return once the host was quiet for `settle` s, `hurry` is set, or `max_wait` passed."""
        start = self.clock()
        while True:
            quiet, waited = self.sample(), self.clock() - start
            if settle <= 0 or quiet >= settle:
                return QuietReport(quiet, waited, self.synced())
            if hurry.is_set() or waited >= max_wait:
                return QuietReport(
                    quiet, waited, self.synced(), forced=hurry.is_set(), busy=not hurry.is_set()
                )
            with contextlib.suppress(TimeoutError):
                step = min(SAMPLE, settle - quiet, max(0.0, max_wait - waited)) + 0.001
                await asyncio.wait_for(hurry.wait(), step)


def kthread_wchar(name: str = "file-storage", proc: str = "/proc") -> Callable[[], int | None]:
    """A counter of the bytes the named kernel thread wrote: f_mass_storage's host writes.

    The thread is found again when it is gone (the gadget re-bound); None while there is none.
    """
    from pathlib import Path

    root = Path(proc)
    pid: list[str] = []

    def find() -> str | None:
        for comm in root.glob("[0-9]*/comm"):
            with contextlib.suppress(OSError):
                if comm.read_text().strip() == name:
                    return comm.parent.name
        return None

    def read() -> int | None:
        for _ in range(2):
            if not pid:
                found = find()
                if found is None:
                    return None
                pid.append(found)
            try:
                for line in (root / pid[0] / "io").read_text().splitlines():
                    if line.startswith("wchar:"):
                        return int(line.split()[1])
            except (OSError, ValueError):
                pass
            pid.clear()
        return None

    return read
