"""Space on the backing file: allocation at init and open, punching dead slots, ENOSPC.

The punching proofs: a hypothesis model (every dead slot is a hole after a finished pass, no
live slot ever is) and power-cut chains whose every discard is checked against the model (a
punch may only hit a slot that is dead in both the durable and the in-memory state).
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import rule

from appliance.nbd import protocol as p
from appliance.store import Store, StoreFullError, create_store, filesystem
from appliance.store import space as store_space
from appliance.store.filesystem import allocated, fs_free
from appliance.store.format import PAGE
from tests.nbd_helpers import MiB, RawClient, serve
from tests.support import FakeClock
from tests.test_daemon_support import SAVEPOINT, env
from tests.test_store_crash import Chain
from tests.test_store_model import HIST_CAP, UNITS, StoreMachine, U

SEEK_DATA = getattr(os, "SEEK_DATA", 3)


def holds_data(fd: int, offset: int, length: int) -> bool:
    """Whether any byte of the range is allocated (SEEK_DATA: what punching gave back)."""
    try:
        return os.lseek(fd, offset, SEEK_DATA) < offset + length
    except OSError as e:
        if e.errno == errno.ENXIO:  # no data after offset at all
            return False
        raise


# ----- allocation ---------------------------------------------------------------------------


def test_init_allocates_everything_a_command_writes(tmp_path):
    path = str(tmp_path / "s.img")
    geo = create_store(path, 256 * MiB)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert allocated(fd) >= geo.slot_off[0]  # superblocks, ring and map
        assert not holds_data(fd, geo.slot_off[0], geo.total_size - geo.slot_off[0])  # sparse
    finally:
        os.close(fd)


def test_open_allocates_the_metadata_of_an_older_store_and_says_so(tmp_path, caplog):
    path = str(tmp_path / "s.img")
    geo = create_store(path, 256 * MiB)
    with Store.open(path) as st:
        st.write(0, b"kept" * 1024)
        st.save("test")
    fd = os.open(path, os.O_RDWR)
    try:  # what an older init left: the map region sparse
        st_map = geo.meta_off
        os.posix_fallocate(fd, 0, 1)
        from appliance.store.backing import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate

        # keep the map's first page (it holds the written unit's record), punch the rest
        fallocate(
            fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, st_map + 4096, geo.meta_len - 4096
        )
        before = allocated(fd)
        assert before < geo.slot_off[0]
    finally:
        os.close(fd)
    with caplog.at_level(logging.INFO, logger="savepoint.store"), Store.open(path) as st:
        assert st.read_saved(0, 4096) == b"kept" * 1024
        assert st.status()["space"]["allocated_bytes"] >= geo.slot_off[0] + 4096
    assert any("in-place upgrade" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="savepoint.store"), Store.open(path):
        pass
    assert not any("in-place upgrade" in r.getMessage() for r in caplog.records)


def _init(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SAVEPOINT, "init", *args], capture_output=True, text=True, env=env(), timeout=60
    )


def test_init_refuses_a_store_larger_than_the_free_space_unless_told(tmp_path):
    path = str(tmp_path / "big.img")
    free = fs_free(str(tmp_path))
    size = f"{free // (1 << 30) + 1}G"  # the store needs about twice this
    proc = _init(path, "--size", size, "--unit", "1M")
    assert proc.returncode == 1 and not os.path.exists(path)
    err = proc.stderr
    assert "can grow to" in err and "free" in err and "--allow-overcommit" in err
    assert err.count("GiB") >= 2 or "TiB" in err  # both figures, in human units
    proc = _init(path, "--size", size, "--unit", "1M", "--allow-overcommit")
    assert proc.returncode == 0, proc.stderr
    assert "allocated now" in proc.stdout
    with Store.open(path) as st:
        warning = filesystem.overcommit_warning(st.status()["space"])
    assert warning and "over-committed by" in warning


def test_daemon_create_refuses_overcommit_with_the_config_key_named(tmp_path):
    from appliance.config import serve_config
    from appliance.daemon import Daemon, StartupError

    free = fs_free(str(tmp_path))
    cfg = serve_config(
        str(tmp_path / "d.img"), (free // MiB + 1) * MiB, 1 << 20, None, None, False, None
    )
    with pytest.raises(StartupError, match="allow_overcommit"):
        Daemon(cfg)._open_store()
    assert not os.path.exists(tmp_path / "d.img")


# ----- ENOSPC -------------------------------------------------------------------------------


def _fill_up(store: Store, monkeypatch, free: list[int]) -> None:
    """Data writes into the slots fail with ENOSPC while free[0] is 0."""
    real = store._b.pwrite

    def pwrite(data, offset):
        if offset >= store.geo.slot_off[0] and free[0] == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(data, offset)

    monkeypatch.setattr(store._b, "pwrite", pwrite)
    monkeypatch.setattr(store_space, "fs_free", lambda fd: free[0])


def test_enospc_is_store_full_until_the_file_system_has_room(tmp_path, monkeypatch, caplog):
    path = str(tmp_path / "s.img")
    create_store(path, 16 * MiB)
    free = [0]
    with Store.open(path) as st:
        st.write(0, b"saved" * 100)
        st.save("test")
        _fill_up(st, monkeypatch, free)
        told = []
        st.space.listeners.append(lambda: told.append(st.space.full_reason))
        with caplog.at_level(logging.WARNING, logger="savepoint.store"):
            for off in (MiB, 2 * MiB):
                with pytest.raises(StoreFullError, match="backing storage full"):
                    st.write(off, b"x" * 8192)
        assert sum("backing storage full" in r.getMessage() for r in caplog.records) == 1
        space = st.status()["space"]
        assert space["full"] and "0 B free" in space["full_reason"]
        assert st.restore("test")["action"] == "restore"  # a full disk never stops RESTORE
        st.save("test")
        now = [0.0]
        st.space.clock = lambda: now[0] + st.space._last_full
        free[0] = store_space.RESUME_FREE
        assert st.space.poll()  # room, but an ENOSPC only just now: not yet
        now[0] = store_space.QUIET
        free[0] = store_space.RESUME_FREE - 1
        assert st.space.poll()
        free[0] = store_space.RESUME_FREE
        assert not st.space.poll() and not st.status()["space"]["full"]
        assert told == ["backing storage full: 0 B free on the file system of the store", ""]
        st.write(MiB, b"y" * 8192)
        assert st.read_saved(0, 500) == b"saved" * 100


def test_nbd_write_on_a_full_disk_gets_enospc_and_a_real_io_error_eio(tmp_path, monkeypatch):
    with serve(tmp_path, size=8 * MiB) as s:
        free = [0]
        _fill_up(s.store, monkeypatch, free)
        c = RawClient(s.sock, structured=True)
        assert c.request(p.CMD_WRITE, MiB, 4096, payload=bytes(4096))[0] == p.ENOSPC
        assert c.request(p.CMD_WRITE_ZEROES, 0, 1000)[0] == p.ENOSPC  # a partial unit: data
        assert c.request(p.CMD_FLUSH, 0, 0)[0] == 0
        free[0] = 1 << 30
        assert c.request(p.CMD_WRITE, MiB, 4096, payload=bytes(4096))[0] == 0
        monkeypatch.setattr(
            s.store._b,
            "pwrite",
            lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")),
        )
        assert c.request(p.CMD_WRITE, MiB, 4096, payload=bytes(4096))[0] == p.EIO
        monkeypatch.undo()


# ----- punching -----------------------------------------------------------------------------


def _slot_bytes(st: Store) -> int:
    """Allocated bytes beyond the metadata, to 256 KiB (file systems add extent blocks)."""
    n = st.status()["space"]["allocated_bytes"] - st.geo.slot_off[0]
    return round(n / (256 << 10)) * (256 << 10)


def _finish_pass(st: Store) -> None:
    while st.background_step(4096):
        pass


def test_one_restore_gives_back_the_space_of_the_discarded_writes(tmp_path):
    path = str(tmp_path / "s.img")
    create_store(path, 64 * MiB)
    with Store.open(path) as st:
        st.write(0, os.urandom(8 * MiB))
        st.save("test")
        _finish_pass(st)
        saved = _slot_bytes(st)
        assert saved == 8 * MiB
        st.write(4 * MiB, os.urandom(16 * MiB))  # 4 MiB over saved data, 12 MiB new
        assert _slot_bytes(st) == 24 * MiB
        st.restore("test")
        st.background_step(8192)  # one daemon-sized step: the pages in RAM go first
        assert _slot_bytes(st) == saved
        assert st.status()["space"]["punched_bytes"] >= 16 * MiB


def test_a_pass_that_ends_with_punches_owed_says_work_remains(tmp_path):
    """A nearly full ring makes the pass owe its punches (they could hold writers back); the
    step that ends the pass must still say work remains, or a caller that steps "until done"
    (SAVE on a full ring, a test, a tool) leaves the discarded write's blocks allocated. Page 0
    left RAM before the RESTORE (parked), so the reclaim of the pages in RAM does not find it."""
    path = str(tmp_path / "s.img")
    create_store(path, 64 * MiB, hist_cap=8)
    with Store.open(path, map_cache=2 * PAGE) as st:
        st.write(0, os.urandom(4096))
        st.read(0, 64 * MiB)  # every map page once: page 0 is parked and dropped
        for _ in range(6):
            st.restore("test")
        assert st.pass_urgent()
        _finish_pass(st)
        fd = os.open(path, os.O_RDONLY)
        try:
            assert not holds_data(fd, st.geo.slot_off[1], 4096), "the RESTORE kept its blocks"
        finally:
            os.close(fd)
        assert st.status()["space"]["punch_fault"] == ""


def test_after_save_the_old_copies_are_given_back_not_the_saved_ones(tmp_path):
    path = str(tmp_path / "s.img")
    create_store(path, 64 * MiB)
    old, new = os.urandom(8 * MiB), os.urandom(4 * MiB)
    with Store.open(path) as st:
        st.write(0, old)
        st.save("test")
        st.write(0, new)
        st.save("test")
        st.close()
    with Store.open(path) as st:  # a restarted daemon: nothing in RAM, the pass finds it all
        _finish_pass(st)
        assert _slot_bytes(st) == 8 * MiB  # 4 MiB new saved copies + 4 MiB untouched old ones
        assert st.read_saved(0, 8 * MiB) == new + old[4 * MiB :]
        st.write(0, b"w" * 4096)  # the working copy after the commit is never punched
        st.save("test")
        st.write(4096, b"v" * 4096)
        _finish_pass(st)
        assert st.read(0, 8192) == b"w" * 4096 + b"v" * 4096


class PunchMachine(StoreMachine):
    """The store model, plus: after a finished pass every dead slot is a hole."""

    @rule()
    def background_then_holes(self) -> None:
        self.background(65536)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            geo = self.store.geo
            for u in range(UNITS):
                if u in self.dirty:
                    continue
                dead = self.primary[u] ^ 1
                assert not holds_data(fd, geo.slot_off[dead] + u * U, U), (
                    f"unit {u}: its dead slot {dead} still holds data after a finished pass"
                )
        finally:
            os.close(fd)


PunchMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_punching_against_the_model = PunchMachine.TestCase
assert HIST_CAP < 40  # the chains above wrap the ring, so the full pass punches too


# ----- power cuts around punching -----------------------------------------------------------


class PunchChain(Chain):
    """Crash chains over a disk full of saved data, with RESTORE and passes most of the time.

    Every discard is checked against the model: it may only hit a slot that holds neither a
    unit's saved copy nor a copy written since the last command.
    """

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.discards = 0
        data = self.rng.randbytes(self.size)  # no unit reads as zeros: a wrong punch shows
        self.model.write(0, data)
        self.store.write(0, data)
        self.store.save("test")
        self.model.committed("save")

    def _guard(self, kind: str, offset: int, length: int) -> None:
        super()._guard(kind, offset, length)
        if kind != "discard":
            return
        self.discards += 1
        for slot in (0, 1):
            lo = self.geo.slot_off[slot]
            a, b = max(offset, lo), min(offset + length, lo + self.units * self.unit)
            for u in range((a - lo) // self.unit, (b - 1 - lo) // self.unit + 1) if a < b else ():
                if u in self.model.dirty:
                    self.fail(
                        f"discard {offset}+{length} punches unit {u}'s copy written "
                        "since the last command"
                    )

    def _next_op(self) -> tuple[object, ...]:
        kind = self.rng.choices(
            ["write", "zero", "flush", "save", "restore", "bg", "reopen"], [30, 4, 5, 8, 12, 25, 3]
        )[0]
        if kind in ("write", "zero"):
            return (kind, *self._range(), self.rng.random() < 0.2)
        if kind == "bg":
            return (kind, self.rng.choice([1, 50, 10_000]))
        return (kind,)


@pytest.mark.parametrize("batch", range(2))
def test_power_cuts_never_let_punching_lose_data(batch):
    points = max(200, int(os.environ.get("SAVEPOINT_CRASH_POINTS", "2000")) // 5)
    total = 0
    for i in range(batch, points // 20, 2):
        chain = PunchChain(0xB0B0 + i)
        for _ in range(20):
            chain.crash_point()
        chain.finish()
        total += chain.discards
    assert total > 0, "no chain punched anything: the test proves nothing"


def test_punch_chain_would_catch_a_punched_working_copy(monkeypatch):
    """The guard above is live: a punch that forgets "written this epoch" is caught."""
    from appliance.store.space import StoreSpace

    monkeypatch.setattr(StoreSpace, "_dead_slot", staticmethod(lambda rec, epoch: rec >> 31 ^ 1))
    with pytest.raises(AssertionError, match="written since the last command|differs|shows"):
        for i in range(20):
            chain = PunchChain(0xB0B0 + i)
            for _ in range(20):
                chain.crash_point()


def test_reclaim_leaves_an_untrusted_map_sector_alone(tmp_path):
    """A page with a damaged map sector: its units stay EIO, the rest is reclaimed."""
    from appliance.store.errors import StoreIOError
    from appliance.store.format import RECS_PER_SECTOR, SECTOR

    path = str(tmp_path / "s.img")
    geo = create_store(path, 16 * MiB)
    with Store.open(path) as st:
        st.write(0, b"a" * 4096)
        st.write(RECS_PER_SECTOR * 4096, b"b" * 4096)  # first unit of map sector 1
        st.save("test")
    with open(path, "r+b") as f:  # damage map sector 1
        f.seek(geo.meta_off + SECTOR + 100)
        f.write(b"\xff" * 8)
    with Store.open(path) as st:
        st.write(0, b"c" * 4096)  # loads the page, finds sector 1 bad
        st.restore("test")
        while st.background_step(4096):
            pass
        assert st.read(0, 4096) == b"a" * 4096
        with pytest.raises(StoreIOError, match="map sector 1"):
            st.read(RECS_PER_SECTOR * 4096, 4096)


def test_status_shows_allocation_margin_and_the_fault_with_what_to_do(capsys):
    from appliance.cli_show import print_status
    from appliance.store.filesystem import FULL_HINT

    space = {
        "backing": "file",
        "full_size": 134 * MiB,
        "allocated_bytes": 40 * MiB,
        "fs_free_bytes": 0,
        "margin_bytes": -94 * MiB,
        "full": True,
        "full_reason": "backing storage full: 0 B free on the file system of the store",
    }
    print_status(
        {
            "mode": "unlocked",
            "space": space,
            "parts": {
                "storage": {"state": "failed", "reason": space["full_reason"], "hint": FULL_HINT}
            },
        }
    )
    out = capsys.readouterr().out
    assert "40.0 MiB allocated of up to 134.0 MiB; 0 B free" in out
    assert "OVER-COMMITTED by 94.0 MiB" in out
    assert "FAULT        backing storage full: 0 B free" in out
    assert "what to do   RESTORE discards the unsaved writes" in out
    assert "part storage" not in out  # shown once, in the storage rows


def test_a_backing_that_cannot_tell_its_free_space_clears_after_a_quiet_time():
    """A thin-provisioned device (here the simulator): QUIET seconds without ENOSPC end it."""
    from tests.crashsim import new_backing

    b = new_backing(1 * MiB)
    st = Store(b)
    full = [True]

    def guard(kind, offset, length):
        if kind == "pwrite" and offset >= st.geo.slot_off[0] and full[0]:
            raise OSError(errno.ENOSPC, "No space left on device")

    b.guard = guard
    now = [100.0]
    st.space.clock = lambda: now[0]
    with pytest.raises(StoreFullError):
        st.write(0, b"x" * 4096)
    assert st.status()["space"]["full"] and st.status()["space"]["backing"] == "memory"
    now[0] += store_space.QUIET
    full[0] = False
    assert not st.space.poll()
    st.write(0, b"x" * 4096)
    assert st.read(0, 4096) == b"x" * 4096


# ----- a punch that fails: the store goes on, a later pass gives the space back ------------


def _failing_punches(monkeypatch, times: int) -> dict[str, int]:
    """The file system's hole punch fails with EIO `times` times (the real FileBacking path)."""
    from appliance.store import backing as store_backing

    real, state = store_backing.fallocate, {"left": times, "failed": 0}

    def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
        if mode & store_backing.FALLOC_FL_PUNCH_HOLE and state["left"]:
            state["left"] -= 1
            state["failed"] += 1
            raise OSError(errno.EIO, "Input/output error")
        real(fd, mode, offset, length)

    monkeypatch.setattr(store_backing, "fallocate", fallocate)
    return state


def test_a_full_ring_command_commits_on_a_file_whose_punches_all_fail(tmp_path, monkeypatch):
    path = str(tmp_path / "s.img")
    create_store(path, 16 * MiB, hist_cap=8)
    with Store.open(path) as st:
        for i in range(7):
            st.write(i * MiB, bytes([i + 1]) * MiB)
            st.save("test")
        assert st.ring_free() == 0
        failing = _failing_punches(monkeypatch, 1 << 30)
        st.write(8 * MiB, b"w" * 4096)
        assert st.save("test")["action"] == "save"
        while st.ring_free() > 0:  # fill it again, with RESTOREs this time
            st.restore("test")
        assert st.restore("test")["action"] == "restore"
        assert failing["failed"] >= 2
        assert "backing cannot free space: EIO" in st.status()["space"]["punch_fault"]
    with Store.open(path) as st:
        assert st.read_saved(8 * MiB, 4096) == b"w" * 4096
        assert [st.read_saved(i * MiB, 1) for i in range(7)] == [bytes([i + 1]) for i in range(7)]


def test_a_failed_punch_is_retried_by_a_later_pass_and_the_file_shrinks(tmp_path, monkeypatch):
    path = str(tmp_path / "s.img")
    create_store(path, 64 * MiB)
    new = os.urandom(8 * MiB)
    with Store.open(path) as st:
        st.write(0, os.urandom(8 * MiB))
        st.save("test")
        _finish_pass(st)
        st.write(0, new)
        st.save("test")  # the 8 MiB of old copies are dead now
        clock = FakeClock()
        st.space.clock = clock
        told = []
        st.space.listeners.append(lambda: told.append(st.space.punch_fault))
        failing = _failing_punches(monkeypatch, 1)
        _finish_pass(st)
        assert failing["failed"] == 1
        assert _slot_bytes(st) > 8 * MiB, "the failed span was given back: the test shows nothing"
        assert st.status()["space"]["punch_fault"].startswith("backing cannot free space: EIO")
        assert not st.background_step(), "a failed punch is retried at once, not after a while"
        clock.advance(store_space.PUNCH_RETRY)
        _finish_pass(st)  # the disk answers again: the next pass punches the span
        assert _slot_bytes(st) == 8 * MiB
        assert st.status()["space"]["punch_fault"] == ""
        assert [bool(t) for t in told] == [True, False]
        assert st.read_saved(0, 8 * MiB) == new


def test_a_punch_that_keeps_failing_is_retried_with_backoff(tmp_path, monkeypatch):
    path = str(tmp_path / "s.img")
    create_store(path, 16 * MiB)
    with Store.open(path) as st:
        for _ in range(2):
            st.write(0, os.urandom(4 * MiB))
            st.save("test")
        clock = FakeClock()
        st.space.clock = clock
        failing = _failing_punches(monkeypatch, 1 << 30)
        _finish_pass(st)
        tries = [failing["failed"]]
        for _ in range(4):  # each retry fails; the next waits twice as long
            clock.advance(store_space.PUNCH_RETRY * 2 ** (len(tries) - 1) - 1)
            _finish_pass(st)
            assert failing["failed"] == tries[-1], "retried before its time"
            clock.advance(1)
            _finish_pass(st)
            assert failing["failed"] > tries[-1], "not retried when due"
            tries.append(failing["failed"])
        assert st.status()["space"]["punch_failures"] == failing["failed"]


def test_spans_busy_with_writers_are_punched_by_a_later_step(tmp_path):
    """A writer holds a stripe lock through the whole pass: no span can be punched. They are
    owed (one range, however many spans) and the first step after it let go punches them."""
    path = str(tmp_path / "s.img")
    create_store(path, 64 * MiB)
    with Store.open(path) as st:
        for _ in range(2):
            st.write(0, os.urandom(16 * MiB))  # 4 map pages
            st.save("test")
        with st._stripes[0]:
            for _ in range(20):  # the whole pass, and retries while the writer holds on
                st.background_step(4096)
            assert st.sb.resolved_below == st.epoch and _slot_bytes(st) == 32 * MiB
        _finish_pass(st)
        assert _slot_bytes(st) == 16 * MiB
        assert st.status()["space"]["punch_fault"] == ""  # busy is no fault
