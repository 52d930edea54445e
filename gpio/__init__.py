"""The enclosure button(s) and status LED (gpiozero): see docs/controls.md."""

from gpio.part import GpioPart
from gpio.settings import CONFIG_SCHEMA, validate_config

__all__ = ["CONFIG_SCHEMA", "GpioPart", "validate_config"]
