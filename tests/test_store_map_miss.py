"""A map page missing from the cache is read without the map lock: the read must never
install records older than those a flush or an eviction changed meanwhile."""

from __future__ import annotations

import random
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as hs

from appliance.store import Store
from appliance.store.cache import decode_parked, encode_parked
from appliance.store.format import PAGE, RECS_PER_SECTOR, UNITS_PER_PAGE
from appliance.store.init import create_store

U = 4096
PAGES = 8
WAIT = 10  # seconds a step of the race may take at most (a loaded CI machine)


class _PausedMapRead:
    """The map's backing; the armed thread's next page read returns, then waits for `go`
    (the page as read then is what it installs), so a flush can run in between."""

    def __init__(self, inner) -> None:
        self._inner, self.armed = inner, None
        self.read_done, self.go = threading.Event(), threading.Event()

    def pread_into(self, buf, offset: int) -> None:
        self._inner.pread_into(buf, offset)
        self.pause()

    def pause(self) -> None:
        if threading.current_thread() is self.armed:
            self.armed = None
            self.read_done.set()
            assert self.go.wait(WAIT)

    def next_data(self, offset: int) -> int:
        return offset  # no holes known: the page is read

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


class _SlowMapRead:
    """The map's backing, its page reads slowed (as a busy SD card): a miss spans more of
    the other threads' flushes and evictions."""

    def __init__(self, inner) -> None:
        self._inner = inner

    def pread_into(self, buf, offset: int) -> None:
        self._inner.pread_into(buf, offset)
        time.sleep(0.001)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def _store(tmp_path, budget: int) -> Store:
    path = str(tmp_path / "disk.img")
    create_store(path, PAGES * UNITS_PER_PAGE * U, unit=U, hist_cap=64)
    return Store.open(path, map_cache=budget)


@pytest.mark.parametrize("known_zero", [False, True], ids=["read", "known-zero"])
def test_a_miss_read_across_a_flush_of_its_parked_sectors_reads_again(
    tmp_path, known_zero: bool
) -> None:
    """known_zero: the page is known to be a hole on disk, so the miss does not read it; that
    knowledge follows the same rule as a read."""
    unit = 3 * UNITS_PER_PAGE + 7
    with _store(tmp_path, 4 * PAGE) as st:
        paused = _PausedMapRead(st.map._b)
        if not known_zero:
            st.map._b = paused  # from the first miss on: every page is read
        st.write(unit * U, b"w" * U)
        st.map.evict(0)  # the page is unloaded; its changed sector parked (not on disk)
        assert not st.map.loaded[3] and st.map.parked
        if known_zero:
            assert st.map._zero_on_disk(3)  # the write's miss learnt it: a hole in the file
            zero_on_disk = st.map._zero_on_disk
            st.map._zero_on_disk = lambda page: (zero_on_disk(page), paused.pause())[0]
        got: list[bytes] = []  # three units: one alone is answered from its parked sector
        reader = threading.Thread(target=lambda: got.append(st.read((unit - 1) * U, 3 * U)))
        paused.armed = reader
        reader.start()
        assert paused.read_done.wait(WAIT)  # it read the page as on disk: without the record
        st.flush()  # writes the parked sector and forgets it
        assert not st.map.parked and not st.map.writing_parked()
        paused.go.set()
        reader.join(WAIT)
        assert got == [bytes(U) + b"w" * U + bytes(U)]  # the stale read was not installed


def test_racing_misses_flushes_and_evictions_read_what_was_written(tmp_path) -> None:
    """Writers of disjoint units over a one-page cache (every request misses, evicts and
    parks), a flusher, and readers checking each writer's units against its own model."""
    writers, rounds = 3, 150
    errors: list[str] = []
    stop = threading.Event()
    with _store(tmp_path, PAGE) as st:
        st.map._b = _SlowMapRead(st.map._b)

        def write_and_check(tid: int) -> None:
            rng, model = random.Random(tid), {}
            units = [u for u in range(PAGES * UNITS_PER_PAGE) if u % writers == tid]
            for i in range(rounds):
                unit = rng.choice(units)
                data = bytes([tid + 1]) * 8 + i.to_bytes(4, "little") + rng.randbytes(U - 12)
                st.write(unit * U, data)
                model[unit] = data
                probe = rng.choice(list(model))
                if st.read(probe * U, U) != model[probe]:
                    errors.append(f"writer {tid}: unit {probe} read back wrong at round {i}")
                    return

        def flush() -> None:
            while not stop.is_set():
                st.flush()

        flusher = threading.Thread(target=flush)
        threads = [threading.Thread(target=write_and_check, args=(t,)) for t in range(writers)]
        flusher.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        stop.set()
        flusher.join(WAIT)
        assert not errors, errors
        assert st.map.cache.status()["evictions"] > rounds  # the race was run, not avoided


class _CountingMapReads:
    """The map's backing, counting page reads."""

    def __init__(self, inner) -> None:
        self._inner, self.reads = inner, 0

    def pread_into(self, buf, offset: int) -> None:
        self.reads += 1
        self._inner.pread_into(buf, offset)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def test_a_miss_on_a_page_never_written_reads_nothing_and_one_flushed_is_read(tmp_path) -> None:
    """The map of a fresh store is a hole in its file: misses skip the read. Pages a flush
    wrote are data from then on: dropped and missed again, they are read (not taken as zeros)."""
    units = [p * UNITS_PER_PAGE + p for p in range(PAGES)]
    with _store(tmp_path, PAGE) as st:
        counting = _CountingMapReads(st.map._b)
        st.map._b = counting
        for u in units:  # one page in the cache: each write misses and evicts
            st.write(u * U, bytes([u % 251 + 1]) * U)
        assert counting.reads == 0
        st.flush()
        st.map.evict(0)
        assert not any(st.map.loaded)
        for u in units:
            assert st.read(u * U, U) == bytes([u % 251 + 1]) * U
        assert counting.reads == len(units)


@given(
    hs.dictionaries(
        hs.integers(0, RECS_PER_SECTOR - 1), hs.integers(0, 2**32 - 1), max_size=RECS_PER_SECTOR
    )
)
def test_a_parked_sector_decodes_to_its_records(recs: dict[int, int]) -> None:
    """Parking (one record, a few, most of a sector) keeps every record as it was."""
    raw = bytearray(RECS_PER_SECTOR * 4)
    for i, r in recs.items():
        raw[i * 4 : i * 4 + 4] = r.to_bytes(4, "little")
    assert decode_parked(encode_parked(bytes(raw))) == raw
