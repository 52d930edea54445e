"""Scenario 10: an iTag keyfinder as an extra SAVE trigger, over real BlueZ on hci0.

The BLE world of scenario 9 plus a third bumble controller on the same LocalLink that is NOT
attached to the kernel: an in-process bumble Device plays the iTag (service 0xFFE0,
characteristic 0xFFE1, notify). The daemon's BLE part connects to it with bleak as a central
on hci0 and subscribes; SIGUSR1 to the controller process is a button press. A press while
LOCKED is refused; after `savepoint unlock` a press SAVEs, and history names itag:<addr>.

`python -m tests.lab.inside.test_itag_lab` is that controller process (DeviceStack starts it in
place of ble_stack's own). It starts slowly under TCG (a python start costs 10-15 s), so this
module imports no pytest and nothing of the appliance side, and the stack waits for its hci0
and hci1 longer than scenario 9 does.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

from ble.itag import BUTTON_UUID, SERVICE_UUID
from tests.lab.inside.appliance_vm import Appliance
from tests.lab.inside.ble_stack import (
    DeviceStack,
    _controller_class,
    _link_class,
    attach_controllers,
    wait_for,
)

ITAG = "00:5A:7E:00:00:03"


class ITagStack(DeviceStack):
    """Scenario 9's stack, with this module as the controller process (adds the iTag)."""

    LOG_PREFIX = "itag"
    MODULE = "tests.lab.inside.test_itag_lab"
    DEVICE = "the iTag's"

    def press(self) -> None:
        self.controllers.send_signal(signal.SIGUSR1)


def press_and_wait(ble: ITagStack, appliance: Appliance, result: str) -> None:
    """One press; waits for the bus's log line for it (`done` or `refused`). The status'
    last_action is no use here: every status request replaces it."""
    line = f"SAVE from itag:{ITAG}: {result}"
    seen = appliance.log().count(line)
    presses = ble.controller_log().count("itag pressed")
    ble.press()
    wait_for(lambda: ble.controller_log().count("itag pressed") > presses, 30, "the iTag's notify")
    wait_for(lambda: appliance.log().count(line) > seen, 30, f"'{line}' in the daemon log")


def test_itag_press_saves_but_never_restores(appliance: Appliance, tmp_path: Path) -> None:
    with ITagStack.running(tmp_path) as ble:
        try:
            itag_scenario(ble, appliance, tmp_path)
        finally:
            appliance.kill(signal.SIGTERM)  # the daemon goes before bluetoothd, as in scenario 9


def itag_scenario(ble: ITagStack, appliance: Appliance, tmp_path: Path) -> None:
    appliance.write_config(lock=True, serial=False)
    with appliance.config.open("a") as cfg:
        cfg.write(
            f'[ble]\nenabled = true\nadapter = "hci0"\n'
            f'registry = "{tmp_path / "fobs.json"}"\n'
            f'itags = [{{address = "{ITAG}", action = "save"}}]\n'
        )
    appliance.start()
    wait_for(
        lambda: appliance.status()["parts"]["ble"]["state"] == "up", 30, "ble part up in the daemon"
    )
    started = time.monotonic()
    wait_for(
        lambda: (
            "itag subscribed notify=True" in ble.controller_log()
            and f"iTag {ITAG} connected" in appliance.log()
        ),
        120,
        "the daemon connected and subscribed to the iTag's 0xFFE1",
    )
    print(f"iTag connected and subscribed {time.monotonic() - started:.1f} s after BLE up")

    epoch = appliance.status()["epoch"]
    press_and_wait(ble, appliance, "refused: SAVE refused: the appliance is LOCKED")
    assert appliance.status()["epoch"] == epoch

    appliance.cli("unlock")
    time.sleep(0.6)  # past the debounce, so this is a new press
    press_and_wait(ble, appliance, "done")
    assert appliance.status()["epoch"] == epoch + 1
    history = appliance.request("history")["data"]["history"]
    assert (history[-1]["action"], history[-1]["source"]) == ("save", f"itag:{ITAG}")
    assert not [h for h in history if h["action"] == "restore"], history


# --- the controller process: scenario 9's two vhci controllers, plus the iTag ---------------
async def run_world() -> None:
    from bumble import gatt
    from bumble.core import AdvertisingData
    from bumble.device import Device
    from bumble.hci import Address, OwnAddressType
    from bumble.host import Host
    from bumble.transport.common import AsyncPipeSink

    link, controller = _link_class()(), _controller_class()
    _transports = await attach_controllers(link, controller)  # as ble_stack's: hci0, hci1

    itag_controller = controller("itag", link=link, public_address=ITAG)
    device = Device(
        name="iTAG",
        address=Address(ITAG),
        host=Host(itag_controller, AsyncPipeSink(itag_controller)),
    )
    P = gatt.Characteristic.Properties
    button = gatt.Characteristic(
        BUTTON_UUID, P.READ | P.NOTIFY, gatt.Characteristic.READABLE, b"\x00"
    )
    device.add_service(gatt.Service(SERVICE_UUID, [button]))
    button.on(
        "subscription",
        lambda _conn, notify, _indicate: print(f"itag subscribed notify={notify}", flush=True),
    )
    device.on("connection", lambda conn: print(f"itag connected {conn.peer_address}", flush=True))
    await device.power_on()
    advert = AdvertisingData(
        [
            (AdvertisingData.FLAGS, bytes([0x06])),
            (AdvertisingData.COMPLETE_LOCAL_NAME, b"iTAG"),
            (AdvertisingData.COMPLETE_LIST_OF_16_BIT_SERVICE_CLASS_UUIDS, bytes.fromhex("e0ff")),
        ]
    )
    await device.start_advertising(
        own_address_type=OwnAddressType.PUBLIC, auto_restart=True, advertising_data=bytes(advert)
    )
    print(f"itag {ITAG} advertising", flush=True)

    loop = asyncio.get_running_loop()

    async def press() -> None:
        await device.notify_subscribers(button, b"\x01")
        print("itag pressed", flush=True)

    loop.add_signal_handler(signal.SIGUSR1, lambda: loop.create_task(press()))
    await loop.create_future()  # until killed


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stdout)
    asyncio.run(run_world())
