"""Both sides of the lab VM for the scenarios: the appliance daemon (the Pi side) and the
host computer's view of the disk through usb-storage (/dev/sdX)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from appliance.control.client import ControlClient, ControlError
from appliance.usb.gadget import Gadget, defaults
from appliance.usb.nbd_device import NbdDevice

RESULTS = Path(os.environ.get("SAVEPOINT_LAB_RESULTS", "/lab-results"))
MIB = 1 << 20
MODELS = {"disk": "Savepoint disk", "thaw": "Savepoint thaw"}


def log_name() -> str:
    test = os.environ.get("PYTEST_CURRENT_TEST", "manual").split(" ")[0]
    return test.split("::")[-1].replace("[", "-").replace("]", "").replace("/", "_")


class Appliance:
    """A `savepoint daemon` process with the gadget (and serial part) on dummy_hcd."""

    def __init__(self, tmp: Path, size: str = "32M") -> None:
        self.tmp = tmp
        self.size = size
        self.store = tmp / "store.img"
        self.control = str(tmp / "control.sock")
        self.nbd_socket = str(tmp / "nbd.sock")
        self.config = tmp / "config.toml"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def write_config(
        self,
        lock: bool = True,
        serial: bool = True,
        thaw: str = "",
        thaw_size: str = "",
        extra: str = "",
    ) -> None:
        thaw_lines = f'thaw_file = "{thaw}"\nthaw_size = "{thaw_size}"\n' if thaw else ""
        self.config.write_text(f"""
[store]
path = "{self.store}"
create = true
size = "{self.size}"
[nbd]
socket = "{self.nbd_socket}"
[control]
socket = "{self.control}"
[lock]
enabled = {str(lock).lower()}
relock_after = 0
[log]
level = "debug"
[gadget]
enabled = true
poll_interval = 0.5
{thaw_lines}[serial]
enabled = {str(serial).lower()}
{extra}""")

    # -- the daemon ----------------------------------------------------------------
    def log_path(self) -> Path:
        """The daemon log of this test's latest start (stdout and stderr)."""
        return RESULTS / f"daemon-{log_name()}-{self.starts}.log"

    def log(self) -> str:
        return self.log_path().read_text(errors="replace")

    def start(self, timeout: float = 60.0, **config: Any) -> str:
        """Start the daemon; return the host's /dev/sdX once the disk is there."""
        if config or not self.config.exists():
            self.write_config(**config)
        self.starts += 1
        log = open(self.log_path(), "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli", "daemon", "--config", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}; see {log.name}")
            with contextlib.suppress(ControlError, OSError, json.JSONDecodeError):
                parts = self.request("status")["data"].get("parts", {})
                gadget = parts.get("gadget", {})
                if gadget.get("state") == "up" and self.status()["host_connected"]:
                    break  # the UDC watch saw the host configure the gadget
                if gadget.get("state") == "failed":
                    raise AssertionError(f"gadget failed: {gadget}")
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon not ready in {timeout:g} s; see {log.name}")
            time.sleep(0.2)
        return host_disk("disk", timeout=max(5.0, deadline - time.monotonic()))

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=60)
        self.proc = None

    def close(self) -> None:
        self.kill(signal.SIGTERM)
        # Whatever a killed daemon left behind must not leak into the next scenario:
        # disconnect first (fails I/O stuck on a dead socket), then the gadget can go.
        NbdDevice("/dev/nbd0", self.nbd_socket).detach()
        Gadget(defaults()).remove()

    def request(self, cmd: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        with ControlClient(self.control, timeout=120) as client:
            return client.request(cmd, args)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """The `savepoint` command line, as a user runs it."""
        done = subprocess.run(
            [sys.executable, "-m", "appliance.cli", *args, "--control", self.control],
            capture_output=True,
            text=True,
            timeout=180,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"savepoint {' '.join(args)} failed: {done.stderr}")
        return done

    def status(self) -> dict[str, Any]:
        return self.request("status")["data"]


# -- the host computer's side ------------------------------------------------------
def host_disk(kind: str = "disk", timeout: float = 30.0) -> str:
    """/dev/sdX of the appliance's LUN ("disk" or "thaw"), once it has a medium."""
    deadline = time.monotonic() + timeout
    while True:
        for block in sorted(Path("/sys/block").glob("sd*")):
            try:
                model = (block / "device" / "model").read_text().strip()
                size = int((block / "size").read_text())
            except (OSError, ValueError):
                continue
            if model == MODELS[kind] and size > 0 and Path(f"/dev/{block.name}").exists():
                return f"/dev/{block.name}"
        if time.monotonic() > deadline:
            raise AssertionError(f"no {kind} LUN appeared on the host side in {timeout:g} s")
        time.sleep(0.2)


def sh(cmd: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{cmd!r} failed ({done.returncode}): {done.stderr}{done.stdout}")
    return done


def read_direct(dev: str, offset: int = 0, length: int | None = None) -> bytes:
    """Read the device bypassing the host's page cache (what the USB disk really holds)."""
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        length = size - offset if length is None else length
        buf = mmap.mmap(-1, length)  # page-aligned, as O_DIRECT wants
        done = 0
        while done < length:
            n = os.preadv(fd, [memoryview(buf)[done : done + 4 * MIB]], offset + done)
            if n <= 0:
                raise AssertionError(f"short read from {dev} at {offset + done}")
            done += n
        return bytes(buf)
    finally:
        os.close(fd)


def write_direct(dev: str | int, offset: int, data: bytes) -> None:
    """Write through to the USB disk: WRITE commands, but no SYNCHRONIZE CACHE.

    Closing the host's last descriptor makes sd send ALLOW MEDIUM REMOVAL, and
    f_mass_storage fsyncs its file on that: pass an open descriptor (open_direct) to
    keep the writes unsynced.
    """
    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    fd = dev if isinstance(dev, int) else open_direct(dev)
    try:
        assert os.pwritev(fd, [memoryview(buf)], offset) == len(data)
    finally:
        if not isinstance(dev, int):
            os.close(fd)


def open_direct(dev: str) -> int:
    return os.open(dev, os.O_RDWR | os.O_DIRECT)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tree_digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): digest(p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def mount(dev: str, where: Path) -> None:
    where.mkdir(parents=True, exist_ok=True)
    sh(f"mount -t vfat -o noatime {dev} {where}")


def umount(where: Path, check: bool = True) -> None:
    sh(f"umount {where}", check=check)


def kernel_log(lines: int = 40) -> str:
    return sh(f"dmesg | tail -n {lines}", check=False).stdout


def mkfs_vfat(dev: str) -> None:
    sh(f"mkfs.vfat -n SAVEPOINT {dev}")
