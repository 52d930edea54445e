"""`savepoint-host save` flushes the Savepoint volume's caches, then sends SAVE and waits."""

from __future__ import annotations

import os
from pathlib import Path

from appliance.usb import host_client, host_flush


def fake_sysfs(root: Path) -> None:
    """ttyACM0 and sdb on one USB device (1-1), sdc on another (a second appliance), sda an
    unrelated disk."""
    usb = root / "devices/usb1/1-1"
    for name, parent, model in (
        ("sdb", usb, "Savepoint disk"),
        ("sdc", root / "devices/usb1/1-2", "Savepoint disk"),
        ("sda", root / "devices/pci0/ata1", "Some SSD"),
    ):
        dev = parent / "1-1:1.0/host0/target0:0:0/0:0:0:0"
        (dev / "block" / name).mkdir(parents=True)
        (dev / "model").write_text(model + "\n")
        (dev / "block" / name / "device").symlink_to(dev)
        (root / "block").mkdir(exist_ok=True)
        (root / "block" / name).symlink_to(dev / "block" / name)
    (usb / "1-1:1.2/tty/ttyACM0").mkdir(parents=True)
    (root / "class/tty").mkdir(parents=True)
    (root / "class/tty/ttyACM0").symlink_to(usb / "1-1:1.2/tty/ttyACM0")
    (usb / "1-1:1.2/tty/ttyACM0/device").symlink_to(usb / "1-1:1.2")


def test_finds_the_savepoint_disk_of_this_appliance_and_its_mounts(tmp_path) -> None:
    fake_sysfs(tmp_path)
    assert host_flush.savepoint_disks("/dev/ttyACM0", str(tmp_path)) == ["sdb"]
    assert host_flush.savepoint_disks("/dev/ttyUSB9", str(tmp_path)) == ["sdb", "sdc"]
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/sda1 / ext4 rw 0 0\n/dev/sdb1 /media/u/SAVE\\040POINT vfat rw 0 0\n"
        "/dev/sdb /mnt/raw ext4 rw 0 0\n/dev/sdc1 /media/other vfat rw 0 0\n"
    )
    assert host_flush.mounts_of(["sdb"], str(mounts)) == ["/media/u/SAVE POINT", "/mnt/raw"]


def test_syncfs_of_a_real_directory(tmp_path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    host_flush.syncfs(str(tmp_path))  # raises on failure
    lines = host_flush.flush_linux("/dev/none", [str(tmp_path)])
    assert f"flushed {tmp_path}" in lines


def test_save_flushes_before_it_asks_and_waits_long_enough(monkeypatch, capsys) -> None:
    calls: list[object] = []
    monkeypatch.setattr(
        host_flush,
        "flush",
        lambda port, vols: calls.append(("flush", vols)) or ["flushed /media/x"],
    )
    monkeypatch.setattr(
        host_client,
        "request",
        lambda port, cmd, args, timeout: (
            calls.append((cmd, args, timeout)) or {"ok": True, "data": {"epoch": 3}}
        ),
    )
    assert host_client.main(["save", "--port", os.devnull, "--volume", "/media/x", "--now"]) == 0
    assert calls == [("flush", ["/media/x"]), ("save", {"now": True}, 660.0)]
    assert "flushed /media/x" in capsys.readouterr().err
    calls.clear()
    assert host_client.main(["status", "--port", os.devnull]) == 0
    assert calls == [("status", {}, 120.0)]  # only SAVE flushes


def test_windows_without_a_volume_says_what_to_do() -> None:
    assert "--volume" in host_flush.flush_windows([])[0]
