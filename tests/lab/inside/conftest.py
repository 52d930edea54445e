"""Fixtures for the scenarios that run inside the lab VM (see tests/lab/appliance_vm.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.inside.appliance_vm import Appliance


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.lab)


@pytest.fixture(scope="session", autouse=True)
def _in_the_vm() -> None:
    assert os.environ.get("SAVEPOINT_LAB_GUEST"), "these scenarios run only inside the lab VM"
    assert any(Path("/sys/class/udc").glob("*")), "no UDC: dummy_hcd is not loaded"


@pytest.fixture
def appliance(tmp_path: Path) -> Iterator[Appliance]:
    app = Appliance(tmp_path)
    try:
        yield app
    finally:
        app.close()
