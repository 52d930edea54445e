"""GpioPart on gpiozero's MockFactory: real Button and PWMLED objects, gestures end to end.

Releases follow the LED cue the part shows (as a user watching the LED would), so the tests
hold on a loaded machine; assertions are on ordered states, never on exact times.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from gpiozero import Device
from gpiozero.pins.mock import MockFactory

from appliance.control.commands import Action, PartUnavailable
from gpio import GpioPart
from gpio import part as gpio_part
from gpio.gestures import Cue
from tests.gpio_helpers import FAST, HeldPin, contains_in_order, hold_until, levels, wait_for
from tests.support import LockingBus

Scenario = Callable[[GpioPart, LockingBus], Awaitable[None]]


def run(scenario: Scenario, sink: LockingBus | None = None, **cfg: Any) -> LockingBus:
    sink = sink or LockingBus()

    async def main() -> None:
        part = GpioPart({**FAST, **cfg}, sink)
        await part.start()
        try:
            await wait_for(lambda: sink.commands, what="the start-up STATUS query")
            sink.commands.clear()
            await scenario(part, sink)
        finally:
            await part.stop()

    asyncio.run(main())
    return sink


async def settle(part: GpioPart, sink: LockingBus, n: int) -> None:
    await wait_for(lambda: len(part.submitted) >= n, what=f"{n} outcomes")
    await asyncio.sleep(0.05)


def test_short_press_shows_status_and_changes_nothing(factory: MockFactory) -> None:
    async def scenario(part: GpioPart, sink: LockingBus) -> None:
        led, button = factory.pin(27), factory.pin(17)
        sink.gate = asyncio.Event()  # hold the answer until the LED has settled
        button.drive_low()
        await asyncio.sleep(0.04)
        button.drive_high()
        await wait_for(lambda: sink.commands and part.led.current == "clean", what="release")
        mark = len(led.states)
        sink.gate.set()
        await settle(part, sink, 1)
        await wait_for(lambda: "locked" in part.led.history, what="the locked signal")
        await wait_for(lambda: part.led.current == "clean", what="back to clean")
        assert sink.actions() == [Action.STATUS]
        assert sink.epoch == 1
        # the status display: three quick blinks (LOCKED), then the steady "clean" light
        assert levels(led, mark) == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]

    run(scenario)


@pytest.mark.parametrize(
    "cue, expected",
    [
        (Cue.SAVE_ARMED, [Action.SAVE]),
        (Cue.RESTORE_WARNING, []),  # let go during the warning: cancelled
        (Cue.RESTORE_ARMED, [Action.RESTORE]),
    ],
)
def test_hold_then_release_at_each_rung(
    factory: MockFactory, cue: Cue, expected: list[Action]
) -> None:
    async def scenario(part: GpioPart, sink: LockingBus) -> None:
        await hold_until(part, factory.pin(17), cue)
        await asyncio.sleep(0.1)
        await wait_for(lambda: len(part.submitted) == len(expected))
        assert sink.actions() == expected
        assert sink.epoch == 1 + len(expected)

    run(scenario, LockingBus(locked=False))


def test_the_led_warns_before_restore_then_blinks_while_it_runs(factory: MockFactory) -> None:
    async def scenario(part: GpioPart, sink: LockingBus) -> None:
        led = factory.pin(27)
        await wait_for(lambda: led.state == 1.0, what="clean: steady on")
        mark = len(led.states)
        await hold_until(part, factory.pin(17), Cue.RESTORE_ARMED)
        await settle(part, sink, 1)
        await wait_for(lambda: part.led.current == "clean", what="back to clean")
        seen = levels(led, mark)
        # clean: on; held: dark; SAVE armed: on; warning: fast blink; ...; clean: on
        assert seen[:3] == [1.0, 0.0, 1.0]
        assert contains_in_order(seen, [1.0, 0.0, 1.0, 0.0, 1.0])
        assert seen[-1] == 1.0
        shown = iter(part.led.history)
        assert all(
            name in shown
            for name in [  # in this order, maybe with others between
                "held",
                "save_armed",
                "restore_warning",
                "restore_armed",
                "busy",
                "clean",
            ]
        )
        assert sink.actions() == [Action.RESTORE]

    run(scenario, LockingBus(locked=False))


def test_long_hold_opens_pairing_once_and_release_does_nothing(factory: MockFactory) -> None:
    async def scenario(part: GpioPart, sink: LockingBus) -> None:
        pin = factory.pin(17)
        pin.drive_low()
        await wait_for(lambda: sink.commands, what="PAIR")
        assert sink.actions() == [Action.PAIR]  # fired while still held
        await asyncio.sleep(0.1)
        pin.drive_high()
        await asyncio.sleep(0.2)
        assert sink.actions() == [Action.PAIR]

    run(scenario, LockingBus(locked=False))


def test_double_press_then_hold_unlocks(factory: MockFactory) -> None:
    async def scenario(part: GpioPart, sink: LockingBus) -> None:
        pin = factory.pin(17)
        pin.drive_low()
        await asyncio.sleep(0.04)
        pin.drive_high()
        await asyncio.sleep(0.04)
        pin.drive_low()
        await wait_for(lambda: Action.UNLOCK in sink.actions(), what="UNLOCK")
        pin.drive_high()
        await settle(part, sink, 2)
        assert sink.actions() == [Action.STATUS, Action.UNLOCK]
        assert not sink.locked
        await wait_for(lambda: "unlocked" in part.led.history, what="the unlocked signal")

    run(scenario)


def test_a_bouncing_contact_is_one_gesture(factory: MockFactory) -> None:
    async def scenario(part: GpioPart, sink: LockingBus) -> None:
        pin = factory.pin(17)
        for _ in range(4):  # contact chatter on press
            pin.drive_low()
            pin.drive_high()
        await hold_until(part, pin, Cue.SAVE_ARMED)
        for _ in range(3):  # and on release
            pin.drive_low()
            pin.drive_high()
        await settle(part, sink, 1)
        await asyncio.sleep(0.1)
        assert sink.actions() == [Action.SAVE]

    run(scenario, LockingBus(locked=False))


def test_refused_save_while_locked_blinks_three_times(factory: MockFactory) -> None:
    async def scenario(part: GpioPart, sink: LockingBus) -> None:
        led = factory.pin(27)
        sink.gate = asyncio.Event()
        await hold_until(part, factory.pin(17), Cue.SAVE_ARMED)
        await wait_for(lambda: sink.commands and part.led.current == "clean", what="release")
        mark = len(led.states)
        sink.gate.set()
        await settle(part, sink, 1)
        await wait_for(lambda: "refused" in part.led.history, what="the refused signal")
        await wait_for(lambda: part.led.current == "clean", what="back to clean")
        assert not part.submitted[0].ok
        assert sink.epoch == 1
        assert levels(led, mark) == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]

    run(scenario, LockingBus(locked=True))


def test_a_button_held_at_start_up_triggers_nothing(factory: MockFactory) -> None:
    factory.pin(17, pin_class=HeldPin)

    async def scenario(part: GpioPart, sink: LockingBus) -> None:
        pin = factory.pin(17)
        assert pin.state is False  # still held
        await asyncio.sleep(FAST["pair_hold"] + 0.2)  # past every rung, PAIR included
        pin.drive_high()
        await asyncio.sleep(0.2)
        assert sink.actions() == []
        await hold_until(part, pin, Cue.SAVE_ARMED)  # once released, it works again
        await settle(part, sink, 1)
        assert sink.actions() == [Action.SAVE]

    run(scenario, LockingBus(locked=False))


def test_dedicated_keys_and_key_switch(factory: MockFactory) -> None:
    async def scenario(part: GpioPart, sink: LockingBus) -> None:
        await wait_for(lambda: Action.UNLOCK in sink.actions() or not sink.commands, what="start")
        switch, restore = factory.pin(5), factory.pin(6)
        switch.drive_low()  # key turned: unlocked
        await wait_for(lambda: not sink.locked, what="key switch UNLOCK")
        restore.drive_low()
        await wait_for(lambda: part.cue == Cue.RESTORE_WARNING, what="restore key warning")
        restore.drive_high()  # let go early: cancelled
        await asyncio.sleep(0.1)
        restore.drive_low()
        await wait_for(lambda: Action.RESTORE in sink.actions(), what="restore key")
        restore.drive_high()
        switch.drive_high()  # key back: locked
        await wait_for(lambda: sink.locked, what="key switch LOCK")
        assert sink.actions() == [Action.UNLOCK, Action.RESTORE, Action.LOCK]

    run(scenario, LockingBus(locked=True), key_switch_pin=5, restore_pin=6)


def test_second_led_carries_the_warnings(factory: MockFactory) -> None:
    async def scenario(part: GpioPart, sink: LockingBus) -> None:
        green, red = factory.pin(27), factory.pin(22)
        await hold_until(part, factory.pin(17), Cue.SAVE_ARMED)
        await wait_for(lambda: "refused" in part.led.history, what="refused")
        await wait_for(lambda: part.led.current == "clean", what="back to clean")
        assert contains_in_order(levels(red), [0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
        assert green.state == 1.0 and red.state == 0.0

    run(scenario, LockingBus(locked=True), led2_pin=22)


def test_no_gpio_chip_means_part_unavailable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    Device.pin_factory = None
    monkeypatch.delenv("GPIOZERO_PIN_FACTORY", raising=False)
    monkeypatch.setattr(gpio_part, "GPIOCHIP_GLOB", str(tmp_path / "gpiochip*"))
    with pytest.raises(PartUnavailable) as info:
        asyncio.run(GpioPart({}, LockingBus()).start())
    assert info.value.reason == "no GPIO chip found"
    assert "buttons and LED are off" in info.value.hint


def test_an_unusable_pin_factory_means_part_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    Device.pin_factory = None
    monkeypatch.setenv("GPIOZERO_PIN_FACTORY", "no-such-factory")
    with pytest.raises(PartUnavailable, match="pin factory"):
        asyncio.run(GpioPart({}, LockingBus()).start())


def test_lgpio_factory_without_lgpio_means_part_unavailable(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """What the systemd unit sets (GPIOZERO_PIN_FACTORY=lgpio) on a machine without lgpio."""
    Device.pin_factory = None
    monkeypatch.setenv("GPIOZERO_PIN_FACTORY", "lgpio")
    monkeypatch.setitem(sys.modules, "lgpio", None)  # importing it fails, as when not installed
    (tmp_path / "gpiochip0").touch()
    monkeypatch.setattr(gpio_part, "GPIOCHIP_GLOB", str(tmp_path / "gpiochip*"))
    with pytest.raises(PartUnavailable, match="pin factory") as info:
        asyncio.run(GpioPart({}, LockingBus()).start())
    assert "python3-lgpio" in info.value.hint
