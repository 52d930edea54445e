"""The host command channel on a pseudo-terminal: SerialPart (the gadget's tty side) and
savepoint-host's request/find_port (the computer's side), end to end through pyserial."""

from __future__ import annotations

import asyncio
import os
import pty
import threading
from types import SimpleNamespace
from typing import Any

import pytest

from appliance.control.commands import Action, Command, Outcome
from appliance.usb import host_client
from appliance.usb.host_serial import SerialPart
from tests.support import LockingBus


def serve_pty(bus: LockingBus, body: Any) -> Any:
    """Run a SerialPart on a pty's slave side while `body(port)` talks to the master."""
    master, slave = pty.openpty()
    port = os.ttyname(slave)

    async def main() -> Any:
        part = SerialPart({"device": port}, bus)  # type: ignore[arg-type]
        await part.start()
        try:
            return await asyncio.to_thread(body, master)
        finally:
            await part.stop()

    try:
        return asyncio.run(main())
    finally:
        os.close(master)
        os.close(slave)


def talk(master: int, line: bytes) -> bytes:
    os.write(master, line)
    out = b""
    while not out.endswith(b"\n"):
        out += os.read(master, 4096)
    return out


def test_serial_part_answers_json_lines_as_host() -> None:
    bus = LockingBus()

    def body(master: int) -> list[bytes]:
        return [
            talk(master, b'{"cmd": "status"}\n'),
            talk(master, b'{"cmd": "save"}\r\n'),
            talk(master, b"not json\n"),
            talk(master, b'{"cmd": "fly"}\n'),
        ]

    status, save, garbage, unknown = serve_pty(bus, body)
    assert b'"ok": true' in status and b'"mode": "locked"' in status
    assert b'"ok": false' in save and b"LOCKED" in save
    assert b"malformed request" in garbage
    assert b"unknown command" in unknown
    assert [(c.action, c.source) for c in bus.commands] == [
        (Action.STATUS, "host"),
        (Action.SAVE, "host"),
    ]


def test_serial_part_needs_the_acm_tty(tmp_path: Any) -> None:
    from appliance.control.commands import PartUnavailable

    part = SerialPart({"device": str(tmp_path / "ttyGS0")}, LockingBus())  # type: ignore[arg-type]
    with pytest.raises(PartUnavailable) as e:
        asyncio.run(part.start())
    assert "acm" in e.value.hint


def test_host_client_request_over_a_serial_port() -> None:
    master, slave = pty.openpty()
    port = os.ttyname(slave)
    received: list[bytes] = []

    def appliance() -> None:
        line = b""
        while not line.endswith(b"\n"):
            line += os.read(master, 4096)
        received.append(line)
        os.write(master, b'{"ok": true, "reason": "", "data": {"epoch": 3}}\n')

    thread = threading.Thread(target=appliance)
    thread.start()
    try:
        reply = host_client.request(port, "history", {"limit": 2}, timeout=10)
    finally:
        thread.join(5)
        os.close(master)
        os.close(slave)
    assert reply == {"ok": True, "reason": "", "data": {"epoch": 3}}
    assert received == [b'{"cmd": "history", "args": {"limit": 2}}\n']


def test_find_port_by_usb_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    ports = [
        SimpleNamespace(device="/dev/ttyACM0", vid=0x1D6B, pid=0x0104, serial_number="A"),
        SimpleNamespace(device="/dev/ttyACM1", vid=0x1D6B, pid=0x0104, serial_number="B"),
        SimpleNamespace(device="/dev/ttyUSB0", vid=0x0403, pid=0x6001, serial_number="X"),
    ]
    monkeypatch.setattr(host_client.list_ports, "comports", lambda: ports)
    assert host_client.find_port(serial_number="B") == "/dev/ttyACM1"
    with pytest.raises(host_client.HostError, match="several appliances"):
        host_client.find_port()
    with pytest.raises(host_client.HostError, match="no Savepoint appliance"):
        host_client.find_port(pid=0x9999)


def test_host_client_exit_codes(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setattr(host_client, "request", lambda *a: {"ok": False, "reason": "LOCKED"})
    assert host_client.main(["save", "--port", "/dev/null"]) == 1
    assert "LOCKED" in capsys.readouterr().err
    monkeypatch.setattr(host_client.list_ports, "comports", lambda: [])
    assert host_client.main(["status"]) == 2
    assert "check the cable" in capsys.readouterr().err


class FaultyBus(LockingBus):
    """Fails one SAVE with an exception, and records what the part reports about itself."""

    def __init__(self) -> None:
        super().__init__()
        self.part_states: list[tuple[str, str]] = []
        self.status_extras: list[Any] = []

    async def submit(self, command: Command) -> Outcome:
        if command.action is Action.SAVE:
            raise RuntimeError("store on fire")
        return await super().submit(command)

    def set_part(self, name: str, state: str, reason: str = "", hint: str = "") -> None:
        self.part_states.append((name, state))


def test_a_request_that_fails_gets_an_error_and_the_channel_lives_on() -> None:
    bus = FaultyBus()

    def body(master: int) -> list[bytes]:
        return [talk(master, b'{"cmd": "save"}\n'), talk(master, b'{"cmd": "status"}\n')]

    failed, status = serve_pty(bus, body)
    assert b'"ok": false' in failed and b"internal error" in failed and b"RuntimeError" in failed
    assert b'"ok": true' in status and bus.part_states == []


def test_a_crash_of_the_serving_task_is_a_fault_and_a_restart(monkeypatch) -> None:
    bus = FaultyBus()
    real_reply, crashes = SerialPart._reply, []

    def reply_once_broken(self: SerialPart, reply: dict[str, Any]) -> None:
        if not crashes:
            crashes.append(reply)
            raise OSError("a bug in the reply path")
        real_reply(self, reply)

    monkeypatch.setattr(SerialPart, "_reply", reply_once_broken)
    master, slave = pty.openpty()

    async def main() -> tuple[bytes, dict[str, Any]]:
        part = SerialPart({"device": os.ttyname(slave), "restart_after": 0.05}, bus)  # type: ignore[arg-type]
        await part.start()
        try:
            os.write(master, b'{"cmd": "status"}\n')  # its answer is lost in the crash
            await asyncio.sleep(0.3)
            answer = await asyncio.to_thread(talk, master, b'{"cmd": "status"}\n')
            return answer, bus.status_extras[0]()
        finally:
            await part.stop()

    try:
        answer, status = asyncio.run(main())
    finally:
        os.close(master)
        os.close(slave)
    assert b'"ok": true' in answer
    assert bus.part_states == [("serial", "failed"), ("serial", "up")]
    assert status["serial"]["restarts"] == 1 and status["serial"]["requests"] == 2
