"""Per-fob keys: the X25519 pairing exchange and the appliance's fob registry on disk.

The registry file is the allow-list. It holds the appliance id, each fob's key, name and last
accepted counter. It is rewritten atomically (temp file, fsync, rename, fsync of the folder)
so a power cut leaves either the old or the new list, and mode 0600 because it holds keys.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ble.frames import (
    APPLIANCE_ID_LEN,
    CONFIRM_LEN,
    PUB_LEN,
    PairReply,
    Result,
    pair_confirm_write,
    pair_pub_writes,
)

KEY_INFO = b"savepoint-fob-key"
CONFIRM_APPLIANCE = b"savepoint-confirm-appliance"
CONFIRM_FOB = b"savepoint-confirm-fob"
MAX_FOB_ID = 0xFFFF
_ADDRESS = re.compile(r"^[0-9A-F]{2}(:[0-9A-F]{2}){5}$")


class RegistryError(Exception):
    """A registry operation named a fob that is not there, or the file is unreadable."""


# --- X25519 ---------------------------------------------------------------------------------
def new_keypair() -> tuple[X25519PrivateKey, bytes]:
    private = X25519PrivateKey.generate()
    return private, private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def derive_key(
    private: X25519PrivateKey,
    peer_pub: bytes,
    *,
    fob_pub: bytes,
    appliance_pub: bytes,
    appliance_id: bytes,
    fob_id: int,
    setup_code: str = "",
) -> bytes:
    """The 32-byte fob key both sides compute. The setup code (if any) is the HKDF salt."""
    if len(peer_pub) != PUB_LEN:
        raise ValueError(f"public key must be {PUB_LEN} bytes")
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_pub))
    if shared == bytes(32):
        raise ValueError("peer public key is a low-order point")
    info = KEY_INFO + appliance_id + fob_id.to_bytes(2, "big") + fob_pub + appliance_pub
    salt = setup_code.encode() or None
    return HKDF(algorithm=SHA256(), length=32, salt=salt, info=info).derive(shared)


def confirm_tag(key: bytes, label: bytes) -> bytes:
    return hmac.new(key, label, hashlib.sha256).digest()[:CONFIRM_LEN]


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
        }
        atomic_write(self.path, json.dumps(doc, indent=1).encode())

    def reserve_id(self) -> int:
        """A fob id never handed out before: ids of failed pairings and revoked fobs are burnt."""
        if self.next_id > MAX_FOB_ID:
            raise RegistryError("all 65535 fob ids are used up; reset the registry")
        fob_id = self.next_id
        self.next_id += 1
        self._save()
        return fob_id

    def add(self, fob_id: int, key: bytes, name: str = "", device: str = "") -> FobRecord:
        if fob_id >= self.next_id or fob_id in self.fobs:
            raise RegistryError(f"fob id {fob_id} was not reserved or is taken")
        record = FobRecord(
            fob_id, name or f"fob-{fob_id}", key.hex(), paired_at=time.time(),
            device=device, address=address_of(device),
        )  # fmt: skip
        self.fobs[fob_id] = record
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
        self._save()
        return record

    def sharing_address(self, record: FobRecord) -> list[int]:
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


def address_of(peer: str) -> str:
    """"AA:BB:CC:DD:EE:FF" from a BlueZ device path (.../dev_AA_BB_CC_DD_EE_FF) or an address
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
    """The fob half of the exchange: send pub_writes(), read the reply, send finish()'s write."""

    def __init__(self, setup_code: str = "") -> None:
        self.setup_code = setup_code
        self._private, self.public = new_keypair()

    def pub_writes(self) -> list[bytes]:
        return pair_pub_writes(self.public)

    def finish(self, reply_bytes: bytes) -> tuple[FobCredentials, bytes]:
        """Check the appliance's reply; return the credentials and the confirm write."""
        reply = PairReply.decode(reply_bytes)
        if reply.result != Result.OK:
            raise ValueError(f"appliance refused pairing: {reply.result.name}")
        key = derive_key(
            self._private, reply.appliance_pub, fob_pub=self.public,
            appliance_pub=reply.appliance_pub, appliance_id=reply.appliance_id,
            fob_id=reply.fob_id, setup_code=self.setup_code,
        )  # fmt: skip
        if not hmac.compare_digest(confirm_tag(key, CONFIRM_APPLIANCE), reply.confirm):
            raise ValueError("appliance key confirmation failed: wrong setup code?")
        creds = FobCredentials(reply.appliance_id.hex(), reply.fob_id, key.hex())
        return creds, pair_confirm_write(reply.fob_id, confirm_tag(key, CONFIRM_FOB))
