"""Ladder step 3: two bumble stacks on a LocalLink — real ATT and SMP, no BlueZ.

Device 0 is the fob (central, GATT client); device 1 is the appliance (peripheral) serving the
same FobProtocol that BlueZ serves in production, with the same encryption requirements.
The fob side runs ble.fob_client's own pair()/send() over bumble instead of bleak.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest
from bumble import gatt
from bumble.att import ATT_Error, ErrorCode
from bumble.core import UUID
from bumble.device import Connection, Peer
from bumble.pairing import PairingConfig, PairingDelegate
from bumble.testing.test_utils import TwoDevices

from appliance.control.commands import Action, Event
from ble import fob_client, frames
from ble.frames import Cmd, FrameError, Result, Status
from ble.keys import FobRegistry
from ble.protocol import FobProtocol
from tests.support import RecordingBus, run

logging.getLogger("bumble").setLevel(logging.CRITICAL)  # refused pairings log tracebacks


class WindowDelegate(PairingDelegate):
    """The appliance's SMP side: like the BlueZ agent, accept only while the window is open."""

    def __init__(self, proto: FobProtocol) -> None:
        super().__init__()  # NoInputNoOutput: Just Works
        self.proto = proto

    async def accept(self) -> bool:
        return self.proto.pairing_open


def appliance_service(
    proto: FobProtocol,
    *,
    outcome: bool = True,
    on_frame: Callable[[Connection, str], Awaitable[None]] | None = None,
) -> tuple[gatt.Service, gatt.Characteristic]:
    """The fob service as BlueZ serves it; `outcome=False` is an appliance older than the
    Outcome characteristic. `on_frame(conn, "before"|"after")` runs around each command."""
    P, A = gatt.Characteristic.Properties, gatt.Characteristic
    enc_r, enc_w = A.READ_REQUIRES_ENCRYPTION, A.WRITE_REQUIRES_ENCRYPTION

    async def on_command(conn, value: bytes) -> None:
        if on_frame is not None:
            await on_frame(conn, "before")
        result = await proto.handle_command(bytes(value), str(conn.peer_address))
        if on_frame is not None:
            await on_frame(conn, "after")
        if result != Result.OK:
            raise ATT_Error(0x80)  # application error; the reason is in Status

    def on_outcome(conn, value: bytes) -> None:
        try:
            proto.outcome_write(str(conn.peer_address), bytes(value))
        except FrameError:
            raise ATT_Error(0x80) from None

    def on_pair(conn, value: bytes) -> None:
        try:
            proto.pair_write(str(conn.peer_address), bytes(value))
        except FrameError:
            raise ATT_Error(0x81) from None

    status = gatt.Characteristic(
        frames.STATUS_UUID, P.READ | P.NOTIFY, enc_r,
        gatt.CharacteristicValue(read=lambda c: proto.status_read(str(c.peer_address))),
    )  # fmt: skip
    chars = [
        gatt.Characteristic(frames.COMMAND_UUID, P.WRITE, enc_w,
                            gatt.CharacteristicValue(write=on_command)),
        status,
        gatt.Characteristic(frames.CHALLENGE_UUID, P.READ, enc_r,
                            gatt.CharacteristicValue(
                                read=lambda c: proto.read_challenge(str(c.peer_address)))),
        gatt.Characteristic(frames.PAIR_UUID, P.READ | P.WRITE, enc_r | enc_w,
                            gatt.CharacteristicValue(
                                read=lambda c: proto.pair_read(str(c.peer_address)),
                                write=on_pair)),
    ]  # fmt: skip
    if outcome:
        chars.append(
            gatt.Characteristic(
                frames.OUTCOME_UUID,
                P.READ | P.WRITE,
                enc_r | enc_w,
                gatt.CharacteristicValue(
                    read=lambda c: proto.outcome_read(str(c.peer_address)), write=on_outcome
                ),
            )
        )
    return gatt.Service(frames.SERVICE_UUID, chars), status


class BumbleLink:
    """fob_client.GattLink over a bumble GATT client."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer

    def char(self, uuid: str):
        [char] = self.peer.get_characteristics_by_uuid(UUID(uuid))
        return char

    async def read(self, uuid: str) -> bytes:
        return bytes(await self.char(uuid).read_value())

    async def write(self, uuid: str, data: bytes) -> None:
        await self.char(uuid).write_value(data, with_response=True)


async def setup(tmp_path):
    sink = RecordingBus()
    proto = FobProtocol(FobRegistry(tmp_path / "fobs.json"), sink)
    devices = TwoDevices()
    fob, appliance = devices[0], devices[1]
    service, status_char = appliance_service(proto)
    appliance.add_service(service)
    proto.on_status = lambda v: asyncio.ensure_future(appliance.notify_subscribers(status_char, v))
    appliance.pairing_config_factory = lambda _c: PairingConfig(
        sc=True, mitm=False, bonding=True, delegate=WindowDelegate(proto)
    )
    fob.pairing_config_factory = lambda _c: PairingConfig(sc=True, mitm=False, bonding=True)
    await devices.setup_connection()
    peer = Peer(devices.connections[0])
    await peer.discover_services()
    for service in peer.services:
        await service.discover_characteristics()
    return devices, proto, sink, BumbleLink(peer)


def test_refused_before_pairing_and_outside_the_window(tmp_path):
    async def body() -> None:
        devices, proto, sink, link = await setup(tmp_path)
        with pytest.raises(ATT_Error) as err:
            await link.write(frames.COMMAND_UUID, bytes(20))
        assert err.value.error_code == ErrorCode.INSUFFICIENT_ENCRYPTION
        with pytest.raises(ATT_Error):
            await link.read(frames.CHALLENGE_UUID)
        with pytest.raises(Exception):  # noqa: B017  (SMP failure type varies by bumble version)
            await devices.connections[0].pair()
        assert not devices.connections[0].is_encrypted
        assert sink.commands == [] and proto.registry.list() == []

    run(body())


def test_secure_connections_bonding_then_fob_protocol(tmp_path):
    async def body() -> None:
        devices, proto, sink, link = await setup(tmp_path)
        central = devices.connections[0]
        bonded = asyncio.get_running_loop().create_future()
        devices.connections[1].on("pairing", bonded.set_result)
        proto.set_pairing(True)
        await central.pair()
        keys = await asyncio.wait_for(bonded, 5)
        assert central.is_encrypted and devices.connections[1].is_encrypted
        assert central.sc  # LE Secure Connections, not legacy pairing
        assert keys.ltk is not None  # bonding: the appliance keeps a long-term key

        creds = await fob_client.pair(link, "")
        assert [f["fob_id"] for f in proto.registry.list()] == [creds.fob_id]
        proto.set_pairing(False)

        received: list[bytes] = []
        await link.char(frames.STATUS_UUID).subscribe(lambda v: received.append(bytes(v)))
        status = await fob_client.send(link, creds, Cmd.SAVE, None)
        assert status.last_result == Result.OK and sink.commands[-1].action == Action.SAVE
        assert sink.commands[-1].source == f"fob:{creds.fob_id}"
        status = await fob_client.send(link, creds, Cmd.RESTORE, None)
        assert status.last_result == Result.OK and sink.commands[-1].action == Action.RESTORE

        # a recorded frame sent again over the air is refused and changes nothing
        nonce = await link.read(frames.CHALLENGE_UUID)
        replay = frames.build_frame(bytes.fromhex(creds.key), bytes.fromhex(creds.appliance_id),
                                    Cmd.SAVE, creds.fob_id, creds.counter, nonce)  # fmt: skip
        with pytest.raises(ATT_Error):
            await link.write(frames.COMMAND_UUID, replay)
        assert proto.status.last_result == Result.REPLAY
        assert len(sink.commands) == 2

        proto.on_event(Event("state", {"mode": "unlocked", "epoch": 7, "dirty_units": 1}))
        for _ in range(50):
            if received and Status.decode(received[-1]).epoch == 7:
                break
            await asyncio.sleep(0.01)
        assert Status.decode(received[-1]).epoch == 7 and Status.decode(received[-1]).unlocked

    run(body())
