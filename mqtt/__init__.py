"""The appliance on a site's MQTT broker: state out, commands in, Home Assistant discovery."""

from typing import Any

__all__ = ["MqttPart", "MqttSettings", "validate_config"]


def __getattr__(name: str) -> Any:
    """MqttPart loads mqtt.part (aiomqtt, paho) on first use, so the spec and the settings
    (mqtt.spec, mqtt.settings) import without them: the CLI loads every part's spec."""
    if name == "MqttPart":
        from mqtt.part import MqttPart

        return MqttPart
    if name in __all__:
        from mqtt import settings

        return getattr(settings, name)
    raise AttributeError(f"module 'mqtt' has no attribute {name!r}")
