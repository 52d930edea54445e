"""The gadget's configfs tree, its RESTORE/SAVE hooks and the UDC watch on temporary roots.

The real kernel path (configfs, dummy_hcd, nbd, usb-storage) is proven in the lab
(tests/lab/); these check the logic that decides what gets written where, and in which order.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from appliance.control.commands import PartUnavailable
from appliance.usb.gadget import ACM, MS, Gadget, GadgetPart, defaults, inquiry_string
from appliance.usb.udc_watch import UdcWatch
from tests.support import RecordingBus


@pytest.fixture
def roots(tmp_path: Path) -> dict[str, Any]:
    configfs = tmp_path / "config"
    (configfs / "usb_gadget").mkdir(parents=True)
    sysfs = tmp_path / "sys"
    udc = sysfs / "class" / "udc" / "dummy_udc.0"
    udc.mkdir(parents=True)
    (udc / "state").write_text("not attached\n")
    (sysfs / "block" / "nbd0").mkdir(parents=True)
    return {"configfs": str(configfs), "sysfs": str(sysfs)}


def read(path: Path) -> str:
    return path.read_text().strip()


def test_builds_mass_storage_and_acm_gadget(roots: dict[str, Any]) -> None:
    g = Gadget(defaults(**roots, serial="SP42"))
    g.create()
    g.set_file(0, "/dev/nbd0")
    g.bind(g.udc())
    assert read(g.root / "idVendor") == "0x1d6b"
    assert read(g.root / "strings/0x409/serialnumber") == "SP42"
    lun = g.lun(0)
    assert read(lun / "removable") == "1"
    assert read(lun / "file") == "/dev/nbd0"
    assert read(lun / "inquiry_string") == "Savepnt Savepoint disk  0100"
    links = sorted(p.name for p in (g.root / "configs/c.1").iterdir() if p.is_symlink())
    assert links == sorted([MS, ACM])
    assert read(g.root / "UDC") == "dummy_udc.0"
    assert not g.lun(1).exists()


def test_thaw_space_is_a_second_lun(roots: dict[str, Any], tmp_path: Path) -> None:
    thaw = tmp_path / "thaw.img"
    thaw.write_bytes(b"")
    g = Gadget(defaults(**roots, thaw_file=str(thaw), acm=False))
    g.create()
    assert read(g.lun(1) / "file") == str(thaw)
    assert "thaw" in read(g.lun(1) / "inquiry_string")
    assert not (g.root / "functions" / ACM).exists()


def test_leftover_gadget_adopted_only_when_identical(roots: dict[str, Any]) -> None:
    Gadget(defaults(**roots)).create()
    assert Gadget(defaults(**roots)).matches()
    assert not Gadget(defaults(**roots, serial="OTHER")).matches()
    assert not Gadget(defaults(**roots, acm=False)).matches()


def test_remove_ejects_unbinds_and_removes_everything(roots: dict[str, Any]) -> None:
    g = Gadget(defaults(**roots))
    g.create()
    g.set_file(0, "/dev/nbd0")
    g.bind("dummy_udc.0")
    g.remove()
    assert not g.root.exists()
    assert list((Path(roots["configfs"]) / "usb_gadget").iterdir()) == []
    g.remove()  # idempotent


def test_bad_inquiry_strings_are_refused() -> None:
    with pytest.raises(ValueError, match="inquiry_vendor"):
        inquiry_string(defaults(inquiry_vendor="FAR TOO LONG"))
    with pytest.raises(ValueError, match="ASCII"):
        inquiry_string(defaults(inquiry_product="Sävepoint"))


def test_missing_or_unknown_udc_explained(roots: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(PartUnavailable, match="no USB device controller") as e:
        Gadget(defaults(configfs=roots["configfs"], sysfs=str(tmp_path))).udc()
    assert "dwc2" in e.value.hint and "dummy_hcd" in e.value.hint
    with pytest.raises(PartUnavailable, match="fe980000.usb"):
        Gadget(defaults(**roots, udc="fe980000.usb")).udc()


class RecordingNbd:
    """Stands in for /dev/nbdN: records the order of the calls around the store."""

    device = "/dev/nbd0"

    def __init__(self, log: list[str], gadget: Gadget) -> None:
        self.log, self.gadget = log, gadget

    def flush_buffers(self) -> None:
        self.log.append(f"BLKFLSBUF file={self.gadget.file(0)!r}")

    def fsync(self) -> bool:
        self.log.append("fsync")
        return False


def test_restore_order_eject_flush_restore_flush_reinsert(roots: dict[str, Any]) -> None:
    part = GadgetPart(roots, RecordingBus(), "/run/nbd.sock")
    part.gadget.create()
    part.gadget.set_file(0, "/dev/nbd0")
    log: list[str] = []
    part.nbd = RecordingNbd(log, part.gadget)  # type: ignore[assignment]

    async def restore() -> dict[str, Any]:
        log.append(f"RESTORE file={part.gadget.file(0)!r}")
        return {"epoch": 7}

    assert asyncio.run(part.around_restore(restore)) == {"epoch": 7}
    assert log == ["BLKFLSBUF file=''", "RESTORE file=''", "BLKFLSBUF file=''"]
    assert read(part.gadget.lun(0) / "forced_eject") == "1"
    assert part.gadget.file(0) == "/dev/nbd0"  # the medium is back: the host re-reads


def test_failed_restore_still_reinserts_the_medium(roots: dict[str, Any]) -> None:
    part = GadgetPart(roots, RecordingBus(), "/run/nbd.sock")
    part.gadget.create()
    part.nbd = RecordingNbd([], part.gadget)  # type: ignore[assignment]

    async def restore() -> None:
        raise OSError("backing device gone")

    with pytest.raises(OSError):
        asyncio.run(part.around_restore(restore))
    assert part.gadget.file(0) == "/dev/nbd0"


def test_before_save_reports_whether_the_host_had_synced(roots: dict[str, Any]) -> None:
    part = GadgetPart(roots, RecordingBus(), "/run/nbd.sock")
    log: list[str] = []
    part.nbd = RecordingNbd(log, part.gadget)  # type: ignore[assignment]
    assert asyncio.run(part.before_save()) is False
    assert log == ["fsync"]


def test_start_without_configfs_explains(tmp_path: Path) -> None:
    part = GadgetPart({"configfs": str(tmp_path / "none")}, RecordingBus(), "/run/nbd.sock")
    with pytest.raises(PartUnavailable, match="usb_gadget") as e:
        asyncio.run(part.start())
    assert "modprobe libcomposite" in e.value.hint


def test_udc_watch_reports_host_connect_and_disconnect(roots: dict[str, Any]) -> None:
    state = Path(roots["sysfs"]) / "class/udc/dummy_udc.0/state"
    seen: list[tuple[bool, str]] = []

    async def scenario() -> None:
        watch = UdcWatch(
            "dummy_udc.0",
            lambda c, s: seen.append((c, s)),
            sysfs=roots["sysfs"],
            interval=0.05,
            use_udev=False,
        )
        await watch.start()
        for value in ("powered", "configured", "suspended", "not attached"):
            state.write_text(value + "\n")
            await asyncio.sleep(0.3)
        state.parent.joinpath("state").unlink()  # the controller went away
        await asyncio.sleep(0.3)
        await watch.stop()

    asyncio.run(scenario())
    assert seen == [(False, "not attached"), (True, "configured"), (False, "not attached")]
