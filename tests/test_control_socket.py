"""The control socket in process: grammar errors, unknown commands, permissions, watch."""

from __future__ import annotations

import asyncio
import grp
import json
import os
import shutil
import socket
import stat

import pytest

from appliance.control.bus import CommandBus
from appliance.control.requests import dispatch
from appliance.control.socket import ControlServer
from tests.test_daemon_support import short_dir


@pytest.fixture
def sockdir():
    d = short_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


async def talk(path: str, payload: bytes) -> list[dict]:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(payload)
    await writer.drain()
    writer.write_eof()
    lines = []
    while line := await reader.readline():
        lines.append(json.loads(line))
    writer.close()
    return lines


def serve(store, path, coro_fn, group="savepoint"):
    async def go():
        bus = CommandBus(store)
        server = ControlServer(bus, path, group)
        await server.start()
        try:
            return await coro_fn(bus, server)
        finally:
            await server.stop()

    return asyncio.run(go())


BAD = [
    (b"not json\n", "malformed request: not JSON"),
    (b"[1, 2]\n", "expected an object"),
    (b'{"args": {}}\n', '"cmd" must be a command name'),
    (b'{"cmd": 5}\n', '"cmd" must be a command name'),
    (b'{"cmd": "status", "args": [1]}\n', '"args" must be an object'),
    (b'{"cmd": "status", "extra": 1}\n', "unknown field(s) extra"),
    (b'{"cmd": "format-disk"}\n', "unknown command 'format-disk'"),
    (b'{"cmd": "history", "args": {"limit": -1}}\n', "positive integer"),
    (b"\xff\xfe\n", "malformed request"),
    (b"[" * 5000 + b"\n", "nested too deeply"),  # json's RecursionError, once fatal to serial
    (b'{"cmd": "status", "args": ' + b'{"a": ' * 3000 + b"\n", "nested too deeply"),
]


@pytest.mark.parametrize("line,reason", BAD)
def test_bad_requests_get_a_clear_error_and_the_connection_stays_usable(
    store, sockdir, line, reason
):
    path = os.path.join(sockdir, "c.sock")

    async def go(bus, server):
        return await talk(path, line + b'{"cmd": "status"}\n')

    epoch = store.epoch
    first, second = serve(store, path, go)
    assert first["ok"] is False and reason in first["reason"]
    assert second["ok"] is True and second["data"]["epoch"] == epoch
    assert store.epoch == epoch


def test_an_overlong_line_closes_only_that_client(store, sockdir):
    path = os.path.join(sockdir, "c.sock")

    async def go(bus, server):
        huge = await talk(path, b"x" * (200 * 1024) + b"\n")
        after = await talk(path, b'{"cmd": "status"}\n')
        return huge, after

    huge, after = serve(store, path, go)
    assert huge[0]["ok"] is False and "longer than" in huge[0]["reason"]
    assert after[0]["ok"] is True


def test_garbage_flood_does_not_stop_the_server(store, sockdir):
    path = os.path.join(sockdir, "c.sock")

    async def go(bus, server):
        for blob in (b"\x00" * 100, b"{", b'{"cmd":"save"', os.urandom(3000)):
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
                s.sendall(blob)
            await asyncio.sleep(0)
        return await talk(path, b'{"cmd": "lock"}\n{"cmd": "save"}\n')

    lock, save = serve(store, path, go)
    assert lock["ok"] and not save["ok"] and "LOCKED" in save["reason"]


def test_socket_is_0600_without_the_group(store, sockdir):
    path = os.path.join(sockdir, "c.sock")

    async def go(bus, server):
        return os.stat(path)

    st = serve(store, path, go, group="no-such-group-here")
    assert stat.S_IMODE(st.st_mode) == 0o600 and stat.S_ISSOCK(st.st_mode)
    assert not os.path.exists(path)  # removed on stop


def test_socket_is_0660_for_an_existing_group(store, sockdir):
    # root may hand the socket to any group; anyone else only to a group they are in
    usable = [
        g
        for g in grp.getgrall()
        if os.geteuid() == 0 or g.gr_gid in os.getgroups() or g.gr_gid == os.getegid()
    ]
    group = sorted(usable, key=lambda g: g.gr_gid == os.getegid())[0]
    path = os.path.join(sockdir, "c.sock")

    async def go(bus, server):
        return os.stat(path)

    st = serve(store, path, go, group=group.gr_name)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == group.gr_gid


def test_stale_socket_is_replaced_but_a_live_one_is_not(store, sockdir):
    path = os.path.join(sockdir, "c.sock")
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(path)  # a socket file nobody listens on: a crashed daemon's leftover

    async def go(bus, server):
        second = ControlServer(bus, path)
        with pytest.raises(RuntimeError, match="another savepoint daemon"):
            await second.start()
        return (await talk(path, b'{"cmd": "status"}\n'))[0]["ok"]

    assert serve(store, path, go) is True


def test_part_handlers_and_host_source(store):
    async def go():
        bus = CommandBus(store)

        async def fobs(args):
            return {"fobs": ["f1"], "args": args}

        bus.register_handler("fobs", fobs)
        listed = await dispatch(bus, '{"cmd": "fobs", "args": {"x": 1}}', "cli")
        host_unlock = await dispatch(bus, '{"cmd": "unlock"}', "host")
        itag_restore = await dispatch(bus, '{"cmd": "restore"}', "itag:aa", authenticated=False)
        return listed, host_unlock, itag_restore

    listed, host_unlock, itag_restore = asyncio.run(go())
    assert listed == {"ok": True, "reason": "", "data": {"fobs": ["f1"], "args": {"x": 1}}}
    assert not host_unlock["ok"] and "policy.host" in host_unlock["reason"]
    assert not itag_restore["ok"] and "unauthenticated" in itag_restore["reason"]


def test_watch_streams_state_then_events(store, sockdir):
    path = os.path.join(sockdir, "c.sock")

    async def go(bus, server):
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b'{"cmd": "watch"}\n')
        ack = json.loads(await reader.readline())
        state = json.loads(await reader.readline())
        await talk(path, b'{"cmd": "unlock"}\n')
        outcome = json.loads(await reader.readline())
        writer.close()
        await asyncio.sleep(0.05)
        return ack, state, outcome, len(bus._subscribers)

    ack, state, outcome, left = serve(store, path, go)
    assert ack["ok"] and state["event"] == "state" and state["data"]["mode"] == "locked"
    assert outcome["event"] == "outcome" and outcome["data"]["action"] == "unlock"
    assert left == 0  # the watcher went away: unsubscribed


def test_roles_by_peer_credentials():
    from appliance.control.roles import Peer, Roles, peer_of

    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        me = peer_of(a)
    assert me is not None and (me.uid, me.gid, me.pid) == (os.geteuid(), os.getegid(), os.getpid())
    assert set(os.getgroups()) <= set(me.groups)
    admin = grp.getgrgid(os.getegid()).gr_name  # a group that surely exists
    roles = Roles(admin)
    stranger = Peer(4242, 54321, 54321, (54322,))
    member = Peer(4242, 54321, 54321, (os.getegid(),))
    assert roles.is_admin(Peer(1, 0, 0)) and roles.is_admin(Peer(1, os.geteuid(), 54321))
    assert roles.is_admin(member) and not roles.is_admin(stranger) and not roles.is_admin(None)
    for cmd, args in [
        ("status", {}),
        ("history", {}),
        ("watch", {}),
        ("fobs", {"op": "list"}),
        ("fobs", {}),
    ]:
        assert roles.refusal(stranger, cmd, args) == ""
    for cmd, args in [
        ("unlock", {}),
        ("save", {}),
        ("restore", {}),
        ("lock", {}),
        ("pair", {}),
        ("fobs", {"op": "revoke", "id": 1}),
        ("fobs", {"op": ["list"]}),
    ]:
        reason = roles.refusal(stranger, cmd, args)
        assert f"needs root or the `{admin}` group" in reason and "uid 54321" in reason
        assert roles.refusal(member, cmd, args) == ""
    missing = Roles("no-such-admin-group").refusal(stranger, "unlock", {})
    assert "does not exist yet: `sudo groupadd no-such-admin-group`" in missing


def test_one_reader_may_hold_only_half_the_clients(store, sockdir, monkeypatch):
    from appliance.control import socket as control_socket
    from appliance.control.roles import Peer
    from appliance.control.socket import ControlLimits

    reader = Peer(4242, 54321, 54321, ())
    monkeypatch.setattr(control_socket, "peer_of", lambda sock: reader)  # as if another uid
    path = os.path.join(sockdir, "c.sock")

    async def go():
        bus = CommandBus(store)
        server = ControlServer(bus, path, limits=ControlLimits(max_clients=4, max_watchers=2))
        await server.start()
        try:
            held = [await asyncio.open_unix_connection(path) for _ in range(2)]
            await asyncio.sleep(0.05)
            reader_, writer = await asyncio.open_unix_connection(path)
            third = json.loads(await reader_.readline())
            for _, w in [*held, (reader_, writer)]:
                w.close()
            return third, server.counters["refused"]
        finally:
            await server.stop()

    third, refused = asyncio.run(go())
    assert not third["ok"] and "too many connections from uid 54321 (2)" in third["reason"]
    assert refused == 1
