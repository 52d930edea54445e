"""gpiozero Buttons wired to the pure recognisers of gpio/gestures.py on the asyncio loop.

gpiozero calls `when_pressed`/`when_released` on its own threads (lgpio's callback thread,
or whoever drives a mock pin). Each edge is stamped there with time.monotonic() - the clock
asyncio's loop.time() uses - and handed over with loop.call_soon_threadsafe; from then on
everything runs on the loop. Debouncing is done by the recogniser, not by gpiozero's
bounce_time, so it behaves the same on every pin factory (MockPin ignores bounce_time).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from gpiozero import Button

from gpio.gestures import Debounced, Output

log = logging.getLogger(__name__)


class ButtonInput:
    """One contact: a gpiozero Button, its recogniser, and the loop timer that drives it."""

    def __init__(
        self,
        name: str,
        pin: int | str,
        active_high: bool,
        make: Callable[[bool, float], Debounced],
        emit: Callable[[str, Output], None],
        switch: bool = False,
    ) -> None:
        self.name = name
        self._emit = emit
        self._loop = asyncio.get_running_loop()
        # pull_up=True: contact to ground (the usual wiring); else to 3.3 V with a pull-down
        self.device = Button(pin, pull_up=not active_high, bounce_time=None)
        held = bool(self.device.is_pressed)
        if held and not switch:
            log.info("%s button is held at start-up: ignored until released", name)
        self.recogniser = make(held, self._loop.time())
        self._timer: asyncio.TimerHandle | None = None
        self.device.when_pressed = lambda: self._from_thread(True)
        self.device.when_released = lambda: self._from_thread(False)

    @property
    def held_at_start(self) -> bool:
        return self.recogniser.pressed

    def _from_thread(self, pressed: bool) -> None:
        t = time.monotonic()
        try:
            self._loop.call_soon_threadsafe(self._edge, t, pressed)
        except RuntimeError:  # the loop is closed: we are shutting down
            pass

    def _edge(self, t: float, pressed: bool) -> None:
        self._deliver(self.recogniser.edge(t, pressed))

    def _tick(self) -> None:
        self._timer = None
        self._deliver(self.recogniser.tick(self._loop.time()))

    def _deliver(self, outputs: list[Output]) -> None:
        for out in outputs:
            self._emit(self.name, out)
        self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.recogniser.next_deadline()
        if deadline is not None:
            self._timer = self._loop.call_at(deadline, self._tick)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.device.when_pressed = None
        self.device.when_released = None
        self.device.close()
