"""The background pass: it survives I/O errors in a real daemon, never holds I/O for the whole
pass when the history ring is full, and keeps a bounded number of map pages loaded."""

from __future__ import annotations

import asyncio
import errno
import logging
import threading
import time

import pytest

import appliance.background as background
import appliance.store.core as store_mod
from appliance.config import serve_config
from appliance.daemon import Daemon
from appliance.store import Store
from appliance.store.format import RECS_PER_SECTOR, UNITS_PER_PAGE
from appliance.store.init import create_store
from tests.support import memory_backing
from tests.test_daemon_support import short_dir

U = 4096


def test_the_daemons_pass_survives_io_errors_shows_a_fault_and_finishes(
    monkeypatch, caplog
) -> None:
    monkeypatch.setattr(background, "BACKGROUND_BACKOFF", 0.05)
    d = short_dir()
    cfg = serve_config(f"{d}/disk.img", 16 << 20, U, f"{d}/nbd.sock", None, False, f"{d}/c.sock")

    async def scenario() -> None:
        daemon = Daemon(cfg)
        await daemon.start()
        try:
            store = daemon.store
            failures = {"left": 1 << 30, "seen": 0}
            real_sync = store._b.sync

            def sync() -> None:  # the disk fails the pass's first three flushes
                if failures["left"]:  # until the test has seen the fault
                    failures["seen"] += 1
                    raise OSError(errno.EIO, "Input/output error")
                real_sync()

            store.write(0, b"saved")
            store.save("test")  # unit 0 now waits for the pass
            store._b.sync = sync
            assert daemon.bus is not None
            deadline = time.monotonic() + 20
            seen_fault = False
            while time.monotonic() < deadline:
                part = daemon.bus.parts.get("background", {})
                if part.get("state") == "failed" and not seen_fault and failures["seen"] >= 3:
                    assert "Input/output error" in part["reason"]
                    assert "failed: background" in await daemon._status_line()
                    seen_fault, failures["left"] = True, 0  # the disk recovers
                if store.sb.resolved_below == store.epoch:
                    break
                await asyncio.sleep(0.02)
            assert seen_fault, "the failing pass was never shown as a fault"
            assert store.sb.resolved_below == store.epoch, "the pass stopped after its errors"
            assert daemon.bus.parts["background"]["state"] == "up"
        finally:
            await daemon.shutdown()

    with caplog.at_level(logging.INFO, logger="savepoint.daemon"):
        asyncio.run(scenario())
    text = caplog.text
    assert "background pass failed" in text and "works again after" in text
    with Store.open(f"{d}/disk.img") as s:
        assert s.read_saved(0, 5) == b"saved"


def test_a_command_on_a_full_ring_waits_for_the_pass_while_io_flows(monkeypatch) -> None:
    units = 4 * UNITS_PER_PAGE
    store = Store(memory_backing(units * U, U, 8))
    for i in range(7):  # 7 epochs in use, none normalised: the next command must wait
        store.write(i * 500 * U, b"epoch %d" % i)
        store.save("test")
    assert store.ring_free() == 0
    monkeypatch.setattr(store_mod, "PASS_SLICE", UNITS_PER_PAGE)  # one page per step
    real_step, steps, hold = store._pass_step, [], threading.Event()

    def step(n: int) -> bool:
        steps.append(n)
        if len(steps) == 2:
            assert hold.wait(10)  # the pass pauses inside its second step
        return real_step(n)

    monkeypatch.setattr(store, "_pass_step", step)
    result: dict = {}
    cmd = threading.Thread(target=lambda: result.update(store.save("cli")))
    cmd.start()
    deadline = time.monotonic() + 10
    while len(steps) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert "SAVE waits for the background pass" in (store.status()["waiting"] or "")
    io = threading.Thread(target=lambda: (store.write(5, b"flowing"), store.flush()))
    io.start()
    io.join(5)
    flowed = not io.is_alive()
    hold.set()
    cmd.join(10)
    io.join(10)
    assert flowed, "I/O was blocked while the command waited for the pass"
    assert result["action"] == "save" and store.status()["waiting"] is None
    assert store.read_saved(0, 12) == b"epochflowing"  # written while it waited: saved too


def _a_pending_unit_per_page(tmp_path, pages: int) -> str:
    """A saved store with one unit written in every map page: the pass has all to do."""
    path = str(tmp_path / "s.img")
    create_store(path, pages * UNITS_PER_PAGE * U, unit=U, hist_cap=64)
    with Store.open(path) as s:
        for p in range(pages):
            s.write(p * UNITS_PER_PAGE * U, b"page %d" % p)
        s.save("test")
    return path


def test_the_pass_keeps_a_bounded_number_of_map_pages_loaded(tmp_path, monkeypatch) -> None:
    pages = 24
    path = _a_pending_unit_per_page(tmp_path, pages)
    monkeypatch.setattr(store_mod, "PASS_RESIDENT_PAGES", 4)
    with Store.open(path) as s:
        assert sum(s.map.loaded) == 0
        most = 0
        while s.background_step(UNITS_PER_PAGE):
            most = max(most, sum(s.map.loaded))
        assert most <= 4 + 1, f"{most} map pages loaded at once"
        assert sum(s.map.loaded) == 0 and s.status()["pending_units"] == 0
        for p in range(pages):
            assert s.read_saved(p * UNITS_PER_PAGE * U, 6 + (p > 9)) == b"page %d" % p
    with Store.open(path) as s:  # what the pass wrote before dropping its pages is durable
        assert s.sb.resolved_below == s.epoch
        assert s.read(3 * UNITS_PER_PAGE * U, 6) == b"page 3"


@pytest.mark.parametrize("free", [0, 1])
def test_pass_urgent_when_few_history_records_are_left(free: int) -> None:
    store = Store(memory_backing(64 * U, U, 16))
    for _ in range(15 - free):
        store.write(0, b"x")
        store.save("test")
    assert store.ring_free() == free and store.pass_urgent()
    while store.background_step():
        pass
    assert not store.pass_urgent() and store.ring_free() == 15


def test_the_daemon_shows_failing_hole_punches_as_a_storage_fault_that_clears(
    monkeypatch, caplog, capsys
) -> None:
    from appliance.cli_show import print_status
    from appliance.store import backing as store_backing
    from appliance.store import space as store_space

    monkeypatch.setattr(store_space, "PUNCH_RETRY", 0.2)
    d = short_dir()
    cfg = serve_config(f"{d}/disk.img", 16 << 20, U, f"{d}/nbd.sock", None, False, f"{d}/c.sock")
    real, failing = store_backing.fallocate, [True]

    def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
        if mode & store_backing.FALLOC_FL_PUNCH_HOLE and failing[0]:
            raise OSError(errno.EIO, "Input/output error")
        real(fd, mode, offset, length)

    monkeypatch.setattr(store_backing, "fallocate", fallocate)

    async def until(what, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.02)

    async def scenario() -> None:
        daemon = Daemon(cfg)
        await daemon.start()
        try:
            store, bus = daemon.store, daemon.bus
            assert bus is not None
            for fill in (b"a", b"b"):
                store.write(0, fill * (1 << 20))
                store.save("test")  # the old copies are dead once the pass ran
            await until(lambda: bus.parts["storage"]["state"] == "failed")
            part = bus.parts["storage"]
            assert part["reason"].startswith("backing cannot free space: EIO")
            assert "the store still works" in part["reason"] and "dmesg" in part["hint"]
            assert "failed: storage" in await daemon._status_line()
            print_status({"mode": "unlocked", **store.status(), "parts": bus.parts})
            background = bus.parts.get("background", {}).get("state")
            assert background != "failed", "a failed punch failed the pass"
            failing[0] = False  # the disk answers again: a retry gives the space back
            await until(lambda: bus.parts["storage"]["state"] == "up")
            assert store.status()["space"]["punch_fault"] == ""
        finally:
            await daemon.shutdown()

    asyncio.run(scenario())
    out = capsys.readouterr().out
    assert "FAULT        backing cannot free space: EIO (Input/output error)" in out
    assert "what to do   nothing is lost" in out


def test_the_pass_under_a_filling_ring_leaves_its_punches_to_a_later_idle_step() -> None:
    """While the ring is nearly full the pass runs under load, and a hole punch can hold every
    writer of the file back (stripe locks, the file system's inode lock): it owes them."""
    from tests.crashsim import CrashBacking, new_backing

    units = 2 * UNITS_PER_PAGE
    b = new_backing(units * U, U, 16)
    store = Store(b)
    for fill in (b"a", b"b"):
        store.write(0, fill * (units * U))
        store.save("test")  # the first copies are dead now
    while not store.pass_urgent():
        store.restore("test")
    store.close()
    punches: list[int] = []
    again = CrashBacking(
        bytearray(b.image), guard=lambda k, o, n: punches.append(n) if k == "discard" else None
    )
    store = Store(again)
    while store.pass_urgent():
        store.background_step(UNITS_PER_PAGE)
    assert store.ring_free() == 15 and punches == [], "the urgent pass punched under load"
    while store.background_step(UNITS_PER_PAGE):
        pass
    assert sum(punches) == units * U  # one dead copy of every unit given back
    assert store.read_saved(0, units * U) == b"b" * (units * U)


class _CountingLock:
    """map.lock, recording how many records the pass normalised in each hold (the store's
    pending count drops by one per record it normalises)."""

    def __init__(self, store: Store) -> None:
        self._lock, self._store, self.per_hold = threading.Lock(), store, []

    def __enter__(self) -> None:
        self._lock.acquire()
        self._before = self._store._pending

    def __exit__(self, *exc: object) -> None:
        self.per_hold.append(self._before - self._store._pending)
        self._lock.release()

    def acquire(self, blocking: bool = True) -> bool:
        return self._lock.acquire(blocking)

    def release(self) -> None:
        self._lock.release()


def test_the_pass_normalises_at_most_one_map_sector_per_map_lock_hold() -> None:
    """A writer never waits for a whole map page (1,008 records) of normalising: on a loaded
    machine the holder may lose the CPU in the middle, and every writer waits for it."""
    units = 3 * UNITS_PER_PAGE
    store = Store(memory_backing(units * U, U, 64))
    store.write_zeroes(0, units * U)  # every unit written in one epoch: uniform sectors
    store.write(5 * U, b"not uniform")  # and one sector of mixed records
    store.save("test")
    lock = store.map.lock = _CountingLock(store)  # type: ignore[assignment]
    while store.background_step(UNITS_PER_PAGE):
        pass
    assert store.status()["pending_units"] == 0 and max(lock.per_hold) > 0
    assert max(lock.per_hold) <= RECS_PER_SECTOR, f"{max(lock.per_hold)} records in one hold"
    assert sum(lock.per_hold) == units
    assert store.read(5 * U, 11) == b"not uniform"


def test_a_save_does_not_wait_for_the_data_sync_of_the_passs_flush(monkeypatch) -> None:
    """The pass's flush syncs what the host wrote (seconds on a slow disk). It does so with
    the I/O gate left, so a SAVE arriving meanwhile, and the I/O queued behind it, go on."""
    units = 4 * UNITS_PER_PAGE
    store = Store(memory_backing(units * U, U, 64))
    for p in range(4):
        store.write(p * UNITS_PER_PAGE * U, b"page %d" % p)
    store.save("test")  # four pending units, one per map page
    monkeypatch.setattr(store_mod, "PASS_FLUSH_SECTORS", 1)  # each step flushes
    store.write(7 * U, b"unsynced")
    real_sync, in_sync, release = store._b.sync, threading.Event(), threading.Event()

    def sync() -> None:  # the pass's first sync hangs until the test lets it go
        if not in_sync.is_set():
            in_sync.set()
            assert release.wait(10)
        real_sync()

    store._b.sync = sync  # type: ignore[method-assign]
    step = threading.Thread(target=store.background_step, args=(UNITS_PER_PAGE,))
    step.start()
    try:
        assert in_sync.wait(10)
        cmd = threading.Thread(target=lambda: (store.write(9 * U, b"new"), store.save("cli")))
        cmd.start()
        cmd.join(5)
        saved = not cmd.is_alive()
    finally:
        release.set()
        step.join(10)
    cmd.join(10)
    assert saved, "the SAVE waited for the pass's data sync"
    while store.background_step(UNITS_PER_PAGE):
        pass
    assert store.read_saved(9 * U, 3) == b"new" and store.read_saved(7 * U, 8) == b"unsynced"
    assert store.status()["pending_units"] == 0 and store.sb.resolved_below == store.epoch


def test_a_forced_pass_over_a_map_within_the_cache_syncs_only_at_its_end(tmp_path) -> None:
    """Each of the pass's flushes is a few syncs, and on ext4 every sync makes the host's
    allocating writes wait for a journal commit: a map that fits in a quarter of the map
    cache is written once, at the end, however many pages it has."""
    pages = 600
    path = _a_pending_unit_per_page(tmp_path, pages)
    with Store.open(path) as s:
        syncs, real_sync = [], s._b.sync

        def sync() -> None:
            syncs.append(s._pass_pos)
            real_sync()

        s._b.sync = sync  # type: ignore[method-assign]
        steps = 0
        while s.background_step(UNITS_PER_PAGE):
            s.write(steps * U, b"host")  # I/O goes on: there is always data to sync
            steps += 1
        assert steps >= pages - 1 and s.status()["pending_units"] == 0
        # the data outside the gate, the data again (written meanwhile), then the map
        # records before the ring may forget, then the superblock: four, all at the end
        assert len(syncs) <= 4, f"syncs at pass positions {syncs}"
        assert set(syncs) == {pages * UNITS_PER_PAGE}, f"syncs at pass positions {syncs}"
    with Store.open(path) as s:  # and all of it is durable
        assert s.sb.resolved_below == s.epoch
        assert s.read(599 * UNITS_PER_PAGE * U, 8) == b"page 599"
