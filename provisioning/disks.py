"""Candidate disks for the store, and the safety checks before one is used.

`python3 -m provisioning.disks` lists whole disks (model, size, /dev/disk/by-id path) with
pyudev. `refusal(path)` says why a disk or file must not be used: it is mounted or in use
(never overridable), or it holds a filesystem or partition table (overridable with --force).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

_SKIP = ("loop", "ram", "zram", "nbd", "dm-", "md", "sr", "mtdblock")


@dataclass
class Disk:
    node: str  # /dev/sda
    by_id: str  # /dev/disk/by-id/usb-... ('' when udev gives none)
    model: str
    size: int  # bytes
    note: str  # why it is unsuitable ('' when it is a candidate)


def human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError


def by_id_link(node: str, links: list[str]) -> str:
    """The most stable /dev/disk/by-id name of a device (wwn- last: it hides the model)."""
    ids = sorted(
        (link for link in links if link.startswith("/dev/disk/by-id/")),
        key=lambda link: ("/wwn-" in link, len(link)),
    )
    return ids[0] if ids else ""


def candidates() -> list[Disk]:
    """Whole disks udev knows, with a note on those that must not be used."""
    import pyudev  # the project's dependency; imported late so --help works without it

    disks = []
    for dev in pyudev.Context().list_devices(subsystem="block", DEVTYPE="disk"):
        name = dev.sys_name
        if name.startswith(_SKIP) or not dev.device_node:
            continue
        size = int(_sysfs(f"/sys/class/block/{name}/size") or 0) * 512
        if size == 0:
            continue
        model = (
            dev.properties.get("ID_MODEL")
            or dev.properties.get("ID_NAME")
            or _sysfs(f"/sys/class/block/{name}/device/model")
            or name
        ).replace("_", " ")
        links = list(dev.device_links)
        disks.append(
            Disk(
                dev.device_node,
                by_id_link(dev.device_node, links),
                model.strip(),
                size,
                refusal(dev.device_node, force=False) or "",
            )
        )
    return disks


def _sysfs(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def stable_path(path: str) -> str:
    """/dev/sda -> /dev/disk/by-id/usb-...: names that survive re-plugging go in the config."""
    if not path.startswith("/dev/") or path.startswith("/dev/disk/by-id/"):
        return path
    real = os.path.realpath(path)
    base = Path("/dev/disk/by-id")
    links = [str(p) for p in base.iterdir()] if base.is_dir() else []
    links = [link for link in links if os.path.realpath(link) == real]
    return by_id_link(real, links) or path


def _devnums(node: str) -> set[int]:
    """st_rdev of a block device and of all its partitions."""
    rdev = os.stat(node).st_rdev
    nums = {rdev}
    sysdir = Path(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}")
    for child in sysdir.glob("*/partition"):
        major, minor = (child.parent / "dev").read_text().strip().split(":")
        nums.add(os.makedev(int(major), int(minor)))
    return nums


def _in_use(node: str) -> str:
    """Why a block device is busy: mounted, swap, or held by LVM/RAID/crypt."""
    nums = _devnums(node)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        major, minor = fields[2].split(":")
        if os.makedev(int(major), int(minor)) in nums:
            return f"it (or a partition on it) is mounted on {fields[4]}"
    for line in Path("/proc/swaps").read_text().splitlines()[1:]:
        swap = line.split()[0]
        if os.path.exists(swap) and os.stat(swap).st_rdev in nums:
            return f"it is in use as swap ({swap})"
    for num in nums:
        holders = Path(f"/sys/dev/block/{os.major(num)}:{os.minor(num)}/holders")
        if holders.is_dir() and any(holders.iterdir()):
            return "it is held by " + ", ".join(p.name for p in holders.iterdir())
    return ""


def signatures(path: str) -> list[str]:
    """Filesystem, RAID or partition-table signatures blkid finds (files and devices alike)."""
    res = subprocess.run(
        ["blkid", "-p", "-o", "export", path], capture_output=True, text=True, check=False
    )
    if res.returncode == 2:  # nothing found
        return []
    if res.returncode != 0:
        raise OSError(f"blkid could not read {path}: {res.stderr.strip() or res.returncode}")
    found = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
    return [f"{key.lower()} {found[key]}" for key in ("TYPE", "PTTYPE") if key in found]


def refusal(path: str, force: bool) -> str | None:
    """Why `path` must not become the store, or None. `force` overrides old signatures only."""
    if not os.path.exists(path):
        if path.startswith("/dev/"):
            return f"{path} does not exist (list the disks with: python3 -m provisioning.disks)"
        return None  # a new file: savepoint init creates it
    mode = os.stat(path).st_mode
    if stat.S_ISBLK(mode):
        busy = _in_use(path)
        if busy:
            return f"refusing {path}: {busy}. Unmount it first; --force does not override this."
    elif not stat.S_ISREG(mode):
        return f"refusing {path}: it is neither a block device nor a regular file"
    found = signatures(path)
    if found and not force:
        return (
            f"refusing {path}: it holds {', '.join(found)}. Everything on it would be "
            "lost; if that is what you want, add --force."
        )
    return None


def main() -> int:
    try:
        disks = candidates()
    except ImportError:
        print("Listing disks needs pyudev: sudo apt-get install python3-pyudev", file=sys.stderr)
        return 2
    if not disks:
        print(
            "No disks found. Plug in a USB SSD or stick, or use a store file on the SD card "
            "(install.sh without --device)."
        )
        return 1
    print(f"{'DEVICE':<10} {'SIZE':>10}  {'MODEL':<24} BY-ID PATH (use it with --device)")
    for d in disks:
        print(f"{d.node:<10} {human(d.size):>10}  {d.model[:24]:<24} {d.by_id or '-'}")
        if d.note:
            print(f"{'':<10} {'':>10}  ^ {d.note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
