"""Scenario 9: the fob over real BlueZ. Two bumble controllers on /dev/vhci are hci0 (the
appliance's adapter) and hci1 (the fob's); Debian's bluetoothd runs both on a private system
bus. `savepoint-fob` pairs during the window `savepoint pair` opens, unlocks and saves; a
bleak fob subscribed to Status sends RESTORE and gets the notification; the disk the host
sees through the gadget changes accordingly."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ble import dbus_api, fob_client, frames
from ble.fob_session import CommandRun, LinkLost, Report, Retry
from ble.frames import Cmd, Result, Status
from tests.lab import drops as causes
from tests.lab.inside.appliance_vm import (
    MIB,
    RESULTS,
    Appliance,
    open_direct,
    read_direct,
    write_direct,
)
from tests.lab.inside.ble_stack import ADDRESSES, BleStack, run, set_adapter, wait_for

FOB_ADAPTER = "hci1"
FOB_DEVICE = "/org/bluez/hci0/dev_" + ADDRESSES[1].replace(":", "_")  # the fob, seen from hci0


@pytest.fixture
def ble(tmp_path: Path) -> Iterator[BleStack]:
    stack = BleStack(tmp_path)
    try:
        stack.start()
        yield stack
    finally:
        stack.close()


class Drops:
    """Every dropped link savepoint-fob reported, written to ble-drops.txt with its cause
    (tests/lab/drops.py). The fob survives drops by design and the scenario asserts what the
    user notices (exit 0, each command run exactly once); a drop no known BlueZ race explains
    fails it: a new cause is to be found, not retried away."""

    def __init__(self, ble: BleStack) -> None:
        self.log = RESULTS / f"{ble.LOG_PREFIX}-bluetoothd.log"
        self.report = RESULTS / f"{ble.LOG_PREFIX}-drops.txt"
        self.seen: list[str] = []

    def check(self, stderr: str, what: str) -> None:
        drops = [line for line in stderr.splitlines() if "link lost" in line]
        if not drops:
            return
        self.seen += drops
        log = self.log.read_text(errors="replace")
        unexplained = causes.unexplained(self.seen, log)
        line = (
            f"{what}: {len(self.seen)} dropped link(s) so far; causes: "
            f"{causes.causes(log) or 'none'}; unexplained: {unexplained or 'none'}\n"
        )
        with open(self.report, "a") as f:
            f.write(line)
        print(line, end="")
        assert not unexplained, f"a dropped link no known cause explains: {line}"


SETUP_CODE = "482913"


def fob(
    capsys: pytest.CaptureFixture[str],
    keys: Path,
    action: str,
    drops: Drops,
    *extra: str,
    rc_wanted: int = 0,
) -> str:
    """`savepoint-fob ACTION` on the fob's adapter: the CLI's own main(), in this process
    (a python start costs 10-15 s under TCG; the BLE work is the same)."""
    capsys.readouterr()
    rc = fob_client.main(
        [action, "--adapter", FOB_ADAPTER, "--keys", str(keys), "--timeout", "40", *extra]
    )
    out = capsys.readouterr()
    assert rc == rc_wanted, f"savepoint-fob {action} exited {rc}: {out.err}{out.out}"
    if rc:
        return out.err
    drops.check(out.err, f"savepoint-fob {action}")
    return out.out


async def restore_watching_status(keys: Path) -> tuple[Report, list[Status]]:
    """A fob subscribed to Status sends RESTORE (savepoint-fob's own session, with its
    reconnecting); returns its report and the notifications it got."""
    store = fob_client.KeyStore(keys)
    creds = store.pick()
    notes: list[Status] = []
    connect = fob_client.bleak_connect(FOB_ADAPTER, creds.address)
    run = CommandRun(
        connect,
        creds,
        Cmd.RESTORE,
        store.save,
        Retry(connect_timeout=40, notify_wait=10),
        watch=notes.append,
    )
    return await run.run(), notes


async def just_works_bond() -> str:
    """What any phone does: connect to the appliance from hci1 and ask BlueZ to bond (Just
    Works: both sides NoInputNoOutput); returns how it ended."""
    from bleak import BleakClient

    for attempt in range(3):  # the BlueZ races at connection (docs/lab.md) drop some links
        device = await fob_client._find(ADDRESSES[0], FOB_ADAPTER, 40)
        client = BleakClient(device, timeout=40, bluez={"adapter": FOB_ADAPTER})
        try:
            await client.connect()
            break
        except Exception as e:  # "failed to discover services, device disconnected"
            print(f"Just Works bond: connecting failed ({e}); again")
            with contextlib.suppress(Exception):
                await client.disconnect()
            if attempt == 2:
                raise
    try:
        await client.pair()
    except Exception as e:  # BleakError, or the D-Bus error bleak passes on
        return f"refused: {e}"
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()
    return "bonded"


async def bond_on_hci0() -> dict[str, Any]:
    """hci0's view of the fob: BlueZ's Paired/Bonded and whether a key is on disk."""
    bus = await dbus_api.connect()
    try:
        objects = await dbus_api.managed_objects(bus)
    finally:
        bus.disconnect()
    props = objects.get(FOB_DEVICE, {}).get("org.bluez.Device1", {})
    info = Path("/var/lib/bluetooth", ADDRESSES[0], ADDRESSES[1], "info")
    keys = info.read_text() if info.exists() else ""
    return {
        "paired": bool(props.get("Paired")),
        "bonded": bool(props.get("Bonded")),
        "ltk_on_disk": "[LongTermKey]" in keys or "[PeripheralLongTermKey]" in keys,
    }


def agent_refusals(appliance: Appliance) -> int:
    """How often the daemon's agent refused the fob (it logs every decision BlueZ asks it
    for, ble/gatt_service.py)."""
    return appliance.log().count(f"refused pairing from {FOB_DEVICE}: pairing window closed")


async def hci0_pairable() -> bool:
    bus = await dbus_api.connect()
    try:
        objects = await dbus_api.managed_objects(bus)
    finally:
        bus.disconnect()
    return bool(objects["/org/bluez/hci0"]["org.bluez.Adapter1"]["Pairable"])


def check_closed_window_refuses_bonds(appliance: Appliance) -> list[str]:
    """Outside the pairing window no device may bond, whether or not BlueZ asks the agent:
    once as the part leaves hci0 (Pairable off: the kernel refuses a bonding request), and
    once with Pairable forced on (as `bluetoothctl pairable on` would leave it): then BlueZ
    must ask the agent, and the agent refuses. Returns what happened (ble-closed-window.txt)."""
    assert run(hci0_pairable()) is False, "the part leaves hci0 pairable outside the window"
    seen = []
    for pairable in (False, True):
        if pairable:
            run(set_adapter("hci0", "Pairable", True))
        before = agent_refusals(appliance)
        how = asyncio.run(asyncio.wait_for(just_works_bond(), 120))
        bond = run(bond_on_hci0())
        asked = agent_refusals(appliance) > before
        seen.append(f"Pairable={pairable}: {how}; agent asked: {asked}; hci0 {bond}")
        assert how.startswith("refused"), seen[-1]
        assert bond == {"paired": False, "bonded": False, "ltk_on_disk": False}, seen[-1]
        if pairable:
            assert asked, f"BlueZ decided without asking the agent: {seen[-1]}"
    run(set_adapter("hci0", "Pairable", False))
    (RESULTS / "ble-closed-window.txt").write_text("\n".join(seen) + "\n")
    print(*seen, sep="\n")
    return seen


async def encryption_around_challenge() -> tuple[bool | None, bool | None]:
    """What savepoint-fob's check (ble/link_security.py) sees on a fresh link of the paired
    fob: before and after its Challenge read (the read the appliance serves encrypted only)."""
    connect = fob_client.bleak_connect(FOB_ADAPTER, ADDRESSES[0])
    for attempt in range(3):  # the BlueZ races at connection (docs/lab.md) drop some links
        try:
            link = await connect(40)
        except LinkLost:
            if attempt == 2:
                raise
            continue
        try:
            before = link.encrypted()
            await link.read(frames.CHALLENGE_UUID)
            return before, link.encrypted()
        finally:
            with contextlib.suppress(Exception):
                await link.close()
    raise AssertionError("unreachable")


async def bluez_devices() -> set[str]:
    """BlueZ's device objects (what `bluetoothctl devices` lists), on every adapter."""
    bus = await dbus_api.connect()
    try:
        objects = await dbus_api.managed_objects(bus)
    finally:
        bus.disconnect()
    return {path for path, ifaces in objects.items() if "org.bluez.Device1" in ifaces}


def start_with_ble(appliance: Appliance, tmp_path: Path) -> str:
    """The daemon with the fob service on hci0; returns the host's /dev/sdX."""
    appliance.write_config(lock=True, serial=False)
    with appliance.config.open("a") as cfg:
        cfg.write(
            f'[ble]\nenabled = true\nadapter = "hci0"\nsetup_code = "{SETUP_CODE}"\n'
            "pairing_window = 600\n"  # TCG: four pairings take more than 60 s
            f'registry = "{tmp_path / "fobs.json"}"\n'
        )
    dev = appliance.start()
    wait_for(
        lambda: appliance.status()["parts"]["ble"]["state"] == "up", 30, "ble part up in the daemon"
    )
    return dev


def test_no_bond_outside_the_pairing_window(ble: BleStack, appliance: Appliance, tmp_path: Path):
    start_with_ble(appliance, tmp_path)
    assert appliance.status()["pairing"]["open"] is False  # no gesture yet: nobody may bond
    check_closed_window_refuses_bonds(appliance)


def test_fob_pairs_saves_and_restores_over_bluez(
    ble: BleStack, appliance: Appliance, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dev = start_with_ble(appliance, tmp_path)
    keys = tmp_path / "fob.json"
    drops = Drops(ble)

    appliance.cli("pair")  # the window a user opens with the button or `savepoint pair`
    for attempt in range(3):  # SPAKE2: one online guess each; the third closes the window
        err = fob(capsys, keys, "pair", drops, "--setup-code", f"00000{attempt}", rc_wanted=1)
        assert "wrong setup code" in err, err
    pairing = appliance.status()["pairing"]
    assert not pairing["open"] and pairing["closed_by"] == "3 wrong setup codes", pairing
    assert not keys.exists()  # nothing kept from the refused pairings
    appliance.cli("pair")
    assert "paired as fob" in fob(capsys, keys, "pair", drops, "--setup-code", SETUP_CODE)
    pairing = appliance.status()["pairing"]
    assert not pairing["open"] and pairing["closed_by"] == "fob 1 paired", pairing  # one fob
    assert oct(keys.stat().st_mode & 0o777) == "0o600"
    before, after = asyncio.run(asyncio.wait_for(encryption_around_challenge(), 180))
    with (RESULTS / "ble-encryption.txt").open("w") as f:
        f.write(f"fob link encrypted before its challenge read: {before}, after: {after}\n")
    assert after is True, f"the kernel does not report the fob's link encrypted ({after})"
    fobs = appliance.request("fobs", {"op": "list"})["data"]
    assert len(fobs["fobs"]) == 1, fobs

    assert "UNLOCK: OK" in fob(capsys, keys, "unlock", drops)  # the daemon starts LOCKED
    assert appliance.status()["mode"] == "unlocked"

    saved, changed = os.urandom(MIB), os.urandom(MIB)
    fd = open_direct(dev)  # held open: the writes stay unsynced until SAVE syncs them
    try:
        write_direct(fd, 2 * MIB, saved)
        epoch = appliance.status()["epoch"]
        assert "SAVE: OK" in fob(capsys, keys, "save", drops)
        write_direct(fd, 2 * MIB, changed)
    finally:
        os.close(fd)
    assert read_direct(dev, 2 * MIB, MIB) == changed

    capsys.readouterr()
    report, notes = asyncio.run(restore_watching_status(keys))
    assert report.result == Result.OK and report.notified, report
    drops.check(capsys.readouterr().err, "RESTORE watching Status")
    status = report.status
    assert status is not None
    assert any(n.last_cmd == Cmd.RESTORE and n.last_result == Result.OK for n in notes), notes
    assert status.epoch > epoch + 1  # SAVE and RESTORE both bump it
    assert read_direct(dev, 2 * MIB, MIB) == saved

    history = appliance.request("history")["data"]["history"]
    from_fob = [
        (h["action"], h.get("source"))
        for h in history
        if str(h.get("source", "")).startswith("fob:")
    ]
    assert from_fob == [  # each exactly once, whatever the links did
        ("save", f"fob:{fobs['fobs'][0]['fob_id']}"),
        ("restore", f"fob:{fobs['fobs'][0]['fob_id']}"),
    ]

    # revoke forgets the fob: its frames are refused and hci0 drops the bond
    assert FOB_DEVICE in run(bluez_devices())
    fob_id = fobs["fobs"][0]["fob_id"]
    out = appliance.cli("fobs", "revoke", str(fob_id)).stdout
    assert f"bond=removed: {ADDRESSES[1]}" in out, out
    assert FOB_DEVICE not in run(bluez_devices())
    [revoked] = appliance.request("fobs", {"op": "list"})["data"]["fobs"]
    assert revoked["revoked"] and revoked["address"] == ADDRESSES[1]

    # `savepoint history`: who tried, who paired, when, among the SAVE and RESTORE records
    events = appliance.request("history")["data"]["events"]
    assert [(e["action"], e["source"]) for e in events] == [
        *[("refused", ADDRESSES[1])] * 3,
        ("closed", "ble"),
        ("paired", f"fob:{fob_id}"),
        ("revoked", f"fob:{fob_id}"),
    ], events
    assert events[4]["detail"].endswith(f"from {ADDRESSES[1]}")
