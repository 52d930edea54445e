"""`savepoint-host save` flushes the host's caches for the Savepoint disk before it sends SAVE.

A SAVE captures what the appliance has; writes still in the host's cache are not in it. So:
- Linux: syncfs() every mounted filesystem on the Savepoint disk, then fsync the disk itself
  (the kernel sends SYNCHRONIZE CACHE, which the appliance records as "host synced");
- macOS: sync(), and F_FULLFSYNC on each volume given with --volume (untested here);
- Windows: FlushFileBuffers on each volume given with --volume (e.g. E:), which needs an
  elevated prompt (untested here).
Each step returns a line for the user; a failed step says what to do and the SAVE goes on.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

MODEL = "Savepoint disk"  # the LUN's INQUIRY product (appliance.usb.gadget defaults)


def flush(port: str, volumes: list[str]) -> list[str]:
    if sys.platform.startswith("linux"):
        return flush_linux(port, volumes)
    if sys.platform == "darwin":
        return flush_macos(volumes)
    if sys.platform == "win32":
        return flush_windows(volumes)
    os.sync()
    return ["flushed all filesystems (sync)"]


# -- Linux ---------------------------------------------------------------------------------
def savepoint_disks(port: str, sysfs: str = "/sys") -> list[str]:
    """Names (sdX) of the Savepoint LUNs on the same USB device as the serial `port`."""
    tty = Path(sysfs, "class/tty", os.path.basename(port), "device")
    usb = tty.resolve().parent if tty.exists() else None  # interface -> its USB device
    found = []
    for block in sorted(Path(sysfs, "block").glob("sd*")):
        try:
            model = (block / "device" / "model").read_text().strip()
        except OSError:
            continue
        if model == MODEL and (usb is None or str(block.resolve()).startswith(f"{usb}/")):
            found.append(block.name)
    return found


def mounts_of(disks: list[str], mounts: str = "/proc/self/mounts") -> list[str]:
    """Mount points of the disks and their partitions (/dev/sdb, /dev/sdb1, ...)."""
    points = []
    for line in Path(mounts).read_text().splitlines():
        dev, point = line.split()[:2]
        name = os.path.basename(dev)
        if dev.startswith("/dev/") and any(name.rstrip("0123456789") == d for d in disks):
            points.append(point.replace("\\040", " "))
    return points


def syncfs(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if ctypes.CDLL(None, use_errno=True).syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), path)
    finally:
        os.close(fd)


def flush_linux(port: str, volumes: list[str]) -> list[str]:
    disks = savepoint_disks(port)
    lines = []
    for point in volumes or mounts_of(disks):
        try:
            syncfs(point)
            lines.append(f"flushed {point}")
        except OSError as e:
            lines.append(f"could not flush {point}: {e}")
    for disk in disks:
        try:
            fd = os.open(f"/dev/{disk}", os.O_RDONLY)
            try:
                os.fsync(fd)  # SYNCHRONIZE CACHE: the appliance records "host synced"
            finally:
                os.close(fd)
            lines.append(f"flushed /dev/{disk}")
        except OSError as e:
            lines.append(
                f"could not flush /dev/{disk} ({e.strerror}): run as root or as a "
                "member of the disk group for a SAVE recorded as synced"
            )
    if not disks and not volumes:
        os.sync()
        lines.append("no Savepoint disk found on this USB device: flushed all filesystems")
    return lines


# -- macOS and Windows (not testable on the development machines) --------------------------
def flush_macos(volumes: list[str]) -> list[str]:
    os.sync()
    lines = ["flushed all filesystems (sync)"]
    import fcntl

    for vol in volumes:
        try:
            fd = os.open(vol, os.O_RDONLY)
            try:
                fcntl.fcntl(fd, fcntl.F_FULLFSYNC)  # type: ignore[attr-defined]
            finally:
                os.close(fd)
            lines.append(f"flushed {vol} to the disk (F_FULLFSYNC)")
        except OSError as e:
            lines.append(f"could not flush {vol}: {e}")
    return lines


def flush_windows(volumes: list[str]) -> list[str]:
    if not volumes:
        return [
            "give the Savepoint drive with --volume E: to flush it first "
            "(or use Safely Remove Hardware)"
        ]
    k32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    lines = []
    for vol in volumes:
        letter = vol.rstrip(":\\")
        path = f"\\\\.\\{letter}:"
        handle = k32.CreateFileW(path, 0x40000000, 3, None, 3, 0, None)  # GENERIC_WRITE
        if handle in (-1, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF):
            err = k32.GetLastError()
            hint = ": run from an elevated prompt (Run as administrator)" if err == 5 else ""
            lines.append(f"could not open {vol} (error {err}){hint}")
            continue
        ok = k32.FlushFileBuffers(handle)
        k32.CloseHandle(handle)
        lines.append(
            f"flushed {vol}" if ok else f"could not flush {vol} (error {k32.GetLastError()})"
        )
    return lines
