"""One fob command over a BLE link that may drop at any step, without ever running it twice.

The steps are: connect (find, connect, discover services, bond), read Challenge, write the
command frame, read (or be notified of) Status. A link lost before the frame is written is
simply tried again on a new link. Once the frame is being written it may have arrived, so it
is never sent again blindly: on the new link the fob asks the appliance's Outcome
characteristic what became of that frame's counter, and only a frame the appliance says it
never accepted (NOT_RUN) is replaced by a new one. Everything is bounded by `Retry`.
"""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from ble import frames
from ble.frames import NEEDS_NONCE, Cmd, FrameOutcome, FrameState, Result, Status
from ble.keys import FobCredentials, FobPairing


class LinkLost(Exception):
    """The BLE link dropped, or never came up, during a step."""


class Refused(Exception):
    """The appliance answered a GATT request with an ATT error (the link is fine)."""


class NotSupported(Exception):
    """The appliance has no such characteristic (an older appliance: no Outcome)."""


class FobError(Exception):
    pass


class GattLink(Protocol):
    """What the fob needs from a connected BLE link (bleak here, bumble in the tests). Link
    losses raise LinkLost and ATT errors Refused; anything else is a local failure."""

    async def read(self, uuid: str) -> bytes: ...
    async def write(self, uuid: str, data: bytes) -> None: ...


class CheckedLink(GattLink, Protocol):
    """A link that can tell whether it is encrypted (True/False), or None: cannot tell."""

    def encrypted(self) -> bool | None: ...


class WatchedLink(GattLink, Protocol):
    async def subscribe(self, uuid: str, callback: Callable[[bytes], None]) -> None: ...


Connect = Callable[[float], Awaitable[GattLink]]  # a fresh link within `timeout` seconds


@dataclass
class Retry:
    """Bounds on one command: at most `links` links in `total` seconds."""

    total: float = 90.0
    links: int = 4
    delay: float = 1.0
    connect_timeout: float = 15.0
    notify_wait: float = 10.0  # how long a watcher waits for the outcome's notification


@dataclass
class Report:
    """The true outcome of one command, and the Status the appliance showed afterwards."""

    cmd: Cmd
    result: Result
    status: Status | None  # None: the link dropped for good after the answer
    links: int = 1  # how many links it took
    notified: bool = False  # the watcher got the outcome as a notification (not a read)

    def describe(self) -> str:
        s = self.status
        if s is None:
            return f"{self.cmd.name}: {self.result.name} | status unknown (the link dropped)"
        mode = "unlocked" if s.unlocked else "locked"
        return (f"{self.cmd.name}: {self.result.name} | mode {mode}, epoch {s.epoch}, "
                f"unsaved {s.dirty_units} units ({s.dirty_bytes} bytes), "
                f"host {'connected' if s.host_connected else 'absent'}"
                f"{', PAIRING open' if s.pairing else ''}"
                f"{', saving, waiting for the host' if s.waiting else ''}")  # fmt: skip


def say(text: str) -> None:
    print(f"savepoint-fob: {text}", file=sys.stderr, flush=True)


@dataclass
class CommandRun:
    """Runs `cmd` for `creds`; `save` persists the bumped counter before any frame leaves."""

    connect: Connect
    creds: FobCredentials
    cmd: Cmd
    save: Callable[[FobCredentials], None] = lambda _c: None
    retry: Retry = field(default_factory=Retry)
    watch: Callable[[Status], None] | None = None  # subscribe to Status notifications
    sent: int = 0  # counter of the frame that may have arrived (0: none)
    answered: Result | None = None  # the write's own answer: OK, or an ATT refusal
    step: str = "connecting"
    links: int = 0
    _notes: list[Status] = field(default_factory=list)
    _sent_on: int = 0  # the link the frame went out on
    _nonce: bytes = b""  # the challenge of the frame sent: the appliance's Status MAC binds it

    async def run(self) -> Report:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry.total
        while True:
            self.links += 1
            link = None
            try:
                self.step = "connecting"
                timeout = min(self.retry.connect_timeout, deadline - loop.time())
                link = await asyncio.wait_for(self.connect(timeout), timeout)
                return await self._on(link, deadline)
            except (LinkLost, TimeoutError) as e:
                left = deadline - loop.time()
                if self.links >= self.retry.links or left <= self.retry.delay:
                    if self.answered is not None:  # the result is known; only Status is not
                        say(f"link lost while {self.step} ({e}); the appliance had answered")
                        return Report(self.cmd, self.answered, None, self.links)
                    raise FobError(self._gave_up(e)) from e
                say(f"link lost while {self.step} ({e or type(e).__name__}); reconnecting")
            finally:
                await _close(link)
            await asyncio.sleep(self.retry.delay)

    async def _on(self, link: GattLink, deadline: float) -> Report:
        if self.watch is not None:
            self.step = "subscribing to Status"
            await link.subscribe(frames.STATUS_UUID, self._noted)  # type: ignore[attr-defined]
        if self.sent:
            result = await self._resolve(link, deadline)
            if result is not None:
                return await self._report(link, result)
        result = await self._send(link)
        return await self._report(link, result)

    async def _send(self, link: GattLink) -> Result:
        self.step = "reading the challenge"
        nonce = await link.read(frames.CHALLENGE_UUID) if self.cmd in NEEDS_NONCE else b""
        self._nonce = nonce
        self._check_encrypted(link)
        self.creds.counter += 1
        self.save(self.creds)  # before sending: a used counter must never be sent again
        frame = frames.build_frame(bytes.fromhex(self.creds.key),
                                   bytes.fromhex(self.creds.appliance_id), self.cmd,
                                   self.creds.fob_id, self.creds.counter, nonce)  # fmt: skip
        self.step, self.sent, self.answered = "writing the command", self.creds.counter, None
        self._sent_on = self.links
        try:
            await link.write(frames.COMMAND_UUID, frame)
            self.answered = Result.OK  # the write succeeds only when the command ran OK
        except Refused:  # a refusal: the Status value says which
            self.step = "reading the status"
            mine = _mine(self, await self._status(link))
            self.answered = Result.FAILED if mine is None else mine
        return self.answered

    def _check_encrypted(self, link: GattLink) -> None:
        """The appliance serves the challenge only over an encrypted link: a link still
        unencrypted after it is not the appliance's. Nothing is sent, no counter used."""
        check = getattr(link, "encrypted", None)
        if check is not None and check() is False:
            raise FobError(
                f"the link is not encrypted after reading the challenge: not your appliance "
                f"(an impostor?); {self.cmd.name} was not sent"
            )

    async def _resolve(self, link: GattLink, deadline: float) -> Result | None:
        """The frame `sent` may have arrived: its result, or None when it never ran."""
        if self.answered is not None:
            return self.answered
        self.step = "asking what became of the frame"
        loop = asyncio.get_running_loop()
        while True:
            outcome = await self._outcome(link)
            if outcome.state == FrameState.DONE:
                say(f"the appliance ran the command before the link dropped: {outcome.result.name}")
                self.answered = outcome.result
                return outcome.result
            if outcome.state == FrameState.NOT_RUN:
                say("the appliance never got the command; sending it again (new counter)")
                self.sent = 0
                return None
            if outcome.state != FrameState.RUNNING or loop.time() > deadline:
                raise FobError(f"{self.cmd.name} (counter {self.sent}) reached the appliance, "
                               f"but it cannot say how it ended ({outcome.state.name}); "
                               "check with `savepoint-fob status`")  # fmt: skip
            await asyncio.sleep(0.2)

    async def _outcome(self, link: GattLink) -> FrameOutcome:
        try:
            await link.write(
                frames.OUTCOME_UUID, frames.outcome_query(self.creds.fob_id, self.sent)
            )
            return frames.FrameOutcome.decode(await link.read(frames.OUTCOME_UUID))
        except NotSupported:
            raise FobError(
                f"the link dropped after {self.cmd.name} was sent and this "
                "appliance (no Outcome characteristic) cannot say whether it ran; "
                "check with `savepoint-fob status` before sending it again"
            ) from None

    async def _status(self, link: GattLink) -> Status:
        """Status, checked: after a frame the appliance ran, only a MAC with our key counts."""
        value = await link.read(frames.STATUS_UUID)
        if len(value) == frames.FRAME_LEN and self.answered != Result.OK:
            return Status.decode(value)  # a refusal: the appliance had no session to MAC with
        try:
            return frames.verify_status(
                value,
                bytes.fromhex(self.creds.key),
                bytes.fromhex(self.creds.appliance_id),
                self._nonce,
            )
        except frames.FrameError as e:
            raise FobError(
                f"{e}; {self.cmd.name} may have reached an impostor, "
                "check with `savepoint-fob status` near the appliance"
            ) from None

    async def _report(self, link: GattLink, result: Result) -> Report:
        self.step = "reading the status"
        if self.watch is None or self.links != self._sent_on:  # a notification died with a link
            return Report(self.cmd, result, await self._status(link), self.links)
        self.step = "waiting for the status notification"
        loop = asyncio.get_running_loop()
        end = loop.time() + self.retry.notify_wait
        while loop.time() < end and not any(_mine(self, n) is not None for n in self._notes):
            await asyncio.sleep(0.05)
        notified = any(_mine(self, n) is not None for n in self._notes)
        self.step = "reading the status"  # the latest state: events may trail the outcome
        return Report(self.cmd, result, await self._status(link), self.links, notified)

    def _noted(self, value: bytes) -> None:
        status = Status.decode(value)
        self._notes.append(status)
        if self.watch is not None:
            self.watch(status)

    def _gave_up(self, e: BaseException) -> str:
        what = f"link lost while {self.step} ({e or type(e).__name__}), {self.links} link(s)"
        if self.sent:
            return (
                f"{what}: {self.cmd.name} (counter {self.sent}) may have reached the "
                "appliance; check with `savepoint-fob status` before sending it again"
            )
        return f"{what}; {self.cmd.name} was not sent"


def _mine(run: CommandRun, status: Status) -> Result | None:
    """The result in `status` when it reports this run's command from this fob."""
    if status.last_cmd == run.cmd and status.last_fob == run.creds.fob_id:
        return status.last_result
    return None


async def _close(link: GattLink | None) -> None:
    close = getattr(link, "close", None)
    if close is not None:
        try:
            await close()
        except Exception:  # the link is gone already; nothing left to release
            pass


# --- pairing ----------------------------------------------------------------------------------
async def pair_once(
    link: GattLink, setup_code: str = "", save: Callable[[FobCredentials], None] | None = None
) -> FobCredentials:
    """The key exchange on one link; `save` keeps the key before the confirmation leaves."""
    fob = FobPairing(setup_code)
    for write in fob.pub_writes():
        await link.write(frames.PAIR_UUID, write)
    try:
        creds, confirm = fob.finish(await link.read(frames.PAIR_UUID))
    except ValueError as e:
        raise FobError(str(e)) from e
    if save is not None:
        save(creds)
    try:
        await link.write(frames.PAIR_UUID, confirm)
    except Refused:
        raise FobError(
            "the appliance refused the key confirmation: wrong setup code? "
            "After 3 wrong codes the window closes; press PAIR again"
        ) from None
    try:  # the appliance confirms only now, after we proved the code
        fob.check_appliance(await link.read(frames.PAIR_UUID))
    except ValueError as e:
        raise FobError(str(e)) from e
    return creds


@dataclass
class PairRun:
    """Pairing that survives a dropped link: before the confirmation every step starts over
    (the appliance restarts the exchange on the first key half); after it, a STATUS frame
    with the new key asks whether the appliance added this fob."""

    connect: Connect
    setup_code: str = ""
    save: Callable[[FobCredentials], None] = lambda _c: None
    retry: Retry = field(default_factory=Retry)
    links: int = 0

    async def run(self) -> FobCredentials:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry.total
        pending: list[FobCredentials] = []  # a key whose confirmation may have arrived
        while True:
            self.links += 1
            link, step = None, "connecting"
            try:
                timeout = min(self.retry.connect_timeout, deadline - loop.time())
                link = await asyncio.wait_for(self.connect(timeout), timeout)
                step = "exchanging keys"
                keep = functools.partial(self._keep, pending=pending, link=link)
                return await pair_once(link, self.setup_code, keep)
            except (LinkLost, TimeoutError) as e:
                if self.links >= self.retry.links or deadline - loop.time() <= self.retry.delay:
                    raise FobError(f"pairing failed: link lost while {step} ({e})") from e
                say(f"link lost while {step} ({e or type(e).__name__}); reconnecting")
            finally:
                await _close(link)
            await asyncio.sleep(self.retry.delay)
            if pending and await self._added(pending[-1], deadline - loop.time()):
                return pending[-1]

    def _keep(self, creds: FobCredentials, pending: list[FobCredentials], link: object) -> None:
        creds.address = getattr(link, "address", "") or creds.address  # where to find it again
        self.save(creds)
        pending.append(creds)

    async def _added(self, creds: FobCredentials, left: float) -> bool:
        """Did the appliance add this key before the link dropped? Asks with a STATUS frame."""
        say(f"asking the appliance whether it added fob {creds.fob_id}")
        retry = Retry(total=max(left, 1.0), links=self.retry.links, delay=self.retry.delay,
                      connect_timeout=self.retry.connect_timeout)  # fmt: skip
        report = await CommandRun(self.connect, creds, Cmd.STATUS, self.save, retry).run()
        self.links += report.links
        if report.result == Result.OK:
            return True
        if report.result != Result.UNKNOWN_FOB:
            raise FobError(
                f"pairing state unclear: STATUS with the new key gave {report.result.name}"
            )
        return False
