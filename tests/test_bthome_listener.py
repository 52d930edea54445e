"""BTHome buttons on the real command bus and store: enrolment, replay protection, gestures,
the `bthome` policy class, battery and presence warnings, the registry file."""

from __future__ import annotations

import json
import os
import stat

import pytest

from appliance.control.bus import CommandBus
from appliance.control.commands import Action, Command, Event, Mode
from appliance.control.policy import default_policy
from ble.bthome_listener import DEFAULT_GESTURES, ButtonListener, parse_gestures
from ble.bthome_registry import ButtonRegistry, RegistryError
from tests import bthome_adverts as adv
from tests.support import FakeClock, run

KEY = bytes.fromhex("00112233445566778899aabbccddeeff")
MAC = "A4:C1:38:00:00:01"
SOURCE = f"bthome:{MAC}"


class World:
    def __init__(self, tmp_path, store, gestures=None, allow_unlock=False) -> None:
        self.path = tmp_path / "buttons.json"
        self.registry = ButtonRegistry(self.path)
        self.registry.add(MAC, KEY.hex(), "desk")
        self.bus = CommandBus(store)
        self.events = self.bus.subscribe()
        self.wall = FakeClock(1_700_000_000.0)
        mapping = parse_gestures({**DEFAULT_GESTURES, **(gestures or {})}, allow_unlock)
        self.listener = ButtonListener(self.registry, self.bus, mapping, wall=self.wall)
        self.store = store

    async def send(self, data: bytes, address: str = MAC) -> str:
        verdict = self.listener.on_advert(address, data)
        await self.listener.drain()
        return verdict

    def outcomes(self) -> list[dict]:
        out = []
        while not self.events.empty():
            event: Event = self.events.get_nowait()
            if event.kind == "outcome":
                out.append(event.data)
        return out

    def warnings(self) -> list[str]:
        return [e.data["reason"] for e in list(self.events._queue) if e.kind == "warning"]


def test_double_press_is_refused_locked_saves_unlocked_long_press_restores(tmp_path, store):
    async def go():
        w = World(tmp_path, store)
        epoch = store.epoch
        assert await w.send(adv.press(KEY, MAC, 1, "double_press")) == "accepted"
        [refused] = w.outcomes()
        assert not refused["ok"] and "LOCKED" in refused["reason"] and store.epoch == epoch
        await w.bus.submit(Command(Action.UNLOCK, "cli"))
        assert await w.send(adv.press(KEY, MAC, 2, "double_press")) == "accepted"
        assert store.epoch == epoch + 1
        assert await w.send(adv.press(KEY, MAC, 3, "long_press")) == "accepted"
        assert store.epoch == epoch + 2
        history = store.history()
        assert [(h["action"], h["source"]) for h in history[-2:]] == [
            ("save", SOURCE),
            ("restore", SOURCE),
        ]

    run(go())


def test_repeats_of_one_press_run_one_command_and_replays_none(tmp_path, store):
    async def go():
        w = World(tmp_path, store)
        w.bus.mode = Mode.UNLOCKED
        epoch = store.epoch
        press = adv.press(KEY, MAC, 10, "double_press")
        verdicts = [await w.send(press) for _ in range(5)]  # a button repeats each advert
        assert verdicts == ["accepted"] + ["repeated"] * 4 and store.epoch == epoch + 1
        w.bus.mode = Mode.UNLOCKED  # the SAVE used the unlock up ([lock] single_use)
        assert await w.send(adv.press(KEY, MAC, 11, "double_press")) == "accepted"
        assert await w.send(press) == "old_counter"  # the recorded press, replayed later
        assert store.epoch == epoch + 2
        assert w.listener.counts == {"accepted": 2, "repeated": 4, "old_counter": 1}

    run(go())


def test_the_counter_is_on_disk_before_the_command_runs(tmp_path, store):
    """A restart (a new registry from the file) still refuses the recorded advert."""

    async def go():
        w = World(tmp_path, store)
        seen_on_disk = []
        real_submit = w.bus.submit

        async def submit(command):
            seen_on_disk.append(json.loads(w.path.read_text())["buttons"][MAC]["counter"])
            return await real_submit(command)

        w.bus.submit = submit
        press = adv.press(KEY, MAC, 41, "press")
        assert await w.send(press) == "accepted"
        assert seen_on_disk == [41]
        again = ButtonListener(ButtonRegistry(w.path), w.bus, w.listener.gestures)
        assert again.on_advert(MAC, press) == "repeated"
        assert again.on_advert(MAC, adv.press(KEY, MAC, 40)) == "old_counter"
        assert stat.S_IMODE(os.stat(w.path).st_mode) == 0o600

    run(go())


def test_unknown_unencrypted_wrong_key_and_truncated_do_nothing(tmp_path, store):
    async def go():
        w = World(tmp_path, store)
        w.bus.mode = Mode.UNLOCKED
        epoch = store.epoch
        other = "A4:C1:38:00:00:02"
        assert await w.send(adv.press(KEY, other, 5, "long_press"), other) == "unknown"
        assert await w.send(adv.plain("long_press")) == "unencrypted"
        assert await w.send(adv.press(bytes(16), MAC, 5, "long_press")) == "wrong_key"
        assert await w.send(adv.press(KEY, MAC, 5, "long_press")[:8]) == "truncated"
        assert store.epoch == epoch and w.outcomes() == []
        record = w.registry.get(MAC)
        assert record.counter == -1 and record.last_seen == 0  # nothing was believed
        # a forged advert with a huge counter must not burn the counter space
        assert await w.send(adv.press(bytes(16), MAC, 2**32 - 1, "press")) == "wrong_key"
        assert await w.send(adv.press(KEY, MAC, 6, "long_press")) == "accepted"
        assert store.epoch == epoch + 1

    run(go())


def test_unlock_is_off_by_default_and_needs_the_switch(tmp_path, store):
    with pytest.raises(ValueError, match="allow_unlock"):
        parse_gestures({"triple_press": "unlock"})
    assert default_policy()["bthome"]["unlock"] == "never"

    async def go():
        w = World(tmp_path, store)
        outcome = await w.bus.submit(Command(Action.UNLOCK, SOURCE))
        assert not outcome.ok and "policy.bthome" in outcome.reason
        # an unauthenticated command claiming to be a button gets the commodity rules
        fake = await w.bus.submit(Command(Action.RESTORE, SOURCE, authenticated=False))
        assert not fake.ok

    run(go())


def test_gestures_map_per_button_and_unmapped_ones_are_counted(tmp_path, store):
    async def go():
        w = World(tmp_path, store, {"button_2:press": "lock", "press": "none"})
        w.bus.mode = Mode.UNLOCKED
        await w.send(adv.press(KEY, MAC, 1, "press"))
        assert w.outcomes() == [] and w.listener.counts["unmapped"] == 1
        data = adv.encrypt(KEY, MAC, 2, adv.objects(2, None, "", "press"))
        await w.send(data)
        [locked] = w.outcomes()
        assert locked["action"] == "lock" and locked["ok"] and w.bus.mode is Mode.LOCKED

    run(go())


def test_bad_gesture_tables_say_what_is_wrong():
    with pytest.raises(ValueError, match="unknown gesture 'squeeze'"):
        parse_gestures({"squeeze": "save"})
    with pytest.raises(ValueError, match="not one of"):
        parse_gestures({"press": "format"})
    with pytest.raises(ValueError, match="unknown gesture"):
        parse_gestures({"knob:press": "save"})


def test_low_battery_and_absence_are_warnings_once(tmp_path, store):
    async def go():
        w = World(tmp_path, store)
        await w.send(adv.press(KEY, MAC, 1, "press", battery=80))
        await w.send(adv.press(KEY, MAC, 2, "press", battery=12))
        await w.send(adv.press(KEY, MAC, 3, "press", battery=11))
        assert w.warnings() == ["battery low (12%): replace the coin cell"]
        assert w.listener.status()[0]["battery"] == 11
        assert "battery low" in w.listener.status()[0]["warning"]
        w.wall.advance(3 * 86400)
        w.listener.check_absent(2 * 86400)
        w.listener.check_absent(2 * 86400)
        assert len(w.warnings()) == 2 and w.warnings()[1].startswith("not seen for 72 h")
        await w.send(adv.press(KEY, MAC, 4, "press", battery=90))  # a new coin cell
        assert w.listener.status()[0]["warning"] == ""

    run(go())


def test_registry_refuses_bad_input_and_changes_nothing(tmp_path):
    reg = ButtonRegistry(tmp_path / "b.json")
    for address, key in (("nonsense", KEY.hex()), (MAC, "abcd"), (MAC, "zz" * 16)):
        with pytest.raises(RegistryError):
            reg.add(address, key)
    assert not (tmp_path / "b.json").exists()
    record = reg.add(MAC.lower().replace(":", "-"), KEY.hex().upper(), "")
    assert record.address == MAC and record.name == "button-00:01"
    with pytest.raises(RegistryError, match="enrolled already"):
        reg.add(MAC, KEY.hex())
    with pytest.raises(RegistryError, match="printable"):
        reg.rename(MAC, "x" * 65)
    assert reg.rename(MAC, "kitchen").name == "kitchen"
    assert "key" not in reg.list()[0]
    reg.remove(MAC)
    with pytest.raises(RegistryError, match="no button"):
        reg.remove(MAC)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(RegistryError, match="unreadable"):
        ButtonRegistry(tmp_path / "bad.json")
