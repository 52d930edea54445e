"""The [gpio] config section: pins and timings, with defaults and checks.

Pins are BCM numbers (17) or gpiozero pin names ("GPIO17", "BOARD11"); "" = not wired.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any

from appliance.settings import Settings, setting
from gpio.gestures import Timings
from gpio.led import LedTimings


@dataclass(frozen=True)
class GpioSettings(Settings):
    """The [gpio] section: pins and timings."""

    button_pin: int | str = setting(17, 'the enclosure button (BCM number or name); "" = none')
    save_pin: int | str = setting("", "optional dedicated SAVE key")
    restore_pin: int | str = setting("", "optional dedicated RESTORE key")
    unlock_pin: int | str = setting("", "optional dedicated UNLOCK key")
    key_switch_pin: int | str = setting(
        "", "optional key switch read as the lock state: closed = UNLOCKED"
    )
    active_high: bool = setting(False, "inputs close to 3.3 V (pull-down); default: to ground")
    led_pin: int | str = setting(27, 'status LED (through a resistor to ground); "" = none')
    led_pwm: bool = setting(True, "drive the LEDs with PWM (gpiozero PWMLED)")
    led2_pin: int | str = setting("", "optional second (red) LED for warnings, refusals and faults")
    rgb_pins: list[Any] = setting([], "optional RGB LED as [red, green, blue]; replaces led_pin")
    debounce: float = setting(0.03, "seconds a contact must be stable to count")
    save_hold: float = setting(2.0, "hold this long, then release: SAVE")
    restore_warn: float = setting(3.0, "from here the LED warns; releasing cancels")
    restore_hold: float = setting(5.0, "hold this long, then release: RESTORE")
    pair_hold: float = setting(10.0, "hold this long: the fob pairing window opens at once")
    double_gap: float = setting(
        0.5, "max seconds between a short press and the next press (UNLOCK)"
    )
    unlock_hold: float = setting(2.0, "hold the second press of a double-press this long: UNLOCK")
    key_hold: float = setting(1.0, "hold a dedicated key this long to fire it")
    led_slow: float = setting(1.0, "half-period of the slow blink (unsaved work)")
    led_fast: float = setting(0.1, "half-period of the fast blink; quick blinks and SOS dots")
    led_no_host: float = setting(5.0, "no host: a short blink every this many seconds; 0 = dark")
    status_show: float = setting(5.0, "seconds a short press shows the status")


SECONDS = tuple(f.name for f in fields(GpioSettings) if f.type == "float")
PIN_KEYS = (
    "button_pin",
    "save_pin",
    "restore_pin",
    "unlock_pin",
    "key_switch_pin",
    "led_pin",
    "led2_pin",
)
_PIN_NAME = re.compile(r"^(GPIO\d{1,2}|BCM\d{1,2}|BOARD\d{1,2}|J8:\d{1,2}|WPI\d{1,2})$", re.I)


Given = GpioSettings | dict[str, Any]  # a dict: a table already checked (a test's, say)


def _check_pin(key: str, value: Any) -> None:
    if value == "":
        return
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f'{key}: {value!r} is not a pin; use a BCM number like 17 or "GPIO17"')
    if isinstance(value, int) and not 0 <= value <= 53:
        raise ValueError(
            f"{key}: bad pin {value}: BCM numbers run 0-53 (0-27 on the 40-pin header)"
        )
    if isinstance(value, str) and not _PIN_NAME.match(value):
        raise ValueError(f'{key}: bad pin {value!r}: use a BCM number (17) or a name ("GPIO17")')


def validate_config(given: Given) -> None:
    """ValueError saying which key is wrong and how to fix it; changes nothing."""
    cfg = GpioSettings.of(given)
    pins = {key: getattr(cfg, key) for key in PIN_KEYS}
    for key, pin in pins.items():
        _check_pin(key, pin)
    rgb = cfg.rgb_pins
    if rgb and len(rgb) != 3:
        raise ValueError(f"rgb_pins: give three pins [red, green, blue], got {rgb!r}")
    for pin in rgb:
        _check_pin("rgb_pins", pin)
    used = [p for p in pins.values() if p != ""] + list(rgb)
    if rgb and cfg.led_pin != "":
        used.remove(cfg.led_pin)  # rgb_pins replaces led_pin
    dupes = {str(p) for p in used if used.count(p) > 1}
    if dupes:
        raise ValueError(
            f"pin {', '.join(sorted(dupes))} is used twice; give each input and LED its own pin"
        )
    for key in SECONDS:
        if getattr(cfg, key) < 0:
            raise ValueError(f"{key}: {getattr(cfg, key)} is negative; give seconds (0 or more)")
    timings(cfg).check()
    t = led_timings(cfg)
    if t.fast <= 0 or t.slow <= 0:
        raise ValueError("led_fast and led_slow must be more than 0 seconds")


def timings(given: Given) -> Timings:
    cfg = GpioSettings.of(given)
    return Timings(**{k: float(getattr(cfg, k)) for k in Timings.__dataclass_fields__})


def led_timings(given: Given) -> LedTimings:
    cfg = GpioSettings.of(given)
    return LedTimings(
        slow=float(cfg.led_slow),
        fast=float(cfg.led_fast),
        no_host=float(cfg.led_no_host),
        status_show=float(cfg.status_show),
    )
