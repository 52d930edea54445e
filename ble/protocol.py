"""The appliance side of the fob protocol, independent of the radio stack.

BlueZ (gatt_service.py) and the bumble tests both call these methods from their GATT callbacks:
read_challenge, handle_command, pair_write/pair_read, outcome_write/outcome_read, status_value.
Every refusal sets a result code in the Status value and changes nothing else.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from appliance.commands import Command, CommandSink, Event, Outcome
from ble import frames
from ble.frames import (
    ACTION_CMD,
    CMD_ACTION,
    NEEDS_NONCE,
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
    FobRecord,
    FobRegistry,
    RegistryError,
    confirm_tag,
    derive_key,
    new_keypair,
)

log = logging.getLogger(__name__)
CHALLENGE_TTL = 10.0
MAX_LIVE_NONCES = 8
MAX_OUTCOMES = 32  # accepted frames whose outcome a fob can still ask for (Outcome char)
MAX_QUERIES = 16  # peers with an Outcome query pending


@dataclass
class _Pairing:
    """One fob's key exchange in progress, keyed by its BLE peer (device path or address)."""

    pub0: bytes = b""
    fob_id: int = 0
    key: bytes = b""
    reply: frames.PairReply | None = None


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
        self._live: dict[bytes, float] = {}  # nonce -> expiry
        self._spent: deque[bytes] = deque(maxlen=64)  # used or expired: "stale", not "bad MAC"
        self._pairings: dict[str, _Pairing] = {}
        self._verify_lock = asyncio.Lock()
        # (fob id, counter) of accepted frames -> (command, result; None while running)
        self._outcomes: OrderedDict[tuple[int, int], tuple[int, Result | None]] = OrderedDict()
        self._queries: OrderedDict[str, tuple[int, int]] = OrderedDict()  # peer -> query

    # --- Challenge ------------------------------------------------------------------------
    def read_challenge(self) -> bytes:
        """A fresh nonce, valid challenge_ttl seconds and for one RESTORE or UNLOCK."""
        self._expire_nonces()
        while len(self._live) >= MAX_LIVE_NONCES:
            oldest = min(self._live, key=self._live.__getitem__)
            self._spend(oldest)
        nonce = secrets.token_bytes(frames.NONCE_LEN)
        self._live[nonce] = self.clock() + self.challenge_ttl
        return nonce

    def _expire_nonces(self) -> None:
        now = self.clock()
        for nonce in [n for n, exp in self._live.items() if exp <= now]:
            self._spend(nonce)

    def _spend(self, nonce: bytes) -> None:
        self._live.pop(nonce, None)
        self._spent.append(nonce)

    # --- Command --------------------------------------------------------------------------
    async def handle_command(self, data: bytes) -> Result:
        """Verify a frame, persist its counter, run it through the bus; return the result."""
        fob_id, cmd = _peek(data)
        async with self._verify_lock:
            try:
                frame = self._verify(data)
            except FrameError as e:
                log.warning("fob frame refused: %s", e)
                return self._finish(cmd, e.result, fob_id)
            self._remember(frame, None)  # accepted: RUNNING until the bus answers
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
        return self._finish(frame.cmd, result, frame.fob_id)

    def _verify(self, data: bytes) -> frames.CommandFrame:
        frame = frames.parse_frame(data)
        record = self.registry.get(frame.fob_id)
        if record is None:
            raise FrameError(Result.UNKNOWN_FOB, f"fob {frame.fob_id} is not paired")
        if record.revoked:
            raise FrameError(Result.REVOKED, f"fob {frame.fob_id} was revoked")
        key = bytes.fromhex(record.key)
        nonce = self._check_tag(frame, key)
        if frame.counter <= record.counter:
            raise FrameError(
                Result.REPLAY, f"counter {frame.counter} not above {record.counter} (replay)"
            )
        if nonce:
            self._spend(nonce)
        try:
            self.registry.accept_counter(frame.fob_id, frame.counter)
        except (OSError, RegistryError) as e:
            self._remember(frame, Result.FAILED)  # the counter may stand in memory: say so
            raise FrameError(Result.FAILED, f"cannot persist the fob counter: {e}") from e
        return frame

    def _check_tag(self, frame: frames.CommandFrame, key: bytes) -> bytes:
        """Return the nonce the tag was made with (b"" for commands that need none)."""
        appliance_id = self.registry.appliance_id
        if frame.cmd not in NEEDS_NONCE:
            if frames.tag_matches(frame, key, appliance_id):
                return b""
            raise FrameError(Result.BAD_MAC, f"bad MAC from fob {frame.fob_id}")
        self._expire_nonces()
        for nonce in self._live:
            if frames.tag_matches(frame, key, appliance_id, nonce):
                return nonce
        if any(frames.tag_matches(frame, key, appliance_id, n) for n in self._spent):
            raise FrameError(Result.STALE_CHALLENGE, "challenge nonce expired or already used")
        if frames.tag_matches(frame, key, appliance_id):
            raise FrameError(Result.STALE_CHALLENGE, f"{frame.cmd.name} needs a challenge nonce")
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

    # --- Pairing --------------------------------------------------------------------------
    def pair_write(self, peer: str, data: bytes) -> None:
        """One write to the Pair characteristic; raises FrameError when refused."""
        if not self.pairing_open:
            self._pairings.pop(peer, None)
            self._finish(0, Result.PAIRING_CLOSED, 0)
            raise FrameError(Result.PAIRING_CLOSED, "pairing window is closed; press PAIR first")
        if len(data) < 2 or data[0] != frames.VERSION:
            raise FrameError(Result.BAD_FRAME, "pair message has a wrong length or version")
        op, body = data[1], bytes(data[2:])
        state = self._pairings.setdefault(peer, _Pairing())
        if op == frames.PAIR_PUB0 and len(body) == frames.PUB_LEN // 2:
            self._pairings[peer] = _Pairing(pub0=body)
        elif op == frames.PAIR_PUB1 and len(body) == frames.PUB_LEN // 2 and state.pub0:
            self._answer(peer, state.pub0 + body)
        elif op == frames.PAIR_CONFIRM and len(body) == 2 + frames.CONFIRM_LEN and state.key:
            self._confirm(peer, state, int.from_bytes(body[:2], "big"), body[2:])
        else:
            self._pairings.pop(peer, None)
            raise FrameError(Result.BAD_FRAME, f"unexpected pair message 0x{op:02x}")

    def _answer(self, peer: str, fob_pub: bytes) -> None:
        private, app_pub = new_keypair()
        fob_id = self.registry.reserve_id()
        appliance_id = self.registry.appliance_id
        try:
            key = derive_key(
                private, fob_pub, fob_pub=fob_pub, appliance_pub=app_pub,
                appliance_id=appliance_id, fob_id=fob_id, setup_code=self.setup_code,
            )  # fmt: skip
        except ValueError as e:
            self._pairings.pop(peer, None)
            raise FrameError(Result.PAIRING_FAILED, f"bad fob public key: {e}") from e
        confirm = confirm_tag(key, CONFIRM_APPLIANCE)
        reply = frames.PairReply(Result.OK, fob_id, app_pub, appliance_id, confirm)
        self._pairings[peer] = _Pairing(fob_id=fob_id, key=key, reply=reply)

    def _confirm(self, peer: str, state: _Pairing, fob_id: int, tag: bytes) -> None:
        del self._pairings[peer]
        if fob_id != state.fob_id or tag != confirm_tag(state.key, CONFIRM_FOB):
            self._finish(0, Result.PAIRING_FAILED, fob_id)
            raise FrameError(Result.PAIRING_FAILED, "fob key confirmation failed (setup code?)")
        record = self.registry.add(fob_id, state.key, device=peer)
        log.info("paired fob %d from %s", fob_id, record.address or peer or "an unknown peer")
        self._finish(0, Result.OK, fob_id)

    def pair_read(self, peer: str) -> bytes:
        state = self._pairings.get(peer)
        if state and state.reply:
            return state.reply.encode()
        closed = Result.NONE if self.pairing_open else Result.PAIRING_CLOSED
        return frames.PairReply(closed).encode()

    # --- Status ---------------------------------------------------------------------------
    def status_value(self) -> bytes:
        return self.status.encode()

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
