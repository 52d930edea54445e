"""The store API, one behaviour at a time, on real (sparse) files."""

from __future__ import annotations

import struct
import threading

import pytest

from appliance.store import (
    CorruptStoreError,
    FormatVersionError,
    NotAStoreError,
    OutOfRangeError,
    Store,
    StoreError,
    StoreIOError,
)
from appliance.store.backing import FileBacking
from appliance.store.format import (
    HIST_REC,
    RECS_PER_SECTOR,
    SB_OFFSETS,
    SB_SIZE,
    SECTOR,
    unpack_superblock,
)
from appliance.store.init import create_store

U = 4096
UNITS = 64
SIZE = UNITS * U


@pytest.fixture
def path(tmp_path) -> str:
    p = str(tmp_path / "store.img")
    create_store(p, SIZE, unit=U, hist_cap=64)
    return p


@pytest.fixture
def store(path):
    s = Store.open(path)
    yield s
    s.close()


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


class CountingBacking(FileBacking):
    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.writes = self.syncs = self.written = 0

    def pwrite(self, data, offset: int) -> None:
        self.writes += 1
        self.written += len(data)
        super().pwrite(data, offset)

    def sync(self) -> None:
        self.syncs += 1
        super().sync()


# ----- I/O --------------------------------------------------------------------------------------


def test_fresh_store_reads_zeros_and_reports_geometry(store) -> None:
    assert store.read(0, SIZE) == bytes(SIZE)
    st = store.status()
    assert (st["size"], st["unit_size"], st["units"], st["epoch"]) == (SIZE, U, UNITS, 1)
    assert (st["dirty_units"], st["dirty_bytes"], st["pending_units"]) == (0, 0, 0)
    assert st["last_save"] is None and st["last_restore"] is None
    assert store.history() == []


@pytest.mark.parametrize(
    "offset,length",
    [(0, 1), (511, 2), (U - 1, 2), (3 * U, 5 * U), (U + 100, 3 * U), (SIZE - 7, 7), (12345, 40000)],
)
def test_writes_of_any_alignment_read_back(store, offset, length) -> None:
    data = pattern(length, offset)
    store.write(offset, data)
    assert store.read(offset, length) == data
    assert store.read(0, offset) == bytes(offset)
    assert store.read(offset + length, SIZE - offset - length) == bytes(SIZE - offset - length)
    assert store.read_saved(0, SIZE) == bytes(SIZE)


def test_partial_write_copies_the_rest_of_the_unit_from_the_saved_copy(store) -> None:
    old = pattern(2 * U, 1)
    store.write(0, old)
    store.save("test")
    store.write(100, b"new")
    store.write(U + U - 3, b"end")
    expect = bytearray(old)
    expect[100:103] = b"new"
    expect[2 * U - 3 :] = b"end"
    assert store.read(0, 2 * U) == expect
    assert store.read_saved(0, 2 * U) == old
    store.restore("test")
    assert store.read(0, 2 * U) == old


def test_trim_reads_zeros_until_restore_and_leaves_the_saved_copy(store) -> None:
    data = pattern(8 * U, 2)
    store.write(0, data)
    store.save("test")
    store.trim(U + 10, 5 * U)  # partial head and tail units, four whole units
    expect = bytearray(data)
    expect[U + 10 : 6 * U + 10] = bytes(5 * U)
    assert store.read(0, 8 * U) == expect
    assert store.read_saved(0, 8 * U) == data
    store.restore("test")
    assert store.read(0, 8 * U) == data
    store.trim(0, 8 * U)
    store.save("test")
    assert store.read_saved(0, 8 * U) == bytes(8 * U)


def test_write_zeroes_and_writes_after_it_in_the_same_epoch(store) -> None:
    data = pattern(4 * U, 3)
    store.write(0, data)
    store.save("test")
    store.write_zeroes(0, 4 * U, fua=True)
    store.write(U + 5, b"abc")  # partial write into a zeroed unit: the rest stays zero
    expect = bytearray(4 * U)
    expect[U + 5 : U + 8] = b"abc"
    assert store.read(0, 4 * U) == expect
    assert store.read_saved(0, 4 * U) == data


def test_block_status_reports_zero_and_data_runs(store) -> None:
    assert store.block_status(0, SIZE) == [(0, SIZE, True)]
    store.write(2 * U, pattern(2 * U, 4))
    assert store.block_status(0, 8 * U) == [
        (0, 2 * U, True),
        (2 * U, 2 * U, False),
        (4 * U, 4 * U, True),
    ]
    store.trim(2 * U, U)
    assert store.block_status(0, 8 * U) == [
        (0, 3 * U, True),
        (3 * U, U, False),
        (4 * U, 4 * U, True),
    ]


@pytest.mark.parametrize("offset,length", [(-1, 1), (SIZE, 1), (SIZE - 1, 2), (0, SIZE + 1)])
def test_out_of_range_requests_are_refused_and_change_nothing(store, offset, length) -> None:
    store.write(0, b"keep")
    before = without_free_space(store.status())
    for call in (
        lambda: store.read(offset, length),
        lambda: store.write(offset, b"x" * length),
        lambda: store.trim(offset, length),
        lambda: store.write_zeroes(offset, length),
        lambda: store.block_status(offset, length),
        lambda: store.read_saved(offset, length),
    ):
        with pytest.raises(OutOfRangeError, match="outside the disk"):
            call()
    assert without_free_space(store.status()) == before
    assert store.read(0, 4) == b"keep"


def without_free_space(status: dict) -> dict:
    """The status minus the filesystem's free space, which other programs change meanwhile."""
    space = {
        k: v
        for k, v in (status.get("space") or {}).items()
        if k not in ("fs_free_bytes", "margin_bytes")
    }
    return {**status, "space": space}


# ----- SAVE, RESTORE, history, status -------------------------------------------------------


def test_status_counts_units_and_bytes_written_since_the_last_command(store) -> None:
    store.write(0, b"a" * 10)
    store.write(5, b"b" * 10)  # same unit again
    store.write(U - 1, b"cc")  # two units
    store.trim(8 * U, 2 * U)
    st = store.status()
    assert (st["dirty_units"], st["dirty_bytes"]) == (4, 10 + 10 + 2 + 2 * U)
    rec = store.save("button")
    assert (rec["epoch"], rec["action"], rec["units"], rec["bytes"]) == (1, "save", 4, 22 + 2 * U)
    st = store.status()
    assert (st["epoch"], st["dirty_units"], st["dirty_bytes"]) == (2, 0, 0)
    assert st["last_save"] and st["last_restore"] is None
    store.restore("fob:ab12")
    assert store.status()["last_restore"]


def test_history_records_every_command_with_its_source(store) -> None:
    store.write(0, b"x")
    store.save("button", host_synced=True)
    store.restore("fob:1")
    store.write(U, b"y" * U)
    store.save("cli")
    hist = store.history()
    assert [(h["epoch"], h["action"], h["source"], h["units"]) for h in hist] == [
        (1, "save", "button", 1),
        (2, "restore", "fob:1", 0),
        (3, "save", "cli", 1),
    ]
    assert hist[0]["host_synced"] and not hist[2]["host_synced"]
    assert [h["epoch"] for h in store.history(limit=2)] == [2, 3]


def test_reopen_keeps_data_saved_image_epoch_and_history(path) -> None:
    with Store.open(path) as s:
        s.write(0, b"saved")
        s.save("cli")
        s.write(0, b"work!")
        s.write(10 * U, b"more")
    with Store.open(path) as s:
        assert s.read(0, 5) == b"work!" and s.read(10 * U, 4) == b"more"
        assert s.read_saved(0, 5) == b"saved" and s.read_saved(10 * U, 4) == bytes(4)
        st = s.status()
        assert (st["epoch"], st["dirty_units"], st["dirty_bytes"]) == (2, 2, 9)
        assert [h["action"] for h in s.history()] == ["save"]
        s.restore("cli")
        assert s.read(0, 5) == b"saved"


def test_background_pass_brings_the_map_up_to_date_without_changing_data(store) -> None:
    data = pattern(20 * U, 5)
    store.write(0, data)
    store.save("cli")
    store.write(0, b"z" * U)
    store.restore("cli")
    assert store.status()["pending_units"] >= 20
    while store.background_step(max_units=8):
        assert 0 <= store.status()["background_progress"] <= 1
    st = store.status()
    assert st["pending_units"] == 0 and st["background_progress"] == 1.0
    assert store.background_step() is False
    assert store.read(0, 20 * U) == data and store.read_saved(0, 20 * U) == data


def test_history_ring_wraps_with_a_small_capacity(tmp_path) -> None:
    p = str(tmp_path / "small.img")
    create_store(p, 16 * U, unit=U, hist_cap=8)
    saved = bytearray(16 * U)
    with Store.open(p) as s:
        for i in range(30):
            data = pattern(U + i, i)
            off = (i * 3 % 14) * U + i
            s.write(off, data)
            if i % 3 == 2:
                s.restore("cli")
            else:
                s.save("cli")
                saved[off : off + len(data)] = data
            assert s.read_saved(0, 16 * U) == saved
            assert s.read(0, 16 * U) == saved
        hist = s.history()
        assert 1 <= len(hist) <= 8 and hist[-1]["epoch"] == 30
    with Store.open(p) as s:
        assert s.read_saved(0, 16 * U) == saved and s.epoch == 31
        assert [h["epoch"] for h in s.history()] == [h["epoch"] for h in hist]


def test_readonly_store_reads_but_refuses_changes(path) -> None:
    with Store.open(path) as s:
        s.write(0, b"data")
    with Store.open(path, readonly=True) as s:
        assert s.read(0, 4) == b"data"
        for call in (
            lambda: s.write(0, b"x"),
            lambda: s.trim(0, U),
            lambda: s.write_zeroes(0, U),
            lambda: s.save("cli"),
            lambda: s.restore("cli"),
        ):
            with pytest.raises(StoreError, match="read-only"):
                call()
        s.flush()
        assert s.background_step() is False
    with Store.open(path) as s:
        assert s.read(0, 4) == b"data" and s.epoch == 1


def test_a_store_in_use_is_refused(path, store) -> None:
    with pytest.raises(StoreError, match="in use"):
        Store.open(path)


# ----- damaged and foreign targets ---------------------------------------------------------


def _poke(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _sb_seqs(path: str) -> list[int]:
    with open(path, "rb") as f:
        raw = f.read(2 * SB_SIZE)
    return [unpack_superblock(raw[o : o + SB_SIZE]).seq for o in SB_OFFSETS]


def test_a_corrupted_superblock_copy_falls_back_to_the_other(path) -> None:
    with Store.open(path) as s:
        s.write(0, b"one")
        s.save("cli")
        s.write(0, b"two")
    seqs = _sb_seqs(path)
    older = SB_OFFSETS[seqs.index(min(seqs))]
    _poke(path, older + 40, b"\xff\xff")  # the older copy is damaged: nothing is lost
    with Store.open(path) as s:
        assert s.read(0, 3) == b"two" and s.read_saved(0, 3) == b"one" and s.epoch == 2
    for off in SB_OFFSETS:
        _poke(path, off + 40, b"\xee\xee")
    with pytest.raises(CorruptStoreError, match="both superblock copies"):
        Store.open(path)


@pytest.mark.parametrize("normalised", [False, True])
def test_a_corrupted_map_sector_is_an_io_error_not_wrong_data(path, normalised) -> None:
    with Store.open(path) as s:
        s.write(0, pattern(4 * U, 9))
        s.save("cli")
        while normalised and s.background_step():
            pass  # records now say "saved in slot 1, nothing pending"
        meta_off = s.geo.meta_off
    _poke(path, meta_off + 8 + 4 * 2 + 3, b"\x00")  # unit 2's record: VSM bit cleared
    with Store.open(path) as s:
        with pytest.raises(StoreIOError, match="map sector 0"):
            s.read(2 * U, U)
        with pytest.raises(StoreIOError):
            s.read_saved(0, 4 * U)


def test_a_damaged_map_sector_inside_a_long_run_is_an_io_error(tmp_path) -> None:
    """Long uniform runs take a fast path; a bad sector in their middle must still count."""
    p = str(tmp_path / "wide.img")
    units = 3 * RECS_PER_SECTOR
    create_store(p, units * U, unit=U, hist_cap=64)
    with Store.open(p) as s:
        s.write(0, pattern(units * U, 4))
        meta_off = s.geo.meta_off
    _poke(p, meta_off + SECTOR, b"\xde\xad")  # the checksum of map sector 1 only
    with Store.open(p) as s:
        with pytest.raises(StoreIOError, match="map sector 1"):
            s.read(0, units * U)
        with pytest.raises(StoreIOError, match="map sector 1"):
            s.write(0, bytes(units * U))
    with Store.open(p) as s:  # the failed write did not paper over the damage
        with pytest.raises(StoreIOError, match="map sector 1"):
            s.read(RECS_PER_SECTOR * U, U)


def test_a_lost_history_ring_write_is_repaired_from_the_superblock(path) -> None:
    """The power went after the superblock of a SAVE was durable but not its ring record."""
    with Store.open(path) as s:
        s.write(0, b"saved")
        s.save("cli")
        s.write(0, b"after")
        s.restore("fob:9")
        hist_off = s.geo.hist_off
    _poke(path, hist_off + 2 * HIST_REC, bytes(HIST_REC))  # the record of epoch 2
    with Store.open(path) as s:
        assert s.read(0, 5) == b"saved" and s.epoch == 3
        assert [h["source"] for h in s.history()] == ["cli", "fob:9"]


def test_a_foreign_file_is_not_a_store(tmp_path) -> None:
    p = tmp_path / "photo.jpg"
    p.write_bytes(b"\xff\xd8\xff\xe0" + pattern(20000, 1))
    with pytest.raises(NotAStoreError, match="not a Savepoint store"):
        Store.open(str(p))
    with pytest.raises(NotAStoreError, match="does not exist"):
        Store.open(str(tmp_path / "missing.img"))


def test_a_store_from_a_newer_format_version_is_refused(path) -> None:
    _poke(path, SB_OFFSETS[0] + 8, struct.pack("<I", 99))
    with pytest.raises(FormatVersionError, match="newer"):
        Store.open(path)


# ----- invariant 6: SAVE and RESTORE cost O(1) I/O ---------------------------------------


def _command_cost(path: str, dirty: int, action: str) -> tuple[int, int, int]:
    b = CountingBacking(path)
    s = Store(b)
    for u in range(dirty):
        s.write(u * U + 3, b"dirty")  # partial writes: one copy-up each, worst case
    s.flush()
    before = (b.writes, b.syncs, b.written)
    getattr(s, action)("cli")
    cost = (b.writes - before[0], b.syncs - before[1], b.written - before[2])
    s.close()
    return cost


@pytest.mark.parametrize("action", ["save", "restore"])
def test_save_and_restore_cost_the_same_for_1_and_200_dirty_units(tmp_path, action) -> None:
    costs = []
    for dirty in (1, 200):
        p = str(tmp_path / f"{action}{dirty}.img")
        create_store(p, 256 * U, unit=U)
        costs.append(_command_cost(p, dirty, action))
    assert costs[0] == costs[1], f"{action}: {costs[0]} for 1 unit, {costs[1]} for 200"
    writes, syncs, written = costs[0]
    assert writes <= 3 and syncs <= 3 and written <= 2 * SB_SIZE + SECTOR


# ----- counters survive a reopen ----------------------------------------------------------


def test_pending_units_are_exact_after_reopen(path) -> None:
    with Store.open(path) as s:
        s.write(0, b"a")
        s.save("cli")
        s.write(0, b"b")
        s.save("cli")
        assert s.status()["pending_units"] == 1  # unit 0, written in epoch 2
    with Store.open(path) as s:
        assert s.status()["pending_units"] == 1


def test_dirty_bytes_survive_a_clean_close(path) -> None:
    with Store.open(path) as s:
        s.write(0, b"a" * 100, fua=True)
        s.write(0, b"b" * 50)  # same unit, same epoch: no map change
        assert s.status()["dirty_bytes"] == 150
    with Store.open(path) as s:
        assert s.status()["dirty_bytes"] == 150


class RacingBacking(FileBacking):
    """Runs `race` once, right after the read at `at`: another request slips in there."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.at, self.race = -1, None

    def pread_into(self, buf, offset: int) -> None:
        super().pread_into(buf, offset)
        if offset == self.at and self.race:
            race, self.race = self.race, None
            race()


def test_a_whole_unit_write_during_a_copy_up_is_not_lost(path) -> None:
    b = RacingBacking(path)
    s = Store(b)
    s.write(5 * U, pattern(4 * U, 1))
    s.save("cli")
    new = pattern(4 * U, 2)
    b.at = s.geo.slot_off[1] + 6 * U  # the copy-up read of unit 6's saved copy (slot 1)
    racer = threading.Thread(target=s.write, args=(5 * U, new))  # units 5-8 in one request

    def race() -> None:  # start the whole-unit write while unit 6 copies up; it must wait
        racer.start()
        racer.join(0.3)

    b.race = race
    s.write(6 * U + 100, b"A" * 10)
    racer.join(10)
    assert b.race is None, "the copy-up read was not reached: the test lost its race"
    got = s.read(6 * U, U)
    s.close()
    assert got[:100] == new[U : U + 100] and got[110:] == new[U + 110 : 2 * U]
