"""Shared by the gpio tests: gpiozero mock pins, short timings, waiting (the fake command bus
is tests/support.py's LockingBus)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from gpiozero.pins.mock import MockPWMPin

from gpio import GpioPart
from gpio.gestures import Cue

# hold ladder in tens/hundreds of ms; each window is wide enough for a loaded 2-CPU machine
FAST: dict[str, Any] = {
    "button_pin": 17,
    "led_pin": 27,
    "debounce": 0.01,
    "save_hold": 0.25,
    "restore_warn": 0.6,
    "restore_hold": 0.9,
    "pair_hold": 1.4,
    "double_gap": 0.4,
    "unlock_hold": 0.3,
    "key_hold": 0.2,
    "led_fast": 0.02,
    "led_slow": 0.06,
    "led_no_host": 0.3,
    "status_show": 0.4,
}


class HeldPin(MockPWMPin):
    """A button wired to ground that is already pressed when the daemon starts."""

    def _set_pull(self, value: str) -> None:
        super()._set_pull(value)
        self._change_state(False)


async def wait_for(cond: Callable[[], Any], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await asyncio.sleep(0.003)


async def hold_until(part: GpioPart, pin: MockPWMPin, cue: Cue) -> None:
    """Hold the button until the part shows `cue`, release it, wait until the part is idle."""
    pin.drive_low()
    await wait_for(lambda: part.cue == cue, what=f"cue {cue}")
    pin.drive_high()
    await wait_for(lambda: part.cue == Cue.IDLE, what="release")


def levels(pin: MockPWMPin, start: int = 0) -> list[float]:
    """The LED pin's levels from the one in force at states[start] on, repeats collapsed."""
    out: list[float] = []
    for s in pin.states[max(start - 1, 0) :]:
        v = float(s.state)
        if not out or out[-1] != v:
            out.append(v)
    return out


def contains_in_order(seq: list[float], wanted: list[float]) -> bool:
    """`wanted` appears in `seq` as a contiguous run."""
    n = len(wanted)
    return any(seq[i : i + n] == wanted for i in range(len(seq) - n + 1))
