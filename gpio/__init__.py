"""The enclosure button(s) and status LED (gpiozero): see docs/controls.md."""

from gpio.part import GpioPart
from gpio.settings import GpioSettings, validate_config

__all__ = ["GpioPart", "GpioSettings", "validate_config"]
