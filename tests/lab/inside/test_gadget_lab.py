"""The gadget on the real kernel: the appliance shows up as a USB disk on the host side."""

from __future__ import annotations

from pathlib import Path

from appliance.usb.udc_watch import read_state
from tests.lab.inside.appliance_vm import Appliance, read_direct, write_direct


def test_gadget_appears_as_usb_disk(appliance: Appliance) -> None:
    dev = appliance.start()
    name = Path(dev).name
    assert (Path("/sys/block") / name / "device" / "vendor").read_text().strip() == "Savepnt"
    assert (Path("/sys/block") / name / "removable").read_text().strip() == "1"
    assert int((Path("/sys/block") / name / "size").read_text()) * 512 == 32 << 20
    assert read_state("/sys", "dummy_udc.0") == "configured"
    assert appliance.status()["host_connected"] is True
    write_direct(dev, 4096, b"\xa5" * 4096)
    assert read_direct(dev, 4096, 4096) == b"\xa5" * 4096
    assert appliance.status()["dirty_units"] >= 1
    assert Path("/dev/ttyACM0").exists(), "the CDC-ACM function did not reach the host side"
