"""The handheld fob: a BLE GATT service on BlueZ, its protocol and crypto, the fob client."""

from typing import Any

__all__ = ["BlePart", "BleSettings", "validate_config"]


def __getattr__(name: str) -> Any:
    """BlePart and BleSettings load ble.part (cryptography, the GATT objects) on first use,
    so `savepoint-fob` and the lab's controller processes start without the appliance side."""
    if name in __all__:
        from ble import part

        return getattr(part, name)
    raise AttributeError(f"module 'ble' has no attribute {name!r}")
