"""The [mqtt] part's spec. Light, as every spec is (appliance/parts.py): the MQTT client
(aiomqtt, paho) is imported by `make`, when the daemon starts the part."""

from __future__ import annotations

from appliance.control.commands import Part
from appliance.parts import PartContext, PartSpec
from mqtt.settings import MqttSettings, validate_config


def _make(settings: MqttSettings, ctx: PartContext) -> Part:
    from mqtt.part import MqttPart

    return MqttPart(settings, ctx.bus)


SPEC = PartSpec("mqtt", MqttSettings, _make, validate=validate_config)
