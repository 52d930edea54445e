"""Home Assistant MQTT discovery: one device per appliance, its sensors and buttons.

Each entity is a retained config message on `<prefix>/<component>/savepoint_<node>/<key>/config`
that reads the retained status topic through a value template; the buttons publish ordinary
requests to the appliance's command topic, so they meet the same policy as any admin
(Save only while a person has unlocked). An empty retained message on the same topics removes
the entities again.
"""

from __future__ import annotations

from typing import Any

from mqtt.messages import Topics

VERSION = "0.1.0"

# key -> (component, name, extra config)
ENTITIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mode": ("sensor", "Mode", {"value_template": "{{ value_json.mode }}", "icon": "mdi:lock"}),
    "unsaved": (
        "sensor",
        "Unsaved data",
        {
            "value_template": "{{ value_json.unsaved_bytes }}",
            "unit_of_measurement": "B",
            "device_class": "data_size",
            "state_class": "measurement",
        },
    ),
    "last_save": (
        "sensor",
        "Last save",
        {"value_template": "{{ value_json.last_save }}", "device_class": "timestamp"},
    ),
    "host": (
        "binary_sensor",
        "Host connected",
        {
            "value_template": "{{ 'ON' if value_json.host_connected else 'OFF' }}",
            "device_class": "connectivity",
        },
    ),
    "fault": (
        "binary_sensor",
        "Fault",
        {
            "value_template": "{{ 'ON' if value_json.faults else 'OFF' }}",
            "device_class": "problem",
            "entity_category": "diagnostic",
        },
    ),
    "save": ("button", "Save", {"action": "save", "icon": "mdi:content-save"}),
    "restore": ("button", "Restore", {"action": "restore", "icon": "mdi:backup-restore"}),
    "lock": ("button", "Lock", {"action": "lock", "icon": "mdi:lock-outline"}),
}


def device(node: str, name: str) -> dict[str, Any]:
    return {
        "identifiers": [f"savepoint_{node}"],
        "name": name or node,
        "manufacturer": "Savepoint",
        "model": "Savepoint appliance",
        "sw_version": VERSION,
    }


def config_topic(discovery_prefix: str, node: str, key: str) -> str:
    return f"{discovery_prefix}/{ENTITIES[key][0]}/savepoint_{node}/{key}/config"


def configs(topics: Topics, name: str, discovery_prefix: str) -> dict[str, dict[str, Any]]:
    """topic -> config payload for every entity of this appliance."""
    node = topics.node
    out: dict[str, dict[str, Any]] = {}
    for key, (component, label, extra) in ENTITIES.items():
        cfg: dict[str, Any] = {
            "name": label,
            "unique_id": f"savepoint_{node}_{key}",
            "device": device(node, name),
            "availability_topic": topics.availability,
            "payload_available": "online",
            "payload_not_available": "offline",
            "origin": {"name": "savepoint", "sw_version": VERSION},
        }
        extra = dict(extra)
        if component == "button":
            action = extra.pop("action")
            cfg["command_topic"] = topics.command
            cfg["payload_press"] = f'{{"id": "homeassistant-{action}", "action": "{action}"}}'
        else:
            cfg["state_topic"] = topics.status
        cfg.update(extra)
        out[config_topic(discovery_prefix, node, key)] = cfg
    return out
