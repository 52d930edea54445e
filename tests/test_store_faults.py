"""I/O errors and full disks, one finding at a time (the randomized chains are in
test_store_crash.py): a failed operation that is retried keeps every promise of docs/format.md.
"""

from __future__ import annotations

import errno
import logging
import random

import pytest

from appliance.store import NotAStoreError, Store, StoreIOError
from appliance.store.format import (
    HIST_REC,
    RESTORE,
    UNITS_PER_PAGE,
    WEPOCH_MASK,
    HistoryRecord,
    MiB,
    geometry_for_capacity,
    plan_geometry,
)
from appliance.store.init import write_fresh_store
from tests.crashsim import CrashBacking, PowerCut, new_backing

U = 4096


def data(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def reopen(b: CrashBacking, rng: random.Random | None = None, readonly: bool = False) -> Store:
    """The store after a power cut (rng given) or after a clean stop (no rng)."""
    return Store(b.power_cut(rng) if rng else CrashBacking(bytearray(b.image)), readonly)


# ----- finding 1: a FLUSH that fails once and is retried keeps the write -----------------


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC])
@pytest.mark.parametrize("fail", ["map-sector write", "superblock write", "final sync"])
def test_a_retried_flush_makes_the_write_durable(err: int, fail: str) -> None:
    b = new_backing(64 * U, U, 64)
    s = Store(b)
    s.write(3 * U, data(U, 1))
    kinds, after = {
        "map-sector write": ({"pwrite"}, 1),
        "superblock write": ({"pwrite"}, 2),
        "final sync": ({"sync"}, 2),
    }[fail]
    b.inject(kinds, err, after)
    with pytest.raises(StoreIOError):
        s.flush()
    s.flush()  # the retry: OK
    for rng in [None, *(random.Random(i) for i in range(20))]:
        assert reopen(b, rng).read(3 * U, U) == data(U, 1), f"lost after {fail} failed"


def test_a_retried_flush_syncs_the_data_before_the_map() -> None:
    """The data sync failed: the retry must sync data again before the map can point at it."""
    b = new_backing(64 * U, U, 64)
    s = Store(b)
    for seed in (1, 2):  # slot 0 then slot 1 saved: unit 0's secondary (slot 0) holds seed 1
        s.write(0, data(U, seed))
        s.save("test")
    s.write(0, data(U, 3))
    b.inject({"sync"})
    with pytest.raises(StoreIOError):
        s.flush()
    b.cut_at = b.ops + 3  # the retry: [data sync], map write, superblock write, sync <- cut
    with pytest.raises(PowerCut):
        s.flush()
    for i in range(40):
        got = reopen(b, random.Random(i)).read(0, U)
        assert got in (data(U, 2), data(U, 3)), "a durable record points at unwritten data"


# ----- finding 2: the background pass keeps what a failed flush did not write ------------


def test_a_failed_background_flush_does_not_forget_the_saved_image() -> None:
    b = new_backing(64 * U, U, 8)
    s = Store(b)
    s.write(0, data(U, 1))
    s.save("test")  # unit 0's record now depends on how epoch 1 ended
    b.inject({"pwrite"})  # the normalised map sector
    with pytest.raises(StoreIOError):
        s.background_step()
    while s.background_step():
        pass
    for _ in range(10):  # wrap the ring: epoch 1's record is forgotten
        s.restore("test")
    s.close()
    assert reopen(b).read_saved(0, U) == data(U, 1)


# ----- finding 3: a read-only open repairs like a read-write one ------------------------


def test_a_read_only_open_prefers_the_superblocks_record() -> None:
    b = new_backing(64 * U, U, 64)
    s = Store(b)
    s.write(0, data(U, 1))
    s.flush()
    epoch = s.epoch
    # A RESTORE at this epoch was cut after its ring record but before its superblock...
    stale = HistoryRecord(epoch, RESTORE, 1, 0, 0, "cut").pack()
    slot = s.geo.hist_off + epoch % s.geo.hist_cap * HIST_REC
    # ...then a SAVE at the same epoch was cut the other way: superblock durable, ring not.
    s.save("test")
    b.image[slot : slot + HIST_REC] = stale
    s.close()
    ro, rw = reopen(b, readonly=True), reopen(b)
    for st in (ro, rw):
        assert st.history(limit=1)[-1]["action"] == "save"
        assert st.read_saved(0, U) == data(U, 1)


# ----- finding 5: counters stay exact when the background pass races a write -------------


def test_pending_units_stay_exact_when_the_pass_races_a_whole_unit_write() -> None:
    units = 2 * UNITS_PER_PAGE + 5
    b = new_backing(units * U, U, 64)
    s = Store(b)
    s.write(0, bytes(range(256)) * (units * U // 256))
    s.save("test")  # every unit pending
    target = s.geo.slot_off[0] + 10 * U  # the one-pwrite run of units 10..19 (slot 0)
    raced = []

    def guard(kind: str, offset: int, length: int) -> None:
        if kind == "pwrite" and offset == target and not raced:
            raced.append(s.background_step(1))  # the pass normalises the run's page meanwhile

    b.guard = guard
    s.write(10 * U, data(10 * U, 5))
    assert raced == [True]
    epoch = s.epoch
    actual = sum(1 for u in range(units) if 0 < s.map.raw(u) & WEPOCH_MASK < epoch)
    assert s.status()["pending_units"] == actual


# ----- finding 6: small devices --------------------------------------------------------


@pytest.mark.parametrize(
    "capacity",
    [8 * MiB, 10 * MiB, 16 * MiB + 4096, 32 * MiB, 63 * MiB, 64 * MiB, 100 * MiB + 12345],
)
@pytest.mark.parametrize("unit", [4096, 65536])
def test_small_devices_get_the_largest_disk_that_fits(capacity: int, unit: int) -> None:
    try:
        geo = geometry_for_capacity(capacity, unit)
    except ValueError:
        smallest = plan_geometry(unit, unit).total_size
        assert smallest > capacity, f"{capacity} bytes were refused but a disk fits"
        return
    assert geo.total_size <= capacity
    bigger = plan_geometry(geo.logical_size + unit, unit)
    assert bigger.total_size > capacity, (
        f"{capacity} bytes: {geo.logical_size} offered, {geo.logical_size + unit} fits"
    )


# ----- finding 4: init --force over a store, cut at any point --------------------------


def test_init_force_over_a_store_never_serves_the_old_data_after_a_cut() -> None:
    old = new_backing(64 * U, U, 64)
    s = Store(old)
    s.write(0, data(64 * U, 7))
    s.save("test")
    s.write(0, data(8 * U, 8))
    s.close()
    geo = s.geo
    for cut in range(1, 40):
        b = CrashBacking(bytearray(old.image), cut_at=cut)
        try:
            write_fresh_store(b, geo, zero_meta=True)
        except PowerCut:
            pass
        else:
            assert cut > 3, "init finished in fewer operations than it has steps"
            break
        for i in range(8):
            try:
                st = Store(b.power_cut(random.Random(i)))
            except NotAStoreError:
                continue  # the old store is gone and the new one not there yet: run init again
            if st.epoch == 1:
                assert st.read(0, 64 * U) == bytes(64 * U), f"cut {cut}: new store, old data"
            else:
                assert st.read_saved(0, 64 * U) == data(64 * U, 7), f"cut {cut}: old store damaged"


# ----- finding 5: counters after a cut inside a flush -----------------------------------


def test_the_first_pass_after_a_cut_recounts_what_the_map_holds() -> None:
    """A cut between a flush's map writes and its superblock: the map says 2 units were
    written, the superblock 0. The pass that follows every open counts them again."""
    for seed in range(200):
        b = new_backing(64 * U, U, 64)
        s = Store(b)
        s.write(0, data(2 * U, 1))
        b.cut_at = b.ops + 4  # data sync, map sector, superblock, sync <- cut
        with pytest.raises(PowerCut):
            s.flush()
        after = Store(b.power_cut(random.Random(seed)))
        written = sum(after.map.raw(u) & WEPOCH_MASK == after.epoch for u in range(64))
        if written == 2 and after.sb.dirty_units == 0:
            break
    else:
        pytest.fail("no cut left the map durable without its superblock")
    while after.background_step():
        pass
    assert after.status()["dirty_units"] == 2
    assert after.save("test")["units"] == 2


# ----- finding 7: a hole punch only gives space back: its failure fails nothing -----------


def _full_ring(hist_cap: int = 8) -> tuple[CrashBacking, Store]:
    """A store whose next command must first finish the background pass (which punches)."""
    b = new_backing(64 * U, U, hist_cap)
    s = Store(b)
    for i in range(hist_cap - 1):
        s.write(i * U, data(U, i))
        s.save("test")  # unit i now waits for the pass; its old copy for a punch
    assert s.ring_free() == 0
    return b, s


@pytest.mark.parametrize("persistent", [True, False], ids=["every-punch", "one-punch"])
@pytest.mark.parametrize("action", ["save", "restore"])
def test_a_command_on_a_full_ring_commits_when_hole_punches_fail(
    action: str, persistent: bool, caplog: pytest.LogCaptureFixture
) -> None:
    b, s = _full_ring()
    s.write(40 * U, data(U, 99))
    fault = b.inject({"discard"}, errno.EIO, persistent=persistent)
    with caplog.at_level(logging.WARNING, logger="savepoint.store"):
        rec = getattr(s, action)("test")  # its pass leaves the punches for later (urgent)
        while s.background_step():  # ...which is now: they fail, and the pass goes on
            pass
        s.write(41 * U, data(U, 100))  # and the store goes on
        s.save("test")
    assert rec["action"] == action and fault.fired >= 1
    saved = [data(U, i) for i in range(7)] + [
        data(U, 99) if action == "save" else bytes(U),
        data(U, 100),
    ]
    space = s.status()["space"]
    assert space["punch_failures"] == fault.fired
    assert space["punch_fault"] == (
        "backing cannot free space: EIO (simulated Input/output error on discard); "
        "the store still works, its file may grow"
    )
    told = [r.getMessage() for r in caplog.records if "cannot free space" in r.getMessage()]
    assert len(told) == 1, f"logged per punch, not once: {told}"
    s.close()
    after = reopen(b)
    assert [after.read_saved(u * U, U) for u in (*range(7), 40, 41)] == saved


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC])
def test_a_trim_whose_hole_punch_fails_still_trims(err: int) -> None:
    """TRIM punches the unit's working copy; the punch fails half-way. The TRIM still
    succeeds (the record says "no data", which is what reads show), and the sectors the
    failed punch zeroed are unsynced data, so a cut before the next flush shows each sector
    old or zero, and after the flush zero."""
    b = new_backing(64 * U, U, 64)
    s = Store(b)
    s.write(0, data(U, 1))
    s.flush()
    b.inject({"discard"}, err)
    b.rng = random.Random(3)  # which sectors of the failed punch land
    s.trim(0, U)
    assert s.read(0, U) == bytes(U)
    assert s.status()["space"]["punch_failures"] == 1
    for i in range(20):
        got = reopen(b, random.Random(i)).read(0, U)
        for k in range(0, U, 512):
            assert got[k : k + 512] in (data(U, 1)[k : k + 512], bytes(512))
    s.flush()
    assert Store(CrashBacking(b.durable_image())).read(0, U) == bytes(U)
