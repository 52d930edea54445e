"""Writes that miss a map page never written park their one record instead of loading the
page: random 4 KiB writes over a large disk then cost no page, no eviction and no forced
flush while the parked records fit (docs/format.md, "The map cache")."""

from __future__ import annotations

import random
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as hs

from appliance.store import Store
from appliance.store.cache import decode_parked, park_record, parked_record
from appliance.store.format import PAGE, RECS_PER_SECTOR, UNITS_PER_PAGE
from appliance.store.init import create_store
from tests.crashsim import new_backing

U = 4096
WAIT = 10  # seconds a step of the race may take at most (a loaded CI machine)


def _writes(st: Store, rng: random.Random, units: list[int]) -> dict[int, bytes]:
    written = {}
    for unit in units:
        written[unit] = rng.randbytes(U)
        st.write(unit * U, written[unit])
    return written


def test_random_writes_over_pages_never_written_load_none_of_them(tmp_path) -> None:
    """400 writes over 256 map pages with room for 64: past the pages installed while the
    cache had room, none is loaded, none evicted, no flush forced; all read back (and the
    units beside them read zeros) without loading a page, and again after a reopen."""
    pages, path = 256, str(tmp_path / "disk.img")
    create_store(path, pages * UNITS_PER_PAGE * U, unit=U, hist_cap=64)
    rng = random.Random(1)
    units = rng.sample(range(pages * UNITS_PER_PAGE), 400)
    with Store.open(path, map_cache=64 * PAGE) as st:
        seq, cache = st.sb.seq, st.map.cache
        written = _writes(st, rng, units)
        loaded = sum(st.map.loaded)
        status = st.status()["map_cache"]
        assert loaded <= cache.low and status["evictions"] == 0, status
        assert len(st.map.parked) > 300 and status["parked"] > 300 * 100, status
        assert st.sb.seq == seq, "a flush was forced"
        for unit, data in written.items():
            assert st.read(unit * U, U) == data
            beside = unit ^ 1
            if beside not in written:
                assert st.read(beside * U, U) == bytes(U)
        assert sum(st.map.loaded) == loaded and st.status()["map_cache"]["evictions"] == 0
        st.flush()
        assert not st.map.parked and cache.parked == 0
    with Store.open(path, map_cache=64 * PAGE) as st:
        for unit, data in written.items():
            assert st.read(unit * U, U) == data


def test_a_power_cut_keeps_the_parked_records_a_flush_wrote() -> None:
    """Parked records are on disk once flushed, and forced flushes (parked records past the
    budget) write them in flush's order: a cut then leaves each unit old or new, never torn."""
    pages, rng = 12, random.Random(2)
    backing = new_backing(pages * UNITS_PER_PAGE * U, U, 64)
    st = Store(backing, map_cache=8 * PAGE)
    written = _writes(st, rng, rng.sample(range(pages * UNITS_PER_PAGE), 40))
    assert st.map.parked and st.status()["map_cache"]["evictions"] == 0
    st.flush()
    extra = _writes(st, rng, [rng.randrange(pages * UNITS_PER_PAGE) for _ in range(300)])
    assert st.map.parked
    after = Store(backing.power_cut(rng), map_cache=8 * PAGE)
    for unit, data in written.items():
        assert after.read(unit * U, U) in (data, extra.get(unit)), unit
    for unit, data in extra.items():
        assert after.read(unit * U, U) in (data, written.get(unit, bytes(U))), unit


class _PausedMapWrite:
    """The store's backing; the first map write of a flush waits for `go`, then fails or not."""

    def __init__(self, inner, meta: range, fail: bool) -> None:
        self._inner, self._meta, self.fail = inner, meta, fail
        self.writing, self.go = threading.Event(), threading.Event()

    def pwrite(self, data, offset: int) -> None:
        if offset in self._meta and not self.go.is_set():
            self.writing.set()
            assert self.go.wait(WAIT)
            if self.fail:
                raise OSError(5, "injected map write error")
        self._inner.pwrite(data, offset)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


@pytest.mark.parametrize("fail", [False, True], ids=["written", "failed"])
def test_a_record_parked_while_a_flush_writes_its_sector_is_kept(tmp_path, fail: bool) -> None:
    """A write parks its record in a sector a flush is writing (parked before, so unloaded):
    the new copy is newer than the flush's, whether the flush succeeds or fails (a failed
    one gave its copy back over the newer one: the unit read zeros)."""
    path = str(tmp_path / "disk.img")
    create_store(path, 8 * UNITS_PER_PAGE * U, unit=U, hist_cap=64)
    first = 3 * UNITS_PER_PAGE + 7
    with Store.open(path, map_cache=4 * PAGE) as st:
        st.write(first * U, b"a" * U)
        st.map.evict(0)  # its sector parked, its page unloaded
        g = st.geo
        paused = _PausedMapWrite(st._b, range(g.meta_off, g.meta_off + g.meta_len), fail)
        st._b = st.map._b = paused
        errors: list[BaseException] = []

        def flush() -> None:
            try:
                st.flush()
            except Exception as e:
                errors.append(e)

        flusher = threading.Thread(target=flush)
        flusher.start()
        assert paused.writing.wait(WAIT)  # the flush took the parked sector and writes it
        st.write((first + 1) * U, b"b" * U)  # the same sector: parked again, from its copy
        assert not st.map.loaded[3] and st.map.parked
        paused.go.set()
        flusher.join(WAIT)
        assert bool(errors) == fail
        assert st.read(first * U, 2 * U) == b"a" * U + b"b" * U
        st.flush()
    with Store.open(path) as st:
        assert st.read(first * U, 2 * U) == b"a" * U + b"b" * U


@given(hs.lists(hs.tuples(hs.integers(0, RECS_PER_SECTOR - 1), hs.integers(0, 2**32 - 1))))
def test_parking_records_one_by_one_keeps_each_as_set(sets: list[tuple[int, int]]) -> None:
    """Records added, replaced and cleared in a parked copy read back as a sector would."""
    enc, model = b"", [0] * RECS_PER_SECTOR
    for i, rec in sets:
        enc = park_record(enc, i, rec)
        model[i] = rec
        assert len(enc) == RECS_PER_SECTOR * 4 or len(enc) % 5 == 0
        assert parked_record(enc, i) == rec
    assert list(memoryview(decode_parked(enc)).cast("I")) == model
