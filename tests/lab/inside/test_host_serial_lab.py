"""Scenario 6: host software over the CDC-ACM port (/dev/ttyACM0 on the host side): STATUS
works, SAVE is refused while the appliance is LOCKED and accepted once it is unlocked, one
unlock is one SAVE; and a host that writes requests without reading its answers does not
freeze the appliance (docs/security.md)."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
import tty

from appliance.usb.host_client import find_port, request
from tests.lab.inside.appliance_vm import Appliance


def savepoint_host(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.usb.host_client", *args],
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_host_command_channel(appliance: Appliance) -> None:
    appliance.start(lock=True)
    port = find_port()  # by USB vendor/product ID, as on any host OS
    assert port.startswith("/dev/ttyACM")

    status = savepoint_host("status", "--json")
    assert status.returncode == 0, status.stderr
    reply = json.loads(status.stdout)
    assert reply["ok"] and reply["data"]["mode"] == "locked"

    refused = savepoint_host("save")
    assert refused.returncode == 1
    assert "LOCKED" in refused.stderr and refused.stderr.count("refused") == 1
    assert not request(port, "unlock")["ok"], "host software must not unlock the appliance"

    appliance.cli("unlock")
    saved = savepoint_host("save", "--json")
    assert saved.returncode == 0, saved.stderr
    assert json.loads(saved.stdout)["data"]["source"] == "host"

    again = savepoint_host("save")  # the SAVE used the unlock: a person must unlock again
    assert again.returncode == 1 and "LOCKED" in again.stderr

    history = json.loads(savepoint_host("history", "--json").stdout)["data"]["history"]
    assert history[-1]["action"] == "save" and history[-1]["source"] == "host"
    bad = request(port, "nonsense")
    assert not bad["ok"] and "unknown command" in bad["reason"]
    assert request(port, "status")["ok"], "the channel stays usable after a bad request"


def timed_status(appliance: Appliance) -> float:
    t0 = time.monotonic()
    assert appliance.request("status")["ok"]
    return time.monotonic() - t0


def test_host_that_never_reads_cannot_freeze_the_appliance(appliance: Appliance) -> None:
    appliance.start(lock=True)
    port = find_port()
    before = max(timed_status(appliance) for _ in range(3))
    fd = os.open(port, os.O_RDWR | os.O_NOCTTY)
    try:
        tty.setraw(fd)
        flood = b'{"cmd": "status"}\n' * 400 + b"[" * 5000 + b"\n"
        writer = threading.Thread(target=os.write, args=(fd, flood), daemon=True)
        writer.start()  # and never read a reply
        time.sleep(2)
        during = [timed_status(appliance) for _ in range(5)]
        deadline = time.monotonic() + 120
        while (serial := appliance.status()["serial"])["requests"] < 401:
            assert time.monotonic() < deadline, serial
            time.sleep(0.5)
        worst = max(during + [timed_status(appliance)])
        print(
            f"control STATUS: {before * 1000:.0f} ms before, worst {worst * 1000:.0f} ms "
            f"while the host did not read; serial counters {serial}"
        )
        assert worst < 3.0, f"the control socket took {worst:.1f} s while the host did not read"
        assert serial["replies_dropped"] > 0 and serial["restarts"] == 0, serial
        writer.join(10)
        drained = 0  # the host reads again: the backlog it is owed is bounded
        while select.select([fd], [], [], 1.0)[0]:
            drained += len(os.read(fd, 1 << 16))
        print(f"host drained {drained} bytes of answers")
    finally:
        os.close(fd)
    reply = request(port, "status")
    assert reply["ok"] and reply["data"]["serial"]["requests"] >= 402
