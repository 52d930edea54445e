"""`savepoint-fob`: a laptop, phone-less PC or second Pi as the appliance's BLE fob (bleak).

  savepoint-fob pair [--setup-code CODE]      (press PAIR on the appliance first)
  savepoint-fob save | restore [--yes] | unlock | lock | status
  savepoint-fob --button 17                   (a Pi with a button: press = SAVE, hold = RESTORE)

The fob's key lives in the user's config folder (mode 0600). The counter is saved before each
frame is sent, so a crash can skip counter values but never reuse one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance import __version__
from appliance.cli_support import RESTORE_NEEDS_YES, restore_needs_yes
from ble import frames
from ble.fob_session import (
    CommandRun,
    FobError,
    GattLink,
    LinkLost,
    NotSupported,
    PairRun,
    Refused,
    Report,
    Retry,
    pair_once,
)
from ble.frames import Cmd, Result, Status
from ble.keys import FobCredentials, atomic_write

if TYPE_CHECKING:  # bleak is imported where it is used: the CLI starts faster without it
    from bleak.args.bluez import BlueZClientArgs, BlueZScannerArgs
    from bleak.backends.device import BLEDevice

__all__ = ["FobError", "GattLink", "KeyStore", "Report", "Retry", "main", "pair", "send"]


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

    def restore(self, content: bytes | None) -> None:
        """Put back the file as it was before a pairing that did not finish."""
        if content is None:
            self.path.unlink(missing_ok=True)
        else:
            atomic_write(self.path, content, mode=0o600)

    def pick(self, address: str = "") -> FobCredentials:
        entries = self.load()
        for creds in entries:
            if not address or creds.address.upper() == address.upper():
                return creds
        raise FobError("this fob is not paired: press PAIR on the appliance, then "
                       "run `savepoint-fob pair`")  # fmt: skip


# --- the protocol over one GattLink (no reconnecting; see ble/fob_session.py) ----------------
async def pair(link: GattLink, setup_code: str = "") -> FobCredentials:
    return await pair_once(link, setup_code)


async def send(link: GattLink, creds: FobCredentials, cmd: Cmd, store: KeyStore | None) -> Status:
    """Send one command on this link; return the Status the appliance reports afterwards."""
    report = await command(link, creds, cmd, store)
    if report.status is None:
        raise FobError(report.describe())
    return report.status


class _Borrowed:
    """The caller's link: used for one command, never closed."""

    def __init__(self, link: GattLink) -> None:
        self.link = link

    async def read(self, uuid: str) -> bytes:
        return await self.link.read(uuid)

    async def write(self, uuid: str, data: bytes) -> None:
        await self.link.write(uuid, data)

    def encrypted(self) -> bool | None:
        check = getattr(self.link, "encrypted", None)
        return None if check is None else check()


async def command(
    link: GattLink, creds: FobCredentials, cmd: Cmd, store: KeyStore | None
) -> Report:
    async def same(_timeout: float) -> GattLink:
        return _Borrowed(link)

    save = store.save if store is not None else (lambda _c: None)
    return await CommandRun(same, creds, cmd, save, Retry(links=1)).run()


def describe(status: Status) -> str:
    last = Cmd(status.last_cmd) if status.last_cmd in Cmd._value2member_map_ else None
    if last is None:
        return Report(Cmd.STATUS, status.last_result, status).describe().replace("STATUS", "-", 1)
    return Report(last, status.last_result, status).describe()


# --- bleak ------------------------------------------------------------------------------------
class BleakLink:
    """GattLink over a connected BleakClient: link losses become LinkLost, ATT errors Refused."""

    def __init__(self, client: Any, adapter: str = "") -> None:
        self.client = client
        self.address = str(client.address)
        self.adapter = adapter

    def encrypted(self) -> bool | None:
        """Asked of the kernel (Linux); None where bleak's platform cannot tell."""
        from ble.link_security import encrypted

        return encrypted(self.address, self.adapter)

    async def read(self, uuid: str) -> bytes:
        return bytes(await self._guard(self.client.read_gatt_char(uuid)))

    async def write(self, uuid: str, data: bytes) -> None:
        await self._guard(self.client.write_gatt_char(uuid, data, response=True))

    async def subscribe(self, uuid: str, callback: Callable[[bytes], None]) -> None:
        await self._guard(self.client.start_notify(uuid, lambda _c, v: callback(bytes(v))))

    async def close(self) -> None:
        await self.client.disconnect()

    async def _guard(self, call: Any) -> Any:
        from bleak.exc import BleakCharacteristicNotFoundError, BleakError, BleakGATTProtocolError

        try:
            return await call
        except BleakGATTProtocolError as e:
            raise Refused(str(e)) from e
        except BleakCharacteristicNotFoundError as e:
            raise NotSupported(str(e)) from e
        except (BleakError, EOFError, ConnectionError, TimeoutError) as e:
            if lost(e, self.client):
                raise LinkLost(str(e) or type(e).__name__) from e
            raise


def lost(e: BaseException, client: Any) -> bool:
    """Whether a bleak failure is the link going away (BlueZ says "Not connected")."""
    text = str(e).lower()
    return (not getattr(client, "is_connected", False) or isinstance(e, (EOFError,
            ConnectionError, TimeoutError)) or "not connected" in text
            or "disconnected" in text)  # fmt: skip


async def _find(address: str, adapter: str, timeout: float) -> BLEDevice:
    from bleak import BleakScanner

    bluez: BlueZScannerArgs = {"adapter": adapter} if adapter else {}
    if address:
        device = await BleakScanner.find_device_by_address(address, timeout, bluez=bluez)
    else:
        device = await BleakScanner.find_device_by_filter(
            lambda _d, adv: frames.SERVICE_UUID in adv.service_uuids, timeout, bluez=bluez
        )
    if device is None:
        raise FobError("no Savepoint appliance in range (is it powered and advertising?)")
    return device


def bleak_connect(adapter: str, address: str, bond: bool = False) -> Callable[[float], Any]:
    """A Connect for fob_session: find, connect, discover services (and bond, for pair).
    For pair, the first link first drops any old local bond with the appliance: the appliance
    removes bonds of pairings that did not finish, and a stale key would fail encryption."""
    stale = [bond]

    async def connect(timeout: float) -> BleakLink:
        from bleak import BleakClient
        from bleak.exc import BleakError

        device = await _find(address, adapter, timeout)
        bluez: BlueZClientArgs = {"adapter": adapter} if adapter else {}
        if stale[0]:
            stale[0] = False
            with contextlib.suppress(Exception):  # not bonded, or not BlueZ: nothing to drop
                await BleakClient(device, bluez=bluez).unpair()
                device = await _find(device.address, adapter, timeout)
        client = BleakClient(device, timeout=timeout, bluez=bluez)
        try:
            await client.connect()
            if bond:
                try:
                    await client.pair()
                except NotImplementedError:  # macOS pairs on the first encrypted access
                    pass
        except (BleakError, EOFError, ConnectionError, TimeoutError) as e:
            await _disconnect(client)
            raise LinkLost(str(e) or type(e).__name__) from e
        except BaseException:
            await _disconnect(client)
            raise
        return BleakLink(client, adapter)

    return connect


async def _disconnect(client: Any) -> None:
    try:
        await client.disconnect()
    except Exception:  # it never fully connected
        pass


def retry_of(args: argparse.Namespace) -> Retry:
    return Retry(total=args.retry_for, connect_timeout=args.timeout)


async def run_action(args: argparse.Namespace, store: KeyStore) -> str:
    action, retry = args.action, retry_of(args)
    if action == "pair":
        connect = bleak_connect(args.adapter, args.address, bond=True)
        run = PairRun(connect, args.setup_code, store.save, retry)
        before = store.path.read_bytes() if store.path.exists() else None
        try:
            creds = await run.run()
        except BaseException:  # a refused pairing must not replace a good key
            store.restore(before)
            raise
        return f"paired as fob {creds.fob_id}; key saved in {store.path}"
    creds = store.pick(args.address)
    connect = bleak_connect(args.adapter, args.address or creds.address)
    report = await CommandRun(connect, creds, Cmd[action.upper()], store.save, retry).run()
    if report.result != Result.OK:
        raise FobError(report.describe())
    return report.describe()


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
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("action", nargs="?", default="status",
                   choices=["pair", "save", "restore", "unlock", "lock", "status"])  # fmt: skip
    p.add_argument("--address", default="", help="appliance BLE address (default: scan)")
    p.add_argument("--adapter", default="", help="local adapter on Linux, e.g. hci1")
    p.add_argument("--setup-code", default="", help="the code on the appliance's label")
    p.add_argument("--timeout", type=float, default=15.0, help="seconds to find/connect")
    p.add_argument("--retry-for", type=float, default=90.0, metavar="SECONDS",
                   help="total time for reconnecting after a dropped link")  # fmt: skip
    p.add_argument("--keys", type=Path, default=None, help="credentials file")
    p.add_argument("--button", type=int, default=None, metavar="GPIO",
                   help="run as a button fob on this GPIO pin")  # fmt: skip
    p.add_argument(
        "--yes",
        "-y",
        action="store_true",
        help="restore: do not ask first (needed without a terminal)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    store = KeyStore(args.keys)
    try:
        if args.button is not None:
            button_loop(args, store)
            return 0
        if restore_needs_yes(args.action, args.yes):
            print(f"savepoint-fob: {RESTORE_NEEDS_YES}", file=sys.stderr)
            return 2
        if (
            args.action == "restore"
            and not args.yes
            and input("Discard everything written since the last SAVE? [y/N] ").strip().lower()
            not in ("y", "yes")
        ):
            print("savepoint-fob: RESTORE cancelled; nothing changed", file=sys.stderr)
            return 1
        print(asyncio.run(run_action(args, store)))
        return 0
    except FobError as e:
        print(f"savepoint-fob: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # bleak/BlueZ errors: say what failed, not a traceback
        why = _no_bluez(e) or f"{type(e).__name__}: {e}"
        print(f"savepoint-fob: {args.action} failed: {why}", file=sys.stderr)
        return 2


def _no_bluez(e: Exception) -> str:
    """On Linux bleak needs BlueZ on the system D-Bus; say which piece is missing."""
    text = str(e)
    if isinstance(e, FileNotFoundError) or "system_bus_socket" in text:
        return (
            "no system D-Bus to reach BlueZ through: install and start BlueZ "
            "(Debian: apt-get install bluez dbus; systemctl start dbus bluetooth)"
        )
    if "org.bluez" in text or "ServiceUnknown" in text:
        return "BlueZ (bluetoothd) is not running: systemctl start bluetooth (package bluez)"
    if "adapter" in text.lower() and "not found" in text.lower() or "No Bluetooth" in text:
        return f"{text}: plug in or enable a Bluetooth adapter (rfkill unblock bluetooth)"
    return ""


if __name__ == "__main__":
    sys.exit(main())
