"""The command vocabulary every control source shares: button, fob, host serial, CLI, policy.

Sources build a `Command` and hand it to a `CommandSink` (the daemon's command bus).
The bus decides (lock mode, policy table), runs it, records it and publishes an `Event`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable


class Action(StrEnum):
    SAVE = "save"
    RESTORE = "restore"
    UNLOCK = "unlock"
    LOCK = "lock"
    STATUS = "status"
    HISTORY = "history"
    PAIR = "pair"


class Mode(StrEnum):
    LOCKED = "locked"
    UNLOCKED = "unlocked"


@dataclass(frozen=True)
class Command:
    action: Action
    source: str  # "button", "fob:<id>", "host", "cli", "policy", ...
    authenticated: bool = True  # False for commodity fobs that cannot prove who they are
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    ok: bool
    action: Action
    source: str
    reason: str = ""  # why it was refused or failed; empty when ok
    data: dict[str, Any] = field(default_factory=dict)  # status, history, epoch, ...

    def summary(self) -> dict[str, Any]:
        """What an "outcome" event and `last_outcome` say of it (without the data)."""
        return {
            "ok": self.ok,
            "action": self.action.value,
            "source": self.source,
            "reason": self.reason,
        }


@dataclass
class Event:
    """Published to subscribers (LED, BLE status, `savepoint watch`).

    kind: "outcome" (data = Outcome fields), "state" (data = status snapshot),
    "progress" (SAVE/RESTORE started), "host" (connected: bool), "pairing" (open: bool),
    "fault" (part, reason).
    """

    kind: str
    data: dict[str, Any] = field(default_factory=dict)


class CommandSink(Protocol):
    async def submit(self, command: Command) -> Outcome: ...
    def subscribe(self) -> asyncio.Queue[Event]: ...
    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None: ...


class PartUnavailable(Exception):
    """A part (gadget, GPIO, BLE, serial) cannot start. The daemon reports it once and goes on.

    `reason` says what is missing; `hint` says what the user can do about it.
    """

    def __init__(self, reason: str, hint: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint


class Part(Protocol):
    """Something the daemon starts and stops: store+NBD, gadget, gpio, ble, serial."""

    name: str

    async def start(self) -> None: ...  # raise PartUnavailable when it cannot run here
    async def stop(self) -> None: ...


@runtime_checkable  # the daemon checks a part that declares store_hooks has them
class StoreHooks(Protocol):
    """Implemented by the USB gadget part; the bus calls them around SAVE and RESTORE."""

    # before_save pushes host writes into the store; returns True if the host had synced.
    async def before_save(self) -> bool: ...
    async def around_restore(self, restore: Callable[[], Awaitable[Any]]) -> Any: ...


# A part can extend the bus with its own commands (e.g. BLE's "fobs"): it calls
# bus.register_handler("fobs", handler), where handler(args: dict) -> Awaitable[dict].
PartHandler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
