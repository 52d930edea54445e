"""The history ring: how each epoch ended (claims 54-56), kept for the last hist_cap epochs."""

from __future__ import annotations

from appliance.backing import Backing
from appliance.store_errors import CorruptStoreError
from appliance.store_format import HIST_REC, SAVE, Geometry, HistoryRecord, unpack_history


class HistoryRing:
    def __init__(self, backing: Backing, geo: Geometry) -> None:
        self._b, self._geo = backing, geo
        self._ring = bytearray(geo.hist_cap * HIST_REC)
        backing.pread_into(memoryview(self._ring), geo.hist_off)
        self._saved = bytearray(geo.hist_cap)  # 1 where epoch e % cap ended with SAVE

    def _off(self, epoch: int) -> int:
        return (epoch % self._geo.hist_cap) * HIST_REC

    def record(self, epoch: int) -> HistoryRecord | None:
        off = self._off(epoch)
        rec = unpack_history(memoryview(self._ring)[off:off + HIST_REC])
        return rec if rec is not None and rec.epoch == epoch else None

    def repair(self, last_raw: bytes, writable: bool) -> None:
        """The superblock carries the newest record: put it back if its ring write tore."""
        last = unpack_history(last_raw)
        if last is None or self.record(last.epoch) == last:
            return
        self._ring[self._off(last.epoch):self._off(last.epoch) + HIST_REC] = last_raw
        if writable:
            self._b.pwrite(last_raw, self._geo.hist_off + self._off(last.epoch))
            self._b.sync()

    def index(self, first: int, end: int) -> None:
        """Learn how epochs first..end-1 ended; map records still depend on them."""
        for e in range(first, end):
            rec = self.record(e)
            if rec is None:
                raise CorruptStoreError(f"history record of epoch {e} is missing or damaged, and "
                                        "units still depend on it; run `savepoint inspect --check`")
            self._saved[e % self._geo.hist_cap] = rec.action == SAVE

    def ended_by_save(self, epoch: int) -> int:
        return self._saved[epoch % self._geo.hist_cap]

    def write(self, rec: HistoryRecord) -> bytes:
        """Write a record to its slot (not yet committed: the superblock commits it)."""
        raw = rec.pack()
        self._b.pwrite(raw, self._geo.hist_off + self._off(rec.epoch))
        return raw

    def committed(self, rec: HistoryRecord, raw: bytes) -> None:
        off = self._off(rec.epoch)
        self._ring[off:off + HIST_REC] = raw
        self._saved[rec.epoch % self._geo.hist_cap] = rec.action == SAVE

    def records(self, first: int, end: int) -> list[HistoryRecord]:
        recs = (self.record(e) for e in range(first, end))
        return [r for r in recs if r is not None]
