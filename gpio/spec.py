"""The [gpio] part's spec: the enclosure button(s) and status LED. Light, as every spec is
(appliance/parts.py): gpiozero is imported by `make`, when the daemon starts the part."""

from __future__ import annotations

from appliance.control.commands import Part
from appliance.parts import PartContext, PartSpec
from gpio.settings import GpioSettings, validate_config


def _make(settings: GpioSettings, ctx: PartContext) -> Part:
    from gpio.part import GpioPart

    return GpioPart(settings, ctx.bus)


SPEC = PartSpec("gpio", GpioSettings, _make, validate=validate_config)
