"""The `bthome` part in the daemon's world: config, scan fallback, status, and `savepoint
buttons` over the real control socket (a CLI subprocess against an in-process bus)."""

from __future__ import annotations

import asyncio
import shutil
import threading
from typing import Any

import pytest

from appliance.config import ConfigError, validate
from appliance.control.bus import CommandBus
from appliance.control.commands import Action, Command, PartUnavailable
from appliance.control.socket import ControlServer
from ble.bthome_part import BTHomePart
from tests import bthome_adverts as adv
from tests.support import run
from tests.test_daemon_support import cli, short_dir

KEY = bytes.fromhex("00112233445566778899aabbccddeeff")
MAC = "A4:C1:38:00:00:01"


class FakeRadio:
    """Stands in for bleak: records how the part asked to scan; `passive` may be refused."""

    def __init__(self, passive: bool = True) -> None:
        self.passive = passive
        self.asked: list[str] = []
        self.callback: Any = None
        self.stopped = False

    async def scan(self, adapter: str, mode: str, callback: Any) -> Any:
        self.asked.append(f"{adapter}:{mode}")
        if mode == "passive" and not self.passive:
            raise RuntimeError(
                "passive scanning on Linux requires BlueZ >= 5.56 with --experimental enabled"
            )
        self.callback = callback

        async def stop() -> None:
            self.stopped = True

        return stop


def test_config_is_checked_before_start():
    ok = validate({"bthome": {"enabled": True, "gestures": {"press": "save"}}})
    assert ok["parts"]["bthome"]["gestures"] == {"press": "save"}
    with pytest.raises(ConfigError, match=r"\[bthome\] gestures: .*allow_unlock"):
        validate({"bthome": {"enabled": True, "gestures": {"triple_press": "unlock"}}})
    with pytest.raises(ConfigError, match="battery_low"):
        validate({"bthome": {"battery_low": 150}})
    with pytest.raises(ConfigError, match="scan"):
        validate({"bthome": {"scan": "sometimes"}})
    assert (
        validate({"policy": {"bthome": {"save": "always"}}})["policy"]["bthome"]["save"] == "always"
    )


def test_passive_scan_falls_back_to_active_and_says_so(tmp_path, store, caplog):
    async def go():
        radio = FakeRadio(passive=False)
        part = BTHomePart(
            {"registry": str(tmp_path / "b.json")}, CommandBus(store), scan=radio.scan
        )
        await part.start()
        assert radio.asked == ["hci0:passive", "hci0:active"]
        assert part.status()["buttons"]["scan"] == "active"
        await part.stop()
        assert radio.stopped

    run(go())
    assert "start bluetoothd with --experimental" in caplog.text


def test_a_part_that_cannot_scan_reports_why(tmp_path, store):
    async def refuse(adapter, mode, callback):
        raise OSError("org.bluez.Error.NotReady")

    part = BTHomePart({"registry": str(tmp_path / "b.json")}, CommandBus(store), scan=refuse)
    with pytest.raises(PartUnavailable, match="NotReady"):
        run(part.start())


def test_allow_unlock_opens_the_policy_cell(tmp_path, store):
    async def go():
        bus = CommandBus(store)
        radio = FakeRadio()
        part = BTHomePart(
            {
                "registry": str(tmp_path / "b.json"),
                "allow_unlock": True,
                "gestures": {"triple_press": "unlock"},
            },
            bus,
            scan=radio.scan,
        )
        await part.start()
        await part.buttons_handler({"op": "add", "address": MAC, "key": KEY.hex()})
        radio.callback(MAC, adv.press(KEY, MAC, 1, "triple_press"), -50, "SBBT-002C")
        await part.listener.drain()
        assert bus.mode.value == "unlocked"
        await part.stop()

    run(go())


class Served:
    """A bus with the bthome part (fake radio) behind a real control socket, in a thread."""

    def __init__(self, tmp_path, store) -> None:
        self.dir = short_dir()
        self.control = f"{self.dir}/control.sock"
        self.radio = FakeRadio()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.bus = None
        self.part = None
        self.call(self._start(tmp_path, store))

    async def _start(self, tmp_path, store) -> None:
        self.bus = CommandBus(store)
        self.part = BTHomePart(
            {"registry": str(tmp_path / "b.json")}, self.bus, scan=self.radio.scan
        )
        await self.part.start()
        self.server = ControlServer(self.bus, self.control)
        await self.server.start()

    def call(self, coro) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(20)

    def advert(self, data: bytes) -> str:
        async def send() -> str:
            verdict = self.radio.callback(MAC, data, -60, "SBBT-002C")
            await self.part.listener.drain()
            return verdict

        return self.call(send())

    def close(self) -> None:
        self.call(self.server.stop())
        self.call(self.part.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        shutil.rmtree(self.dir, ignore_errors=True)


def test_buttons_cli_enrols_lists_renames_removes(tmp_path, store):
    served = Served(tmp_path, store)
    try:
        control = served.control
        assert "no buttons enrolled" in cli("buttons", control=control).stdout
        bad = cli("buttons", "add", MAC, "--key", "abc", control=control, check=False)
        assert bad.returncode == 1 and "32 hex digits" in bad.stderr
        assert served.advert(adv.press(KEY, MAC, 1, "press")) == "unknown"
        done = cli("buttons", "add", MAC, "--key", KEY.hex(), "--name", "desk", control=control)
        assert f"{MAC} (desk): enrolled" in done.stdout
        assert served.advert(adv.press(KEY, MAC, 5, "press", battery=64)) == "accepted"
        listed = cli("buttons", control=control).stdout
        assert "desk" in listed and "battery 64%" in listed and "counter 5" in listed
        assert "unknown 1" in listed and "accepted 1" in listed
        status = cli("status", control=control).stdout
        assert f"desk {MAC}: battery 64%" in status
        assert "renamed" in cli("buttons", "rename", MAC, "hall", control=control).stdout
        assert "removed" in cli("buttons", "remove", MAC, control=control).stdout
        gone = cli("buttons", "remove", MAC, control=control, check=False)
        assert gone.returncode == 1 and "no button" in gone.stderr
        assert served.advert(adv.press(KEY, MAC, 6, "long_press")) == "unknown"
    finally:
        served.close()


def test_only_the_local_admin_may_enrol(tmp_path, store):
    from appliance.control.requests import dispatch

    async def go():
        bus = CommandBus(store)
        part = BTHomePart({"registry": str(tmp_path / "b.json")}, bus, scan=FakeRadio().scan)
        await part.start()
        line = (
            f'{{"cmd": "buttons", "args": {{"op": "add", "address": "{MAC}", '
            f'"key": "{KEY.hex()}"}}}}'
        )
        host = await dispatch(bus, line, "host")
        assert not host["ok"] and "local control socket" in host["reason"]
        assert part.listener.registry.buttons == {}
        assert (await dispatch(bus, line, "cli"))["ok"]
        outcome = await bus.submit(Command(Action.STATUS, "cli"))
        assert outcome.data["buttons"]["devices"][0]["address"] == MAC
        await part.stop()

    run(go())


def test_a_warning_flashes_the_led_and_reads_well_in_watch():
    from appliance.cli_show import describe_event
    from appliance.control.commands import Event
    from gpio.led import DaemonView, LedTimings, signals

    warning = {
        "part": "bthome",
        "button": MAC,
        "name": "desk",
        "reason": "battery low (12%): replace the coin cell",
    }

    assert DaemonView().apply(Event("warning", warning)) == "warning"
    assert signals(LedTimings())["warning"].colour == "amber"
    assert (
        describe_event({"event": "warning", "data": warning})
        == "warning: desk: battery low (12%): replace the coin cell"
    )


def test_a_restarted_bluetoothd_gets_the_scan_again(tmp_path, store):
    async def go():
        radio = FakeRadio()
        part = BTHomePart(
            {"registry": str(tmp_path / "b.json")}, CommandBus(store), scan=radio.scan
        )
        await part.start()
        part.bluez_changed("")
        assert part.status()["buttons"]["scan"] == "lost"
        part.bluez_changed(":1.42")
        for _ in range(10):
            await asyncio.sleep(0)
        assert radio.asked == ["hci0:passive", "hci0:passive"] and radio.stopped
        assert part.status()["buttons"]["scan"] == "passive"
        await part.stop()

    run(go())
