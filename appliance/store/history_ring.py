"""The history ring: how each epoch ended, kept for the last hist_cap epochs (docs/format.md,
"History ring").

Only one byte per ring slot stays in RAM (did that epoch end with SAVE?); the records
themselves are read from disk when asked for, so the ring costs 64 KiB of RAM, not 4 MiB.
"""

from __future__ import annotations

from appliance.store.backing import Backing
from appliance.store.errors import CorruptStoreError
from appliance.store.format import HIST_REC, SAVE, Geometry, HistoryRecord, unpack_history


class HistoryRing:
    def __init__(self, backing: Backing, geo: Geometry) -> None:
        self._b, self._geo = backing, geo
        self._saved = bytearray(geo.hist_cap)  # 1 where epoch e % cap ended with SAVE
        self._last: HistoryRecord | None = None  # the superblock's copy of the newest record

    def _off(self, epoch: int) -> int:
        return self._geo.hist_off + (epoch % self._geo.hist_cap) * HIST_REC

    def record(self, epoch: int) -> HistoryRecord | None:
        found = self.records(epoch, epoch + 1)
        return found[0] if found else None

    def records(self, first: int, end: int) -> list[HistoryRecord]:
        """Valid records of epochs first..end-1 (at most hist_cap of them), oldest first."""
        cap = self._geo.hist_cap
        first = max(first, end - cap)
        found: list[HistoryRecord] = []
        epoch = first
        while epoch < end:  # at most two contiguous reads: before and after the ring wraps
            n = min(end - epoch, cap - epoch % cap)
            raw = bytearray(n * HIST_REC)
            self._b.pread_into(memoryview(raw), self._off(epoch))
            for i in range(n):
                rec = unpack_history(memoryview(raw)[i * HIST_REC : (i + 1) * HIST_REC])
                if rec is not None and rec.epoch == epoch + i:
                    found.append(rec)
            epoch += n
        last = self._last
        if last is not None and first <= last.epoch < end:  # read-only open of a torn ring:
            # the superblock's copy wins, as repair() makes it win on a read-write open
            found = sorted(
                [*(r for r in found if r.epoch != last.epoch), last], key=lambda r: r.epoch
            )
        return found

    def repair(self, last_raw: bytes, writable: bool) -> None:
        """The superblock carries the newest record: put it back if its ring write tore."""
        last = unpack_history(last_raw)
        if last is None or self.record(last.epoch) == last:
            return
        self._last = last  # served from RAM if the ring cannot be written (read-only open)
        if writable:
            self._b.pwrite(last_raw, self._off(last.epoch))
            self._b.sync()

    def index(self, first: int, end: int) -> None:
        """Learn how epochs first..end-1 ended; map records still depend on them."""
        recs = {r.epoch: r for r in self.records(first, end)}
        for e in range(first, end):
            if e not in recs:
                raise CorruptStoreError(
                    f"history record of epoch {e} is missing or damaged, and "
                    "units still depend on it; run `savepoint inspect --check`"
                )
            self._saved[e % self._geo.hist_cap] = recs[e].action == SAVE

    def ended_by_save(self, epoch: int) -> int:
        return self._saved[epoch % self._geo.hist_cap]

    def write(self, rec: HistoryRecord) -> bytes:
        """Write a record to its slot (not yet committed: the superblock commits it)."""
        raw = rec.pack()
        self._b.pwrite(raw, self._off(rec.epoch))
        return raw

    def committed(self, rec: HistoryRecord) -> None:
        self._saved[rec.epoch % self._geo.hist_cap] = rec.action == SAVE
