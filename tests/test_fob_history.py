"""Each pairing, refused pairing and revocation shows in `savepoint history`, interleaved by
time with SAVE and RESTORE: a real daemon with [ble] on a private bus, a fake bluetoothd."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess

import pytest

from appliance.control.bus import CommandBus
from appliance.control.requests import dispatch
from ble.keys import MAX_EVENTS, FobRegistry, RegistryError, registry_history
from ble.protocol import FobProtocol
from tests.fake_bluez import DEVICE, AttError, FakeBluez
from tests.support import RecordingBus
from tests.test_ble_dbus import OTHER, pair_over_gatt
from tests.test_daemon import write_config
from tests.test_daemon_support import SAVEPOINT, cli, env, qemu_io, short_dir, status

CODE = "4829"


def config(d: str, bus_address: str) -> str:
    return write_config(
        d,
        f"""[ble]
enabled = true
bus_address = "{bus_address}"
registry = "{d}/fobs.json"
setup_code = "{CODE}"
""",
    )


async def until(check, seconds: float = 20) -> None:
    for _ in range(int(seconds / 0.1)):
        try:
            if await asyncio.to_thread(check):
                return
        except (AssertionError, KeyError):  # the daemon or its part is not up yet
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {check}")


async def user(*args: str, control: str) -> str:
    return (await asyncio.to_thread(cli, *args, control=control)).stdout


async def wrong_code(fake: FakeBluez) -> None:
    assert await fake.pair(OTHER)
    with pytest.raises(AttError):
        await pair_over_gatt(fake, OTHER, code="0000")


def test_history_shows_who_paired_and_who_was_refused_by_time(private_bus) -> None:
    d = short_dir()
    control = os.path.join(d, "c.sock")
    fake = FakeBluez(private_bus)
    proc = None

    async def body() -> None:
        await fake.start()
        try:
            await story()
        finally:
            if proc is not None:  # while the fake bluetoothd still answers its goodbyes
                proc.terminate()
                await asyncio.to_thread(proc.wait, 30)
            await fake.stop()

    async def story() -> None:
        nonlocal proc
        log = open(os.path.join(d, "log"), "w")  # noqa: SIM115 (the daemon writes it)
        proc = subprocess.Popen(
            [*SAVEPOINT, "daemon", "--config", config(d, private_bus)],
            env=env(),
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        log.close()  # the daemon has its own descriptor
        await until(lambda: status(control)["parts"]["ble"]["state"] == "up")
        await user("pair", control=control)
        await until(lambda: fake.adapter["Pairable"] is True)
        await wrong_code(fake)  # someone nearby guesses once
        assert await fake.pair()
        await pair_over_gatt(fake, code=CODE)
        await user("unlock", control=control)
        await asyncio.to_thread(qemu_io, f"nbd+unix:///savepoint?socket={d}/nbd.sock",
                                "write -P 7 0 64k")  # fmt: skip
        await user("save", "--now", control=control)
        await user("pair", control=control)
        for _ in range(3):
            await wrong_code(fake)
        await user("fobs", "revoke", "1", control=control)

        text = await user("history", control=control)
        rows = [line.split() for line in text.splitlines()]
        what = [(r[3], r[4]) if r[0] == "ble" else (r[4], r[5]) for r in rows]
        assert what == [
            ("refused", "F0:F0:F0:F0:F0:02"),
            ("paired", "fob:1"),
            ("save", "cli"),
            ("refused", "F0:F0:F0:F0:F0:02"),
            ("refused", "F0:F0:F0:F0:F0:02"),
            ("refused", "F0:F0:F0:F0:F0:02"),
            ("closed", "ble"),
            ("revoked", "fob:1"),
        ], text
        assert '"fob-1" from F0:F0:F0:F0:F0:01' in text
        assert "pairing window closed: 3 wrong setup codes" in text
        assert "wrong setup code (0 attempt(s) left)" in text

        reply = json.loads(await user("history", "--json", control=control))
        assert [r["action"] for r in reply["data"]["history"]] == ["save"]
        [paired] = [e for e in reply["data"]["events"] if e["action"] == "paired"]
        assert paired["part"] == "ble" and paired["source"] == "fob:1"
        last = json.loads(await user("history", "--json", "--limit", "1", control=control))
        assert [e["action"] for e in last["data"]["events"]] == ["revoked"]

    try:
        asyncio.run(body())
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(d, ignore_errors=True)


def test_pairings_are_for_the_local_socket_not_the_host(tmp_path, store) -> None:
    """The host's channel and MQTT get SAVE/RESTORE records only, as before."""
    registry = FobRegistry(tmp_path / "fobs.json")
    registry.add(1, b"k" * 32, device=DEVICE)
    bus = CommandBus(store)
    bus.history_sources["ble"] = lambda: registry_history(tmp_path / "fobs.json")
    line = '{"cmd": "history"}'
    local = asyncio.run(dispatch(bus, line, "cli"))["data"]
    assert [e["action"] for e in local["events"]] == ["paired"]
    assert "events" not in asyncio.run(dispatch(bus, line, "host"))["data"]


def test_an_unreadable_registry_is_one_event_not_a_failed_history(tmp_path, store) -> None:
    path = tmp_path / "fobs.json"
    path.write_text("{not json")
    bus = CommandBus(store)
    bus.history_sources["ble"] = lambda: registry_history(path)
    reply = asyncio.run(dispatch(bus, '{"cmd": "history"}', "cli"))
    assert reply["ok"]
    [event] = reply["data"]["events"]
    assert event["action"] == "unreadable" and "move it away" in event["detail"]


def test_refusals_kept_are_bounded_and_survive_a_restart(tmp_path) -> None:
    path = tmp_path / "fobs.json"
    proto = FobProtocol(FobRegistry(path), RecordingBus(), setup_code=CODE)
    proto.set_pairing(True)
    for _ in range(3):
        with pytest.raises(Exception, match="confirmation failed"):
            refused_pairing(proto)
    assert not proto.pairing_open
    window = FobRegistry(path).events  # a restart reads what was kept
    assert [e["action"] for e in window] == ["refused"] * 3 + ["closed"]
    registry = FobRegistry(path)
    for i in range(MAX_EVENTS):
        registry.note("refused", "AA:BB:CC:DD:EE:FF", f"attempt {i}")
    events = FobRegistry(path).events
    assert len(events) == MAX_EVENTS and events[-1]["detail"] == f"attempt {MAX_EVENTS - 1}"
    assert registry_history(tmp_path / "none.json") == []
    assert not (tmp_path / "none.json").exists()  # reading the history creates nothing
    path.write_text(json.dumps({**json.loads(path.read_text()), "events": [{"time": 1}]}))
    with pytest.raises(RegistryError, match="unreadable"):
        registry_history(path)


def refused_pairing(proto: FobProtocol) -> None:
    from ble.keys import FobPairing

    fob = FobPairing("0000")
    for write in fob.pub_writes():
        proto.pair_write("peer", write)
    _creds, confirm = fob.finish(proto.pair_read("peer"))
    proto.pair_write("peer", confirm)
