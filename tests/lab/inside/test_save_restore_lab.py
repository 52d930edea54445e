"""Scenarios 1-3: SAVE and RESTORE as the host computer sees them through usb-storage."""

from __future__ import annotations

import os
from pathlib import Path

from tests.lab.inside.appliance_vm import (
    MIB,
    Appliance,
    digest,
    kernel_log,
    mkfs_vfat,
    mount,
    open_direct,
    read_direct,
    sh,
    tree_digests,
    umount,
    write_direct,
)


def write_files(root: Path, files: dict[str, int], seed: str) -> None:
    for name, size in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size) if size else seed.encode())


def test_vfat_save_change_restore(appliance: Appliance, tmp_path: Path) -> None:
    """1: mkfs, copy, SAVE (CLI), change and delete, RESTORE: exactly the saved files."""
    dev = appliance.start()
    mnt = tmp_path / "host"
    mkfs_vfat(dev)
    mount(dev, mnt)
    write_files(mnt, {"a.bin": 300_000, "docs/b.txt": 5000, "docs/c.bin": 1 * MIB}, "x")
    saved = tree_digests(mnt)
    umount(mnt)
    appliance.cli("unlock")
    assert "refused" not in appliance.cli("save").stdout.lower()

    mount(dev, mnt)
    (mnt / "a.bin").write_bytes(b"changed" * 1000)
    (mnt / "docs" / "b.txt").unlink()
    write_files(mnt, {"new.bin": 200_000}, "y")
    assert tree_digests(mnt) != saved
    umount(mnt)

    appliance.cli("restore", "--yes")
    mount(dev, mnt)  # opening the disk sees the medium change and re-reads everything
    try:
        assert tree_digests(mnt) == saved, kernel_log()
    finally:
        umount(mnt)
    history = appliance.request("history")["data"]["history"]
    assert [r["action"] for r in history[-2:]] == ["save", "restore"]
    assert history[-2]["source"] == "cli"


def test_unsynced_host_writes_are_saved(appliance: Appliance) -> None:
    """2: writes the host sent without SYNCHRONIZE CACHE sit in the Pi's page cache of
    /dev/nbdN; SAVE right after them must still include them."""
    dev = appliance.start(lock=False)
    first = os.urandom(2 * MIB)
    fd = open_direct(dev)  # held open: closing it would make the gadget fsync
    try:
        write_direct(fd, 3 * MIB, first)  # WRITE commands, no cache flush
        save = appliance.request("save")
        assert save["ok"], save
        assert save["data"]["host_synced"] is False  # the sync before SAVE had work to do
        write_direct(fd, 3 * MIB, os.urandom(2 * MIB))
    finally:
        os.close(fd)
    assert appliance.request("restore")["ok"]
    assert read_direct(dev, 3 * MIB, 2 * MIB) == first
    sh("sync")
    again = appliance.request("save")
    assert again["ok"] and again["data"]["host_synced"] is True


def test_restore_while_mounted_no_stale_data(appliance: Appliance, tmp_path: Path) -> None:
    """3: RESTORE while the host has the file system mounted and cached; after it, neither
    the host's cache nor the Pi's page cache of /dev/nbdN serves the discarded data."""
    dev = appliance.start(lock=False)
    mnt = tmp_path / "host"
    mkfs_vfat(dev)
    mount(dev, mnt)
    write_files(mnt, {"keep.bin": 500_000, "dir/f.txt": 3000}, "k")
    saved = tree_digests(mnt)
    sh(f"sync -f {mnt}/keep.bin")
    assert appliance.request("save")["ok"]
    image = digest(read_direct(dev))

    (mnt / "keep.bin").write_bytes(os.urandom(500_000))  # same size, new content
    write_files(mnt, {"later.bin": 400_000}, "l")
    sh(f"sync -f {mnt}/keep.bin")
    changed = tree_digests(mnt)  # now in the host's page cache and the Pi's
    assert changed != saved

    assert appliance.request("restore")["ok"]
    assert digest(read_direct(dev)) == image, "the USB disk does not show the saved image"
    buffered = sh(f"dd if={dev} bs=1M status=none | sha256sum").stdout.split()[0]
    assert buffered == image, "the host's page cache served data from before RESTORE"
    umount(mnt, check=False)  # the old mount may complain: its medium changed under it
    mount(dev, mnt)
    try:
        assert tree_digests(mnt) == saved, kernel_log()
    finally:
        umount(mnt)
