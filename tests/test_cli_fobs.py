"""`savepoint fobs` and who may use part commands (fob list/rename/revoke)."""

from __future__ import annotations

import asyncio
import json

from appliance.control.commands import Action
from appliance.control.requests import dispatch
from tests.support import RecordingBus
from tests.test_daemon_support import Served, cli


def test_part_commands_only_from_the_local_control_socket() -> None:
    calls: list[dict] = []

    async def fobs(args: dict) -> dict:
        calls.append(args)
        return {"fobs": [{"id": 1, "name": "keyring"}]}

    bus = RecordingBus()
    bus.register_handler("fobs", fobs)
    line = json.dumps({"cmd": "fobs", "args": {"op": "revoke", "id": 1}})
    host = asyncio.run(dispatch(bus, line, "host"))
    assert not host["ok"] and "local control socket" in host["reason"]
    assert calls == []  # the host (or malware on it) cannot revoke a fob
    local = asyncio.run(dispatch(bus, line, "cli"))
    assert local["ok"] and calls == [{"op": "revoke", "id": 1}]
    assert asyncio.run(dispatch(bus, '{"cmd": "status"}', "host"))["ok"]
    assert Action.STATUS.value == "status"


def test_fobs_without_ble_says_so_and_pair_says_what_to_do(tmp_path) -> None:
    served = Served(str(tmp_path / "disk.img"))
    try:
        proc = cli("fobs", control=served.control, check=False)
        assert proc.returncode == 1 and "BLE is off" in proc.stderr
        assert proc.stderr.count("\n") == 1
        proc = cli("fobs", "revoke", control=served.control, check=False)
        assert proc.returncode == 1 and "needs a fob id" in proc.stderr
        proc = cli("pair", control=served.control, check=False)
        assert proc.returncode == 1 and "savepoint-fob pair" not in proc.stdout
        assert "no fob can pair: BLE is off on this appliance" in proc.stderr
    finally:
        served.cleanup()
