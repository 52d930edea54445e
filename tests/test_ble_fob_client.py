"""The fob client's own logic: its key file, counter handling and CLI errors (no radio)."""

from __future__ import annotations

import asyncio
import os
import stat

from ble import fob_client
from ble.frames import Cmd, Result
from ble.keys import FobRegistry
from ble.protocol import FobProtocol
from tests.support import RecordingBus


class DirectLink:
    """fob_client.GattLink straight into the appliance's protocol object."""

    def __init__(self, proto: FobProtocol) -> None:
        self.proto = proto

    async def read(self, uuid: str) -> bytes:
        from ble import frames

        return {frames.CHALLENGE_UUID: lambda: self.proto.read_challenge("fob"),
                frames.STATUS_UUID: lambda: self.proto.status_read("fob"),
                frames.PAIR_UUID: lambda: self.proto.pair_read("fob")}[uuid]()  # fmt: skip

    async def write(self, uuid: str, data: bytes) -> None:
        from ble import frames

        if uuid == frames.PAIR_UUID:
            self.proto.pair_write("fob", data)
        elif await self.proto.handle_command(data, "fob") != Result.OK:
            raise RuntimeError("ATT error")


def test_key_file_is_private_and_counter_saved_before_sending(tmp_path):
    proto = FobProtocol(FobRegistry(tmp_path / "app.json"), RecordingBus())
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


def test_bleak_failures_that_mean_a_lost_link(tmp_path) -> None:
    """What BlueZ says when the link went away is a LinkLost; an ATT error is the appliance
    answering, so the link is fine."""

    class Client:
        is_connected = True

    up = Client()
    assert fob_client.lost(Exception("[org.bluez.Error.Failed] Not connected"), up)
    assert fob_client.lost(EOFError(), up) and fob_client.lost(TimeoutError(), up)
    assert not fob_client.lost(Exception("[org.bluez.Error.NotPermitted] Write not permitted"),
                               up)  # fmt: skip
    down = Client()
    down.is_connected = False
    assert fob_client.lost(Exception("Operation failed"), down)


def test_cli_bounds_the_retries(tmp_path) -> None:
    args = fob_client.parser().parse_args(["save", "--timeout", "5", "--retry-for", "30"])
    retry = fob_client.retry_of(args)
    assert retry.total == 30 and retry.connect_timeout == 5 and retry.links >= 2


class RefusingLink(DirectLink):
    """DirectLink whose refusals are ATT errors, as the real link reports them."""

    async def write(self, uuid: str, data: bytes) -> None:
        from ble.fob_session import Refused

        try:
            await super().write(uuid, data)
        except ValueError as e:
            raise Refused(str(e)) from e


def test_wrong_setup_code_says_so_and_keeps_the_old_key(tmp_path):
    import pytest

    from ble.fob_session import FobError, PairRun

    proto = FobProtocol(FobRegistry(tmp_path / "app.json"), RecordingBus(), setup_code="4829")
    store = fob_client.KeyStore(tmp_path / "fob.json")

    async def connect(_timeout: float) -> RefusingLink:
        return RefusingLink(proto)

    async def body() -> None:
        proto.set_pairing(True)
        good = await PairRun(connect, "4829", store.save).run()
        proto.set_pairing(False)
        proto.set_pairing(True)  # a new window; someone types the code wrong
        before = store.path.read_bytes()
        with pytest.raises(FobError, match="wrong setup code"):
            await PairRun(connect, "0000", store.save).run()
        store.restore(before)  # what `savepoint-fob pair` does when pairing fails
        assert store.pick().key == good.key

    asyncio.run(body())


class UnencryptedLink(DirectLink):
    """An impostor's link: it serves a challenge without asking for encryption."""

    def encrypted(self) -> bool | None:
        return False


def test_fob_refuses_to_send_over_an_unencrypted_link(tmp_path):
    bus = RecordingBus()
    proto = FobProtocol(FobRegistry(tmp_path / "app.json"), bus)
    proto.set_pairing(True)
    store = fob_client.KeyStore(tmp_path / "fob.json")

    async def body() -> None:
        store.save(await fob_client.pair(DirectLink(proto)))
        try:
            await fob_client.send(UnencryptedLink(proto), store.pick(), Cmd.RESTORE, store)
        except fob_client.FobError as e:
            assert "not encrypted" in str(e) and "RESTORE was not sent" in str(e)
        else:
            raise AssertionError("sent over an unencrypted link")
        assert bus.commands == [] and store.pick().counter == 0  # nothing sent, nothing used
        status = await fob_client.send(DirectLink(proto), store.pick(), Cmd.STATUS, store)
        assert status.last_result == Result.OK

    asyncio.run(body())


def test_link_security_reads_the_kernels_connection_list():
    from ble import link_security as ls

    appliance = bytes.fromhex("01 00 00 7e 5a 00")  # bdaddr_t is little-endian
    raw = ls._REQ.pack(0, 2) + ls._INFO.pack(64, appliance, ls.LE_LINK, 1, 1, 0x5)
    raw += ls._INFO.pack(65, bytes(6), 0x01, 0, 1, 0x4)  # a BR/EDR link is not ours
    assert ls.parse_conn_list(raw) == {"00:5A:7E:00:00:01": 0x5}
    no_enc = ls._REQ.pack(0, 1) + ls._INFO.pack(64, appliance, ls.LE_LINK, 1, 1, 0x1)
    assert not ls.parse_conn_list(no_enc)["00:5A:7E:00:00:01"] & ls.HCI_LM_ENCRYPT
    assert ls.encrypted("00:5A:7E:00:00:09", "hci9") is None  # no such adapter or link
