"""The server's own contract: where and how it listens, URIs and examples, counters, stop."""

from __future__ import annotations

import grp
import logging
import os
import socket
import stat
import threading

import pytest

from appliance.nbd import protocol as p
from appliance.nbd.server import NbdServer
from appliance.store import Store, create_store
from tests.nbd_helpers import MiB, RawClient, run, serve, wait_for


@pytest.fixture
def store(tmp_path):
    create_store(str(tmp_path / "disk.sp"), 4 * MiB)
    st = Store.open(str(tmp_path / "disk.sp"))
    yield st
    st.close()


def test_unix_socket_is_0600_and_uri_and_examples_name_it(tmp_path):
    with serve(tmp_path, size=4 * MiB) as s:
        mode = os.stat(s.sock).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        assert s.server.uris == [f"nbd+unix:///savepoint?socket={s.sock}"]
        ex = s.server.examples()
        assert f"nbdinfo '{s.uri}'" in ex
        assert f"qemu-system-x86_64 -m 2G -drive 'file={s.uri},format=raw" in ex
        assert f"nbd-client -unix {s.sock} -N savepoint /dev/nbd0" in ex
        assert run("nbdinfo", "--size", s.uri).stdout.strip() == str(4 * MiB)
    assert not os.path.exists(s.sock)  # stop() removes its socket


def test_group_socket_is_0660_with_that_group(tmp_path, store):
    group = grp.getgrgid(os.getgid()).gr_name
    srv = NbdServer(store, unix_path=str(tmp_path / "g.sock"), group=group)
    srv.start()
    try:
        st = os.stat(tmp_path / "g.sock")
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getgid()
    finally:
        srv.stop()
    with pytest.raises(ValueError, match="group 'no-such-group-xyz' does not exist"):
        NbdServer(store, unix_path=str(tmp_path / "h.sock"), group="no-such-group-xyz").start()
    assert not os.path.exists(tmp_path / "h.sock")


def test_stale_socket_is_replaced_but_a_live_one_is_not_stolen(tmp_path, store):
    path = str(tmp_path / "nbd.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens: a crashed server's leftover
    srv = NbdServer(store, unix_path=path)
    srv.start()
    try:
        other = NbdServer(store, unix_path=path)
        with pytest.raises(OSError, match="already listening"):
            other.start()
        assert RawClient(path).request(p.CMD_READ, 0, 4)[0] == 0  # first server unharmed
    finally:
        srv.stop()
    (tmp_path / "file").write_text("not a socket")
    with pytest.raises(ValueError, match="not a socket"):
        NbdServer(store, unix_path=str(tmp_path / "file")).start()
    assert (tmp_path / "file").read_text() == "not a socket"


def test_non_loopback_tcp_needs_allow_remote_and_warns(store, caplog):
    with pytest.raises(ValueError, match="non-loopback.*allow_remote"):
        NbdServer(store, tcp=("0.0.0.0", 0))
    srv = NbdServer(store, tcp=("0.0.0.0", 0), allow_remote=True)
    with caplog.at_level(logging.WARNING, logger="savepoint.nbd"):
        srv.start()
    srv.stop()
    assert any("without TLS" in r.getMessage() for r in caplog.records)


def test_tcp_uri_has_the_bound_port(store):
    srv = NbdServer(store, tcp=("127.0.0.1", 0))
    srv.start()
    try:
        (uri,) = srv.uris
        port = int(uri.rsplit(":", 1)[1].split("/")[0])
        assert port > 0 and uri == f"nbd://127.0.0.1:{port}/savepoint"
        assert run("nbdinfo", "--size", uri).stdout.strip() == str(4 * MiB)
    finally:
        srv.stop()


def test_counters_and_stop_drains_in_flight_requests(tmp_path):
    with serve(tmp_path, size=4 * MiB) as s:
        c1, c2 = RawClient(s.sock), RawClient(s.sock)
        assert s.server.active_connections == 2 and s.server.inflight == 0
        gate, entered = threading.Event(), threading.Event()
        real_write = s.store.write

        def slow_write(*a, **k):
            entered.set()
            gate.wait(10)
            return real_write(*a, **k)

        s.store.write = slow_write  # hold one write in flight
        c1.s.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_WRITE, b"cookie01", 0, 4) + b"late")
        assert entered.wait(10)
        assert s.server.inflight == 1
        stopper = threading.Thread(target=s.server.stop)
        stopper.start()
        assert wait_for(lambda: s.server.stopping)
        gate.set()
        assert c1.reply(b"cookie01", False, 0) == (0, b"")  # finished, not dropped
        stopper.join(10)
        assert not stopper.is_alive() and s.server.active_connections == 0
        assert c2.s.recv(1) == b""
        del s.store.write
        assert s.store.read(0, 4) == b"late"
