"""The fob client's own logic: its key file, counter handling and CLI errors (no radio)."""

from __future__ import annotations

import asyncio
import os
import stat

from ble import fob_client
from ble.frames import Cmd, Result
from ble.keys import FobRegistry
from ble.protocol import FobProtocol
from tests.ble_helpers import RecordingSink


class DirectLink:
    """fob_client.GattLink straight into the appliance's protocol object."""

    def __init__(self, proto: FobProtocol) -> None:
        self.proto = proto

    async def read(self, uuid: str) -> bytes:
        from ble import frames

        return {frames.CHALLENGE_UUID: self.proto.read_challenge,
                frames.STATUS_UUID: self.proto.status_value,
                frames.PAIR_UUID: lambda: self.proto.pair_read("fob")}[uuid]()  # fmt: skip

    async def write(self, uuid: str, data: bytes) -> None:
        from ble import frames

        if uuid == frames.PAIR_UUID:
            self.proto.pair_write("fob", data)
        elif await self.proto.handle_command(data) != Result.OK:
            raise RuntimeError("ATT error")


def test_key_file_is_private_and_counter_saved_before_sending(tmp_path):
    proto = FobProtocol(FobRegistry(tmp_path / "app.json"), RecordingSink())
    proto.set_pairing(True)
    store = fob_client.KeyStore(tmp_path / "cfg" / "fob.json")
    link = DirectLink(proto)

    async def body() -> None:
        creds = await fob_client.pair(link)
        store.save(creds)
        assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
        status = await fob_client.send(link, store.pick(), Cmd.RESTORE, store)
        assert status.last_result == Result.OK
        assert store.pick().counter == 1
        assert "RESTORE: OK" in fob_client.describe(status)

    asyncio.run(body())


def test_unpaired_fob_says_what_to_do(tmp_path, capsys):
    assert fob_client.main(["save", "--keys", str(tmp_path / "none.json")]) == 1
    assert "press PAIR on the appliance" in capsys.readouterr().err


def test_a_link_lost_while_connecting_is_retried_then_reported(capsys) -> None:
    """BLE links drop during set-up; nothing was sent yet, so the fob tries again (3 times)."""
    calls: list[int] = []

    async def flaky(fail_times: int) -> str:
        calls.append(1)
        if len(calls) <= fail_times:
            raise ConnectionError("failed to discover services, device disconnected")
        return "connected"

    run = asyncio.run
    assert run(fob_client.with_retries(lambda: flaky(2), (ConnectionError,), delay=0)) \
        == "connected"
    assert len(calls) == 3 and capsys.readouterr().err.count("trying again") == 2
    calls.clear()
    try:
        run(fob_client.with_retries(lambda: flaky(5), (ConnectionError,), delay=0))
    except ConnectionError as e:
        assert "device disconnected" in str(e)
    else:
        raise AssertionError("a link that never comes up must be reported")
    assert len(calls) == fob_client.CONNECT_TRIES
    calls.clear()
    try:  # anything else is not a dropped link: no retry
        run(fob_client.with_retries(lambda: flaky(5), (TimeoutError,), delay=0))
    except ConnectionError:
        pass
    assert len(calls) == 1
