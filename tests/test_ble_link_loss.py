"""The fob survives a dropped link at every step, and never runs a command twice.

Two bumble stacks on a LocalLink, as in test_ble_bumble.py, but the fob connects afresh for
every attempt (find, connect, discover, encrypt with the bond) and the test cuts the real link
(an HCI disconnect through the LocalLink) at a chosen step: while connecting, during service
discovery, during bonding, at the challenge read, before the frame reaches the appliance,
after the command ran but before the write's answer, while the command runs, at the status
read, and instead of the status notification. Each test checks what the fob reports and how
many commands the appliance's bus received.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from bumble.att import ATT_Error
from bumble.core import UUID
from bumble.device import Connection, Peer
from bumble.pairing import PairingConfig
from bumble.testing.test_utils import TwoDevices

from appliance.control.commands import Action, Command, Outcome
from ble import fob_session, frames
from ble.fob_session import CommandRun, FobError, LinkLost, NotSupported, PairRun, Refused, Retry
from ble.frames import Cmd, Result
from ble.keys import FobCredentials, FobRegistry
from ble.protocol import FobProtocol
from tests.support import RecordingBus
from tests.test_ble_bumble import WindowDelegate, appliance_service

logging.getLogger("bumble").setLevel(logging.CRITICAL)
FAST = Retry(total=30, links=4, delay=0.05, connect_timeout=10, notify_wait=5)  # slack for load


class SlowSink(RecordingBus):
    """A bus whose commands take `delay` seconds, like a SAVE of a big disk."""

    def __init__(self, delay: float = 0.0, refuse: set[str] | None = None) -> None:
        super().__init__(refuse)
        self.delay = delay

    async def submit(self, command: Command) -> Outcome:
        await asyncio.sleep(self.delay)
        return await super().submit(command)


class CutLink:
    """fob_session.GattLink over one bumble connection. Each request races the connection's
    disconnection, as BlueZ fails a pending request with "Not connected"."""

    def __init__(self, world: World, conn: Connection) -> None:
        self.world, self.conn = world, conn
        self.gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        conn.on("disconnection", lambda *_: self.gone.done() or self.gone.set_result(None))
        self.peer = Peer(conn)
        self.address = str(conn.peer_address)

    async def guard(self, call: Awaitable[Any]) -> Any:
        op = asyncio.ensure_future(call)
        await asyncio.wait({op, self.gone}, return_when=asyncio.FIRST_COMPLETED)
        if not op.done() or op.cancelled():  # bumble cancels what is pending on a disconnect
            op.cancel()
            raise LinkLost("Not connected")
        try:
            return op.result()
        except ATT_Error as e:
            raise Refused(str(e)) from e
        except Exception as e:
            if self.gone.done():
                raise LinkLost(f"Not connected ({e!r})") from e
            raise

    def char(self, uuid: str) -> Any:
        chars = self.peer.get_characteristics_by_uuid(UUID(uuid))
        if not chars:
            raise NotSupported(uuid)
        return chars[0]

    async def read(self, uuid: str) -> bytes:
        await self.world.maybe_cut({frames.CHALLENGE_UUID: "challenge",
                                    frames.STATUS_UUID: "status"}.get(uuid, ""))  # fmt: skip
        return bytes(await self.guard(self.char(uuid).read_value()))

    async def write(self, uuid: str, data: bytes) -> None:
        await self.world.maybe_cut({frames.COMMAND_UUID: "frame lost",
                                    frames.PAIR_UUID: "pair write"}.get(uuid, ""))  # fmt: skip
        await self.guard(self.char(uuid).write_value(data, with_response=True))
        if uuid == frames.PAIR_UUID and data[1] == frames.PAIR_CONFIRM:
            await self.world.maybe_cut("confirm answer lost")  # it arrived; the fob never hears
            if self.gone.done():
                raise LinkLost("Not connected")

    async def subscribe(self, uuid: str, callback: Callable[[bytes], None]) -> None:
        await self.guard(self.char(uuid).subscribe(lambda v: callback(bytes(v))))

    async def close(self) -> None:
        if not self.gone.done():
            await self.conn.disconnect()


class World:
    """The appliance (device 1, advertising, restarting adverts after each link) and the fob
    (device 0). `cuts[step]` says how many times to cut the link at that step."""

    def __init__(
        self, tmp_path: Any, sink: RecordingBus | None = None, *, outcome: bool = True
    ) -> None:
        self.sink = sink or RecordingBus()
        self.proto = FobProtocol(FobRegistry(tmp_path / "fobs.json"), self.sink)
        self.devices = TwoDevices()
        self.fob, self.app = self.devices[0], self.devices[1]
        service, status = appliance_service(self.proto, outcome=outcome, on_frame=self.on_frame)
        self.app.add_service(service)
        self.proto.on_status = self.notify
        self.status_char = status
        delegate = WindowDelegate(self.proto)
        self.app.pairing_config_factory = lambda _c: PairingConfig(
            sc=True, mitm=False, bonding=True, delegate=delegate
        )
        self.fob.pairing_config_factory = lambda _c: PairingConfig(sc=True, mitm=False,
                                                                   bonding=True)  # fmt: skip
        self.cuts: dict[str, int] = {}
        self.then: dict[str, int] = {}
        self.bonded = False

    async def start(self) -> None:
        for device in self.devices.devices:
            await device.power_on()
        await self.app.start_advertising(auto_restart=True, advertising_interval_min=20)

    async def cut(self) -> None:
        """Drop the link from the appliance's side (the fob sees the peer go away)."""
        for _ in range(100):  # the appliance may not have seen a brand-new link yet
            if self.app.connections:
                break
            await asyncio.sleep(0.01)
        for conn in list(self.app.connections.values()):
            await conn.disconnect()
        await asyncio.sleep(0.05)

    async def maybe_cut(self, step: str) -> None:
        if self.cuts.get(step, 0) > 0:
            self.cuts[step] -= 1
            self.cuts.update(self.then)  # the cuts armed by this one
            self.then = {}
            await self.cut()

    async def connect(self, _timeout: float) -> CutLink:
        conn = await self.fob.connect(self.app.random_address)
        link = CutLink(self, conn)
        await self.maybe_cut("connect")
        if link.gone.done():
            raise LinkLost("failed to discover services, device disconnected")
        discovery = asyncio.ensure_future(self._discover(link))
        await self.maybe_cut("discovery")
        await link.guard(discovery)
        await self.maybe_cut("bonding")
        if self.bonded:
            await self._alias_bonds(conn)
        await link.guard(conn.encrypt() if self.bonded else conn.pair())
        self.bonded = True
        return link

    async def _alias_bonds(self, conn: Connection) -> None:
        """bumble files a bond under the peer's identity address (F1:...:F1/P) but looks it up
        by the address of the new link (the same bytes, random): file it under both."""
        for device, peer in ((self.fob, conn.peer_address), (self.app, self.fob.random_address)):
            for address, keys in await device.keystore.get_all():
                if address.split("/")[0] == str(peer).split("/")[0]:
                    await device.keystore.update(str(peer), keys)

    async def _discover(self, link: CutLink) -> None:
        await link.peer.discover_services()
        for service in link.peer.services:
            await service.discover_characteristics()

    async def on_frame(self, _conn: Connection, when: str) -> None:
        await self.maybe_cut({"before": "while running", "after": "answer lost"}[when])

    def notify(self, value: bytes) -> None:
        if self.cuts.get("notification", 0) > 0 and self.proto.status.last_fob:
            self.cuts["notification"] -= 1
            asyncio.ensure_future(self.cut())  # the link goes instead of the notification
            return
        asyncio.ensure_future(self.app.notify_subscribers(self.status_char, value))

    async def pair(self) -> FobCredentials:
        self.proto.set_pairing(True)
        creds = await PairRun(self.connect, retry=FAST).run()
        self.proto.set_pairing(False)
        return creds

    def commands(self, action: Action) -> int:
        return sum(c.action == action for c in self.sink.commands)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 60))


async def command_with_cut(
    tmp_path: Any,
    step: str,
    cmd: Cmd = Cmd.SAVE,
    times: int = 1,
    sink: RecordingBus | None = None,
    **kw: Any,
) -> tuple[World, fob_session.Report]:
    world = World(tmp_path, sink)
    await world.start()
    creds = await world.pair()
    world.cuts[step] = times
    report = await CommandRun(world.connect, creds, cmd, retry=FAST, **kw).run()
    assert world.cuts[step] == 0, f"the {step} cut never happened"
    return world, report


@pytest.mark.parametrize(
    "step", ["connect", "discovery", "bonding", "challenge", "frame lost", "status"]
)
def test_a_link_lost_before_the_frame_or_after_its_answer_is_retried(tmp_path, step):
    """Before the frame arrives nothing ran (a new link sends it); after the answer arrived
    the result is known (a new link only reads Status). Either way the command runs once."""

    async def body() -> None:
        world, report = await command_with_cut(tmp_path, step, Cmd.RESTORE)
        assert report.result == Result.OK and report.links == 2
        assert world.commands(Action.RESTORE) == 1
        assert report.status.last_cmd == Cmd.RESTORE

    run(body)


def test_command_ran_but_its_answer_was_lost_is_not_run_again(tmp_path, capsys):
    async def body() -> None:
        world, report = await command_with_cut(tmp_path, "answer lost", Cmd.SAVE)
        assert report.result == Result.OK and report.links == 2
        assert world.commands(Action.SAVE) == 1  # the Outcome query, not a second frame
        assert "ran the command before the link dropped: OK" in capsys.readouterr().err

    run(body)


def test_a_refusal_whose_answer_was_lost_is_reported_as_refused(tmp_path):
    async def body() -> None:
        world, report = await command_with_cut(
            tmp_path, "answer lost", Cmd.SAVE, sink=RecordingBus(refuse={"save"})
        )
        assert report.result == Result.REFUSED
        assert world.commands(Action.SAVE) == 1

    run(body)


def test_link_lost_while_the_command_runs_waits_for_its_end(tmp_path):
    async def body() -> None:
        world, report = await command_with_cut(
            tmp_path, "while running", Cmd.SAVE, sink=SlowSink(delay=1.5)
        )
        assert report.result == Result.OK and report.links == 2
        assert world.commands(Action.SAVE) == 1

    run(body)


def test_a_frame_lost_twice_then_sent_runs_once(tmp_path, capsys):
    async def body() -> None:
        world, report = await command_with_cut(tmp_path, "frame lost", Cmd.UNLOCK, times=2)
        assert report.result == Result.OK and report.links == 3
        assert world.commands(Action.UNLOCK) == 1
        assert capsys.readouterr().err.count("never got the command") == 2

    run(body)


def test_notification_lost_with_the_link_is_read_instead(tmp_path):
    async def body() -> None:
        seen: list[frames.Status] = []
        world, report = await command_with_cut(
            tmp_path, "notification", Cmd.RESTORE, watch=seen.append
        )
        assert report.result == Result.OK and not report.notified
        assert report.status.last_cmd == Cmd.RESTORE and report.status.last_fob
        assert world.commands(Action.RESTORE) == 1

    run(body)


def test_the_status_notification_arrives_on_a_steady_link(tmp_path):
    async def body() -> None:
        seen: list[frames.Status] = []
        world, report = await command_with_cut(
            tmp_path, "none", Cmd.RESTORE, times=0, watch=seen.append
        )
        assert report.notified and report.links == 1 and report.result == Result.OK
        assert any(s.last_cmd == Cmd.RESTORE and s.last_result == Result.OK for s in seen)

    run(body)


def test_a_link_that_never_comes_back_is_reported_within_bounds(tmp_path):
    async def body() -> None:
        world = World(tmp_path)
        await world.start()
        creds = await world.pair()
        world.cuts["connect"] = 99
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(FobError, match="SAVE was not sent"):
            await CommandRun(world.connect, creds, Cmd.SAVE, retry=FAST).run()
        assert world.cuts["connect"] == 99 - FAST.links  # tried FAST.links links, no more
        assert loop.time() - start < FAST.total
        assert world.commands(Action.SAVE) == 0

    run(body)


def test_an_answer_lost_for_good_says_the_command_may_have_run(tmp_path):
    async def body() -> None:
        world = World(tmp_path)
        await world.start()
        creds = await world.pair()
        world.cuts["answer lost"] = 1
        world.then = {"connect": 99}  # and the link never comes back
        with pytest.raises(FobError, match="may have reached the appliance"):
            await CommandRun(world.connect, creds, Cmd.SAVE, retry=FAST).run()
        assert world.commands(Action.SAVE) == 1

    run(body)


def test_an_answered_command_whose_status_is_lost_for_good_still_reports_its_result(tmp_path):
    async def body() -> None:
        world = World(tmp_path)
        await world.start()
        creds = await world.pair()
        world.cuts["status"] = 1
        world.then = {"connect": 99}
        report = await CommandRun(world.connect, creds, Cmd.SAVE, retry=FAST).run()
        assert report.result == Result.OK and report.status is None
        assert "SAVE: OK | status unknown" in report.describe()
        assert world.commands(Action.SAVE) == 1

    run(body)


def test_an_appliance_without_outcome_is_never_sent_the_frame_twice(tmp_path):
    async def body() -> None:
        world = World(tmp_path, outcome=False)
        await world.start()
        creds = await world.pair()
        world.cuts["answer lost"] = 1
        with pytest.raises(FobError, match="cannot say whether it ran"):
            await CommandRun(world.connect, creds, Cmd.SAVE, retry=FAST).run()
        assert world.commands(Action.SAVE) == 1

    run(body)


@pytest.mark.parametrize("step", ["connect", "bonding", "pair write"])
def test_pairing_survives_a_dropped_link(tmp_path, step):
    async def body() -> None:
        world = World(tmp_path)
        await world.start()
        world.cuts[step] = 1
        creds = await world.pair()
        assert world.cuts[step] == 0
        assert [f["fob_id"] for f in world.proto.registry.list()] == [creds.fob_id]
        report = await CommandRun(world.connect, creds, Cmd.STATUS, retry=FAST).run()
        assert report.result == Result.OK

    run(body)


def test_pairing_confirmation_whose_answer_was_lost_is_checked_not_redone(tmp_path, capsys):
    async def body() -> None:
        world = World(tmp_path)
        await world.start()
        world.cuts["confirm answer lost"] = 1
        creds = await world.pair()
        assert world.cuts["confirm answer lost"] == 0
        assert [f["fob_id"] for f in world.proto.registry.list()] == [creds.fob_id]
        assert world.commands(Action.STATUS) == 1  # the STATUS frame that asked
        assert f"whether it added fob {creds.fob_id}" in capsys.readouterr().err

    run(body)
