"""The appliance side of the fob protocol, independent of the radio stack.

BlueZ (gatt_service.py) and the bumble tests both call these methods from their GATT callbacks:
read_challenge, handle_command, pair_write/pair_read, outcome_write/outcome_read, status_read.
Every refusal sets a result code in the Status value and changes nothing else. Each takes the
BLE peer (BlueZ's `device` option): challenges, pairings and MACed Status are per peer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from appliance.control.commands import Command, CommandSink, Event, Outcome
from ble import frames
from ble.frames import (
    ACTION_CMD,
    CMD_ACTION,
    Cmd,
    FrameError,
    FrameOutcome,
    FrameState,
    Result,
    Status,
)
from ble.keys import FobRecord, FobRegistry, RegistryError
from ble.pairing import MAX_PAIR_FAILURES, MAX_PENDING_PAIRINGS, PairingWindow

log = logging.getLogger(__name__)
CHALLENGE_TTL = 10.0
NONCES_PER_PEER = 4  # live challenges per peer: one device can only push out its own
MAX_PEERS = 32  # peers with live challenges or a Status session (least recent dropped)
MAX_COUNTER_JUMP = 2**16  # a counter further ahead than this is refused, not accepted
MAX_OUTCOMES = 32  # accepted frames whose outcome a fob can still ask for (Outcome char)
MAX_QUERIES = 16  # peers with an Outcome query pending


@dataclass
class _Session:
    """The last verified frame from one peer: its Status reads carry a MAC with that key."""

    fob_id: int
    key: bytes
    nonce: bytes
    cmd: int = 0
    result: Result = Result.NONE


class FobProtocol:
    def __init__(
        self,
        registry: FobRegistry,
        bus: CommandSink,
        *,
        setup_code: str = "",
        challenge_ttl: float = CHALLENGE_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.bus = bus
        self.challenge_ttl = challenge_ttl
        self.clock = clock
        self.status = Status()
        self.on_status: Callable[[bytes], None] = lambda _value: None
        # set by BlePart: forget a revoked fob's BLE bond; returns what happened, for the user
        self.forget_bond: Callable[[FobRecord], Awaitable[str]] | None = None
        # set by BlePart: the protocol closed the window (a fob paired, or too many failures)
        self.on_window_closed: Callable[[str], None] = lambda _why: None
        self.on_pair_failed: Callable[[str], object] = lambda _peer: None  # BlePart: drop its bond
        self._live: OrderedDict[str, dict[bytes, float]] = OrderedDict()  # peer -> nonce -> exp
        self._spent: deque[bytes] = deque(maxlen=64)  # used or expired: "stale", not "bad MAC"
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self.window = PairingWindow(
            registry, setup_code, lambda result, fob: self._finish(0, result, fob),
            closed=lambda why: self.on_window_closed(why),
            failed=lambda peer: self.on_pair_failed(peer),
        )  # fmt: skip
        self._verify_lock = asyncio.Lock()
        # (fob id, counter) of accepted frames -> (command, result; None while running)
        self._outcomes: OrderedDict[tuple[int, int], tuple[int, Result | None]] = OrderedDict()
        self._queries: OrderedDict[str, tuple[int, int]] = OrderedDict()  # peer -> query

    # --- Challenge ------------------------------------------------------------------------
    def read_challenge(self, peer: str = "") -> bytes:
        """A fresh nonce for this peer, valid challenge_ttl seconds and for one frame."""
        live = self._peer_nonces(peer)
        while len(live) >= NONCES_PER_PEER:
            self._spend(live, next(iter(live)))
        nonce = secrets.token_bytes(frames.NONCE_LEN)
        live[nonce] = self.clock() + self.challenge_ttl
        return nonce

    def _peer_nonces(self, peer: str) -> dict[bytes, float]:
        live = self._live.setdefault(peer, {})
        self._live.move_to_end(peer)
        while len(self._live) > MAX_PEERS:
            self._live.popitem(last=False)
        now = self.clock()
        for nonce in [n for n, exp in live.items() if exp <= now]:
            self._spend(live, nonce)
        return live

    def _spend(self, live: dict[bytes, float], nonce: bytes) -> None:
        live.pop(nonce, None)
        self._spent.append(nonce)

    # --- Command --------------------------------------------------------------------------
    async def handle_command(self, data: bytes, peer: str = "") -> Result:
        """Verify a frame, persist its counter, run it through the bus; return the result."""
        fob_id, cmd = _peek(data)
        async with self._verify_lock:
            try:
                frame, session = self._verify(data, peer)
            except FrameError as e:
                log.warning("fob frame refused: %s", e)
                self._sessions.pop(peer, None)  # its Status read shows this refusal, unMACed
                return self._finish(cmd, e.result, fob_id)
            self._remember(frame, None)  # accepted: RUNNING until the bus answers
            self._sessions[peer] = session
            self._sessions.move_to_end(peer)
            while len(self._sessions) > MAX_PEERS:
                self._sessions.popitem(last=False)
        try:
            outcome = await self.bus.submit(
                Command(CMD_ACTION[frame.cmd], source=f"fob:{frame.fob_id}", authenticated=True)
            )
        except Exception:  # the bus failing must still give the fob an answer
            log.exception("command bus failed on a fob command")
            result = Result.FAILED
        else:
            self._apply_outcome_data(outcome)
            result = Result.OK if outcome.ok else Result.REFUSED
        self._remember(frame, result)
        session.cmd, session.result = frame.cmd, result
        return self._finish(frame.cmd, result, frame.fob_id)

    def _verify(self, data: bytes, peer: str) -> tuple[frames.CommandFrame, _Session]:
        frame = frames.parse_frame(data)
        record = self.registry.get(frame.fob_id)
        if record is None:
            raise FrameError(Result.UNKNOWN_FOB, f"fob {frame.fob_id} is not paired")
        if record.revoked:
            raise FrameError(Result.REVOKED, f"fob {frame.fob_id} was revoked")
        if record.protocol < frames.VERSION:
            raise FrameError(Result.OLD_PROTOCOL, f"fob {frame.fob_id} paired with protocol "
                                                  f"{record.protocol}: pair it again")  # fmt: skip
        key = bytes.fromhex(record.key)
        nonce = self._check_tag(frame, key, peer)
        if frame.counter <= record.counter:
            raise FrameError(
                Result.REPLAY, f"counter {frame.counter} not above {record.counter} (replay)"
            )
        if frame.counter - record.counter > MAX_COUNTER_JUMP:
            raise FrameError(
                Result.COUNTER_JUMP,
                f"counter {frame.counter} is more than "
                f"{MAX_COUNTER_JUMP} ahead of {record.counter}",
            )
        self._spend(self._peer_nonces(peer), nonce)
        try:
            self.registry.accept_counter(frame.fob_id, frame.counter)
        except (OSError, RegistryError) as e:
            self._remember(frame, Result.FAILED)  # the counter may stand in memory: say so
            raise FrameError(Result.FAILED, f"cannot persist the fob counter: {e}") from e
        return frame, _Session(frame.fob_id, key, nonce)

    def _check_tag(self, frame: frames.CommandFrame, key: bytes, peer: str) -> bytes:
        """Return this peer's nonce the tag was made with (protocol 2: every frame has one)."""
        appliance_id = self.registry.appliance_id
        for nonce in list(self._peer_nonces(peer)):
            if frames.tag_matches(frame, key, appliance_id, nonce):
                return nonce
        if any(frames.tag_matches(frame, key, appliance_id, n) for n in self._spent):
            raise FrameError(Result.STALE_CHALLENGE, "challenge nonce expired or already used")
        if frames.tag_matches(frame, key, appliance_id):
            raise FrameError(Result.STALE_CHALLENGE, f"{frame.cmd.name} needs a challenge nonce")
        if any(frames.tag_matches(frame, key, appliance_id, n)
               for link in self._live.values() for n in link):  # fmt: skip
            raise FrameError(Result.STALE_CHALLENGE, "challenge read on another link")
        raise FrameError(Result.BAD_MAC, f"bad MAC from fob {frame.fob_id}")

    def _finish(self, cmd: int, result: Result, fob_id: int) -> Result:
        self.status.last_cmd, self.status.last_result, self.status.last_fob = cmd, result, fob_id
        self._notify()
        return result

    # --- Outcome (what became of one frame, for a fob whose link dropped) -----------------
    def _remember(self, frame: frames.CommandFrame, result: Result | None) -> None:
        key = (frame.fob_id, frame.counter)
        self._outcomes[key] = (frame.cmd, result)
        self._outcomes.move_to_end(key)
        while len(self._outcomes) > MAX_OUTCOMES:
            self._outcomes.popitem(last=False)

    def frame_outcome(self, fob_id: int, counter: int) -> FrameOutcome:
        known = self._outcomes.get((fob_id, counter))
        if known is not None:
            cmd, result = known
            if result is None:
                return FrameOutcome(FrameState.RUNNING, fob_id, counter, cmd)
            return FrameOutcome(FrameState.DONE, fob_id, counter, cmd, result)
        record = self.registry.get(fob_id)
        if record is None or counter > record.counter:  # never accepted, so never ran
            return FrameOutcome(FrameState.NOT_RUN, fob_id, counter)
        return FrameOutcome(FrameState.UNKNOWN, fob_id, counter)

    def outcome_write(self, peer: str, data: bytes) -> None:
        """A query (fob id, counter) for the next Outcome read from this peer."""
        self._queries[peer] = frames.parse_outcome_query(data)
        self._queries.move_to_end(peer)
        while len(self._queries) > MAX_QUERIES:
            self._queries.popitem(last=False)

    def outcome_read(self, peer: str) -> bytes:
        query = self._queries.get(peer)
        if query is None:
            return FrameOutcome(FrameState.NO_QUERY).encode()
        return self.frame_outcome(*query).encode()

    # --- Pairing (ble/pairing.py: SPAKE2, the fob confirms first, one fob per window) -------
    @property
    def pairing_open(self) -> bool:
        return self.window.open

    def pair_write(self, peer: str, data: bytes) -> None:
        """One write to the Pair characteristic; raises FrameError when refused."""
        self.window.write(peer, data)

    def pair_read(self, peer: str) -> bytes:
        return self.window.read(peer)

    # --- Status ---------------------------------------------------------------------------
    def status_value(self) -> bytes:
        """The 20-byte Status everyone may read and gets notified (a hint, not proof)."""
        return self.status.encode()

    def status_read(self, peer: str = "") -> bytes:
        """What `peer` reads: after a verified frame from it, that frame's result in the last
        fields and a MAC with its fob's key over the challenge, so the fob can trust it."""
        session = self._sessions.get(peer)
        if session is None:
            return self.status.encode()
        mine = dataclasses.replace(self.status, last_cmd=session.cmd, last_fob=session.fob_id,
                                   last_result=session.result)  # fmt: skip
        body = mine.encode()
        tag = frames.status_tag(session.key, self.registry.appliance_id, session.nonce, body)
        return body + tag

    def on_event(self, event: Event) -> None:
        """Fold a bus event into the Status value and notify subscribers."""
        data = event.data
        if event.kind == "state":
            self._apply_state(data)
        elif event.kind == "pairing":
            self.set_pairing(bool(data.get("open")))
            return
        elif event.kind == "progress":
            self.status.busy = data.get("phase") in ("start", "waiting", "commit")
            self.status.waiting = data.get("phase") == "waiting"
        elif event.kind == "host":
            self.status.host_connected = bool(data.get("connected"))
        elif event.kind == "outcome":
            if str(data.get("source", "")).startswith("fob:"):
                return  # handle_command already reported it, with the finer result code
            cmd = ACTION_CMD.get(data.get("action"), 0)  # type: ignore[arg-type]
            self.status.last_cmd = cmd
            self.status.last_result = Result.OK if data.get("ok") else Result.REFUSED
            self.status.last_fob = 0
        else:
            return
        self._notify()

    def set_pairing(self, open_: bool) -> None:
        self.window.set_open(open_)
        self.status.pairing = open_
        self._notify()

    def _apply_state(self, data: dict[str, Any]) -> None:
        s = self.status
        if "mode" in data:
            s.unlocked = str(data["mode"]) == "unlocked"
        s.epoch = int(data.get("epoch", s.epoch))
        s.dirty_units = int(data.get("dirty_units", s.dirty_units))
        s.dirty_bytes = int(data.get("dirty_bytes", s.dirty_bytes))
        s.host_connected = bool(data.get("host_connected", s.host_connected))
        if "pairing" in data:
            pairing = data["pairing"]
            self.window.open = s.pairing = bool(
                pairing.get("open") if isinstance(pairing, dict) else pairing
            )

    def _apply_outcome_data(self, outcome: Outcome) -> None:
        if {"epoch", "mode"} & outcome.data.keys():
            self._apply_state(outcome.data)

    def _notify(self) -> None:
        try:
            self.on_status(self.status.encode())
        except Exception:  # a broken subscriber must not break the command path
            log.exception("status notification failed")

    # --- fobs handler (bus.register_handler("fobs", ...)) ---------------------------------
    async def fobs_handler(self, args: dict[str, Any]) -> dict[str, Any]:
        op = args.get("op", "list")
        try:
            if op == "list":
                return {"fobs": self.registry.list()}
            fob_id = int(args.get("id", 0))
            if op == "rename":
                return {"fob": self.registry.rename(fob_id, str(args.get("name", ""))).public()}
            if op == "revoke":
                record = self.registry.revoke(fob_id)  # stands even if the bond stays
                bond = await self.forget_bond(record) if self.forget_bond else "not managed here"
                return {"fob": {**record.public(), "bond": bond}}
        except (RegistryError, ValueError, TypeError) as e:
            raise ValueError(str(e)) from e
        raise ValueError(f"unknown fobs op {op!r}; use list, rename or revoke")


def _peek(data: bytes) -> tuple[int, int]:
    """Fob id and command of a frame, for the Status report even when the frame is bad."""
    if len(data) >= 4:
        return int.from_bytes(data[2:4], "big"), data[1]
    return 0, 0


__all__ = ["MAX_PAIR_FAILURES", "MAX_PENDING_PAIRINGS", "Cmd", "FobProtocol", "Result"]
