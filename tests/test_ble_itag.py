"""iTag keyfinders: config, press -> command, debounce, reconnect, and the bus's refusals."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest

from appliance.control.commands import Action, Command, PartUnavailable
from ble import BlePart
from ble.itag import BUTTON_UUID, ITag, ITagWatcher, parse_itags
from tests.support import FakeClock, RecordingBus, run

ADDR = "AA:BB:CC:DD:EE:01"


class FakeTag:
    """A notifying iTag as a bleak client sees it; `fail` connection attempts fail first."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.attempts = 0
        self.links: list[FakeLink] = []
        self.up = asyncio.Event()

    def factory(self, address: str, dropped: Callable[[], None]) -> FakeLink:
        link = FakeLink(self, address, dropped)
        self.links.append(link)
        return link

    def press(self) -> None:
        link = self.links[-1]
        assert link.notify is not None, "nobody subscribed to 0xFFE1"
        link.notify(None, bytearray(b"\x01"))

    def drop(self) -> None:
        self.up.clear()
        self.links[-1].dropped()


class FakeLink:
    def __init__(self, tag: FakeTag, address: str, dropped: Callable[[], None]) -> None:
        self.tag, self.address, self.dropped = tag, address, dropped
        self.notify: Callable[[Any, bytearray], None] | None = None
        self.closed = False

    async def connect(self) -> None:
        self.tag.attempts += 1
        if self.tag.attempts <= self.tag.fail:
            raise OSError(f"Device with address {self.address} was not found.")

    async def start_notify(self, uuid: str, callback: Callable[[Any, bytearray], None]) -> None:
        assert uuid == BUTTON_UUID
        self.notify = callback
        self.tag.up.set()

    async def disconnect(self) -> None:
        self.closed = True


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.parametrize(
    "value, message",
    [
        ("AA:BB", "must be a list of tables"),
        (["AA:BB:CC:DD:EE:01"], r"itags\[0\]: expected \{address"),
        ([{"address": "AA:BB:CC:DD:EE"}], r"itags\[0\]: address 'AA:BB:CC:DD:EE' is not a BLE"),
        ([{"address": ADDR, "action": "restore"}], r"'restore' is not allowed.*cannot auth"),
        ([{"address": ADDR, "action": "unlock"}], r"only trigger \"save\" or \"status\""),
        ([{"address": ADDR, "button": 1}], "unknown key button"),
        ([{"address": ADDR}, {"address": ADDR.lower()}], r"itags\[1\]: AA:BB.* listed twice"),
    ],
)
def test_config_errors_name_the_entry_and_the_fix(value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_itags(value)


def test_config_accepts_save_and_status() -> None:
    tags = parse_itags([{"address": "aa:bb:cc:dd:ee:01"},
                        {"address": "AA:BB:CC:DD:EE:02", "action": "status"}])  # fmt: skip
    assert tags == [ITag(ADDR, Action.SAVE), ITag("AA:BB:CC:DD:EE:02", Action.STATUS)]
    assert tags[0].source == "itag:AA:BB:CC:DD:EE:01"


def test_press_submits_unauthenticated_and_repeats_are_debounced() -> None:
    async def body() -> None:
        sink, tag, clock = RecordingBus(), FakeTag(), FakeClock(100.0)
        watcher = ITagWatcher(ITag(ADDR, Action.SAVE), sink, tag.factory, clock=clock)
        task = asyncio.create_task(watcher.run())
        await asyncio.wait_for(tag.up.wait(), 2)
        tag.press()
        clock.advance(0.2)
        tag.press()  # the tag repeating itself, or a bounce
        clock.advance(0.4)
        tag.press()  # a second press
        await settle()
        assert [(c.action, c.source, c.authenticated) for c in sink.commands] == [
            (Action.SAVE, f"itag:{ADDR}", False)
        ] * 2
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert tag.links[-1].closed  # stop disconnects

    run(body())


def test_missing_tag_is_logged_once_and_reconnects_with_backoff(caplog) -> None:
    async def body() -> None:
        sink, tag = RecordingBus(), FakeTag(fail=4)
        watcher = ITagWatcher(ITag(ADDR, Action.STATUS), sink, tag.factory,
                              backoff=(0.01, 0.04))  # fmt: skip
        task = asyncio.create_task(watcher.run())
        await asyncio.wait_for(tag.up.wait(), 2)
        assert tag.attempts == 5 and all(link.closed for link in tag.links[:-1])
        tag.drop()  # out of range: the watcher reconnects by itself
        await asyncio.wait_for(tag.up.wait(), 2)
        assert tag.attempts == 6
        tag.press()
        await settle()
        assert [c.action for c in sink.commands] == [Action.STATUS]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    with caplog.at_level(logging.INFO, logger="ble.itag"):
        run(body())
    missing = [r for r in caplog.records if "not reachable" in r.getMessage()]
    assert len(missing) == 1 and "was not found" in missing[0].getMessage()
    assert sum("disconnected; reconnecting" in r.getMessage() for r in caplog.records) == 1


def test_the_real_bus_refuses_restore_and_unlock_from_an_itag(tmp_path) -> None:
    from appliance.control.bus import CommandBus
    from appliance.store import Store, create_store

    create_store(str(tmp_path / "disk.img"), 1 << 20, 4096)
    store = Store.open(str(tmp_path / "disk.img"))

    async def body() -> None:
        bus, tag = CommandBus(store), FakeTag()
        watcher = ITagWatcher(ITag(ADDR, Action.SAVE), bus, tag.factory)
        task = asyncio.create_task(watcher.run())
        await asyncio.wait_for(tag.up.wait(), 2)
        epoch = (await bus.snapshot())["epoch"]
        tag.press()  # LOCKED at boot: refused
        await asyncio.sleep(0.1)
        assert (await bus.snapshot())["epoch"] == epoch
        assert "LOCKED" in (bus.last_outcome or {})["reason"]
        assert (await bus.submit(Command(Action.UNLOCK, source="cli"))).ok
        watcher._last_press = float("-inf")  # a later press, not a bounce
        tag.press()
        for _ in range(100):
            if (await bus.snapshot())["epoch"] == epoch + 1:
                break
            await asyncio.sleep(0.02)
        last = bus.last_outcome or {}
        assert (last["action"], last["source"], last["ok"]) == ("save", f"itag:{ADDR}", True)
        for action in (Action.RESTORE, Action.UNLOCK):
            outcome = await bus.submit(Command(action, source=f"itag:{ADDR}",
                                               authenticated=False))  # fmt: skip
            assert not outcome.ok and "unauthenticated fob" in outcome.reason
        assert (await bus.snapshot())["epoch"] == epoch + 1
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    try:
        run(body())
    finally:
        store.close()


def test_ble_part_refuses_a_bad_itag_entry_before_touching_bluez(tmp_path) -> None:
    cfg = {"registry": str(tmp_path / "f.json"), "bus_address": "unix:path=/nonexistent",
           "itags": [{"address": ADDR, "action": "restore"}]}  # fmt: skip
    with pytest.raises(PartUnavailable, match="'restore' is not allowed") as err:
        run(BlePart(cfg, RecordingBus()).start())
    assert "[ble] itags" in err.value.hint


def test_ble_part_runs_the_configured_itags_and_stops_them(private_bus: str, tmp_path) -> None:
    from tests.fake_bluez import FakeBluez

    async def body() -> None:
        fake, sink, tag = FakeBluez(private_bus), RecordingBus(), FakeTag()
        await fake.start()
        cfg = {"registry": str(tmp_path / "f.json"), "bus_address": private_bus,
               "itags": [{"address": ADDR.lower(), "action": "save"}]}  # fmt: skip
        part = BlePart(cfg, sink)
        part.itag_links = tag.factory
        await part.start()
        try:
            await asyncio.wait_for(tag.up.wait(), 2)
            assert tag.links[-1].address == ADDR
            tag.press()
            await settle()
            assert [(c.action, c.source) for c in sink.commands] == [(Action.SAVE, f"itag:{ADDR}")]
        finally:
            await part.stop()
            await fake.stop()
        assert tag.links[-1].closed

    run(body())
