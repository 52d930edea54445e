"""Byte formats of the fob protocol: command frames, their MAC, the Status value, pairing messages.

Everything here is pure (no I/O, no clocks) so a fob written in C can be checked against it.
docs/fob-protocol.md is the byte-exact description; keep the two in step.
All integers are big-endian.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from enum import IntEnum

from appliance.control.commands import Action

VERSION = 2  # protocol 2: SPAKE2 pairing, a challenge in every frame, MACed replies
V1 = 1
SERVICE_UUID = "5a7e0001-8d1f-4c3a-9b6e-2f0c5e7d1a01"
COMMAND_UUID = "5a7e0002-8d1f-4c3a-9b6e-2f0c5e7d1a01"
STATUS_UUID = "5a7e0003-8d1f-4c3a-9b6e-2f0c5e7d1a01"
CHALLENGE_UUID = "5a7e0004-8d1f-4c3a-9b6e-2f0c5e7d1a01"
PAIR_UUID = "5a7e0005-8d1f-4c3a-9b6e-2f0c5e7d1a01"
OUTCOME_UUID = "5a7e0006-8d1f-4c3a-9b6e-2f0c5e7d1a01"  # what became of a frame: see below

APPLIANCE_ID_LEN = 16
NONCE_LEN = 16
TAG_LEN = 12
FRAME_LEN = 20  # fits one ATT write at the minimum MTU of 23
MAC_LABEL = b"savepoint-cmd"
STATUS_LABEL = b"savepoint-status"
MSG_LEN = 33  # a SPAKE2 message (Ed25519 group): side byte + 32-byte element
STATUS_TAG_LEN = 12
_HEADER = struct.Struct(">BBHI")  # version, command, fob id, counter


class Cmd(IntEnum):
    SAVE = 0x01
    RESTORE = 0x02
    UNLOCK = 0x03
    STATUS = 0x04
    LOCK = 0x05


# Protocol 2: every command binds a fresh challenge nonce, so a withheld frame expires.
NEEDS_NONCE = frozenset(Cmd)
CMD_ACTION = {
    Cmd.SAVE: Action.SAVE,
    Cmd.RESTORE: Action.RESTORE,
    Cmd.UNLOCK: Action.UNLOCK,
    Cmd.STATUS: Action.STATUS,
    Cmd.LOCK: Action.LOCK,
}
ACTION_CMD = {a: c for c, a in CMD_ACTION.items()}


class Result(IntEnum):
    """Result codes carried in the Status characteristic (byte 17)."""

    OK = 0x00
    BAD_FRAME = 0x01  # wrong length or version
    UNKNOWN_COMMAND = 0x02
    UNKNOWN_FOB = 0x03
    REVOKED = 0x04
    BAD_MAC = 0x05
    REPLAY = 0x06  # counter not higher than the last accepted one
    STALE_CHALLENGE = 0x07  # nonce missing, expired or already used
    REFUSED = 0x08  # the command bus (policy, lock mode) said no
    FAILED = 0x09  # the command ran and failed
    PAIRING_CLOSED = 0x0A
    PAIRING_FAILED = 0x0B
    COUNTER_JUMP = 0x0C  # counter implausibly far ahead of the last accepted one
    OLD_PROTOCOL = 0x0D  # a protocol 1 frame or a fob paired with protocol 1: pair it again
    NONE = 0xFF  # nothing happened yet


class FrameError(ValueError):
    def __init__(self, result: Result, message: str) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class CommandFrame:
    cmd: Cmd
    fob_id: int
    counter: int
    tag: bytes
    version: int = VERSION

    @property
    def header(self) -> bytes:
        return _HEADER.pack(self.version, self.cmd, self.fob_id, self.counter)

    def encode(self) -> bytes:
        return self.header + self.tag


def mac_input(appliance_id: bytes, header: bytes, nonce: bytes = b"") -> bytes:
    return MAC_LABEL + appliance_id + header + nonce


def compute_tag(key: bytes, appliance_id: bytes, header: bytes, nonce: bytes = b"") -> bytes:
    digest = hmac.new(key, mac_input(appliance_id, header, nonce), hashlib.sha256).digest()
    return digest[:TAG_LEN]


def build_frame(
    key: bytes, appliance_id: bytes, cmd: Cmd, fob_id: int, counter: int, nonce: bytes = b""
) -> bytes:
    """What a fob sends. `nonce` is the Challenge value, required for RESTORE and UNLOCK."""
    if cmd in NEEDS_NONCE and len(nonce) != NONCE_LEN:
        raise ValueError(f"{cmd.name} needs the {NONCE_LEN}-byte challenge nonce")
    if not 0 < counter < 2**32 or not 0 < fob_id < 2**16:
        raise ValueError("counter must be 1..2^32-1 and fob id 1..65535")
    header = _HEADER.pack(VERSION, cmd, fob_id, counter)
    return header + compute_tag(key, appliance_id, header, nonce)


def header_only_frame(
    key: bytes, appliance_id: bytes, cmd: Cmd, fob_id: int, counter: int
) -> bytes:
    """A frame whose MAC binds no challenge (what protocol 1 allowed): for tests and attackers."""
    header = _HEADER.pack(VERSION, cmd, fob_id, counter)
    return header + compute_tag(key, appliance_id, header)


def parse_frame(data: bytes) -> CommandFrame:
    """Split a frame into fields; checks only the shape, never the MAC."""
    if len(data) != FRAME_LEN:
        raise FrameError(Result.BAD_FRAME, f"frame is {len(data)} bytes, expected {FRAME_LEN}")
    version, cmd, fob_id, counter = _HEADER.unpack_from(data)
    if version == V1:
        raise FrameError(Result.OLD_PROTOCOL, "protocol 1 frame: this fob must be paired again")
    if version != VERSION:
        raise FrameError(Result.BAD_FRAME, f"frame version {version}, expected {VERSION}")
    try:
        command = Cmd(cmd)
    except ValueError:
        raise FrameError(Result.UNKNOWN_COMMAND, f"unknown command 0x{cmd:02x}") from None
    return CommandFrame(command, fob_id, counter, bytes(data[_HEADER.size :]), version)


def tag_matches(frame: CommandFrame, key: bytes, appliance_id: bytes, nonce: bytes = b"") -> bool:
    expected = compute_tag(key, appliance_id, frame.header, nonce)
    return hmac.compare_digest(expected, frame.tag)


# --- Status characteristic: 20 bytes, so a notification fits the minimum MTU ---------------
_STATUS = struct.Struct(">BBII6sBBH")
FLAG_UNLOCKED = 0x01
FLAG_HOST = 0x02
FLAG_PAIRING = 0x04
FLAG_BUSY = 0x08
FLAG_WAITING = 0x10  # a SAVE is waiting for the host to stop writing


@dataclass
class Status:
    unlocked: bool = False
    host_connected: bool = False
    pairing: bool = False
    busy: bool = False
    waiting: bool = False
    epoch: int = 0
    dirty_units: int = 0
    dirty_bytes: int = 0
    last_cmd: int = 0  # a Cmd value, 0 = none
    last_result: Result = Result.NONE
    last_fob: int = 0  # fob id of the last frame, 0 when it came from elsewhere

    def encode(self) -> bytes:
        flags = (
            FLAG_UNLOCKED * self.unlocked
            | FLAG_HOST * self.host_connected
            | FLAG_PAIRING * self.pairing
            | FLAG_BUSY * self.busy
            | FLAG_WAITING * self.waiting
        )
        return _STATUS.pack(
            VERSION,
            flags,
            _u32(self.epoch),
            _u32(self.dirty_units),
            min(self.dirty_bytes, 2**48 - 1).to_bytes(6, "big"),
            self.last_cmd,
            self.last_result,
            self.last_fob,
        )

    @classmethod
    def decode(cls, data: bytes) -> Status:
        if len(data) not in (_STATUS.size, _STATUS.size + STATUS_TAG_LEN):  # tag: verify_status
            raise FrameError(Result.BAD_FRAME, f"status is {len(data)} bytes, expected 20 or 32")
        _v, flags, epoch, units, nbytes, cmd, result, fob = _STATUS.unpack_from(data)
        return cls(
            unlocked=bool(flags & FLAG_UNLOCKED),
            host_connected=bool(flags & FLAG_HOST),
            pairing=bool(flags & FLAG_PAIRING),
            busy=bool(flags & FLAG_BUSY),
            waiting=bool(flags & FLAG_WAITING),
            epoch=epoch,
            dirty_units=units,
            dirty_bytes=int.from_bytes(nbytes, "big"),
            last_cmd=cmd,
            last_result=Result(result) if result in Result._value2member_map_ else Result.NONE,
            last_fob=fob,
        )


def _u32(value: int) -> int:
    return max(0, min(int(value), 2**32 - 1))


# --- Pairing messages (Pair characteristic), protocol 2: SPAKE2 ---------------------------------
PAIR_MSG0 = 0x10  # bytes 0..16 of the fob's SPAKE2 message
PAIR_MSG1 = 0x11  # bytes 17..32; the appliance answers on the next read
PAIR_CONFIRM = 0x12  # the fob proves it derived the same key (it goes first)
MSG_SPLIT = 17
CONFIRM_LEN = 16
# version, result, fob id, appliance id, appliance's SPAKE2 message, its confirmation (zero
# until the fob's confirmation verified: nothing derived from the key leaves before that)
_PAIR_REPLY = struct.Struct(">BBH16s33s16s")


def pair_msg_writes(message: bytes) -> list[bytes]:
    """The two writes carrying the fob's 33-byte SPAKE2 message (19 and 18 bytes)."""
    if len(message) != MSG_LEN:
        raise ValueError(f"a SPAKE2 message is {MSG_LEN} bytes")
    return [bytes([VERSION, PAIR_MSG0]) + message[:MSG_SPLIT],
            bytes([VERSION, PAIR_MSG1]) + message[MSG_SPLIT:]]  # fmt: skip


def pair_confirm_write(fob_id: int, confirm: bytes) -> bytes:
    return struct.pack(">BBH", VERSION, PAIR_CONFIRM, fob_id) + confirm


@dataclass(frozen=True)
class PairReply:
    result: Result
    fob_id: int = 0
    appliance_id: bytes = bytes(APPLIANCE_ID_LEN)
    appliance_msg: bytes = bytes(MSG_LEN)
    confirm: bytes = bytes(CONFIRM_LEN)

    def encode(self) -> bytes:
        return _PAIR_REPLY.pack(VERSION, self.result, self.fob_id, self.appliance_id,
                                self.appliance_msg, self.confirm)  # fmt: skip

    @classmethod
    def decode(cls, data: bytes) -> PairReply:
        if len(data) != _PAIR_REPLY.size or data[0] != VERSION:
            raise FrameError(Result.OLD_PROTOCOL if data[:1] == bytes([V1]) else Result.BAD_FRAME,
                             f"pair reply is {len(data)} bytes, version {data[:1].hex()}; "
                             f"expected {_PAIR_REPLY.size} bytes, version {VERSION}")  # fmt: skip
        _v, result, fob_id, app_id, msg, confirm = _PAIR_REPLY.unpack(data)
        known = result in Result._value2member_map_
        return cls(Result(result) if known else Result.NONE, fob_id, app_id, msg, confirm)


# --- Status with a MAC: what a fob reads after its own frame ----------------------------------
def status_tag(key: bytes, appliance_id: bytes, nonce: bytes, status: bytes) -> bytes:
    """Binds the 20-byte Status to the fob's key and the challenge of its last frame."""
    digest = hmac.new(key, STATUS_LABEL + appliance_id + nonce + status, hashlib.sha256).digest()
    return digest[:STATUS_TAG_LEN]


def verify_status(value: bytes, key: bytes, appliance_id: bytes, nonce: bytes) -> Status:
    """The Status in a 32-byte read, after checking its MAC; FrameError when it fails."""
    if len(value) != _STATUS.size + STATUS_TAG_LEN:
        raise FrameError(Result.BAD_MAC, f"status without a MAC ({len(value)} bytes): "
                                         "not the appliance this fob paired with?")  # fmt: skip
    body, tag = value[: _STATUS.size], value[_STATUS.size :]
    if not hmac.compare_digest(status_tag(key, appliance_id, nonce, body), tag):
        raise FrameError(Result.BAD_MAC, "status MAC is wrong: not the appliance this fob "
                                         "paired with")  # fmt: skip
    return Status.decode(body)


# --- Outcome characteristic (1.1): what became of the frame with a given counter ---------------
# A fob whose link dropped after it wrote a frame cannot tell whether the frame arrived. It must
# never send the command again blindly: it writes (fob id, counter) here and reads the answer.
_OUTCOME_QUERY = struct.Struct(">BHI")  # version, fob id, counter
_OUTCOME_REPLY = struct.Struct(">BBHIBB")  # version, state, fob id, counter, command, result


class FrameState(IntEnum):
    NOT_RUN = 0x00  # the appliance never accepted this counter: the command did not run
    RUNNING = 0x01  # accepted; the command has not finished yet
    DONE = 0x02  # accepted and finished: command and result are valid
    UNKNOWN = 0x03  # accepted, but its outcome is forgotten (restart, or many frames since)
    NO_QUERY = 0xFF  # read without a query written first on this link


@dataclass(frozen=True)
class FrameOutcome:
    state: FrameState
    fob_id: int = 0
    counter: int = 0
    cmd: int = 0
    result: Result = Result.NONE

    def encode(self) -> bytes:
        return _OUTCOME_REPLY.pack(VERSION, self.state, self.fob_id, self.counter, self.cmd,
                                   self.result)  # fmt: skip

    @classmethod
    def decode(cls, data: bytes) -> FrameOutcome:
        if len(data) != _OUTCOME_REPLY.size:
            raise FrameError(Result.BAD_FRAME, f"outcome is {len(data)} bytes")
        _v, state, fob_id, counter, cmd, result = _OUTCOME_REPLY.unpack(data)
        known = result in Result._value2member_map_
        state_ok = state in FrameState._value2member_map_
        return cls(FrameState(state) if state_ok else FrameState.UNKNOWN, fob_id, counter, cmd,
                   Result(result) if known else Result.NONE)  # fmt: skip


def outcome_query(fob_id: int, counter: int) -> bytes:
    return _OUTCOME_QUERY.pack(VERSION, fob_id, counter)


def parse_outcome_query(data: bytes) -> tuple[int, int]:
    if len(data) != _OUTCOME_QUERY.size or data[0] != VERSION:
        raise FrameError(
            Result.BAD_FRAME,
            f"outcome query is {len(data)} bytes, expected "
            f"{_OUTCOME_QUERY.size} with version {VERSION}",
        )
    _v, fob_id, counter = _OUTCOME_QUERY.unpack(data)
    return fob_id, counter
