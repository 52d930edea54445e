"""The enclosure button and LED against the real command bus and a real store (MockFactory pins).

A user story: the appliance starts LOCKED; a SAVE hold is refused (three quick blinks, store
untouched); double-press-and-hold unlocks; the SAVE hold then saves; writes made after that
are thrown away by a RESTORE hold.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpiozero.pins.mock import MockFactory

from appliance.control.bus import CommandBus
from appliance.control.commands import Action, Mode
from appliance.store import Store
from appliance.store.init import create_store
from gpio import GpioPart
from gpio.gestures import Cue
from tests.gpio_helpers import FAST, contains_in_order, hold_until, levels, wait_for


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    path = str(tmp_path / "disk.img")
    create_store(path, 16 << 20)
    st = Store.open(path)
    try:
        yield st
    finally:
        st.close()


async def outcomes(part: GpioPart, n: int) -> None:
    await wait_for(lambda: len(part.submitted) >= n, what=f"{n} button outcomes")


def test_button_drives_the_real_bus_and_store(factory: MockFactory, store: Store) -> None:
    async def main() -> None:
        bus = CommandBus(store)
        part = GpioPart(dict(FAST), bus)
        await part.start()
        button, led = factory.pin(17), factory.pin(27)
        try:
            await wait_for(lambda: part.led.current == "clean", what="start-up status")
            epoch = store.epoch
            store.write(0, b"A" * 4096)  # work the host has not saved

            # locked: the SAVE hold is refused and changes nothing
            mark = len(led.states)
            await hold_until(part, button, Cue.SAVE_ARMED)
            await outcomes(part, 1)
            assert not part.submitted[-1].ok and "LOCKED" in part.submitted[-1].reason
            assert store.epoch == epoch and store.status()["dirty_units"] == 1
            await wait_for(lambda: "refused" in part.led.history, what="refused signal")
            await wait_for(lambda: part.led.current == "unsaved", what="unsaved blink")
            assert contains_in_order(levels(led, mark), [1.0, 0.0, 1.0, 0.0, 1.0, 0.0])

            # double-press then hold: UNLOCK
            button.drive_low()
            await asyncio.sleep(0.04)
            button.drive_high()
            await asyncio.sleep(0.04)
            button.drive_low()
            await wait_for(lambda: bus.mode is Mode.UNLOCKED, what="UNLOCK")
            button.drive_high()
            await asyncio.sleep(0.05)  # let the release settle (past debounce)

            # SAVE: one epoch on, nothing unsaved, LED steady
            await hold_until(part, button, Cue.SAVE_ARMED)
            await wait_for(lambda: store.epoch == epoch + 1, what="SAVE")
            await wait_for(lambda: part.led.current == "clean", what="clean after SAVE")
            assert store.status()["dirty_units"] == 0

            # new work, then RESTORE: thrown away
            store.write(0, b"B" * 4096)
            await hold_until(part, button, Cue.RESTORE_ARMED)
            await wait_for(lambda: store.epoch == epoch + 2, what="RESTORE")
            assert store.read(0, 4096) == b"A" * 4096
            await outcomes(part, 5)  # the first press of the double-press was a STATUS
            actions = [o.action for o in part.submitted if o.action is not Action.STATUS]
            assert actions == [Action.SAVE, Action.UNLOCK, Action.SAVE, Action.RESTORE]
            assert [h["source"] for h in store.history()][-2:] == ["button", "button"]
        finally:
            await part.stop()
            await bus.close()

    asyncio.run(main())
