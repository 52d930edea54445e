"""A map page missing from the cache is read without the map lock: the read must never
install records older than those a flush or an eviction changed meanwhile."""

from __future__ import annotations

import random
import threading
import time

from appliance.store import Store
from appliance.store.format import PAGE, UNITS_PER_PAGE
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
        if threading.current_thread() is self.armed:
            self.armed = None
            self.read_done.set()
            assert self.go.wait(WAIT)

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


def test_a_miss_read_across_a_flush_of_its_parked_sectors_reads_again(tmp_path) -> None:
    unit = 3 * UNITS_PER_PAGE + 7
    with _store(tmp_path, 4 * PAGE) as st:
        st.write(unit * U, b"w" * U)
        st.map.evict(0)  # the page is unloaded; its changed sector parked (not on disk)
        assert not st.map.loaded[3] and st.map.parked
        paused = _PausedMapRead(st.map._b)
        st.map._b = paused
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(st.read(unit * U, U)))
        paused.armed = reader
        reader.start()
        assert paused.read_done.wait(WAIT)  # it read the page as on disk: without the record
        st.flush()  # writes the parked sector and forgets it
        assert not st.map.parked and not st.map.writing_parked()
        paused.go.set()
        reader.join(WAIT)
        assert got == [b"w" * U]  # not zeros: the stale read was not installed


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
