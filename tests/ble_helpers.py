"""Shared pieces of the BLE tests: a recording command sink and a scripted fob."""

from __future__ import annotations

import asyncio
from typing import Any

from appliance.control.commands import Command, Event, Outcome
from ble import frames
from ble.frames import Cmd
from ble.keys import FobCredentials, FobPairing
from ble.protocol import FobProtocol


class RecordingSink:
    """Stands in for the daemon's command bus: records commands, answers ok (or not)."""

    def __init__(self, refuse: set[str] | None = None) -> None:
        self.commands: list[Command] = []
        self.refuse = refuse or set()
        self.queues: list[asyncio.Queue[Event]] = []
        self.handlers: dict[str, Any] = {}

    async def submit(self, command: Command) -> Outcome:
        self.commands.append(command)
        ok = command.action.value not in self.refuse
        outcome = Outcome(ok, command.action, command.source, "" if ok else "locked")
        self.publish(Event("outcome", {"ok": ok, "action": command.action,
                                       "source": command.source, "reason": outcome.reason}))
        return outcome

    def subscribe(self) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self.queues.append(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        self.queues.remove(queue)

    def register_handler(self, name: str, handler: Any) -> None:
        self.handlers[name] = handler

    def publish(self, event: Event) -> None:
        for queue in self.queues:
            queue.put_nowait(event)


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
