"""The BLE half of the lab VM: two bumble controllers as hci0/hci1, a private system bus and
Debian's bluetoothd on it.

`python -m tests.lab.inside.ble_stack` is the controller process: one LocalLink, two bumble
controllers, each attached to the kernel through its own /dev/vhci fd (the kernel sees a
real HCI adapter per fd, in open order: hci0 then hci1). BleStack (used by the scenario)
starts that process, btmon, a dbus-daemon with BlueZ's bluetooth.conf policy and
`bluetoothd -n`, and tears all of it down again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ble import dbus_api
from tests.lab.bluez import BLUETOOTHD, BTMON, POLICY, cached_bluez
from tests.lab.inside.appliance_vm import RESULTS
from tests.lab.vm import CACHE

ADDRESSES = ("00:5A:7E:00:00:01", "00:5A:7E:00:00:02")  # hci0: appliance, hci1: fob

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <!-- the deny-by-default part of Debian's system.conf; bluetooth.conf punches the holes -->
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
  <include>{policy}</include>
</busconfig>
"""


# --- the controller process -----------------------------------------------------------------
def _link_class() -> type:
    from bumble import core
    from bumble.link import LocalLink

    class PublicAddressLink(LocalLink):
        """bumble 0.0.236's LocalLink sends LE ACL data from the sender's *random* address,
        but the kernel connects by public address, so the receiver finds no connection.
        Route by the connection's own address instead."""

        def send_acl_data(
            self, sender_controller: Any, destination_address: Any, transport: Any, data: bytes
        ) -> None:
            if transport != core.PhysicalTransport.LE:
                return super().send_acl_data(
                    sender_controller, destination_address, transport, data
                )
            source = next(
                (
                    c.self_address
                    for c in sender_controller.le_connections.values()
                    if c.peer_address == destination_address
                ),
                sender_controller.random_address,
            )
            destination = self.find_le_controller(destination_address)
            if destination is not None:
                asyncio.get_running_loop().call_soon(
                    destination.on_link_acl_data, source, transport, data
                )

    return PublicAddressLink


def _controller_class() -> type:
    from bumble.controller import Controller
    from bumble.hci import LeFeatureMask

    class LegacyController(Controller):
        """With extended advertising or LL privacy in the LE features, Linux 6.1 waits for
        an LE *Enhanced* Connection Complete, which bumble does not send: the kernel cancels
        the connection 4 s later under BlueZ's feet. Without them it uses the legacy
        commands and events all through (legacy adverts are what the fob service uses)."""

        le_features = Controller.le_features & ~(
            LeFeatureMask.LE_EXTENDED_ADVERTISING
            | LeFeatureMask.LL_PRIVACY
            | LeFeatureMask.LE_PERIODIC_ADVERTISING
        )

    return LegacyController


async def attach_controllers(link: Any, controller: type) -> list[Any]:
    """hci0 and hci1: bumble controllers on /dev/vhci, on `link`; returns their transports
    (keep them referenced)."""
    from bumble.transport import open_transport

    transports = []
    for index, address in enumerate(ADDRESSES):
        transport = await open_transport("vhci")  # sequential: hci0 first, then hci1
        transports.append(transport)
        controller(
            f"hci{index}",
            host_source=transport.source,
            host_sink=transport.sink,
            link=link,
            public_address=address,
        )
        print(f"controller hci{index} {address} attached", flush=True)
    return transports


async def run_controllers() -> None:
    _transports = await attach_controllers(_link_class()(), _controller_class())
    await asyncio.get_running_loop().create_future()  # until killed


# --- the stack, as the scenario uses it -----------------------------------------------------
class BleStack:
    """Controllers, btmon, a private system bus and bluetoothd; close() ends them all."""

    LOG_PREFIX = "ble"  # log files are <prefix>-btmon.log etc.: each scenario keeps its own

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        root = cached_bluez(CACHE)
        assert root is not None, "bluez is not in .lab-cache: tests/lab/vm.py fetches it"
        self.bluez = root
        self.procs: list[subprocess.Popen[bytes]] = []
        self.address = ""

    def _spawn(self, cmd: list[str], log: str, **kw: Any) -> subprocess.Popen[bytes]:
        with open(RESULTS / log.replace("ble-", f"{self.LOG_PREFIX}-", 1), "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, **kw)
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        self._spawn([str(self.bluez / BTMON)], "ble-btmon.log")
        self._spawn([sys.executable, "-m", "tests.lab.inside.ble_stack"], "ble-controllers.log")
        wait_for(
            lambda: all(Path(f"/sys/class/bluetooth/hci{i}").exists() for i in (0, 1)),
            120,
            "hci0 and hci1 (bumble controllers on /dev/vhci)",
        )  # python starts slowly
        self.address = self._start_bus()
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = self.address  # the daemon and the fob
        Path("/var/lib/bluetooth").mkdir(parents=True, exist_ok=True)
        self._spawn(
            [str(self.bluez / BLUETOOTHD), "-n", "-d", "-f", str(self._main_conf())],
            "ble-bluetoothd.log",
        )
        wait_for(lambda: run(adapters()) >= {"hci0", "hci1"}, 60, "bluetoothd's adapters")
        # bluetoothd powers adapters itself (AutoEnable); a Set while it does so is "Busy"
        with contextlib.suppress(dbus_api.DBusError):
            run(set_powered("hci1"))  # the fob's adapter; the appliance powers its own
        wait_for(lambda: run(adapters(powered=True)) >= {"hci1"}, 30, "powered hci1")

    def _main_conf(self) -> Path:
        """Debian's main.conf with EATT off (`[GATT] Channels = 1`), as the appliance must run
        BlueZ 5.66: with EATT, bluetoothd sometimes sends the fob's Exchange MTU over an EATT
        channel and answers it on the *other* one; the fob's side gets "Received unexpected
        ATT response", closes that channel and drops the whole link (reason 2, local host),
        failing whatever GATT call is pending with "Not connected". docs/lab.md has the logs."""
        text = (self.bluez / "etc/bluetooth/main.conf").read_text()
        assert "#Channels = 3" in text, "bluez's main.conf changed: set [GATT] Channels = 1"
        conf = self.tmp / "bluetooth-main.conf"
        conf.write_text(text.replace("#Channels = 3", "Channels = 1", 1))
        return conf

    def _start_bus(self) -> str:
        socket = self.tmp / "system_bus_socket"
        conf = self.tmp / "system-bus.conf"
        conf.write_text(BUS_CONFIG.format(socket=socket, policy=self.bluez / POLICY))
        self._spawn(
            ["dbus-daemon", "--config-file", str(conf), "--nofork", "--nopidfile"], "ble-dbus.log"
        )
        wait_for(socket.exists, 30, "the private system bus")
        return f"unix:path={socket}"

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        os.environ.pop("DBUS_SYSTEM_BUS_ADDRESS", None)


class DeviceStack(BleStack):
    """Scenario 9's stack with the scenario's own module (MODULE) as the controller process:
    it attaches hci0 and hci1 as ble_stack does, then plays one more device (DEVICE) on the
    same link, not attached to the kernel. SIGUSR1 to `controllers` is that device's cue."""

    MODULE = ""
    DEVICE = ""

    def controller_env(self) -> dict[str, str] | None:
        return None

    def _spawn(self, cmd: list[str], log: str, **kw: Any) -> subprocess.Popen[bytes]:
        if cmd[-2:] != ["-m", "tests.lab.inside.ble_stack"]:
            return super()._spawn(cmd, log, **kw)
        env = self.controller_env()
        if env is not None:
            kw["env"] = env
        proc = super()._spawn([*cmd[:-1], self.MODULE], log, **kw)
        wait_for(
            lambda: (
                proc.poll() is not None
                or all(Path(f"/sys/class/bluetooth/hci{i}").exists() for i in (0, 1))
            ),
            120,
            f"hci0 and hci1 (bumble controllers on /dev/vhci, and {self.DEVICE})",
        )
        return proc

    @property
    def controllers(self) -> subprocess.Popen[bytes]:
        return next(p for p in self.procs if p.args[-1] == self.MODULE)  # type: ignore[index]

    def controller_log(self) -> str:
        return (RESULTS / f"{self.LOG_PREFIX}-controllers.log").read_text(errors="replace")

    @classmethod
    @contextlib.contextmanager
    def running(cls, tmp: Path) -> Iterator[Any]:
        stack = cls(tmp)
        try:
            stack.start()
            yield stack
        finally:
            stack.close()


def wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if check():
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout:g} s; see {RESULTS}/ble-*.log")
        time.sleep(0.3)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


async def adapters(powered: bool = False) -> set[str]:
    """bluetoothd's adapters (only the powered ones when `powered`)."""
    bus = await dbus_api.connect()
    try:
        objects = await dbus_api.managed_objects(bus)
    finally:
        bus.disconnect()
    return {
        p.rsplit("/", 1)[1]
        for p, i in objects.items()
        if "org.bluez.Adapter1" in i and (i["org.bluez.Adapter1"].get("Powered") or not powered)
    }


async def set_powered(adapter: str) -> None:
    await set_adapter(adapter, "Powered", True)


async def set_adapter(adapter: str, prop: str, value: bool) -> None:
    """Set a boolean Adapter1 property (Powered, Pairable) as bluetoothctl would."""
    bus = await dbus_api.connect()
    try:
        await dbus_api.call(
            bus,
            dbus_api.BLUEZ,
            f"/org/bluez/{adapter}",
            "org.freedesktop.DBus.Properties",
            "Set",
            "ssv",
            ["org.bluez.Adapter1", prop, dbus_api.Variant("b", value)],
        )
    finally:
        bus.disconnect()


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stdout)
    asyncio.run(run_controllers())
