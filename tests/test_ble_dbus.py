"""Ladder step 2: BlePart on a private dbus-daemon against a fake bluetoothd."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from appliance.control.commands import Action, Event, PartUnavailable
from ble import BlePart, dbus_api, frames
from ble.frames import Cmd, FrameOutcome, FrameState, Result, Status
from ble.keys import FobCredentials, FobPairing
from tests.ble_helpers import frame_for
from tests.fake_bluez import DEVICE, AttError, FakeBluez
from tests.support import RecordingBus, run

OTHER = "/org/bluez/hci0/dev_F0_F0_F0_F0_F0_02"


async def with_part(
    address: str, tmp_path, body: Callable[..., Awaitable[None]], **cfg: object
) -> None:
    fake = FakeBluez(address)
    await fake.start()
    sink = RecordingBus()
    conf = {"bus_address": address, "registry": str(tmp_path / "fobs.json"), **cfg}
    part = BlePart(conf, sink)
    await part.start()
    try:
        await body(fake, part, sink)
    finally:
        await part.stop()
        await fake.stop()


async def pair_over_gatt(fake: FakeBluez, device: str = DEVICE, code: str = "") -> FobCredentials:
    fob = FobPairing(code)
    for write in fob.pub_writes():
        await fake.write(frames.PAIR_UUID, write, device)
    creds, confirm = fob.finish(await fake.read(frames.PAIR_UUID, device))
    await fake.write(frames.PAIR_UUID, confirm, device)
    fob.check_appliance(await fake.read(frames.PAIR_UUID, device))
    return creds


async def fresh(fake: FakeBluez, creds: FobCredentials, cmd: Cmd) -> bytes:
    """The fob's next frame, with a challenge read on its link (protocol 2: every frame)."""
    return frame_for(creds, cmd, await fake.read(frames.CHALLENGE_UUID))


async def reopen(sink: RecordingBus) -> None:
    """A new gesture: protocol 2 closes the window at the first pairing."""
    sink.publish(Event("pairing", {"open": True}))
    await asyncio.sleep(0.05)


async def eventually(check: Callable[[], bool], seconds: float = 3) -> bool:
    """Poll a condition that a background D-Bus round trip makes true."""
    for _ in range(int(seconds / 0.02)):
        if check():
            return True
        await asyncio.sleep(0.02)
    return check()


async def next_status(fake: FakeBluez) -> Status:
    _path, value = await asyncio.wait_for(fake.notifications.get(), 2)
    return Status.decode(value)


def test_registers_service_advert_and_agent(private_bus, tmp_path):
    async def body(fake: FakeBluez, part: BlePart, sink: RecordingBus) -> None:
        assert fake.reg is not None
        flags = {uuid: f for uuid, (_p, f) in fake.reg.chars.items()}
        assert flags[frames.COMMAND_UUID] == ["encrypt-write"]
        assert "notify" in flags[frames.STATUS_UUID]
        assert set(flags) == {frames.COMMAND_UUID, frames.STATUS_UUID, frames.CHALLENGE_UUID,
                              frames.PAIR_UUID, frames.OUTCOME_UUID}  # fmt: skip
        assert flags[frames.OUTCOME_UUID] == ["encrypt-read", "encrypt-write"]
        [advert] = fake.reg.adverts.values()
        assert advert["ServiceUUIDs"] == [frames.SERVICE_UUID]
        assert advert["LocalName"] == "Savepnt" and advert["Type"] == "peripheral"
        assert fake.reg.agent and fake.adapter["Powered"] is True
        assert "fobs" in sink.handlers

    run(with_part(private_bus, tmp_path, body))


def test_no_bluez_or_no_adapter_is_unavailable_with_a_hint(private_bus, tmp_path):
    async def no_daemon() -> None:
        cfg = {"bus_address": private_bus, "registry": str(tmp_path / "f")}
        part = BlePart(cfg, RecordingBus())
        with pytest.raises(PartUnavailable, match="bluetoothd") as err:
            await part.start()
        assert "bluez" in err.value.hint

    async def wrong_adapter() -> None:
        fake = FakeBluez(private_bus)
        await fake.start()
        cfg = {"bus_address": private_bus, "registry": str(tmp_path / "f"), "adapter": "hci7"}
        with pytest.raises(PartUnavailable, match=r"hci7 \(found: \['hci0'\]\)"):
            await BlePart(cfg, RecordingBus()).start()
        await fake.stop()

    run(no_daemon())
    run(wrong_adapter())


def test_pairing_window_commands_and_notifications(private_bus, tmp_path):
    async def body(fake: FakeBluez, part: BlePart, sink: RecordingBus) -> None:
        # Window closed: the agent rejects bonding, the link stays unencrypted.
        assert not await fake.pair()
        with pytest.raises(AttError, match="Insufficient Encryption"):
            await fake.write(frames.COMMAND_UUID, bytes(20))
        await fake.start_notify(frames.STATUS_UUID)
        sink.publish(Event("pairing", {"open": True}))
        assert (await next_status(fake)).pairing
        assert await fake.pair()
        assert await eventually(lambda: fake.adapter["Pairable"] is True)
        creds = await pair_over_gatt(fake)
        assert creds.fob_id == 1 and (await next_status(fake)).last_result == Result.OK
        assert not (await next_status(fake)).pairing  # one gesture, one fob

        await fake.write(frames.COMMAND_UUID, await fresh(fake, creds, Cmd.SAVE))
        assert sink.commands[-1].action == Action.SAVE
        assert sink.commands[-1].source == "fob:1"
        status = await next_status(fake)
        while status.last_cmd == 0:  # the window's closing may still be queued
            status = await next_status(fake)
        assert (status.last_cmd, status.last_result) == (Cmd.SAVE, Result.OK)

        nonce = await fake.read(frames.CHALLENGE_UUID)
        restore = frame_for(creds, Cmd.RESTORE, nonce)
        await fake.write(frames.COMMAND_UUID, restore)
        assert sink.commands[-1].action == Action.RESTORE
        with pytest.raises(AttError, match="NotAuthorized"):
            await fake.write(frames.COMMAND_UUID, restore)  # recorded and replayed
        last = Status.decode(await fake.read(frames.STATUS_UUID)).last_result
        assert last == Result.STALE_CHALLENGE  # its nonce was used up
        save = await fresh(fake, creds, Cmd.SAVE)
        await fake.write(frames.COMMAND_UUID, save)
        with pytest.raises(AttError, match="NotAuthorized"):
            await fake.write(frames.COMMAND_UUID, save)
        status = Status.decode(await fake.read(frames.STATUS_UUID))
        assert status.last_result == Result.STALE_CHALLENGE
        assert [c.action for c in sink.commands] == [Action.SAVE, Action.RESTORE, Action.SAVE]

        sink.publish(Event("state", {"mode": "unlocked", "epoch": 4, "dirty_units": 3,
                                     "dirty_bytes": 12288, "host_connected": True}))  # fmt: skip
        while (status := await next_status(fake)).epoch != 4:
            pass
        assert status.unlocked and status.dirty_bytes == 12288 and status.host_connected

        sink.publish(Event("pairing", {"open": False}))
        await asyncio.sleep(0.05)
        assert not await fake.pair(OTHER)
        with pytest.raises(AttError):
            await fake.write(frames.PAIR_UUID, FobPairing().pub_writes()[0], DEVICE)

    run(with_part(private_bus, tmp_path, body))


def test_pairing_window_closes_by_itself(private_bus, tmp_path):
    async def body(fake: FakeBluez, part: BlePart, sink: RecordingBus) -> None:
        sink.publish(Event("pairing", {"open": True}))
        await asyncio.sleep(0.05)
        assert await fake.pair()
        assert await eventually(lambda: not part.proto.pairing_open)
        assert not await fake.pair(OTHER)
        assert await eventually(lambda: fake.adapter["Pairable"] is False)

    run(with_part(private_bus, tmp_path, body, pairing_window=0.2))


def test_reregisters_after_bluetoothd_restart(private_bus, tmp_path):
    async def body(fake: FakeBluez, part: BlePart, sink: RecordingBus) -> None:
        await fake.stop()
        await asyncio.sleep(0.05)
        assert not part.registered.is_set()
        fake.adapter["Pairable"] = True  # a bluetoothd that comes back pairable
        await fake.start()  # a new connection: new unique name, like a new bluetoothd
        await asyncio.wait_for(part.registered.wait(), 3)
        assert fake.adapter["Pairable"] is False  # no window: the kernel refuses bonding
        assert fake.reg and len(fake.reg.chars) == 5 and fake.reg.agent
        sink.publish(Event("pairing", {"open": True}))
        await asyncio.sleep(0.05)
        assert await fake.pair()
        creds = await pair_over_gatt(fake)
        await fake.write(frames.COMMAND_UUID, await fresh(fake, creds, Cmd.STATUS))
        assert sink.commands[-1].action == Action.STATUS

    run(with_part(private_bus, tmp_path, body))


def test_revoke_refuses_frames_and_removes_the_bond(private_bus, tmp_path):
    async def body(fake: FakeBluez, part: BlePart, sink: RecordingBus) -> None:
        sink.publish(Event("pairing", {"open": True}))
        await asyncio.sleep(0.05)
        await fake.pair()
        creds = await pair_over_gatt(fake)
        listed = await sink.handlers["fobs"]({"op": "list"})
        assert [(f["fob_id"], f["address"]) for f in listed["fobs"]] == [
            (creds.fob_id, "F0:F0:F0:F0:F0:01")
        ]
        sink.publish(Event("pairing", {"open": False}))
        answer = await sink.handlers["fobs"]({"op": "revoke", "id": creds.fob_id})
        assert answer["fob"]["revoked"]
        assert answer["fob"]["bond"].startswith("removed: F0:F0:F0:F0:F0:01")
        assert fake.removed == [DEVICE] and DEVICE not in fake.bonded
        tree = await dbus_api.managed_objects(part.dbus)
        assert DEVICE not in tree  # `bluetoothctl devices` no longer lists it
        # the link is no longer encrypted, and the window is closed: it cannot bond again
        with pytest.raises(AttError, match="Insufficient Encryption"):
            await fake.write(frames.COMMAND_UUID, await fresh(fake, creds, Cmd.SAVE))
        await asyncio.sleep(0.05)
        assert not await fake.pair()
        fake.bonded.add(DEVICE)  # even over a link that is still encrypted: REVOKED
        with pytest.raises(AttError):
            await fake.write(frames.COMMAND_UUID, await fresh(fake, creds, Cmd.SAVE))
        assert Status.decode(await fake.read(frames.STATUS_UUID)).last_result == Result.REVOKED
        assert sink.commands == []
        again = await sink.handlers["fobs"]({"op": "revoke", "id": creds.fob_id})
        assert again["fob"]["bond"].startswith("removed")  # a second revoke: the new bond
        assert fake.removed == [DEVICE, DEVICE]

    run(with_part(private_bus, tmp_path, body))


def test_revoke_stands_when_bluez_is_away(private_bus, tmp_path):
    async def body(fake: FakeBluez, part: BlePart, sink: RecordingBus) -> None:
        sink.publish(Event("pairing", {"open": True}))
        await asyncio.sleep(0.05)
        await fake.pair()
        first = await pair_over_gatt(fake)
        await reopen(sink)
        await fake.pair(OTHER)
        second = await pair_over_gatt(fake, OTHER)
        await reopen(sink)
        third = await pair_over_gatt(fake, OTHER)  # the same phone paired twice
        answer = await sink.handlers["fobs"]({"op": "revoke", "id": second.fob_id})
        assert answer["fob"]["bond"] == (
            f"kept: fob {third.fob_id} is paired from the same device F0:F0:F0:F0:F0:02"
        )
        fake.bonded.discard(OTHER)  # someone ran `bluetoothctl remove` already
        answer = await sink.handlers["fobs"]({"op": "revoke", "id": third.fob_id})
        assert answer["fob"]["bond"].startswith("already gone: F0:F0:F0:F0:F0:02")
        await fake.stop()
        await asyncio.sleep(0.05)
        answer = await sink.handlers["fobs"]({"op": "revoke", "id": first.fob_id})
        assert answer["fob"]["revoked"]
        assert answer["fob"]["bond"] == (
            "kept: BlueZ is not reachable; "
            "remove it later with `bluetoothctl remove F0:F0:F0:F0:F0:01`"
        )
        assert part.proto.registry.get(first.fob_id).revoked
        assert fake.removed == [], fake.removed

    run(with_part(private_bus, tmp_path, body))


def test_through_the_real_command_bus(private_bus, tmp_path):
    """PAIR from the button opens the window; the bus's lock mode and policy apply to fobs."""
    from appliance.control.bus import CommandBus
    from appliance.control.commands import Command
    from appliance.store import Store, create_store

    create_store(str(tmp_path / "disk.img"), 1 << 20, 4096)
    store = Store.open(str(tmp_path / "disk.img"))

    async def body() -> None:
        bus = CommandBus(store)
        fake = FakeBluez(private_bus)
        await fake.start()
        part = BlePart({"bus_address": private_bus, "registry": str(tmp_path / "f.json")}, bus)
        await part.start()
        try:
            await fake.start_notify(frames.STATUS_UUID)
            assert (await bus.submit(Command(Action.PAIR, source="button"))).ok
            while not (await next_status(fake)).pairing:
                pass
            assert await fake.pair()
            creds = await pair_over_gatt(fake)

            with pytest.raises(AttError):  # LOCKED at boot: SAVE is refused by the bus
                await fake.write(frames.COMMAND_UUID, await fresh(fake, creds, Cmd.SAVE))
            assert Status.decode(await fake.read(frames.STATUS_UUID)).last_result == Result.REFUSED
            nonce = await fake.read(frames.CHALLENGE_UUID)
            await fake.write(frames.COMMAND_UUID, frame_for(creds, Cmd.UNLOCK, nonce))
            epoch = (await bus.snapshot())["epoch"]
            await fake.write(frames.COMMAND_UUID, await fresh(fake, creds, Cmd.SAVE))
            status = Status.decode(await fake.read(frames.STATUS_UUID))
            # one unlock is one SAVE ([lock] single_use): the SAVE re-locked
            assert not status.unlocked and status.last_result == Result.OK
            assert status.epoch == epoch + 1
            last = bus.last_outcome or {}
            assert (last["action"], last["source"]) == ("save", f"fob:{creds.fob_id}")
            fobs = await bus.handler("fobs")({"op": "list"})  # type: ignore[misc]
            assert fobs["fobs"][0]["counter"] == creds.counter
        finally:
            await part.stop()
            await fake.stop()

    try:
        run(body())
    finally:
        store.close()


def test_outcome_over_dbus(private_bus, tmp_path):
    """The Outcome characteristic through BlueZ's D-Bus calls; a bad query is an ATT error."""

    async def body(fake: FakeBluez, part: BlePart, sink: RecordingBus) -> None:
        sink.publish(Event("pairing", {"open": True}))
        await asyncio.sleep(0.05)
        assert await fake.pair()
        creds = await pair_over_gatt(fake)
        await fake.write(frames.COMMAND_UUID, await fresh(fake, creds, Cmd.SAVE))
        await fake.write(frames.OUTCOME_UUID, frames.outcome_query(creds.fob_id, creds.counter))
        done = FrameOutcome.decode(await fake.read(frames.OUTCOME_UUID))
        assert (done.state, done.cmd, done.result) == (FrameState.DONE, Cmd.SAVE, Result.OK)
        await fake.write(frames.OUTCOME_UUID, frames.outcome_query(creds.fob_id, 99))
        later = FrameOutcome.decode(await fake.read(frames.OUTCOME_UUID))
        assert later.state == FrameState.NOT_RUN and later.counter == 99
        with pytest.raises(AttError):
            await fake.write(frames.OUTCOME_UUID, b"\x01\x00")
        assert len(sink.commands) == 1

    run(with_part(private_bus, tmp_path, body))


def test_one_gesture_one_fob_and_unfinished_bonds_go(private_bus, tmp_path):
    """A device that bonds during the window but never finishes pairing loses its bond when
    the window closes; the window closes at the first pairing, so a second one is refused."""

    async def body(fake: FakeBluez, part: BlePart, sink: RecordingBus) -> None:
        await reopen(sink)
        assert await fake.pair(OTHER)  # the attacker bonds, then only reads Status
        assert await fake.pair()
        await pair_over_gatt(fake)
        assert await eventually(lambda: fake.removed == [OTHER])
        assert fake.adapter["Pairable"] is False and not part.proto.pairing_open
        with pytest.raises(AttError):
            await pair_over_gatt(fake, OTHER)
        assert [f["fob_id"] for f in part.proto.registry.list()] == [1]

    run(with_part(private_bus, tmp_path, body))


def test_a_wrong_setup_code_loses_its_bond_at_once(private_bus, tmp_path):
    """So the next attempt starts clean on both sides; the third closes the window."""

    async def body(fake: FakeBluez, part: BlePart, sink: RecordingBus) -> None:
        await reopen(sink)
        for attempt in range(3):
            assert await fake.pair(OTHER)
            with pytest.raises(AttError):
                await pair_over_gatt(fake, OTHER, code="0000")
            assert await eventually(lambda n=attempt: fake.removed == [OTHER] * (n + 1))
        assert not part.proto.pairing_open
        assert await eventually(lambda: fake.adapter["Pairable"] is False)
        assert part.proto.registry.list() == []

    run(with_part(private_bus, tmp_path, body, setup_code="4829"))
