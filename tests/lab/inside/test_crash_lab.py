"""Scenario 4: SIGKILL the daemon in the middle of host writes, a SAVE and a RESTORE.

Each time the daemon restarts, the gadget comes back (the host sees the disk again) and the
saved image is intact: RESTORE shows exactly the last saved state.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from typing import Any

from appliance.usb.udc_watch import read_state
from tests.lab.inside.appliance_vm import (
    MIB,
    Appliance,
    digest,
    open_direct,
    read_direct,
    write_direct,
)


def in_background(appliance: Appliance, cmd: str) -> threading.Thread:
    """Send a command and ignore the answer: the daemon is about to die under it."""

    def send() -> Any:
        try:
            appliance.request(cmd)
        except Exception:  # the connection dies with the daemon
            pass

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def restart(appliance: Appliance) -> str:
    dev = appliance.start()  # waits for the gadget and the host's /dev/sdX
    assert read_state("/sys", "dummy_udc.0") == "configured"
    return dev


def restored_image(appliance: Appliance, dev: str) -> str:
    reply = appliance.request("restore")
    assert reply["ok"], reply
    return digest(read_direct(dev))


def test_sigkill_mid_writes_save_and_restore(appliance: Appliance) -> None:
    dev = appliance.start(lock=False)
    write_direct(dev, 0, os.urandom(8 * MIB))
    assert appliance.request("save")["ok"]
    saved = digest(read_direct(dev))

    # (a) in the middle of the host's writes
    writer = subprocess.Popen(
        [
            "dd",
            "if=/dev/urandom",
            f"of={dev}",
            "bs=256k",
            "count=96",
            "oflag=direct",
            "status=none",
        ],
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.5)
    appliance.kill()
    writer.wait(timeout=120)
    dev = restart(appliance)
    assert restored_image(appliance, dev) == saved, "host writes at the kill reached the save"

    # (b) in the middle of a SAVE that first has to push 4 MiB of unsynced writes
    fd = open_direct(dev)
    write_direct(fd, 2 * MIB, os.urandom(4 * MIB))
    after = digest(read_direct(dev))
    in_background(appliance, "save")
    time.sleep(0.3)
    appliance.kill()
    os.close(fd)
    dev = restart(appliance)
    now = restored_image(appliance, dev)
    assert now in (saved, after), "a SAVE cut short left a mix of old and new"
    saved = now

    # (c) in the middle of a RESTORE
    write_direct(dev, 0, os.urandom(6 * MIB))
    in_background(appliance, "restore")
    time.sleep(0.2)
    appliance.kill()
    dev = restart(appliance)
    assert restored_image(appliance, dev) == saved
    assert appliance.status()["host_connected"] is True
