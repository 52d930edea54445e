"""The kernel NBD device (/dev/nbdN) attached to the daemon's NBD Unix socket.

Debian's nbd-client configures the device through netlink (its default since 3.17) and exits;
the kernel keeps the socket. The ioctl mode (`-nonetlink`) is never used: it keeps the device
open, and then ejecting the LUN does not drop the device's page cache.

A netlink device keeps its configuration until it is disconnected, even when the server died,
so a restarted daemon first detaches what its predecessor left, then attaches again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from appliance.control.commands import PartUnavailable


class NbdDeviceError(RuntimeError):
    """nbd-client failed; the message carries its output."""


class NbdDevice:
    def __init__(
        self,
        device: str,
        socket_path: str,
        export_name: str = "savepoint",
        sysfs: str = "/sys",
        client: str = "nbd-client",
        block_size: int = 512,
    ) -> None:
        self.device = device
        self.socket_path = socket_path
        self.export_name = export_name
        self.sysfs = Path(sysfs)
        self.client = client
        self.block_size = block_size

    @property
    def name(self) -> str:
        return os.path.basename(self.device)

    def _block(self) -> Path:
        return self.sysfs / "block" / self.name

    def check(self) -> None:
        """PartUnavailable unless the device and nbd-client exist."""
        if not self._block().exists():
            raise PartUnavailable(
                f"{self.device} does not exist", "load the kernel NBD module: modprobe nbd"
            )
        if shutil.which(self.client) is None:
            raise PartUnavailable(f"{self.client} not found", "apt-get install nbd-client")

    def connected(self) -> bool:
        """The kernel shows a `pid` attribute only while a connection is configured."""
        return (self._block() / "pid").exists()

    def size(self) -> int:
        try:
            return int((self._block() / "size").read_text()) * 512
        except (OSError, ValueError):
            return 0

    def attach(self, timeout: float = 15.0) -> None:
        """Connect the device to the socket (detaching a stale connection first).

        The kernel frees a disconnected device's state only once its last opener closed
        it (the LUN, a dying sync), so a busy device is retried until `timeout`.
        """
        self.check()
        if self.connected():
            self.detach()
        cmd = [
            self.client,
            "-unix",
            self.socket_path,
            self.device,
            "-N",
            self.export_name,
            "-b",
            str(self.block_size),
        ]
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._run(cmd, timeout)
                break
            except NbdDeviceError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        while self.size() == 0:  # the size shows up once the kernel took the socket
            if time.monotonic() > deadline:
                raise NbdDeviceError(f"{self.device} has no size after connecting")
            time.sleep(0.05)

    def detach(self, timeout: float = 10.0) -> None:
        if not self._block().exists() or not self.connected():
            return
        # The kernel fails the I/O in flight at once; the device's state itself goes only
        # when its last opener closes it, so there is nothing to wait for here.
        self._run([self.client, "-d", self.device], timeout)

    def _run(self, cmd: list[str], timeout: float) -> None:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise NbdDeviceError(f"{' '.join(cmd)} did not finish in {timeout:g} s") from e
        if done.returncode != 0:
            out = (done.stderr + done.stdout).strip()
            raise NbdDeviceError(f"{' '.join(cmd)} failed ({done.returncode}): {out}")

    def fsync(self) -> bool:
        """Write the device's dirty pages to the store. True if there were none (host synced).

        Runs in a child process (coreutils `sync FILE` = fsync): the daemon serves this very
        device, and a daemon killed while its own thread waits in fsync could never exit,
        so its NBD socket would never close and that I/O would wait forever.
        """
        before = self.sectors_written()
        self._run(["sync", self.device], timeout=600)
        return self.sectors_written() == before

    def flush_buffers(self) -> None:
        """BLKFLSBUF: write back dirty pages, then drop the device's page cache.

        In a child process (util-linux blockdev) for the same reason as fsync.
        """
        self._run(["blockdev", "--flushbufs", self.device], timeout=600)

    def sectors_written(self) -> int:
        """Sectors the device wrote (field 7 of /sys/block/nbdN/stat).

        Not the write request count: an empty flush counts as a write request there.
        """
        try:
            return int((self._block() / "stat").read_text().split()[6])
        except (OSError, ValueError, IndexError):
            return 0
