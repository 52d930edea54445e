"""The fakes the tests share: a clock moved by hand, a command bus that records, and a store
backing in memory (tests/crashsim.py builds the power-losing backing on it); and `run`, the
bounded asyncio.run of the tests that drive a part's coroutines.

One copy of each, so that every part is tested against the same stand-in for the daemon's
`CommandBus`, and a change to what a part may expect of the bus is made once.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
from collections.abc import Awaitable, Callable, Coroutine
from functools import lru_cache
from typing import Any, TypeVar

from appliance.control.commands import Action, Command, Event, Outcome
from appliance.store.format import DEFAULT_HIST_CAP
from appliance.store.init import create_store

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
    """asyncio.run with a bound: a test that hangs fails after `timeout` seconds."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


class FakeClock:
    """Stands in for time.monotonic or time.time: returns `now`, which only the test moves."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class RecordingBus:
    """Stands in for the daemon's CommandBus as a part sees it: records the commands submitted
    and the events published, fans events out to subscribers, keeps registered handlers.

    Every command is answered by `decide` (ok unless its action is in `refuse`) and the answer
    is published as an "outcome" event, as the real bus does.
    """

    def __init__(self, refuse: set[str] | None = None) -> None:
        self.commands: list[Command] = []
        self.events: list[Event] = []
        self.refuse = refuse or set()
        self.queues: list[asyncio.Queue[Event]] = []
        self.handlers: dict[str, Handler] = {}
        self.hooks: Any = None

    async def submit(self, command: Command) -> Outcome:
        self.commands.append(command)
        outcome = await self.decide(command)
        self.publish(Event("outcome", {**outcome.summary(), "data": outcome.data}))
        return outcome

    async def decide(self, command: Command) -> Outcome:
        ok = command.action.value not in self.refuse
        return Outcome(ok, command.action, command.source, "" if ok else "locked")

    def actions(self) -> list[Action]:
        return [c.action for c in self.commands]

    def subscribe(self) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self.queues.append(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        self.queues.remove(queue)

    def publish(self, event: Event) -> None:
        self.events.append(event)
        for queue in self.queues:
            queue.put_nowait(event)

    def register_handler(self, name: str, handler: Handler) -> None:
        self.handlers[name] = handler

    def handler(self, name: str) -> Handler | None:
        return self.handlers.get(name)


class LockingBus(RecordingBus):
    """A RecordingBus with the policy a part notices: SAVE is refused while LOCKED, UNLOCK and
    LOCK switch the mode, SAVE and RESTORE take a moment (progress events) and bump the epoch.
    While `gate` is set, commands wait for it to open before they are answered."""

    def __init__(self, locked: bool = True) -> None:
        super().__init__()
        self.locked = locked
        self.epoch = 1
        self.gate: asyncio.Event | None = None

    def emit(self, kind: str, **data: Any) -> None:
        self.publish(Event(kind, data))

    async def decide(self, command: Command) -> Outcome:
        if self.gate is not None:
            await self.gate.wait()
        a = command.action
        ok, reason = True, ""
        if a is Action.SAVE and self.locked:
            ok, reason = False, "SAVE refused: the appliance is LOCKED"
        elif a in (Action.SAVE, Action.RESTORE):
            self.emit("progress", action=a.value, phase="start")
            await asyncio.sleep(0.05)
            self.epoch += 1
            self.emit("progress", action=a.value, phase="end")
        elif a in (Action.UNLOCK, Action.LOCK):
            self.locked = a is Action.LOCK
        data = {
            "mode": "locked" if self.locked else "unlocked",
            "epoch": self.epoch,
            "dirty_units": 0,
            "host_connected": True,
        }
        return Outcome(ok, a, command.source, reason, data)


class MemoryBacking:
    """A store Backing in a bytearray (fd = None): a disk that writes at once and never fails.

    `_read` and `_apply` are the unlocked primitives a subclass (the crash backing) wraps."""

    fd = None

    def __init__(self, image: bytearray) -> None:
        self.image = image
        self.size = len(image)
        self._lock = threading.Lock()  # the store issues I/O from many threads

    def pread_into(self, buf: memoryview, offset: int) -> None:
        with self._lock:
            self._read(buf, offset)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        with self._lock:
            self._apply(bytes(data), offset)

    def discard(self, offset: int, length: int) -> None:
        """Punch a hole: reads as zeros."""
        with self._lock:
            if length > 0:
                self._apply(bytes(length), offset)

    def sync(self) -> None:
        pass

    def next_data(self, offset: int) -> int:
        """As FileBacking's: here the first non-zero byte, looked for within 1 MiB."""
        with self._lock:
            window = self._peek(offset, 1 << 20)
        return offset + len(window) - len(window.lstrip(b"\0"))

    def close(self) -> None:
        pass

    def _peek(self, offset: int, length: int) -> bytes:
        return bytes(self.image[offset : offset + length])

    def _read(self, buf: memoryview, offset: int) -> None:
        buf[:] = self.image[offset : offset + len(buf)]

    def _apply(self, data: bytes, offset: int) -> None:
        if offset < 0 or offset + len(data) > self.size:
            raise OSError(f"write at {offset}+{len(data)} beyond the {self.size}-byte backing")
        self.image[offset : offset + len(data)] = data


@lru_cache(maxsize=16)
def _template(size: int, unit: int, hist_cap: int) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "store.img")
        create_store(path, size, unit=unit, hist_cap=hist_cap)
        with open(path, "rb") as f:
            return f.read()


def new_store_image(size: int, unit: int = 4096, hist_cap: int = DEFAULT_HIST_CAP) -> bytearray:
    """A freshly initialised store (made by the real create_store) as a bytearray."""
    return bytearray(_template(size, unit, hist_cap))


def memory_backing(size: int, unit: int = 4096, hist_cap: int = DEFAULT_HIST_CAP) -> MemoryBacking:
    """A fresh store in memory: `Store(memory_backing(...))` opens it."""
    return MemoryBacking(new_store_image(size, unit, hist_cap))
