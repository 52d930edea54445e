"""Shared pieces of the BLE tests: a fob scripted straight into the protocol (the bus they
run against is tests/support.py's RecordingBus)."""

from __future__ import annotations

from ble import frames
from ble.frames import Cmd
from ble.keys import FobCredentials, FobPairing
from ble.protocol import FobProtocol


def pair_directly(proto: FobProtocol, peer: str = "dev", setup_code: str = "") -> FobCredentials:
    """Run the pairing messages straight into the protocol object (no radio)."""
    fob = FobPairing(setup_code)
    for write in fob.pub_writes():
        proto.pair_write(peer, write)
    creds, confirm = fob.finish(proto.pair_read(peer))
    proto.pair_write(peer, confirm)
    fob.check_appliance(proto.pair_read(peer))
    return creds


def frame_for(creds: FobCredentials, cmd: Cmd, nonce: bytes = b"") -> bytes:
    """The fob's next frame; bumps the stored counter like the real client does."""
    creds.counter += 1
    return frames.build_frame(
        bytes.fromhex(creds.key), bytes.fromhex(creds.appliance_id), cmd, creds.fob_id,
        creds.counter, nonce,
    )  # fmt: skip
