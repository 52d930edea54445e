"""The USB gadget: the appliance as a USB disk (and serial port) through configfs/libcomposite.

One configuration holds a mass-storage function (LUN 0: the protected disk on /dev/nbdN;
optional LUN 1: the unprotected "thaw space" file) and a CDC-ACM function for the host's
command channel. GadgetPart is also the bus's StoreHooks: it syncs the host's writes before
SAVE and ejects/flushes/re-inserts the medium around RESTORE so nobody sees stale data.

The configfs and sysfs roots are parameters so unit tests can run on plain directories.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.control.commands import CommandSink, Event, PartUnavailable
from appliance.control.host_quiet import kthread_wchar
from appliance.parts import PartSpec
from appliance.settings import Settings, setting
from appliance.usb.nbd_device import NbdDevice, NbdDeviceError
from appliance.usb.udc_watch import UdcWatch

log = logging.getLogger("savepoint.gadget")


@dataclass(frozen=True)
class GadgetSettings(Settings):
    """The [gadget] section: the USB composite gadget (mass storage, optional serial)."""

    udc: str = setting("", "USB device controller under /sys/class/udc; empty = the first one")
    name: str = setting("savepoint", "gadget directory name under <configfs>/usb_gadget")
    nbd_device: str = setting("/dev/nbd0", "kernel NBD device attached to the daemon's socket")
    vendor_id: int = setting(0x1D6B, "USB idVendor (default: Linux Foundation)")
    product_id: int = setting(0x0104, "USB idProduct (default: multifunction composite gadget)")
    manufacturer: str = setting("Savepoint", "USB manufacturer string")
    product: str = setting("Savepoint disk", "USB product string")
    serial: str = setting(
        "SAVEPOINT0001", "USB serial number (savepoint-host finds the port by it)"
    )
    inquiry_vendor: str = setting("Savepnt", "SCSI INQUIRY vendor, up to 8 characters")
    inquiry_product: str = setting("Savepoint disk", "SCSI INQUIRY product, up to 16 characters")
    inquiry_revision: str = setting("0100", "SCSI INQUIRY revision, up to 4 characters")
    thaw_file: str = setting("", "unprotected LUN 1 backing file (survives RESTORE); empty = none")
    thaw_size: str | int = setting("", 'create thaw_file with this size if missing, e.g. "256M"')
    acm: bool = setting(True, "add the CDC-ACM serial function (host command channel)")
    configfs: str = setting("/sys/kernel/config", "configfs mount point")
    sysfs: str = setting("/sys", "sysfs mount point")
    poll_interval: float = setting(2.0, "seconds between re-reads of the UDC state")


MS = "mass_storage.usb0"
ACM = "acm.usb0"


def defaults(**overrides: Any) -> GadgetSettings:
    return GadgetSettings.of(overrides)


def inquiry_string(cfg: GadgetSettings) -> str:
    """f_mass_storage takes one 28-byte string: vendor(8) product(16) revision(4)."""
    parts = (("inquiry_vendor", 8), ("inquiry_product", 16), ("inquiry_revision", 4))
    out = ""
    for key, width in parts:
        value = str(getattr(cfg, key))
        if len(value) > width or not value.isascii():
            raise ValueError(f"[gadget] {key} {value!r}: use at most {width} ASCII characters")
        out += value.ljust(width)
    return out


class Gadget:
    """The configfs tree of one gadget: build, bind, eject, tear down."""

    def __init__(self, cfg: GadgetSettings) -> None:
        self.cfg = cfg
        self.root = Path(cfg.configfs) / "usb_gadget" / cfg.name
        self.sysfs = Path(cfg.sysfs)
        self.real = _is_configfs(cfg.configfs)  # False: a unit test's plain directories

    # -- attributes -----------------------------------------------------------------
    def lun(self, n: int) -> Path:
        return self.root / "functions" / MS / f"lun.{n}"

    def desired(self) -> dict[str, str]:
        """Every attribute this config writes, relative to the gadget root."""
        cfg = self.cfg
        attrs = {
            "idVendor": f"0x{cfg.vendor_id:04x}", "idProduct": f"0x{cfg.product_id:04x}",
            "bcdUSB": "0x0200", "bcdDevice": "0x0100",
            "strings/0x409/manufacturer": cfg.manufacturer,
            "strings/0x409/product": cfg.product,
            "strings/0x409/serialnumber": cfg.serial,
            "configs/c.1/strings/0x409/configuration": "Savepoint",
            "configs/c.1/MaxPower": "250",
            f"functions/{MS}/stall": "1",
            f"functions/{MS}/lun.0/removable": "1",
            f"functions/{MS}/lun.0/ro": "0",
            f"functions/{MS}/lun.0/nofua": "0",
            f"functions/{MS}/lun.0/inquiry_string": inquiry_string(cfg),
        }  # fmt: skip
        if cfg.thaw_file:
            attrs[f"functions/{MS}/lun.1/removable"] = "1"
            attrs[f"functions/{MS}/lun.1/inquiry_string"] = inquiry_string(
                dataclasses.replace(cfg, inquiry_product="Savepoint thaw")
            )
        return attrs

    def functions(self) -> list[str]:
        return [MS, ACM] if self.cfg.acm else [MS]

    def exists(self) -> bool:
        return self.root.is_dir()

    def matches(self) -> bool:
        """A leftover gadget can be adopted when it is exactly what this config builds."""
        if not self.exists():
            return False
        linked = sorted(p.name for p in (self.root / "configs" / "c.1").glob("*.usb0"))
        if linked != sorted(self.functions()):
            return False
        if not self.cfg.thaw_file and self.lun(1).exists():
            return False
        for rel, value in self.desired().items():
            try:
                if (self.root / rel).read_text().strip() != value.strip():
                    return False
            except OSError:
                return False
        return self.file(1) == self.cfg.thaw_file if self.cfg.thaw_file else True

    # -- building -----------------------------------------------------------------
    def create(self) -> None:
        strings = self.root / "strings" / "0x409"
        config = self.root / "configs" / "c.1"
        for d in (strings, config / "strings" / "0x409", *self._function_dirs(), self.lun(0)):
            d.mkdir(parents=True, exist_ok=True)
        if self.cfg.thaw_file:
            self.lun(1).mkdir(exist_ok=True)
        for rel, value in self.desired().items():
            _write(self.root / rel, value)
        for fn in self.functions():
            link = config / fn
            if not link.is_symlink():
                link.symlink_to(self.root / "functions" / fn)
        if self.cfg.thaw_file:
            self.set_file(1, self.cfg.thaw_file)

    def _function_dirs(self) -> list[Path]:
        return [self.root / "functions" / fn for fn in self.functions()]

    def udc(self) -> str:
        """The configured UDC, or the first one the kernel offers."""
        wanted = self.cfg.udc
        udcs = sorted(p.name for p in (self.sysfs / "class" / "udc").glob("*"))
        if wanted:
            if wanted not in udcs:
                raise PartUnavailable(
                    f"USB device controller {wanted!r} not found "
                    f"(have: {', '.join(udcs) or 'none'})",
                    "fix [gadget] udc, or load the controller driver",
                )
            return wanted
        if not udcs:
            raise PartUnavailable(
                "no USB device controller in /sys/class/udc",
                "on a Pi: dtoverlay=dwc2 and modprobe dwc2; for testing: modprobe dummy_hcd",
            )
        return udcs[0]

    def bound_to(self) -> str:
        try:
            return (self.root / "UDC").read_text().strip()
        except OSError:
            return ""

    def bind(self, udc: str) -> None:
        if self.bound_to() != udc:
            _write_in_child(self.root / "UDC", udc)

    def unbind(self) -> None:
        if self.bound_to():
            _write_in_child(self.root / "UDC", "")

    # -- the medium -----------------------------------------------------------------
    def file(self, n: int) -> str:
        try:
            return (self.lun(n) / "file").read_text().strip()
        except OSError:
            return ""

    def set_file(self, n: int, path: str) -> None:
        _write_in_child(self.lun(n) / "file", path)

    def forced_eject(self, n: int = 0) -> None:
        """Close the LUN's file even while the host holds the medium (plain eject: EBUSY)."""
        if self.lun(n).is_dir():
            _write_in_child(self.lun(n) / "forced_eject", "1")
            if not self.real:  # the kernel empties `file` itself
                _write(self.lun(n) / "file", "")

    # -- teardown -----------------------------------------------------------------
    def remove(self) -> None:
        """Eject, unbind, remove: configfs wants links, then children, then parents."""
        if not self.exists():
            return
        for n in (1, 0):
            self.forced_eject(n)
        self.unbind()
        config = self.root / "configs" / "c.1"
        for link in config.glob("*"):
            if link.is_symlink():
                link.unlink()
        for d in (config / "strings" / "0x409", config):
            _rmdir(d, self.real)
        for fn in sorted((self.root / "functions").glob("*")):
            for lun in sorted(fn.glob("lun.*"), reverse=True):
                if lun.name != "lun.0":  # lun.0 belongs to the function
                    _rmdir(lun, self.real)
            _rmdir(fn, self.real)
        _rmdir(self.root / "strings" / "0x409", self.real)
        _rmdir(self.root, self.real)


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value + "\n" if value else "\n")


def _write_in_child(path: Path, value: str) -> None:
    """Write an attribute that can wait for the LUN's I/O, from a child process.

    f_mass_storage takes the LUN's lock for file/forced_eject/UDC, and its worker holds it
    while its I/O waits for our own NBD server. Were this process killed while one of its
    threads waited on that lock, it could never exit: the NBD socket would stay open, the
    I/O never fail, the lock never come free. A child can wait; the daemon can still die.
    """
    done = subprocess.run(["tee", str(path)], input=value + "\n", capture_output=True, text=True)
    if done.returncode != 0:
        raise OSError(f"writing {value!r} to {path}: {done.stderr.strip()}")


def _is_configfs(root: str) -> bool:
    try:
        with open("/proc/self/mounts") as mounts:
            return any(line.split()[1:3] == [os.path.realpath(root), "configfs"] for line in mounts)
    except OSError:
        return False


def _rmdir(path: Path, real: bool) -> None:
    """configfs removes attribute files with their directory; a test tree needs help."""
    if not path.is_dir():
        return
    try:
        path.rmdir()
    except OSError as e:
        if e.errno != errno.ENOTEMPTY or real:
            raise
        for child in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            child.rmdir() if child.is_dir() and not child.is_symlink() else child.unlink()
        path.rmdir()


class GadgetPart:
    """Part [gadget]: NBD device + configfs gadget + host-connection watch; also StoreHooks
    (its spec says so: the daemon makes it the bus's hooks while it is up)."""

    name = "gadget"

    def __init__(
        self, cfg: GadgetSettings | dict[str, Any], bus: CommandSink, nbd_socket: str
    ) -> None:
        self.cfg = GadgetSettings.of(cfg)  # a dict: a table already checked (a test's)
        self.bus = bus
        self.gadget = Gadget(self.cfg)
        self.nbd = NbdDevice(self.cfg.nbd_device, nbd_socket, sysfs=self.cfg.sysfs)
        self.watch: UdcWatch | None = None

    async def start(self) -> None:
        if not (Path(self.cfg.configfs) / "usb_gadget").is_dir():
            raise PartUnavailable(
                "configfs has no usb_gadget directory",
                f"modprobe libcomposite and mount configfs at {self.cfg.configfs}",
            )
        udc = self.gadget.udc()
        self.nbd.check()
        await asyncio.to_thread(self._setup, udc)
        self.watch = UdcWatch(
            udc,
            self._host_changed,
            sysfs=self.cfg.sysfs,
            interval=float(self.cfg.poll_interval),
        )
        await self.watch.start()
        self._count_host_writes(kthread_wchar())
        log.info("gadget %s bound to %s, LUN 0 on %s", self.cfg.name, udc, self.nbd.device)

    def _setup(self, udc: str) -> None:
        self._prepare_thaw_file()
        # A killed predecessor leaves I/O stuck on its dead socket, and f_mass_storage holds
        # the LUN's lock while it waits: disconnecting fails that I/O, so eject can proceed.
        # The host saw commands time out meanwhile: a fresh enumeration is the clean restart.
        crashed = self.nbd.connected()
        if crashed:
            log.info("detaching %s left connected by a previous run", self.nbd.device)
            self._detach()
        adopt = not crashed and self.gadget.matches()
        if adopt:  # keep the host's USB connection; only the medium changes
            log.info("adopting the gadget %s left by a previous run", self.cfg.name)
            self.gadget.forced_eject(0)
        else:
            self.gadget.remove()
        try:
            self.nbd.attach()
        except NbdDeviceError as e:
            raise PartUnavailable(
                f"cannot attach {self.nbd.device}: {e}", "check that the NBD server is running"
            ) from e
        if not adopt:
            self.gadget.create()
        self.gadget.set_file(0, self.nbd.device)
        self.gadget.bind(udc)

    def _detach(self) -> None:
        try:
            self.nbd.detach()
        except NbdDeviceError as e:
            log.warning("%s", e)

    def _prepare_thaw_file(self) -> None:
        path, size = self.cfg.thaw_file, self.cfg.thaw_size
        if not path or os.path.exists(path):
            return
        if not size:
            raise PartUnavailable(
                f"thaw file {path} does not exist",
                "create it, or set [gadget] thaw_size to have it created",
            )
        from appliance.sizes import parse_size

        with open(path, "wb") as f:
            f.truncate(parse_size(size))

    async def stop(self) -> None:
        if self.watch is not None:
            await self.watch.stop()
            self.watch = None
        self._count_host_writes(None)
        await asyncio.to_thread(self._teardown)

    def _count_host_writes(self, counter: Callable[[], int | None] | None) -> None:
        """SAVE's wait for a quiet host watches f_mass_storage's own write count: the host's
        writes sit in /dev/nbdN's page cache for seconds before the NBD server sees them."""
        activity = getattr(self.bus, "activity", None)
        if activity is not None:
            activity.use(counter)
            if counter is not None and counter() is None:
                log.warning(
                    "cannot read the mass-storage thread's I/O counters (/proc/PID/io"
                    " of file-storage): a SAVE cannot wait for a quiet host"
                )

    def _teardown(self) -> None:
        self.gadget.remove()
        self._detach()

    def _host_changed(self, connected: bool, state: str) -> None:
        self.bus.publish(Event("host", {"connected": connected, "state": state}))  # type: ignore[attr-defined]

    # -- StoreHooks -----------------------------------------------------------------
    async def before_save(self) -> bool:
        """Push the host's writes still in /dev/nbdN's page cache into the store."""
        return await asyncio.to_thread(self.nbd.fsync)

    async def around_restore(self, restore: Callable[[], Awaitable[Any]]) -> Any:
        """forced_eject -> BLKFLSBUF -> RESTORE -> BLKFLSBUF -> re-insert (medium change)."""
        await asyncio.to_thread(self.gadget.forced_eject, 0)
        try:
            await asyncio.to_thread(self.nbd.flush_buffers)  # dirty pages land before RESTORE
            result = await restore()
            await asyncio.to_thread(self.nbd.flush_buffers)  # drop pages of the old state
        finally:
            await asyncio.to_thread(self.gadget.set_file, 0, self.nbd.device)
        return result


SPEC = PartSpec(
    "gadget",
    GadgetSettings,
    lambda s, ctx: GadgetPart(s, ctx.bus, ctx.nbd_socket),
    store_hooks=True,
)
