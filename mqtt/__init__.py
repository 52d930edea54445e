"""The appliance on a site's MQTT broker: state out, commands in, Home Assistant discovery."""

from mqtt.part import MqttPart
from mqtt.settings import MqttSettings, validate_config

__all__ = ["MqttPart", "MqttSettings", "validate_config"]
