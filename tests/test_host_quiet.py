"""SAVE waits for a quiet host: the activity counter, the wait, the bus, the history record,
and off a Pi the NBD clients' own writes and flushes (real libnbd clients, real store)."""

from __future__ import annotations

import asyncio
import struct
import time

import crc32c

from appliance.control.bus import CommandBus
from appliance.control.commands import Action, Command
from appliance.control.host_quiet import HostActivity, kthread_wchar
from appliance.store.cli import host_column, print_history
from appliance.store.format import HIST_REC, HistoryRecord, unpack_history
from tests.nbd_helpers import libnbd, serve
from tests.support import FakeClock


def test_quiet_time_counts_from_the_last_change_and_flush_marks_synced() -> None:
    clock = FakeClock(100.0)
    act = HostActivity(clock)
    assert act.synced() is True  # nothing written since we started looking
    act.sample()
    clock.advance(5)
    assert act.sample() == 5
    act.wrote()
    assert act.sample() == 0 and act.synced() is False
    clock.advance(1.5)
    assert act.sample() == 1.5
    with act.own_flush():  # the appliance's own sync is not the host's
        act.flushed()
    assert act.synced() is False
    act.flushed()
    assert act.synced() is True
    act.use(lambda: None)  # a counter that cannot be read: unknown, never "busy"
    assert act.synced() is None


def test_kthread_wchar_reads_the_mass_storage_thread(tmp_path) -> None:
    read = kthread_wchar(proc=str(tmp_path))
    assert read() is None  # no such thread (gadget not bound)
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "comm").write_text("file-storage\n")
    (tmp_path / "42" / "io").write_text("rchar: 10\nwchar: 123456\nsyscr: 1\n")
    assert read() == 123456
    (tmp_path / "42" / "io").write_text("rchar: 10\nwchar: 123999\n")
    assert read() == 123999


async def keep_writing(act: HostActivity, stop: asyncio.Event, every: float = 0.05) -> None:
    while not stop.is_set():
        act.wrote()
        await asyncio.sleep(every)


def test_save_waits_for_the_host_to_go_quiet(store) -> None:
    async def go():
        act = HostActivity()
        bus = CommandBus(store, lock_enabled=False, activity=act, settle=0.3, max_wait=5)
        events = bus.subscribe()
        stop = asyncio.Event()
        writer = asyncio.ensure_future(keep_writing(act, stop))
        save = asyncio.ensure_future(bus.submit(Command(Action.SAVE, "button")))
        await asyncio.sleep(0.4)
        status = await bus.submit(Command(Action.STATUS, "cli"))  # not queued behind the SAVE
        assert not save.done()
        stop.set()
        await writer
        outcome = await save
        phases = []
        while not events.empty():
            e = events.get_nowait()
            if e.kind == "progress":
                phases.append(e.data["phase"])
        return outcome, status, phases

    started = time.monotonic()
    outcome, status, phases = asyncio.run(go())
    assert outcome.ok and time.monotonic() - started >= 0.7
    assert status.ok and status.data["saving"] == "waiting for the host"
    assert phases == ["start", "waiting", "commit", "end"]
    rec = store.history()[-1]
    assert rec["quiet"] >= 0.3 and rec["forced"] is False and rec["host_busy"] is False
    assert outcome.data["waited"] >= 0.4


def test_a_second_save_commits_the_waiting_one_at_once(store) -> None:
    async def go():
        act = HostActivity()
        bus = CommandBus(store, lock_enabled=False, activity=act, settle=5, max_wait=30)
        stop = asyncio.Event()
        writer = asyncio.ensure_future(keep_writing(act, stop))
        first = asyncio.ensure_future(bus.submit(Command(Action.SAVE, "button")))
        await asyncio.sleep(0.3)
        second = await bus.submit(Command(Action.SAVE, "button"))
        done = await asyncio.wait_for(first, 5)
        stop.set()
        await writer
        return done, second

    done, second = asyncio.run(go())
    assert second.ok and second.data["hurried"] is True
    assert done.ok and done.data["forced"] is True and done.data["waited"] < 2
    assert len(store.history()) == 1  # one SAVE, not two


def test_second_press_obeys_the_lock(store) -> None:
    async def go():
        act = HostActivity()
        bus = CommandBus(store, activity=act, settle=5, max_wait=1)
        assert (await bus.submit(Command(Action.UNLOCK, "button"))).ok
        act.wrote()
        first = asyncio.ensure_future(bus.submit(Command(Action.SAVE, "host")))
        await asyncio.sleep(0.1)
        second = await bus.submit(Command(Action.SAVE, "policy"))  # never may SAVE
        return await first, second

    first, second = asyncio.run(go())
    assert not second.ok  # a source that may not SAVE cannot hurry one either
    assert first.ok and first.data["host_busy"] is True and first.data["forced"] is False


def test_now_and_max_wait(store) -> None:
    async def go():
        act = HostActivity()
        bus = CommandBus(store, lock_enabled=False, activity=act, settle=5, max_wait=0.5)
        stop = asyncio.Event()
        writer = asyncio.ensure_future(keep_writing(act, stop))
        await asyncio.sleep(0.1)
        now = await bus.submit(Command(Action.SAVE, "cli", args={"now": True}))
        busy = await bus.submit(Command(Action.SAVE, "cli"))
        stop.set()
        await writer
        return now, busy

    now, busy = asyncio.run(go())
    assert now.data["forced"] is True and now.data["waited"] < 0.2
    assert busy.data["host_busy"] is True and 0.5 <= busy.data["waited"] < 2
    assert "BUSY (saved anyway)" in host_column(busy.data)
    assert "forced" in host_column(now.data)


def test_settle_zero_never_waits_but_records_the_quiet_time(store) -> None:
    async def go():
        act = HostActivity()
        bus = CommandBus(store, lock_enabled=False, activity=act, settle=0)
        act.wrote()
        return await bus.submit(Command(Action.SAVE, "cli"))

    outcome = asyncio.run(go())
    assert outcome.data["waited"] < 0.1 and outcome.data["quiet"] is not None


# -- the record on disk ------------------------------------------------------------------
def old_record(flags: int) -> bytes:
    """A record as the previous version wrote it: the two bytes after flags were padding."""
    body = struct.pack("<QqQQBB2x24s", 7, 1_700_000_000 * 10**9, 3, 12288, 1, flags, b"button")
    return body + struct.pack("<I", crc32c.crc32c(body))


def test_old_records_read_as_unknown_new_ones_round_trip(capsys) -> None:
    old = unpack_history(old_record(1))
    assert old is not None and len(old_record(1)) == HIST_REC
    info = old.as_dict()
    assert info["host_synced"] is True and info["quiet"] is None and info["host_busy"] is None
    new = HistoryRecord(8, 1, 1_700_000_001 * 10**9, 1, 4096, "fob:1", 2 | 8, 70000)
    back = unpack_history(new.pack())
    assert len(new.pack()) == HIST_REC
    d = back.as_dict()
    assert d["quiet"] == 6553.5 and d["host_busy"] is True and d["forced"] is False
    print_history([info, d])
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("host synced") and "host quiet >6553 s" in out[1]
    assert "BUSY (saved anyway)" in out[1]


# -- off a Pi: the NBD clients' writes are the host's writes -----------------------------------
WRITE_NO_FLUSH = """
import json, sys, nbd
h = nbd.NBD(); h.connect_unix(sys.argv[1])
h.pwrite(b"x" * 4096, 0)
if sys.argv[2] == "flush":
    h.flush()
h.shutdown(); print(json.dumps(True))
"""


def test_nbd_writes_and_flushes_are_seen(tmp_path) -> None:
    with serve(tmp_path) as served:
        act = HostActivity()
        served.server.activity = act
        libnbd(WRITE_NO_FLUSH, served.sock, "no")
        assert act.writes >= 1 and act.synced() is False
        assert act.sample() < 1
        libnbd(WRITE_NO_FLUSH, served.sock, "flush")
        assert act.synced() is True  # the host flushed after its last write
        before = act.writes
        libnbd(
            """
import json, sys, nbd
h = nbd.NBD(); h.connect_unix(sys.argv[1])
h.pread(4096, 0); h.shutdown(); print(json.dumps(True))
""",
            served.sock,
        )
        assert act.writes == before  # reads are not activity
