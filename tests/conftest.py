"""Fixtures shared across test files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from gpiozero import Device
from gpiozero.pins.mock import MockFactory, MockPWMPin

from appliance.store import Store, create_store


@pytest.fixture
def factory() -> Iterator[MockFactory]:
    """gpiozero mock pins (PWM-capable, for the LED) for the gpio tests."""
    Device.pin_factory = MockFactory(pin_class=MockPWMPin)
    try:
        yield Device.pin_factory
    finally:
        Device.pin_factory.reset()
        Device.pin_factory = None


@pytest.fixture
def private_bus() -> Iterator[str]:
    """The address of a dbus-daemon of the test's own, for the fake bluetoothd to own org.bluez."""
    from tests.fake_bluez import PrivateBus  # the D-Bus tests' helper: not for every test

    bus = PrivateBus()
    try:
        yield bus.address
    finally:
        bus.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A fresh 1 MiB store of 4 KiB units in tmp_path (files needing another size override it)."""
    path = str(tmp_path / "disk.img")
    create_store(path, 1 << 20, 4096)
    st = Store.open(path)
    try:
        yield st
    finally:
        st.close()
