"""The enclosure button(s) and status LED (gpiozero): see docs/controls.md."""

from typing import Any

__all__ = ["GpioPart", "GpioSettings", "validate_config"]


def __getattr__(name: str) -> Any:
    """GpioPart loads gpio.part (gpiozero) on first use, so the spec and the settings
    (gpio.spec, gpio.settings) import without it: the CLI loads every part's spec."""
    if name == "GpioPart":
        from gpio.part import GpioPart

        return GpioPart
    if name in __all__:
        from gpio import settings

        return getattr(settings, name)
    raise AttributeError(f"module 'gpio' has no attribute {name!r}")
