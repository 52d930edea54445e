"""Debian's bluez (bluetoothd, btmon, BlueZ's D-Bus policy) for the lab VM, fetched once.

`apt-get install bluez` would pull systemd/udev upgrades onto the host, so the package is
downloaded and unpacked with `dpkg -x` into `.lab-cache/bluez/<version>/`, like the kernel.
The VM sees the host root, so the unpacked binaries run there with the host's libraries:
`ldd` checks they resolve before the VM boots (.ci/apt-packages.txt lists them).
"""

from __future__ import annotations

import fcntl
import glob
import subprocess
from pathlib import Path

from tests.lab.kernel import LabSetupError, _run

PACKAGE = "bluez"
BLUETOOTHD = "usr/libexec/bluetooth/bluetoothd"
POLICY = "etc/dbus-1/system.d/bluetooth.conf"
BTMON = "usr/bin/btmon"


def fetch_bluez(cache: Path) -> Path:
    """The unpacked bluez package's root, downloading it on first use (host side)."""
    cache = cache.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "bluez.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        downloads = cache / "debs"
        downloads.mkdir(exist_ok=True)
        try:
            _run(["apt-get", "download", PACKAGE], downloads)
        except LabSetupError:
            if (root := cached_bluez(cache)) is not None:
                return root  # offline: the last unpacked one will do
            raise
        deb = max(downloads.glob(f"{PACKAGE}_*.deb"), key=lambda p: p.stat().st_mtime)
        version = _run(["dpkg-deb", "-f", str(deb), "Version"], downloads).strip()
        root = cache / "bluez" / version.replace(":", "_")
        if not (root / ".ready").exists():
            root.mkdir(parents=True, exist_ok=True)
            _run(["dpkg", "-x", str(deb), str(root)], downloads)
            (root / ".ready").write_text(version + "\n")
        deb.unlink()
    check_libraries(root)
    return root


def cached_bluez(cache: Path) -> Path | None:
    """The newest unpacked bluez (inside the VM, where nothing can be downloaded)."""
    ready = sorted(glob.glob(str(cache / "bluez" / "*" / ".ready")))
    return Path(ready[-1]).parent if ready else None


def check_libraries(root: Path) -> None:
    done = subprocess.run(["ldd", str(root / BLUETOOTHD)], capture_output=True, text=True)
    missing = [line.split()[0] for line in done.stdout.splitlines() if "not found" in line]
    if done.returncode != 0 or missing:
        raise LabSetupError(
            f"bluetoothd from {root} cannot run on this host (missing: {missing or done.stderr}):"
            " apt-get install libasound2 libdw1 libglib2.0-0 libdbus-1-3"
        )
