"""Scenario 11: an encrypted BTHome v2 button as a fob, heard by BlueZ on hci0 (which serves
the fob service at the same time, as on an installed appliance).

The BLE world of scenario 9 (bumble controllers as hci0/hci1, a private system bus,
bluetoothd, here with --experimental so BlueZ offers advertisement monitors and the daemon
can scan passively) plus a third bumble controller on the same LocalLink that is NOT attached
to the kernel: an in-process bumble Device plays a Shelly BLU Button. The test encrypts each
advertisement itself (tests/bthome_adverts.py: AES-CCM from `cryptography`), writes its hex
to a file and sends SIGUSR1; the button then broadcasts it for a while, many times, as a real
button repeats a press. A double press while LOCKED is refused; after `savepoint unlock` it
SAVEs as bthome:<addr>; a long press RESTOREs; a replayed advertisement does nothing; the
battery shows in `savepoint status`.

`python -m tests.lab.inside.test_bthome_lab` is that controller process. It starts slowly
under TCG, so this module imports no pytest and nothing of the appliance side.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

from tests import bthome_adverts as adv
from tests.lab.inside.appliance_vm import Appliance
from tests.lab.inside.ble_stack import (
    DeviceStack,
    _controller_class,
    _link_class,
    attach_controllers,
    wait_for,
)

BUTTON = "00:5A:7E:00:00:04"
KEY = bytes.fromhex("5a0e1d3c2b4a69788796a5b4c3d2e1f0")
BURST = 2.0  # seconds a press is broadcast (a Shelly BLU Button repeats it for about that)


class ButtonStack(DeviceStack):
    """Scenario 9's stack, with this module as the controller process (adds the button) and
    bluetoothd with --experimental (advertisement monitors: passive scanning)."""

    LOG_PREFIX = "bthome"
    MODULE = "tests.lab.inside.test_bthome_lab"
    DEVICE = "the button's"

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.advert_file = tmp / "advert.hex"

    def _spawn(self, cmd: list[str], log: str, **kw: Any) -> Any:
        if cmd and cmd[0].endswith("bluetoothd"):
            return super()._spawn([*cmd[:2], "-E", *cmd[2:]], log, **kw)
        return super()._spawn(cmd, log, **kw)

    def controller_env(self) -> dict[str, str]:
        return {**os.environ, "BTHOME_ADVERT_FILE": str(self.advert_file)}

    def broadcast(self, service_data: bytes) -> None:
        """The button broadcasts this service data for BURST seconds; returns when done."""
        sent = self.controller_log().count("button broadcast done")
        self.advert_file.write_text(service_data.hex())
        self.controllers.send_signal(signal.SIGUSR1)
        wait_for(
            lambda: self.controller_log().count("button broadcast done") > sent,
            30,
            "the button's broadcast",
        )


def counts(appliance: Appliance) -> dict[str, int]:
    return appliance.status()["buttons"]["counts"]


def press(ble: ButtonStack, appliance: Appliance, data: bytes, line: str) -> None:
    """Broadcast one press; wait for the bus's log line for it."""
    seen = appliance.log().count(line)
    ble.broadcast(data)
    wait_for(lambda: appliance.log().count(line) > seen, 30, f"'{line}' in the daemon log")


def test_bthome_button_saves_restores_and_ignores_replays(
    appliance: Appliance, tmp_path: Path
) -> None:
    with ButtonStack.running(tmp_path) as ble:
        try:
            bthome_scenario(ble, appliance, tmp_path)
        finally:
            appliance.kill(signal.SIGTERM)  # the daemon goes before bluetoothd, as in scenario 9


def bthome_scenario(ble: ButtonStack, appliance: Appliance, tmp_path: Path) -> None:
    appliance.write_config(lock=True, serial=False)
    with appliance.config.open("a") as cfg:
        cfg.write(
            f'[ble]\nenabled = true\nadapter = "hci0"\n'  # as installed: fobs too
            f'registry = "{tmp_path / "fobs.json"}"\n'
            f'[bthome]\nenabled = true\nadapter = "hci0"\n'
            f'registry = "{tmp_path / "buttons.json"}"\n'
        )
    appliance.start()
    wait_for(
        lambda: (
            [appliance.status()["parts"][n]["state"] for n in ("ble", "bthome")] == ["up", "up"]
        ),
        30,
        "ble and bthome parts up",
    )
    assert appliance.status()["buttons"]["scan"] == "passive", appliance.log()
    done = appliance.cli("buttons", "add", BUTTON, "--key", KEY.hex(), "--name", "desk")
    assert "enrolled" in done.stdout
    source = f"bthome:{BUTTON}"

    epoch = appliance.status()["epoch"]
    press(
        ble,
        appliance,
        adv.press(KEY, BUTTON, 1, "double_press", battery=77),
        f"SAVE from {source}: refused: SAVE refused: the appliance is LOCKED",
    )
    assert appliance.status()["epoch"] == epoch

    appliance.cli("unlock")
    saved = adv.press(KEY, BUTTON, 2, "double_press", battery=77)
    press(ble, appliance, saved, f"SAVE from {source}: done")
    press(
        ble,
        appliance,
        adv.press(KEY, BUTTON, 3, "long_press", battery=76),
        f"RESTORE from {source}: done",
    )
    assert appliance.status()["epoch"] == epoch + 2
    history = appliance.request("history")["data"]["history"]
    assert [(h["action"], h["source"]) for h in history[-2:]] == [
        ("save", source),
        ("restore", source),
    ]
    log = appliance.log()
    assert log.count(f"SAVE from {source}: done") == 1, "one press ran more than one SAVE"

    old = counts(appliance).get("old_counter", 0)
    ble.broadcast(saved)  # the recorded double press, replayed
    wait_for(
        lambda: counts(appliance).get("old_counter", 0) > old,
        30,
        "the replayed advert counted as an old counter",
    )
    assert appliance.status()["epoch"] == epoch + 2
    assert appliance.log().count(f"SAVE from {source}: done") == 1

    ble.broadcast(adv.plain("long_press"))  # encryption off (or someone imitating it)
    wait_for(lambda: counts(appliance).get("unencrypted", 0) > 0, 30, "the plain advert counted")
    assert appliance.status()["epoch"] == epoch + 2

    [button] = appliance.status()["buttons"]["devices"]
    assert (button["address"], button["battery"], button["counter"]) == (BUTTON, 76, 3)
    shown = appliance.cli("status").stdout
    assert f"desk {BUTTON}: battery 76%" in shown, shown
    listed = appliance.cli("buttons").stdout
    assert "desk" in listed and "counter 3" in listed and "scan: passive" in listed, listed


# --- the controller process: scenario 9's two vhci controllers, plus the button -------------
async def run_world() -> None:
    from bumble.device import Device
    from bumble.hci import Address, OwnAddressType
    from bumble.host import Host
    from bumble.transport.common import AsyncPipeSink

    link, controller = _link_class()(), _controller_class()
    _transports = await attach_controllers(link, controller)  # as ble_stack's: hci0, hci1

    button_controller = controller("button", link=link, public_address=BUTTON)
    device = Device(
        name="SBBT-002C",
        address=Address(BUTTON),
        host=Host(button_controller, AsyncPipeSink(button_controller)),
    )
    await device.power_on()
    print(f"button {BUTTON} powered", flush=True)
    advert_file = Path(os.environ["BTHOME_ADVERT_FILE"])
    loop = asyncio.get_running_loop()
    busy = asyncio.Lock()

    async def broadcast() -> None:
        async with busy:
            data = bytes.fromhex(advert_file.read_text().strip())
            await device.start_advertising(
                own_address_type=OwnAddressType.PUBLIC,
                advertising_data=adv.advertising_data(data),
                advertising_interval_min=100,
                advertising_interval_max=100,
            )
            print(f"button broadcasting {data.hex()}", flush=True)
            await asyncio.sleep(BURST)
            await device.stop_advertising()
            await asyncio.sleep(0.3)
            print("button broadcast done", flush=True)

    loop.add_signal_handler(signal.SIGUSR1, lambda: loop.create_task(broadcast()))
    await loop.create_future()  # until killed


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stdout)
    asyncio.run(run_world())
