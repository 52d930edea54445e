"""The appliance side of the fob protocol, independent of the radio stack.

BlueZ (gatt_service.py) and the bumble tests both call these methods from their GATT callbacks:
read_challenge, handle_command, pair_write/pair_read, outcome_write/outcome_read, status_read.
Every refusal sets a result code in the Status value and changes nothing else. Each takes the
BLE peer (BlueZ's `device` option): challenges, pairings and MACed Status are per peer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
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
from ble.keys import (
    CONFIRM_APPLIANCE,
    CONFIRM_FOB,
    ApplianceExchange,
    FobRecord,
    FobRegistry,
    RegistryError,
    confirm_tag,
)

log = logging.getLogger(__name__)
CHALLENGE_TTL = 10.0
NONCES_PER_PEER = 4  # live challenges per peer: one device can only push out its own
MAX_PEERS = 32  # peers with live challenges or a Status session (least recent dropped)
MAX_PAIR_FAILURES = 3  # wrong confirmations per window; then the window closes
MAX_PENDING_PAIRINGS = 8  # exchanges started but not confirmed (they reveal nothing)
MAX_COUNTER_JUMP = 2**16  # a counter further ahead than this is refused, not accepted
MAX_OUTCOMES = 32  # accepted frames whose outcome a fob can still ask for (Outcome char)
MAX_QUERIES = 16  # peers with an Outcome query pending


@dataclass
class _Pairing:
    """One fob's key exchange in progress, keyed by its BLE peer (device path or address)."""

    msg0: bytes = b""
    fob_id: int = 0
    key: bytes = b""
    reply: frames.PairReply | None = None


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
        self.setup_code = setup_code
        self.challenge_ttl = challenge_ttl
        self.clock = clock
        self.status = Status()
        self.pairing_open = False
        self.on_status: Callable[[bytes], None] = lambda _value: None
        # set by BlePart: forget a revoked fob's BLE bond; returns what happened, for the user
        self.forget_bond: Callable[[FobRecord], Awaitable[str]] | None = None
        # set by BlePart: the protocol closed the window (a fob paired, or too many failures)
        self.on_window_closed: Callable[[str], None] = lambda _why: None
        self.on_pair_failed: Callable[[str], object] = lambda _peer: None  # BlePart: drop its bond
        self._live: OrderedDict[str, dict[bytes, float]] = OrderedDict()  # peer -> nonce -> exp
        self._spent: deque[bytes] = deque(maxlen=64)  # used or expired: "stale", not "bad MAC"
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._pairings: OrderedDict[str, _Pairing] = OrderedDict()
        self._finished: dict[str, frames.PairReply] = {}  # this window's pairing, for its read
        self._failures = 0
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

    # --- Pairing (SPAKE2; the fob confirms first; one fob per window) ------------------------
    def pair_write(self, peer: str, data: bytes) -> None:
        """One write to the Pair characteristic; raises FrameError when refused."""
        if not self.pairing_open:
            self._pairings.pop(peer, None)
            self._finish(0, Result.PAIRING_CLOSED, 0)
            raise FrameError(Result.PAIRING_CLOSED, "pairing window is closed; press PAIR first")
        if len(data) < 2 or data[0] != frames.VERSION:
            result = Result.OLD_PROTOCOL if data[:1] == bytes([frames.V1]) else Result.BAD_FRAME
            raise FrameError(result, "pair message has a wrong length or version "
                                     f"(protocol {frames.VERSION} expected)")  # fmt: skip
        op, body = data[1], bytes(data[2:])
        state = self._pairings.get(peer, _Pairing())
        if op == frames.PAIR_MSG0 and len(body) == frames.MSG_SPLIT:
            self._pending(peer, _Pairing(msg0=body))
        elif op == frames.PAIR_MSG1 and len(body) == frames.MSG_LEN - frames.MSG_SPLIT \
                and state.msg0:  # fmt: skip
            self._answer(peer, state.msg0 + body)
        elif op == frames.PAIR_CONFIRM and len(body) == 2 + frames.CONFIRM_LEN and state.key:
            self._confirm(peer, state, int.from_bytes(body[:2], "big"), body[2:])
        else:
            self._pairings.pop(peer, None)
            raise FrameError(Result.BAD_FRAME, f"unexpected pair message 0x{op:02x}")

    def _pending(self, peer: str, state: _Pairing) -> None:
        self._pairings[peer] = state
        self._pairings.move_to_end(peer)
        while len(self._pairings) > MAX_PENDING_PAIRINGS:
            self._pairings.popitem(last=False)

    def _answer(self, peer: str, fob_msg: bytes) -> None:
        """The appliance's SPAKE2 message; no confirmation yet (that would allow guessing)."""
        exchange = ApplianceExchange(self.setup_code)
        appliance_id = self.registry.appliance_id
        try:
            fob_id = self.registry.peek_id()
            key = exchange.key(fob_msg, appliance_id, fob_id)
        except (ValueError, RegistryError) as e:
            self._pairings.pop(peer, None)
            raise FrameError(Result.PAIRING_FAILED, str(e)) from e
        reply = frames.PairReply(Result.OK, fob_id, appliance_id, exchange.message)
        self._pending(peer, _Pairing(fob_id=fob_id, key=key, reply=reply))

    def _confirm(self, peer: str, state: _Pairing, fob_id: int, tag: bytes) -> None:
        del self._pairings[peer]
        good = hmac.compare_digest(tag, confirm_tag(state.key, CONFIRM_FOB))
        if fob_id != state.fob_id or not good:
            self._failures += 1
            left = MAX_PAIR_FAILURES - self._failures
            log.warning("pairing from %s failed: wrong setup code (%d attempt(s) left)",
                        peer or "a peer", max(left, 0))  # fmt: skip
            self._finish(0, Result.PAIRING_FAILED, fob_id)
            self.on_pair_failed(peer)
            if left <= 0:
                self._close_window(f"{MAX_PAIR_FAILURES} wrong setup codes")
            raise FrameError(Result.PAIRING_FAILED, "fob key confirmation failed (setup code?)")
        try:
            record = self.registry.add(fob_id, state.key, device=peer)
        except (OSError, RegistryError) as e:  # another pairing took the id: try again
            raise FrameError(Result.PAIRING_FAILED, f"cannot store the fob: {e}") from e
        log.info("paired fob %d from %s", fob_id, record.address or peer or "an unknown peer")
        assert state.reply is not None
        self._finished[peer] = frames.PairReply(
            Result.OK, fob_id, state.reply.appliance_id, state.reply.appliance_msg,
            confirm_tag(state.key, CONFIRM_APPLIANCE),
        )  # fmt: skip
        self._finish(0, Result.OK, fob_id)
        self._close_window(f"fob {fob_id} paired")

    def _close_window(self, why: str) -> None:
        self.set_pairing(False)
        self.on_window_closed(why)

    def pair_read(self, peer: str) -> bytes:
        if peer in self._finished:
            return self._finished[peer].encode()
        state = self._pairings.get(peer)
        if state and state.reply:
            return state.reply.encode()
        closed = Result.NONE if self.pairing_open else Result.PAIRING_CLOSED
        return frames.PairReply(closed).encode()

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
        if open_ and not self.pairing_open:  # a new gesture: a fresh count, a fresh id
            self._failures = 0
            self._finished.clear()
        self.pairing_open = self.status.pairing = open_
        if not open_:
            self._pairings.clear()
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
            self.pairing_open = s.pairing = bool(
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


__all__ = ["FobProtocol", "Cmd", "Result"]
