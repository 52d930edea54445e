"""Is a host computer connected? Watch the USB device controller's `state` attribute.

The UDC state (not attached, powered, default, addressed, configured, suspended) changes
without a uevent: the kernel only calls sysfs_notify() on it. So a thread polls the attribute
for POLLPRI, re-reading it every `interval` seconds as a fallback, and pyudev reports UDCs,
block devices and ttys appearing and going away. The callback runs on the asyncio loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("savepoint.udc")

# The host enumerated the gadget and chose its configuration. "suspended" is a sleeping host
# that is still plugged in: not a disconnect (on_host_disconnect must not RESTORE for it).
CONNECTED_STATES = ("configured", "suspended")
SUBSYSTEMS = ("udc", "block", "tty")

HostCallback = Callable[[bool, str], None]  # (connected, raw state)
DeviceCallback = Callable[[str, str, str], None]  # (action, subsystem, sys_name)


def read_state(sysfs: str | Path, udc: str) -> str:
    """The UDC's state string; "gone" when the controller is not there."""
    try:
        return (Path(sysfs) / "class" / "udc" / udc / "state").read_text().strip()
    except OSError:
        return "gone"


class UdcWatch:
    def __init__(
        self,
        udc: str,
        on_host: HostCallback,
        sysfs: str = "/sys",
        interval: float = 2.0,
        on_device: DeviceCallback | None = None,
        use_udev: bool = True,
    ) -> None:
        self.udc = udc
        self.on_host = on_host
        self.on_device = on_device
        self.sysfs = Path(sysfs)
        self.interval = interval
        self.use_udev = use_udev
        self.state = ""
        self.connected: bool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = -1, -1

    @property
    def state_path(self) -> Path:
        return self.sysfs / "class" / "udc" / self.udc / "state"

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake_r, self._wake_w = os.pipe()
        self._check()  # publish the state we start in
        self._thread = threading.Thread(target=self._run, name="udc-watch", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        if self._thread is None:
            return
        os.write(self._wake_w, b"x")
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    # -- the thread ---------------------------------------------------------------
    def _run(self) -> None:
        monitor = self._udev_monitor()
        state_fd: int | None = None
        try:
            while True:
                if state_fd is None:
                    state_fd = _open(self.state_path)
                poller = select.poll()
                poller.register(self._wake_r, select.POLLIN)
                if state_fd is not None:
                    os.pread(state_fd, 64, 0)  # sysfs_notify fires only after a read
                    poller.register(state_fd, select.POLLPRI | select.POLLERR)
                if monitor is not None:
                    poller.register(monitor.fileno(), select.POLLIN)
                ready = dict(poller.poll(self.interval * 1000))
                if self._wake_r in ready:
                    return
                if monitor is not None and monitor.fileno() in ready:
                    if self._drain(monitor) and state_fd is not None:
                        os.close(state_fd)  # the UDC came or went: reopen its attribute
                        state_fd = None
                self._call(self._check)
        finally:
            if state_fd is not None:
                os.close(state_fd)

    def _udev_monitor(self) -> Any:
        if not self.use_udev:
            return None
        try:
            import pyudev

            # Without udevd (a minimal system, the lab VM) only kernel uevents arrive.
            source = "udev" if os.path.exists("/run/udev/control") else "kernel"
            monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source=source)
            for subsystem in SUBSYSTEMS:
                monitor.filter_by(subsystem)
            monitor.start()
            return monitor
        except Exception as e:  # no libudev, no netlink permission: polling still works
            log.warning("udev monitoring unavailable (%s); polling the UDC state only", e)
            return None

    def _drain(self, monitor: Any) -> bool:
        """Deliver pending device events; True if a UDC came or went."""
        udc_changed = False
        while (device := monitor.poll(timeout=0)) is not None:
            action, subsystem = device.action or "", device.subsystem or ""
            log.debug("%s %s %s", action, subsystem, device.sys_name)
            if subsystem == "udc" and device.sys_name == self.udc:
                udc_changed = True
            if self.on_device is not None:
                self._call(self.on_device, action, subsystem, device.sys_name)
        return udc_changed

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop is shutting down
                self._loop.call_soon_threadsafe(fn, *args)

    # -- on the loop ----------------------------------------------------------------
    def _check(self) -> None:
        state = read_state(self.sysfs, self.udc)
        if state == self.state:
            return
        self.state = state
        connected = state in CONNECTED_STATES
        log.info("UDC %s: %s", self.udc, state)
        if connected != self.connected:
            self.connected = connected
            self.on_host(connected, state)


def _open(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDONLY)
    except OSError:
        return None
