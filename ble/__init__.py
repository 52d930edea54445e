"""The handheld fob: a BLE GATT service on BlueZ, its protocol and crypto, the fob client."""

from ble.part import CONFIG_SCHEMA, BlePart

__all__ = ["BlePart", "CONFIG_SCHEMA"]
