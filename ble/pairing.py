"""The pairing window, appliance side: SPAKE2 with the setup code, one gesture, one fob.

FobProtocol (ble/protocol.py) holds one PairingWindow and passes it the Pair characteristic's
writes and reads. The fob confirms first (so a wrong guess learns nothing to test offline);
MAX_PAIR_FAILURES wrong confirmations close the window, and so does the first pairing. Each
refusal and early closing is kept in the registry for `savepoint history`.
"""

from __future__ import annotations

import hmac
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ble import frames
from ble.frames import FrameError, Result
from ble.keys import (
    CONFIRM_APPLIANCE,
    CONFIRM_FOB,
    ApplianceExchange,
    FobRegistry,
    RegistryError,
    address_of,
    confirm_tag,
)

log = logging.getLogger("ble.protocol")
MAX_PAIR_FAILURES = 3  # wrong confirmations per window; then the window closes
MAX_PENDING_PAIRINGS = 8  # exchanges started but not confirmed (they reveal nothing)


@dataclass
class _Pairing:
    """One fob's key exchange in progress, keyed by its BLE peer (device path or address)."""

    msg0: bytes = b""
    fob_id: int = 0
    key: bytes = b""
    reply: frames.PairReply | None = None


class PairingWindow:
    def __init__(
        self,
        registry: FobRegistry,
        setup_code: str,
        report: Callable[[Result, int], object],
        closed: Callable[[str], None],
        failed: Callable[[str], object],
    ) -> None:
        self.registry = registry
        self.setup_code = setup_code
        self.report = report  # a pairing result for the Status value (result, fob id)
        self.closed = closed  # the window closed itself (a fob paired, too many failures)
        self.failed = failed  # a wrong confirmation from this peer (its bond goes)
        self.open = False
        self._pairings: OrderedDict[str, _Pairing] = OrderedDict()
        self._finished: dict[str, frames.PairReply] = {}  # this window's pairing, for its read
        self._failures = 0

    def set_open(self, open_: bool) -> None:
        if open_ and not self.open:  # a new gesture: a fresh count, a fresh id
            self._failures = 0
            self._finished.clear()
        self.open = open_
        if not open_:
            self._pairings.clear()

    def write(self, peer: str, data: bytes) -> None:
        """One write to the Pair characteristic; raises FrameError when refused."""
        if not self.open:
            self._pairings.pop(peer, None)
            self.report(Result.PAIRING_CLOSED, 0)
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

    def read(self, peer: str) -> bytes:
        if peer in self._finished:
            return self._finished[peer].encode()
        state = self._pairings.get(peer)
        if state and state.reply:
            return state.reply.encode()
        closed = Result.NONE if self.open else Result.PAIRING_CLOSED
        return frames.PairReply(closed).encode()

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
            self._refused(peer, fob_id)
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
        self.report(Result.OK, fob_id)
        self._close(f"fob {fob_id} paired")

    def _refused(self, peer: str, fob_id: int) -> None:
        self._failures += 1
        left = max(MAX_PAIR_FAILURES - self._failures, 0)
        log.warning("pairing from %s failed: wrong setup code (%d attempt(s) left)",
                    peer or "a peer", left)  # fmt: skip
        self._note("refused", address_of(peer) or peer or "unknown peer",
                   f"pairing: wrong setup code ({left} attempt(s) left)")  # fmt: skip
        self.report(Result.PAIRING_FAILED, fob_id)
        self.failed(peer)
        if not left:
            why = f"{MAX_PAIR_FAILURES} wrong setup codes"
            self._note("closed", "ble", f"pairing window closed: {why}")
            self._close(why)

    def _close(self, why: str) -> None:
        self.set_open(False)
        self.closed(why)

    def _note(self, action: str, source: str, detail: str) -> None:
        """Bounded (MAX_PAIR_FAILURES + 1 writes a window); a full disk must not stop the
        refusal, so a failed write is logged."""
        try:
            self.registry.note(action, source, detail)
        except (OSError, RegistryError) as e:
            log.warning("could not keep %r in the fob registry: %s", detail, e)
