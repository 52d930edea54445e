"""Scenario 6: host software over the CDC-ACM port (/dev/ttyACM0 on the host side): STATUS
works, SAVE is refused while the appliance is LOCKED and accepted once it is unlocked."""

from __future__ import annotations

import json
import subprocess
import sys

from appliance.host_client import find_port, request
from tests.lab.inside.appliance_vm import Appliance


def savepoint_host(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance.host_client", *args],
                          capture_output=True, text=True, timeout=180)


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

    history = json.loads(savepoint_host("history", "--json").stdout)["data"]["history"]
    assert history[-1]["action"] == "save" and history[-1]["source"] == "host"
    bad = request(port, "nonsense")
    assert not bad["ok"] and "unknown command" in bad["reason"]
    assert request(port, "status")["ok"], "the channel stays usable after a bad request"
