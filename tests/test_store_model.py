"""Model-based test of the whole store API (hypothesis stateful) against two bytearrays.

The model is the claims' vocabulary and nothing more: a saved image, a visible image, which
slot holds each unit's saved copy (flipped by SAVE for the units written since T0), the
counters the status reports, and the history. Every backing write goes through a guard that
checks invariant 1 against the model: no write or discard may touch a unit's saved slot.

The disk spans six map pages and the map cache holds two, so the runs evict pages all the
time, clean ones and dirty ones (their changed sectors parked, or flushed when too many are),
and the background pass takes several steps (the model runs it to its end). Requests land
in a few clusters of units, some across a map page boundary; the units around each cluster
must stay zero.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from appliance.store import Store
from appliance.store.format import PAGE, UNITS_PER_PAGE
from appliance.store.init import create_store

U = 4096
UNITS = 6 * UNITS_PER_PAGE
SIZE = UNITS * U - 1024  # the last unit is partial
HIST_CAP = 8
MAP_CACHE = 2 * PAGE  # a third of the map: pages come and go
_P = UNITS_PER_PAGE
CLUSTERS = [  # (first unit, units): where requests land
    (0, 4),
    (_P - 2, 4),  # across the boundary of pages 0 and 1
    (2 * _P + 500, 3),
    (3 * _P - 1, 3),  # across pages 2 and 3
    (4 * _P + 10, 3),
    (UNITS - 4, 4),  # the end of the disk, partial last unit included
]


class GuardedBacking:
    """Delegates to the store's real backing; refuses writes into a saved slot."""

    def __init__(self, inner, machine: StoreMachine) -> None:
        self.inner, self.m = inner, machine
        self.size, self.fd = inner.size, inner.fd

    def _check(self, kind: str, offset: int, length: int) -> None:
        geo = self.m.store.geo
        for slot in (0, 1):
            lo = geo.slot_off[slot]
            a, b = max(offset, lo), min(offset + length, lo + UNITS * U)
            for u in range((a - lo) // U, (b - 1 - lo) // U + 1) if a < b else ():
                assert self.m.primary[u] != slot, (
                    f"{kind} at {offset}+{length} overwrites the saved copy of unit {u} "
                    f"(slot {slot}): invariant 1"
                )

    def pread_into(self, buf, offset: int) -> None:
        self.inner.pread_into(buf, offset)

    def pwrite(self, data, offset: int) -> None:
        self._check("pwrite", offset, len(data))
        self.inner.pwrite(data, offset)

    def discard(self, offset: int, length: int) -> None:
        self._check("discard", offset, length)
        self.inner.discard(offset, length)

    def sync(self) -> None:
        self.inner.sync()

    def close(self) -> None:
        self.inner.close()


def _cluster_offset(pick: tuple[int, int]) -> int:
    first, n = CLUSTERS[pick[0]]
    return first * U + pick[1] % min(n * U, SIZE - first * U)


def _cluster_end(offset: int) -> int:
    for first, n in CLUSTERS:
        if first * U <= offset < (first + n) * U:
            return min((first + n) * U, SIZE)
    raise AssertionError(offset)


offsets = st.tuples(st.integers(0, len(CLUSTERS) - 1), st.integers(0, 4 * U)).map(_cluster_offset)
lengths = st.one_of(st.integers(0, 3 * U), st.sampled_from([U, 2 * U, 5 * U]))
sources = st.sampled_from(["button", "fob:1a2b", "cli", "host", "policy"])


class StoreMachine(RuleBasedStateMachine):
    @initialize()
    def create(self) -> None:
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # fsync costs nothing there
        self.dir = Path(tempfile.mkdtemp(prefix="savepoint-model-", dir=shm))
        self.path = str(self.dir / "store.img")
        create_store(self.path, SIZE, unit=U, hist_cap=HIST_CAP)
        self.saved = bytearray(SIZE)
        self.visible = bytearray(SIZE)
        self.primary = bytearray(UNITS)
        self.dirty: set[int] = set()
        self.dirty_bytes = 0
        self.epoch = 1
        self.wepoch = [0] * UNITS  # epoch of a unit's last write, 0 once normalised
        self.alloc = bytearray(UNITS)  # units whose visible copy holds data (BLOCK_STATUS)
        self.saved_alloc = bytearray(UNITS)
        self.resolved = 1  # the model's resolved_below
        self.pass_pos = self.pass_start = 0  # where the background pass is, since when
        self.history: list[tuple[int, str, str, int, int]] = []
        self.store = None
        self._open()

    def _open(self) -> None:
        self.store = Store.open(self.path, map_cache=MAP_CACHE)
        self.store._b = GuardedBacking(self.store._b, self)
        self.pass_pos = 0  # a new open starts its pass from the beginning

    def teardown(self) -> None:
        if getattr(self, "store", None) is not None:
            self.store.close()
        if hasattr(self, "dir"):
            shutil.rmtree(self.dir, ignore_errors=True)

    # ----- I/O --------------------------------------------------------------------------------

    def _clip(self, offset: int, length: int) -> int:
        return min(length, _cluster_end(offset) - offset)

    def _wrote(self, offset: int, data: bytes, holes: range = range(0)) -> None:
        """`holes`: the whole units a zeroing request only marked as zero (no data)."""
        self.visible[offset : offset + len(data)] = data
        self.dirty_bytes += len(data)
        if data:
            for u in range(offset // U, (offset + len(data) - 1) // U + 1):
                self.dirty.add(u)
                self.wepoch[u] = self.epoch
                self.alloc[u] = u not in holes

    @rule(offset=offsets, length=lengths, seed=st.integers(0, 2**16), fua=st.booleans())
    def write(self, offset: int, length: int, seed: int, fua: bool) -> None:
        data = random.Random(seed).randbytes(self._clip(offset, length))
        self.store.write(offset, data, fua=fua)
        self._wrote(offset, data)

    @rule(offset=offsets, length=lengths)
    def read(self, offset: int, length: int) -> None:
        length = self._clip(offset, length)
        assert self.store.read(offset, length) == self.visible[offset : offset + length]

    @rule(offset=offsets, length=lengths, punch=st.booleans(), fua=st.booleans())
    def zero(self, offset: int, length: int, punch: bool, fua: bool) -> None:
        length = self._clip(offset, length)
        if punch:
            self.store.trim(offset, length)
        else:
            self.store.write_zeroes(offset, length, fua=fua)
        first_full, end_full = -(-offset // U), (offset + length) // U
        self._wrote(offset, bytes(length), range(first_full, end_full))

    @rule(offset=offsets, length=lengths)
    def block_status(self, offset: int, length: int) -> None:
        """Runs cover the range from its start; a unit reads as a hole iff its visible copy holds no
        data (never written, or zeroed whole), whatever path (uniform run or not) answered."""
        length = self._clip(offset, length)
        if not length:
            return
        pos = offset
        for start, n, zero in self.store.block_status(offset, length):
            assert start == pos and n > 0
            for u in range(start // U, (start + n - 1) // U + 1):
                assert zero == (not self.alloc[u]), f"unit {u}: hole={zero}"
            pos += n
        assert offset < pos <= offset + length  # a shorter answer keeps the cache in budget

    @rule()
    def flush(self) -> None:
        self.store.flush()

    # ----- commands -----------------------------------------------------------------------------

    def _commit(self, action: str, source: str, rec: dict) -> None:
        assert (rec["epoch"], rec["action"], rec["source"]) == (self.epoch, action, source)
        assert (rec["units"], rec["bytes"]) == (len(self.dirty), self.dirty_bytes)
        while self.epoch + 1 - self.resolved >= HIST_CAP:  # the store finishes the pass first
            self._pass_to(UNITS)
        self.history.append((self.epoch, action, source, len(self.dirty), self.dirty_bytes))
        if action == "save":
            self.saved[:] = self.visible
            self.saved_alloc[:] = self.alloc
            for u in self.dirty:
                self.primary[u] ^= 1
        else:
            self.visible[:] = self.saved
            self.alloc[:] = self.saved_alloc
        self.dirty.clear()
        self.dirty_bytes = 0
        self.epoch += 1

    def _pass_to(self, end: int) -> None:
        """The pass normalised units pass_pos..end-1; at the disk's end it is done."""
        if self.pass_pos == 0:
            self.pass_start = self.epoch
        for u in range(self.pass_pos, end):
            if self.wepoch[u] != self.epoch:
                self.wepoch[u] = 0
        self.pass_pos = end
        if end == UNITS:
            self.resolved, self.pass_pos = self.pass_start, 0

    @rule(source=sources)
    def save(self, source: str) -> None:
        self._commit("save", source, self.store.save(source))

    @rule(source=sources)
    def restore(self, source: str) -> None:
        self._commit("restore", source, self.store.restore(source))

    @rule(budget=st.sampled_from([1, 100, 65536]))
    def background(self, budget: int) -> None:
        # Steps of `budget` units (a page at least) until the pass is done: several steps,
        # each of which may stop early when the map cache is full.
        steps = 1
        while self.store.background_step(budget):
            steps += 1
            assert steps <= 2 * UNITS, "the background pass does not finish"
        self._pass_to(UNITS)

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = None
        self._open()

    # ----- what the user sees after every step ----------------------------------------------

    def _pending(self) -> int:
        return sum(1 for w in self.wepoch if 0 < w < self.epoch)

    @invariant()
    def disk_and_saved_image_match_the_model(self) -> None:
        if self.store is None:
            return
        for first, n in CLUSTERS:  # and a unit either side: nothing may land there
            a, b = max(0, first - 1) * U, min(SIZE, (first + n + 1) * U)
            assert self.store.read(a, b - a) == self.visible[a:b]
            assert self.store.read_saved(a, b - a) == self.saved[a:b]

    @invariant()
    def status_matches_the_model(self) -> None:
        if self.store is None:
            return
        s = self.store.status()
        assert (s["epoch"], s["dirty_units"], s["dirty_bytes"]) == (
            self.epoch,
            len(self.dirty),
            self.dirty_bytes,
        )
        assert s["pending_units"] == self._pending()
        assert s["ring_free"] == HIST_CAP - 1 - (self.epoch - self.resolved)
        cache = self.store.map.cache
        assert cache.used() <= cache.limit, cache.status()  # the budget holds between requests

    @invariant()
    def history_is_the_last_commands(self) -> None:
        if self.store is None:
            return
        got = [
            (h["epoch"], h["action"], h["source"], h["units"], h["bytes"])
            for h in self.store.history()
        ]
        assert got == self.history[-HIST_CAP:]


StoreMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_store_against_the_model = StoreMachine.TestCase
