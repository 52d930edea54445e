"""`savepoint-fob`: a laptop, phone-less PC or second Pi as the appliance's BLE fob (bleak).

  savepoint-fob pair [--setup-code CODE]      (press PAIR on the appliance first)
  savepoint-fob save | restore | unlock | lock | status
  savepoint-fob --button 17                   (a Pi with a button: press = SAVE, hold = RESTORE)

The fob's key lives in the user's config folder (mode 0600). The counter is saved before each
frame is sent, so a crash can skip counter values but never reuse one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Protocol, TypeVar

from ble import frames
from ble.frames import NEEDS_NONCE, Cmd, Result, Status
from ble.keys import FobCredentials, FobPairing, atomic_write

T = TypeVar("T")
CONNECT_TRIES = 3  # BLE links drop during connection set-up; nothing was sent yet, so retry


class GattLink(Protocol):
    """What the fob needs from a connected BLE link (bleak here, bumble in the tests)."""

    async def read(self, uuid: str) -> bytes: ...
    async def write(self, uuid: str, data: bytes) -> None: ...


class FobError(Exception):
    pass


# --- key storage ------------------------------------------------------------------------------
def config_dir() -> Path:
    if sys.platform == "win32":
        return Path(os.environ.get("APPDATA", Path.home())) / "savepoint"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "savepoint"
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "savepoint"


class KeyStore:
    """The fob's credentials file: one entry per appliance it is paired with."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or config_dir() / "fob.json"

    def load(self) -> list[FobCredentials]:
        if not self.path.exists():
            return []
        try:
            return [FobCredentials(**e) for e in json.loads(self.path.read_text())["appliances"]]
        except (ValueError, KeyError, TypeError) as e:
            raise FobError(f"{self.path} is unreadable ({e}); pair again") from e

    def save(self, creds: FobCredentials) -> None:
        others = [c for c in self.load() if c.appliance_id != creds.appliance_id]
        doc = {"appliances": [asdict(c) for c in [creds, *others]]}
        atomic_write(self.path, json.dumps(doc, indent=1).encode(), mode=0o600)

    def pick(self, address: str = "") -> FobCredentials:
        entries = self.load()
        for creds in entries:
            if not address or creds.address.upper() == address.upper():
                return creds
        raise FobError("this fob is not paired: press PAIR on the appliance, then "
                       "run `savepoint-fob pair`")  # fmt: skip


# --- the protocol over any GattLink -----------------------------------------------------------
async def pair(link: GattLink, setup_code: str = "") -> FobCredentials:
    fob = FobPairing(setup_code)
    for write in fob.pub_writes():
        await link.write(frames.PAIR_UUID, write)
    try:
        creds, confirm = fob.finish(await link.read(frames.PAIR_UUID))
    except ValueError as e:
        raise FobError(str(e)) from e
    await link.write(frames.PAIR_UUID, confirm)
    return creds


async def send(link: GattLink, creds: FobCredentials, cmd: Cmd, store: KeyStore | None) -> Status:
    """Send one command; return the Status the appliance reports afterwards."""
    nonce = await link.read(frames.CHALLENGE_UUID) if cmd in NEEDS_NONCE else b""
    creds.counter += 1
    if store is not None:
        store.save(creds)  # before sending: a used counter must never be sent again
    frame = frames.build_frame(bytes.fromhex(creds.key), bytes.fromhex(creds.appliance_id),
                               cmd, creds.fob_id, creds.counter, nonce)  # fmt: skip
    try:
        await link.write(frames.COMMAND_UUID, frame)
    except Exception:  # refusals arrive as ATT errors; the Status value says which
        pass
    return Status.decode(await link.read(frames.STATUS_UUID))


def describe(status: Status) -> str:
    mode = "unlocked" if status.unlocked else "locked"
    last = Cmd(status.last_cmd).name if status.last_cmd in Cmd._value2member_map_ else "-"
    return (f"{last}: {status.last_result.name} | mode {mode}, epoch {status.epoch}, "
            f"unsaved {status.dirty_units} units ({status.dirty_bytes} bytes), "
            f"host {'connected' if status.host_connected else 'absent'}"
            f"{', PAIRING open' if status.pairing else ''}"
            f"{', saving, waiting for the host' if status.waiting else ''}")  # fmt: skip


# --- bleak ------------------------------------------------------------------------------------
class BleakLink:
    def __init__(self, client: object) -> None:
        self.client = client

    async def read(self, uuid: str) -> bytes:
        return bytes(await self.client.read_gatt_char(uuid))  # type: ignore[attr-defined]

    async def write(self, uuid: str, data: bytes) -> None:
        await self.client.write_gatt_char(uuid, data, response=True)  # type: ignore[attr-defined]


async def _find(address: str, adapter: str, timeout: float) -> object:
    from bleak import BleakScanner

    kwargs = {"bluez": {"adapter": adapter}} if adapter else {}
    if address:
        device = await BleakScanner.find_device_by_address(address, timeout, **kwargs)
    else:
        device = await BleakScanner.find_device_by_filter(
            lambda _d, adv: frames.SERVICE_UUID in adv.service_uuids, timeout, **kwargs
        )
    if device is None:
        raise FobError("no Savepoint appliance in range (is it powered and advertising?)")
    return device


async def with_retries(attempt: Callable[[], Awaitable[T]], retry_on: tuple[type, ...],
                       tries: int = CONNECT_TRIES, delay: float = 1.0) -> T:
    """attempt() until it succeeds, at most `tries` times; says why it tries again."""
    for n in range(1, tries + 1):
        try:
            return await attempt()
        except retry_on as e:
            if n == tries:
                raise
            print(f"savepoint-fob: link lost while connecting ({e}); trying again",
                  file=sys.stderr, flush=True)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


async def _connect(args: argparse.Namespace, address: str) -> object:
    """Find, connect and (for pair) bond: everything before the first frame is sent."""
    from bleak import BleakClient

    device = await _find(address, args.adapter, args.timeout)
    kwargs = {"bluez": {"adapter": args.adapter}} if args.adapter else {}
    client = BleakClient(device, timeout=args.timeout, **kwargs)
    await client.connect()
    if args.action == "pair":
        try:
            await client.pair()
        except NotImplementedError:  # macOS pairs on first encrypted access
            pass
        except BaseException:
            await client.disconnect()
            raise
    return client


async def run_action(args: argparse.Namespace, store: KeyStore) -> str:
    from bleak.exc import BleakError

    action = args.action
    creds = None if action == "pair" else store.pick(args.address)
    address = args.address or (creds.address if creds else "")
    client = await with_retries(lambda: _connect(args, address), (BleakError, TimeoutError))
    try:
        return await _act(args, store, client, creds)
    finally:
        await client.disconnect()


async def _act(args: argparse.Namespace, store: KeyStore, client: object,
               creds: FobCredentials | None) -> str:
    link = BleakLink(client)
    if args.action == "pair":
        creds = await pair(link, args.setup_code)
        creds.address = client.address
        store.save(creds)
        return f"paired as fob {creds.fob_id}; key saved in {store.path}"
    assert creds is not None
    status = await send(link, creds, Cmd[args.action.upper()], store)
    if status.last_result not in (Result.OK,):
        raise FobError(describe(status))
    return describe(status)


def button_loop(args: argparse.Namespace, store: KeyStore) -> None:
    """A second Pi as a fob: short press sends SAVE, a 3-second hold sends RESTORE."""
    from gpiozero import Button

    button = Button(args.button, hold_time=3.0)
    held = False

    def fire(action: str) -> None:
        ns = argparse.Namespace(**{**vars(args), "action": action})
        try:
            print(asyncio.run(run_action(ns, store)), flush=True)
        except Exception as e:  # keep the fob running whatever one press did
            print(f"{action} failed: {e}", file=sys.stderr, flush=True)

    def on_held() -> None:
        nonlocal held
        held = True
        fire("restore")

    def on_released() -> None:
        nonlocal held
        if not held:
            fire("save")
        held = False

    button.when_held = on_held
    button.when_released = on_released
    print(f"fob ready on GPIO{args.button}: press = SAVE, hold 3 s = RESTORE", flush=True)
    from signal import pause

    pause()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="savepoint-fob", description=__doc__.split("\n")[0])
    p.add_argument("action", nargs="?", default="status",
                   choices=["pair", "save", "restore", "unlock", "lock", "status"])  # fmt: skip
    p.add_argument("--address", default="", help="appliance BLE address (default: scan)")
    p.add_argument("--adapter", default="", help="local adapter on Linux, e.g. hci1")
    p.add_argument("--setup-code", default="", help="the code on the appliance's label")
    p.add_argument("--timeout", type=float, default=15.0, help="seconds to find/connect")
    p.add_argument("--keys", type=Path, default=None, help="credentials file")
    p.add_argument("--button", type=int, default=None, metavar="GPIO",
                   help="run as a button fob on this GPIO pin")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    store = KeyStore(args.keys)
    try:
        if args.button is not None:
            button_loop(args, store)
            return 0
        print(asyncio.run(run_action(args, store)))
        return 0
    except FobError as e:
        print(f"savepoint-fob: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # bleak/BlueZ errors: say what failed, not a traceback
        print(f"savepoint-fob: {args.action} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
