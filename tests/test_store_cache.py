"""The map cache: a store whose map is many times the budget keeps its RAM within it, and
reads, writes, BLOCK_STATUS, SAVE, RESTORE, the background pass and a power cut all behave as
with the whole map in RAM."""

from __future__ import annotations

import random

import pytest

from appliance.config import ConfigError, load
from appliance.store import Store
from appliance.store.format import PAGE, UNITS_PER_PAGE
from appliance.store.init import create_store
from tests.crashsim import new_backing

U = 4096
PAGES = 24  # map pages of the test store: six times the budget
BUDGET = 4 * PAGE


def _within_budget(st: Store) -> None:
    cache = st.map.cache
    assert cache.status()["size"] <= cache.budget, cache.status()  # parked sectors included
    assert sum(st.map.loaded) <= cache.budget // PAGE


def _spread_writes(st: Store, rng: random.Random, n: int) -> dict[int, bytes]:
    """n 4 KiB writes, each in a random map page: every one misses the cache."""
    written: dict[int, bytes] = {}
    for _ in range(n):
        unit = rng.randrange(PAGES * UNITS_PER_PAGE)
        data = rng.randbytes(U)
        st.write(unit * U, data)
        written[unit] = data
        _within_budget(st)
    return written


@pytest.fixture
def store_path(tmp_path) -> str:
    path = str(tmp_path / "disk.img")
    create_store(path, PAGES * UNITS_PER_PAGE * U, unit=U, hist_cap=64)
    return path


def test_random_writes_over_a_large_map_stay_within_the_budget_and_read_back(
    store_path: str,
) -> None:
    rng = random.Random(1)
    with Store.open(store_path, map_cache=BUDGET) as st:
        written = _spread_writes(st, rng, 200)
        for unit, data in written.items():
            assert st.read(unit * U, U) == data
            _within_budget(st)
        status = st.status()["map_cache"]
        assert status["budget"] == BUDGET and status["size"] <= BUDGET
        assert status["evictions"] > 0 and 0 <= status["hit_rate"] < 1
    with Store.open(store_path, map_cache=BUDGET) as st:  # the forced flushes wrote it all
        for unit, data in written.items():
            assert st.read(unit * U, U) == data


def test_block_status_and_uniform_runs_work_on_an_evicting_cache(store_path: str) -> None:
    with Store.open(store_path, map_cache=BUDGET) as st:
        units = [p * UNITS_PER_PAGE + 5 for p in range(0, PAGES, 2)]
        for unit in units:
            st.write(unit * U, b"x" * (3 * U))  # three whole units: the one-pwrite run path
        data_at = set()
        pos = 0
        while pos < st.size:  # a shorter answer is allowed: ask again from where it ended
            for off, n, zero in st.block_status(pos, st.size - pos):
                if not zero:
                    data_at.update(range(off // U, (off + n) // U))
                pos = off + n
            _within_budget(st)
        assert data_at == {u + i for u in units for i in range(3)}
        assert st.read(units[-1] * U, 3 * U) == b"x" * (3 * U)


def test_save_restore_and_a_full_pass_keep_to_the_budget(store_path: str) -> None:
    rng = random.Random(2)
    with Store.open(store_path, map_cache=BUDGET) as st:
        saved = _spread_writes(st, rng, 60)
        st.save("test")
        _spread_writes(st, rng, 60)
        st.restore("test")
        while st.background_step(UNITS_PER_PAGE * 3):  # the pass reads every map page
            _within_budget(st)
        _within_budget(st)
        assert st.status()["pending_units"] == 0
        for unit, data in saved.items():
            assert st.read(unit * U, U) == data


def test_a_power_cut_after_forced_flushes_keeps_what_flush_acknowledged() -> None:
    rng = random.Random(3)
    backing = new_backing(PAGES * UNITS_PER_PAGE * U, U, 64)
    st = Store(backing, map_cache=BUDGET)
    written = _spread_writes(st, rng, 100)
    st.flush()
    extra = _spread_writes(st, rng, 30)  # some of these forced flushes, some did not
    after = Store(backing.power_cut(rng), map_cache=BUDGET)
    for unit, data in written.items():
        got = after.read(unit * U, U)
        assert got == data or (unit in extra and got == extra[unit]), unit
    for unit, data in extra.items():
        assert after.read(unit * U, U) in (data, written.get(unit, bytes(U)))


def test_the_budget_is_a_config_key_with_a_clear_error(tmp_path) -> None:
    def parsed(value: str) -> dict:
        p = tmp_path / "c.toml"
        p.write_text(f'[store]\npath = "/x"\nmap_cache = {value}\n')
        return load(str(p))

    assert parsed('"8M"')["store"]["map_cache"] == 8 << 20
    with pytest.raises(ConfigError, match=r"map_cache: .*at least \"64K\""):
        parsed('"4K"')
    with pytest.raises(ConfigError, match="map_cache"):
        parsed('"lots"')


def test_a_save_waiting_for_a_full_ring_runs_the_pass_within_the_budget(tmp_path) -> None:
    path = str(tmp_path / "ring.img")
    create_store(path, PAGES * UNITS_PER_PAGE * U, unit=U, hist_cap=8)
    rng = random.Random(4)
    with Store.open(path, map_cache=BUDGET) as st:
        last: dict[int, bytes] = {}
        for _ in range(12):  # the ring holds 8: later SAVEs wait for the pass over every page
            last.update(_spread_writes(st, rng, 8))
            st.save("test")
            _within_budget(st)
        assert st.sb.resolved_below > 1  # the pass did finish, within the budget
        for unit, data in last.items():
            assert st.read_saved(unit * U, U) == data


class _CountingSyncs:
    """The store's backing, counting data syncs and failing map writes on demand."""

    def __init__(self, inner, meta: range) -> None:
        self.inner, self.meta, self.syncs, self.fail_map = inner, meta, 0, False
        self.size, self.fd = inner.size, getattr(inner, "fd", None)

    def pread_into(self, buf, offset: int) -> None:
        self.inner.pread_into(buf, offset)

    def pwrite(self, data, offset: int) -> None:
        if self.fail_map and offset in self.meta:
            raise OSError(5, "injected map write error")
        self.inner.pwrite(data, offset)

    def sync(self) -> None:
        self.syncs += 1
        self.inner.sync()

    def discard(self, offset: int, length: int) -> None:
        self.inner.discard(offset, length)

    def close(self) -> None:
        self.inner.close()


def _counting(st: Store) -> _CountingSyncs:
    g = st.geo
    st._b = _CountingSyncs(st._b, range(g.meta_off, g.meta_off + g.meta_len))
    st.map._b = st._b
    return st._b


def test_dirty_pages_are_parked_not_synced_and_a_reopen_reads_them(store_path: str) -> None:
    """Random writes, one per map page, over a map six times the budget: the dirty pages
    are dropped with their records parked, and no data sync is forced while those fit."""
    rng = random.Random(5)
    with Store.open(store_path, map_cache=BUDGET) as st:
        b = _counting(st)
        written = _spread_writes(st, rng, 40)
        status = st.status()["map_cache"]
        assert status["parked"] > 0 and status["evictions"] > 0
        assert b.syncs == 0, "the cache forced a sync though the parked records fit"
        for unit, data in written.items():  # loaded again, with the parked records
            assert st.read(unit * U, U) == data
        more = _spread_writes(st, rng, 200)  # past the park limit: flushes are forced
        assert b.syncs > 0
        _within_budget(st)
    with Store.open(store_path) as st:
        for unit, data in {**written, **more}.items():
            assert st.read(unit * U, U) == data


def test_a_failed_flush_keeps_the_parked_records(store_path: str) -> None:
    rng = random.Random(6)
    with Store.open(store_path, map_cache=BUDGET) as st:
        b = _counting(st)
        written = _spread_writes(st, rng, 30)
        assert st.map.parked
        b.fail_map = True
        with pytest.raises(Exception, match="I/O error"):
            st.flush()
        for unit, data in written.items():  # still the written data, parked or loaded
            assert st.read(unit * U, U) == data
        _within_budget(st)
        b.fail_map = False
        st.flush()
        assert not st.map.parked and st.status()["map_cache"]["parked"] == 0
    with Store.open(store_path) as st:
        for unit, data in written.items():
            assert st.read(unit * U, U) == data


def test_16k_memory_pages_group_four_map_pages(store_path: str, monkeypatch) -> None:
    """A kernel with 16 KiB pages (the Pi 5's default): madvise frees whole 16 KiB pages, so
    the cache loads and drops four map pages together and divides its budget by 16 KiB."""
    from appliance.store import unit_map

    monkeypatch.setattr(unit_map, "MEMORY_PAGE", 16384)
    rng = random.Random(7)
    with Store.open(store_path, map_cache=8 * PAGE) as st:
        assert st.map.cache.group_bytes == 16384 and st.map.cache.limit == 2
        written = _spread_writes(st, rng, 60)
        assert st.status()["map_cache"]["evictions"] > 0
        for unit, data in written.items():
            assert st.read(unit * U, U) == data
            _within_budget(st)
    with Store.open(store_path) as st:
        for unit, data in written.items():
            assert st.read(unit * U, U) == data


def test_the_pass_counts_unsaved_units_when_a_restore_reclaim_runs_ahead(tmp_path) -> None:
    """After RESTORE the reclaim normalises loaded pages first, some ahead of the pass's
    cursor; a page the cache dropped meanwhile must still be counted when the pass gets
    there (status and the next SAVE record said 1 unit where 2 were written)."""
    path = str(tmp_path / "d.img")
    create_store(path, PAGES * UNITS_PER_PAGE * U, unit=U, hist_cap=64)
    with Store.open(path, map_cache=3 * PAGE) as st:
        st.restore("test")
        st.write(1007 * U, b"a" * U)  # map page 0
        st.write(1008 * U, b"b" * U)  # map page 1
        st.flush()
        for unit in (1008, 0, 4 * UNITS_PER_PAGE, 5 * UNITS_PER_PAGE):
            st.read(unit * U, U)  # page 1 is dropped; 0, 4 and 5 stay
        assert st.status()["dirty_units"] == 2
        while st.background_step(1):
            pass
        assert st.status()["dirty_units"] == 2
        assert st.save("test")["units"] == 2


def test_the_pass_keeps_a_quarter_of_the_cache_whatever_the_memory_page(
    store_path: str, monkeypatch
) -> None:
    """The cache counts memory pages; the pass's share is in map pages. On a 16 KiB-page
    kernel (a Pi 5) a quarter of the budget is still a quarter, not a sixteenth (which
    would make the pass flush, and stall allocating writes, four times as often)."""
    from appliance.store import unit_map

    budget = 64 * PAGE
    with Store.open(store_path, map_cache=budget) as st:
        assert st._pass_share() == budget // PAGE // 4
    monkeypatch.setattr(unit_map, "MEMORY_PAGE", 16384)
    with Store.open(store_path, map_cache=budget) as st:
        assert st.map.cache.group_bytes == 16384
        assert st._pass_share() == budget // PAGE // 4
