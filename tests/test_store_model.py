"""Model-based test of the whole store API (hypothesis stateful) against two bytearrays.

The model is the claims' vocabulary and nothing more: a saved image, a visible image, which
slot holds each unit's saved copy (flipped by SAVE for the units written since T0), the
counters the status reports, and the history. Every backing write goes through a guard that
checks invariant 1 against the model: no write or discard may touch a unit's saved slot.
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
from appliance.store.init import create_store

U = 4096
UNITS = 24
SIZE = UNITS * U - 1024  # the last unit is partial
HIST_CAP = 8


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


offsets = st.integers(0, SIZE - 1)
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
        self.history: list[tuple[int, str, str, int, int]] = []
        self.store = None
        self._open()

    def _open(self) -> None:
        self.store = Store.open(self.path)
        self.store._b = GuardedBacking(self.store._b, self)

    def teardown(self) -> None:
        if getattr(self, "store", None) is not None:
            self.store.close()
        if hasattr(self, "dir"):
            shutil.rmtree(self.dir, ignore_errors=True)

    # ----- I/O --------------------------------------------------------------------------------

    def _clip(self, offset: int, length: int) -> int:
        return min(length, SIZE - offset)

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
        """Runs cover the range exactly; a unit reads as a hole iff its visible copy holds no
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
        assert pos == offset + length

    @rule()
    def flush(self) -> None:
        self.store.flush()

    # ----- commands -----------------------------------------------------------------------------

    def _commit(self, action: str, source: str, rec: dict) -> None:
        assert (rec["epoch"], rec["action"], rec["source"]) == (self.epoch, action, source)
        assert (rec["units"], rec["bytes"]) == (len(self.dirty), self.dirty_bytes)
        if self.epoch + 1 - self.resolved >= HIST_CAP:  # the store finishes the pass first
            self._normalised()
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

    def _normalised(self) -> None:
        self.wepoch = [w if w == self.epoch else 0 for w in self.wepoch]
        self.resolved = self.epoch

    @rule(source=sources)
    def save(self, source: str) -> None:
        self._commit("save", source, self.store.save(source))

    @rule(source=sources)
    def restore(self, source: str) -> None:
        self._commit("restore", source, self.store.restore(source))

    @rule(budget=st.sampled_from([1, 100, 65536]))
    def background(self, budget: int) -> None:
        # A store this small is one map page: every step finishes the pass.
        assert self.store.background_step(budget) is False
        self._normalised()

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
        assert self.store.read(0, SIZE) == self.visible
        assert self.store.read_saved(0, SIZE) == self.saved

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
