"""The appliance on a site's MQTT broker: state out, commands in, Home Assistant discovery."""

from mqtt.part import MqttPart
from mqtt.settings import CONFIG_SCHEMA, validate_config

__all__ = ["CONFIG_SCHEMA", "MqttPart", "validate_config"]
