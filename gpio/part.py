"""GpioPart: the enclosure button(s) feed the command bus; the status LED follows its events.

Devices come from gpiozero's default pin factory (lgpio on a Pi; GPIOZERO_PIN_FACTORY
overrides it; tests set Device.pin_factory = MockFactory()). With no GPIO chip at all, start()
raises PartUnavailable so the daemon says so once and runs on without buttons and LED.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import warnings
from functools import partial
from typing import Any

from gpiozero import LED, PWMLED, RGBLED, Device
from gpiozero.exc import BadPinFactory, GPIOZeroError, PinFactoryFallback

from appliance.control.commands import Action, Command, CommandSink, Event, Outcome, PartUnavailable
from appliance.parts import TaskSet
from gpio import settings
from gpio.button import ButtonInput
from gpio.gestures import Cue, HoldKey, KeySwitch, MainButton, Output
from gpio.led import DaemonView, Player, choose, signals
from gpio.led import Output as LedOutput

log = logging.getLogger(__name__)

GPIOCHIP_GLOB = "/dev/gpiochip*"  # the character devices lgpio opens
NO_GPIO_HINT = (
    "buttons and LED are off; on a Raspberry Pi install python3-lgpio (or "
    "`pip install lgpio`) and check the [gpio] pins; elsewhere disable [gpio]"
)
_CUE_RANK = (Cue.IDLE, Cue.HELD, Cue.SAVE_ARMED, Cue.RESTORE_WARNING, Cue.RESTORE_ARMED)
_KEYS = {"save_pin": Action.SAVE, "restore_pin": Action.RESTORE, "unlock_pin": Action.UNLOCK}


class GpioPart:
    name = "gpio"

    def __init__(self, cfg: settings.Given, bus: CommandSink) -> None:
        self.cfg = settings.GpioSettings.of(cfg)
        settings.validate_config(self.cfg)
        self.bus = bus
        self.timings = settings.timings(self.cfg)
        self.led_timings = settings.led_timings(self.cfg)
        self.inputs: dict[str, ButtonInput] = {}
        self.led: Player | None = None
        self.view = DaemonView()
        self.cues: dict[str, Cue] = {}
        self.submitted: list[Outcome] = []  # outcomes of what the buttons asked, in order
        self._status_until = 0.0
        self._tasks = TaskSet()
        self._queue: asyncio.Queue[Event] | None = None

    # -- life cycle ------------------------------------------------------------------------
    async def start(self) -> None:
        self._check_gpio_present()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PinFactoryFallback)
                self._build_inputs()
                self._build_led()
        except (BadPinFactory, ImportError) as e:  # GPIOZERO_PIN_FACTORY=lgpio without lgpio
            self._close_devices()
            raise PartUnavailable(f"no usable GPIO pin factory ({e})", NO_GPIO_HINT) from e
        except (GPIOZeroError, OSError, ValueError) as e:
            self._close_devices()
            raise PartUnavailable(
                f"GPIO set-up failed: {e}", "check the [gpio] pins in the config"
            ) from e
        if self.led is not None:
            self.led.start()
        self._queue = self.bus.subscribe()
        self._tasks.spawn(self._follow_events(self._queue))
        self._tasks.spawn(self._first_status())
        switch = self.inputs.get("key_switch")
        if switch is not None and switch.held_at_start:
            self._tasks.spawn(self._submit(Action.UNLOCK))
        self._refresh()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._queue is not None:
            self.bus.unsubscribe(self._queue)
            self._queue = None
        if self.led is not None:
            await self.led.stop()
        self._close_devices()

    def _check_gpio_present(self) -> None:
        if Device.pin_factory is not None or os.environ.get("GPIOZERO_PIN_FACTORY"):
            return  # a factory was chosen explicitly (tests, mock demo, remote pigpio)
        if not glob.glob(GPIOCHIP_GLOB):
            raise PartUnavailable("no GPIO chip found", NO_GPIO_HINT)

    def _build_inputs(self) -> None:
        cfg, t = self.cfg, self.timings
        high = cfg.active_high
        if cfg.button_pin != "":
            self.inputs["button"] = ButtonInput(
                "button",
                cfg.button_pin,
                high,
                lambda held, now: MainButton(t, held, now),
                self._on_input,
            )
        for key, action in _KEYS.items():
            if getattr(cfg, key) != "":
                self.inputs[action.value] = ButtonInput(
                    action.value,
                    getattr(cfg, key),
                    high,
                    partial(HoldKey, action, t),
                    self._on_input,
                )
        if cfg.key_switch_pin != "":
            self.inputs["key_switch"] = ButtonInput(
                "key_switch",
                cfg.key_switch_pin,
                high,
                lambda held, now: KeySwitch(t.debounce, held, now),
                self._on_input,
                switch=True,
            )

    def _build_led(self) -> None:
        cfg = self.cfg
        if cfg.rgb_pins:
            out = LedOutput(rgb=RGBLED(*cfg.rgb_pins, pwm=cfg.led_pwm))
        else:
            kind = PWMLED if cfg.led_pwm else LED
            main = kind(cfg.led_pin) if cfg.led_pin != "" else None
            alert = kind(cfg.led2_pin) if cfg.led2_pin != "" else None
            out = LedOutput(main, alert)
        if out.devices():
            self.led = Player(out)

    def _close_devices(self) -> None:
        for inp in self.inputs.values():
            with contextlib.suppress(Exception):
                inp.close()
        self.inputs.clear()
        if self.led is not None:
            for dev in self.led.output.devices():
                with contextlib.suppress(Exception):
                    dev.close()
            self.led = None

    # -- buttons -> bus ----------------------------------------------------------------------
    def _on_input(self, name: str, out: Output) -> None:
        if isinstance(out, Cue):
            self.cues[name] = out
            self._refresh()
        else:
            self._tasks.spawn(self._submit(out))

    async def _submit(self, action: Action) -> None:
        try:
            outcome = await self.bus.submit(Command(action, source="button"))
        except Exception:
            log.exception("button: %s failed in the command bus", action.value.upper())
            return
        self.submitted.append(outcome)
        log.info(
            "button: %s -> %s %s",
            action.value.upper(),
            "ok" if outcome.ok else "refused",
            outcome.reason,
        )
        if action is Action.STATUS and outcome.ok:
            self._show_status(outcome.data)

    def _show_status(self, snapshot: dict[str, Any]) -> None:
        snap = snapshot.get("status", snapshot)
        if isinstance(snap, dict):
            self.view.apply_state(snap)
        loop = asyncio.get_running_loop()
        self._status_until = loop.time() + self.led_timings.status_show
        loop.call_later(self.led_timings.status_show + 0.001, self._refresh)
        if self.led is not None:
            sig = signals(self.led_timings)
            self.led.flash(sig["locked" if self.view.locked else "unlocked"])
        self._refresh()

    async def _first_status(self) -> None:
        with contextlib.suppress(Exception):
            outcome = await self.bus.submit(Command(Action.STATUS, source="button"))
            snap = outcome.data.get("status", outcome.data)
            if outcome.ok and isinstance(snap, dict):
                self.view.apply_state(snap)
                self._refresh()

    # -- bus events -> LED -------------------------------------------------------------------
    async def _follow_events(self, queue: asyncio.Queue[Event]) -> None:
        while True:
            event = await queue.get()
            signal = self.view.apply(event)
            if signal and self.led is not None:
                self.led.flash(signals(self.led_timings)[signal])
            self._refresh()

    @property
    def cue(self) -> Cue:
        return max(self.cues.values(), key=_CUE_RANK.index, default=Cue.IDLE)

    def _refresh(self) -> None:
        if self.led is None:
            return
        showing = asyncio.get_running_loop().time() < self._status_until
        self.led.play(choose(self.view, self.cue, showing, self.led_timings))
