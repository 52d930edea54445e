"""Per-fob keys: the SPAKE2 pairing exchange (protocol 2) and the appliance's fob registry.

The registry file is the allow-list. It holds the appliance id, each fob's key, name and last
accepted counter. It is rewritten atomically (temp file, fsync, rename, fsync of the folder)
so a power cut leaves either the old or the new list, and mode 0600 because it holds keys.
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from spake2 import SPAKE2_A, SPAKE2_B
from spake2.spake2 import SPAKEError

from ble.frames import (
    APPLIANCE_ID_LEN,
    CONFIRM_LEN,
    VERSION,
    PairReply,
    Result,
    pair_confirm_write,
    pair_msg_writes,
)

KEY_INFO = b"savepoint-fob-key-v2"
CONFIRM_APPLIANCE = b"savepoint-confirm-appliance"
CONFIRM_FOB = b"savepoint-confirm-fob"
ID_FOB = b"savepoint-fob"  # SPAKE2 identities: the fob is side A, the appliance side B
ID_APPLIANCE = b"savepoint-appliance"
MAX_FOB_ID = 0xFFFF
MAX_EVENTS = 64  # refused pairings and closed windows kept for `savepoint history`
_ADDRESS = re.compile(r"^[0-9A-F]{2}(:[0-9A-F]{2}){5}$")
Entropy = Callable[[int], bytes]


class RegistryError(Exception):
    """A registry operation named a fob that is not there, or the file is unreadable."""


# --- SPAKE2 (python-spake2: Ed25519 group, its M and N, SHA-256 transcript hash) --------------
def spake_ids() -> tuple[bytes, bytes]:
    return ID_FOB, ID_APPLIANCE


def derive_fob_key(shared: bytes, appliance_id: bytes, fob_id: int) -> bytes:
    """The 32-byte fob key from the SPAKE2 key (which already binds code and transcript)."""
    info = KEY_INFO + appliance_id + fob_id.to_bytes(2, "big")
    return HKDF(algorithm=SHA256(), length=32, salt=None, info=info).derive(shared)


def confirm_tag(key: bytes, label: bytes) -> bytes:
    return hmac.new(key, label, hashlib.sha256).digest()[:CONFIRM_LEN]


class ApplianceExchange:
    """The appliance's half of one SPAKE2 run (side B). The setup code is the password."""

    def __init__(self, setup_code: str, entropy: Entropy = os.urandom) -> None:
        self._spake = SPAKE2_B(setup_code.encode(), idA=ID_FOB, idB=ID_APPLIANCE,
                               entropy_f=entropy)  # fmt: skip
        self.message = self._spake.start()

    def key(self, fob_msg: bytes, appliance_id: bytes, fob_id: int) -> bytes:
        """The fob key; ValueError for a message that is not a valid SPAKE2 side-A element."""
        try:
            shared = self._spake.finish(fob_msg)
        except (SPAKEError, ValueError, AssertionError) as e:
            raise ValueError(f"bad SPAKE2 message from the fob: {e}") from e
        return derive_fob_key(shared, appliance_id, fob_id)


# --- files ----------------------------------------------------------------------------------
def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` so that a crash leaves the old or the new content."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # mode: the last folder only
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# --- registry -------------------------------------------------------------------------------
@dataclass
class FobRecord:
    fob_id: int
    name: str
    key: str  # hex; empty once revoked
    counter: int = 0
    revoked: bool = False
    paired_at: float = 0.0
    last_used: float = 0.0
    device: str = ""  # the peer it paired from: BlueZ device path (bumble: its address)
    address: str = ""  # that peer's BLE address, when known (records before 0.2 have none)
    protocol: int = 1  # records written before protocol 2 have none: those fobs must re-pair
    revoked_at: float = 0.0  # 0: not revoked, or revoked before this was kept

    def public(self) -> dict[str, Any]:
        """What `savepoint fobs list` shows: everything but the key."""
        info = asdict(self)
        del info["key"]
        return info


class FobRegistry:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.fobs: dict[int, FobRecord] = {}
        self.next_id = 1
        self.appliance_id = b""
        self.events: builtins.list[dict[str, Any]] = []  # what no fob record says (refusals)
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            self.appliance_id = secrets.token_bytes(APPLIANCE_ID_LEN)
            self._save()
            return
        try:
            doc = json.loads(self.path.read_text())
            self.appliance_id = bytes.fromhex(doc["appliance_id"])
            self.next_id = int(doc["next_id"])
            self.fobs = {int(k): FobRecord(**v) for k, v in doc["fobs"].items()}
            self.events = [_event(e) for e in doc.get("events", [])][-MAX_EVENTS:]
        except (ValueError, KeyError, TypeError) as e:
            raise RegistryError(
                f"fob registry {self.path} is unreadable ({e}); "
                "restore it from backup or move it away and pair the fobs again"
            ) from e

    def _save(self) -> None:
        doc = {
            "appliance_id": self.appliance_id.hex(),
            "next_id": self.next_id,
            "fobs": {str(i): asdict(r) for i, r in sorted(self.fobs.items())},
            "events": self.events,
        }
        atomic_write(self.path, json.dumps(doc, indent=1).encode())

    def peek_id(self) -> int:
        """The id the next pairing gets; taken (and written) only when that pairing finishes."""
        if self.next_id > MAX_FOB_ID:
            raise RegistryError("all 65535 fob ids are used up; reset the registry")
        return self.next_id

    def add(self, fob_id: int, key: bytes, name: str = "", device: str = "") -> FobRecord:
        if fob_id != self.peek_id() or fob_id in self.fobs:
            raise RegistryError(f"fob id {fob_id} is not the next free id {self.next_id}")
        record = FobRecord(
            fob_id, name or f"fob-{fob_id}", key.hex(), paired_at=time.time(),
            device=device, address=address_of(device), protocol=VERSION,
        )  # fmt: skip
        self.fobs[fob_id] = record
        self.next_id = fob_id + 1
        self._save()
        return record

    def get(self, fob_id: int) -> FobRecord | None:
        return self.fobs.get(fob_id)

    def key(self, fob_id: int) -> bytes:
        return bytes.fromhex(self._need(fob_id).key)

    def accept_counter(self, fob_id: int, counter: int) -> None:
        """Persist the counter before the command runs, so a replay after a crash fails too."""
        record = self._need(fob_id)
        if counter <= record.counter:
            raise RegistryError(f"counter {counter} is not above {record.counter}")
        record.counter = counter
        record.last_used = time.time()
        self._save()

    def list(self) -> list[dict[str, Any]]:
        return [r.public() for _, r in sorted(self.fobs.items())]

    def rename(self, fob_id: int, name: str) -> FobRecord:
        if not name or len(name) > 64:
            raise RegistryError("a fob name must be 1-64 characters")
        record = self._need(fob_id)
        record.name = name
        self._save()
        return record

    def revoke(self, fob_id: int) -> FobRecord:
        """Keep the entry (so its frames get REVOKED, not UNKNOWN_FOB) but forget the key."""
        record = self._need(fob_id)
        record.revoked = True
        record.key = ""
        record.revoked_at = time.time()
        self._save()
        return record

    def note(self, action: str, source: str, detail: str) -> None:
        """Keep an event no fob record shows (a refused pairing, a window closed early)."""
        self.events = [*self.events, _event({"time": time.time(), "action": action,
                       "source": source, "detail": detail})][-MAX_EVENTS:]  # fmt: skip
        self._save()

    def history(self) -> builtins.list[dict[str, Any]]:
        """Pairings, revocations and kept events for `savepoint history`, oldest first."""
        rows = list(self.events)
        for r in self.fobs.values():
            where = r.address or r.device or "an unknown device"
            rows.append({"time": r.paired_at, "action": "paired", "source": f"fob:{r.fob_id}",
                         "detail": f'"{r.name}" from {where}'})  # fmt: skip
            if r.revoked_at:
                rows.append({"time": r.revoked_at, "action": "revoked",
                             "source": f"fob:{r.fob_id}", "detail": f'"{r.name}"'})  # fmt: skip
        return sorted(rows, key=lambda e: e["time"])

    def sharing_address(self, record: FobRecord) -> builtins.list[int]:  # list: a method here
        """Other live fobs paired from the same device (one phone paired twice, say)."""
        return [
            r.fob_id
            for r in self.fobs.values()
            if r.address and r.address == record.address and r is not record and not r.revoked
        ]

    def _need(self, fob_id: int) -> FobRecord:
        record = self.fobs.get(fob_id)
        if record is None:
            known = ", ".join(str(i) for i in self.fobs) or "none"
            raise RegistryError(f"no fob with id {fob_id} (known: {known})")
        return record


def _event(e: dict[str, Any]) -> dict[str, Any]:
    """One kept event, checked (time, action, source, detail); TypeError/ValueError if bad."""
    return {"time": float(e["time"]), "action": str(e["action"]), "source": str(e["source"]),
            "detail": str(e["detail"])}  # fmt: skip


def registry_history(path: str | os.PathLike[str]) -> builtins.list[dict[str, Any]]:
    """The registry's history without creating it (no registry yet: nothing happened)."""
    if not Path(path).exists():
        return []
    return FobRegistry(path).history()


def address_of(peer: str) -> str:
    """ "AA:BB:CC:DD:EE:FF" from a BlueZ device path (.../dev_AA_BB_CC_DD_EE_FF) or an address
    (bumble's may carry a "/P" type suffix); "" when `peer` is neither."""
    text = peer.rsplit("/dev_", 1)[-1].replace("_", ":").split("/", 1)[0].upper()
    return text if _ADDRESS.match(text) else ""


# --- the fob's side of the exchange -----------------------------------------------------------
@dataclass
class FobCredentials:
    """What a fob keeps after pairing (the fob client stores it in its config dir, 0600)."""

    appliance_id: str  # hex
    fob_id: int
    key: str  # hex
    counter: int = 0
    address: str = ""  # the appliance's BLE address, to reconnect without scanning


class FobPairing:
    """The fob half: send pub_writes(), read the reply, send finish()'s write, then read the
    reply again and check_appliance() it (the appliance confirms only after the fob did)."""

    def __init__(self, setup_code: str = "", entropy: Entropy = os.urandom) -> None:
        self.setup_code = setup_code
        self._spake = SPAKE2_A(setup_code.encode(), idA=ID_FOB, idB=ID_APPLIANCE,
                               entropy_f=entropy)  # fmt: skip
        self.message = self._spake.start()
        self._key = b""

    def pub_writes(self) -> list[bytes]:
        return pair_msg_writes(self.message)

    def finish(self, reply_bytes: bytes) -> tuple[FobCredentials, bytes]:
        """Derive the key from the appliance's reply; return the credentials and the confirm
        write. Nothing here can tell a wrong setup code yet: check_appliance() does."""
        reply = PairReply.decode(reply_bytes)
        if reply.result != Result.OK:
            raise ValueError(f"appliance refused pairing: {reply.result.name}")
        try:
            shared = self._spake.finish(reply.appliance_msg)
        except (SPAKEError, ValueError, AssertionError) as e:
            raise ValueError(f"bad SPAKE2 message from the appliance: {e}") from e
        self._key = derive_fob_key(shared, reply.appliance_id, reply.fob_id)
        creds = FobCredentials(reply.appliance_id.hex(), reply.fob_id, self._key.hex())
        return creds, pair_confirm_write(reply.fob_id, confirm_tag(self._key, CONFIRM_FOB))

    def check_appliance(self, reply_bytes: bytes) -> None:
        """The appliance's confirmation, read after ours: proves it knew the same code."""
        reply = PairReply.decode(reply_bytes)
        if (
            reply.result != Result.OK
            or not self._key
            or not hmac.compare_digest(confirm_tag(self._key, CONFIRM_APPLIANCE), reply.confirm)
        ):
            raise ValueError(f"the appliance did not confirm the key ({reply.result.name}): "
                             "wrong setup code, or not your appliance")  # fmt: skip
