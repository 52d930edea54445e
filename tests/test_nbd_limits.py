"""NBD clients that try to outlast or exhaust the server (issue 15, finding 7).

Each attack runs against a real server over its Unix socket with raw sockets: a handshake that
trickles one byte at a time, a connection that never stops sending options, and more clients
than the cap. After each, real clients (nbdinfo, qemu-io) must still work.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time

import pytest

from appliance.nbd import protocol as p
from appliance.nbd.server import MAX_CONNECTIONS, NbdServer
from appliance.nbd.session import HANDSHAKE_TIMEOUT
from tests.nbd_helpers import RawClient, run, serve, wait_for
from tests.test_daemon_support import Served, qemu_io, status

GREETING = 18  # NBDMAGIC, IHAVEOPT, handshake flags


def greeted(sock_path: str) -> RawClient:
    """A raw client past the greeting and client flags, in option haggling."""
    c = RawClient.__new__(RawClient)
    c.p, c.struct = p, struct
    c.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.s.settimeout(10)
    c.s.connect(sock_path)
    assert c.recv(GREETING)[:8] == struct.pack(">Q", p.NBDMAGIC)
    c.s.sendall(struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES))
    return c


def closed_by_server(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def test_defaults_are_the_documented_ones() -> None:
    assert HANDSHAKE_TIMEOUT == 30 and p.MAX_OPTIONS == 32 and MAX_CONNECTIONS == 8


def test_trickled_handshake_is_cut_at_the_total_deadline(tmp_path, caplog) -> None:
    """One byte every 0.3 s never trips a per-receive timeout; the total deadline still ends
    it (before the fix, one byte every 8 s kept a 30 s handshake open for 48 s and more)."""
    deadline = 2.0
    with serve(tmp_path, handshake_timeout=deadline) as s, caplog.at_level(logging.INFO):
        c = greeted(s.sock)
        start = time.monotonic()
        option = p.OPTION.pack(p.IHAVEOPT, p.OPT_LIST, 0) * 100
        sent = 0
        try:
            while time.monotonic() - start < 3 * deadline:
                c.s.sendall(option[sent : sent + 1])
                sent += 1
                time.sleep(0.3)
        except (BrokenPipeError, ConnectionResetError):
            pass
        else:
            pytest.fail(f"server still reading the trickle after {3 * deadline} s")
        cut = time.monotonic() - start
        print(f"trickled handshake cut after {cut:.1f} s ({sent} bytes sent)")
        assert deadline - 0.5 < cut < deadline + 1.5
        assert closed_by_server(c.s)
        assert wait_for(lambda: s.server.active_connections == 0)
        assert "did not finish the handshake within 2 s" in caplog.text
        run("nbdinfo", s.uri)  # a real client is served normally afterwards


def test_a_client_that_never_reads_is_cut_at_the_deadline_too(tmp_path) -> None:
    """Options whose replies are never read fill the socket; sending must not wait forever."""
    with serve(tmp_path, handshake_timeout=1.5) as s:
        c = greeted(s.sock)
        c.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        info = struct.pack(">IH", 0, 2) + struct.pack(">HH", p.INFO_NAME, p.INFO_DESCRIPTION)
        flood = p.OPTION.pack(p.IHAVEOPT, p.OPT_INFO, len(info)) + info
        c.s.sendall(flood * p.MAX_OPTIONS)
        assert wait_for(lambda: s.server.active_connections == 0, timeout=5)
        run("nbdinfo", s.uri)


def test_option_flood_is_refused_after_the_cap(tmp_path, caplog) -> None:
    """20,000 LIST options on one connection used to be answered one by one, forever."""
    with serve(tmp_path) as s, caplog.at_level(logging.WARNING):
        c = greeted(s.sock)
        answered, last = 0, None
        for _ in range(20_000):
            try:
                replies = c.option(p.OPT_LIST)
            except (ConnectionError, AssertionError):
                break
            last = replies[-1][0]
            if last != p.REP_ACK:
                break
            answered += 1
        assert answered == p.MAX_OPTIONS
        assert last == p.REP_ERR_POLICY
        assert closed_by_server(c.s)
        assert f"more than {p.MAX_OPTIONS} options" in caplog.text
        assert wait_for(lambda: s.server.active_connections == 0)
        listed = run("nbdinfo", "--list", s.uri).stdout  # the most options a real client sends
        assert "savepoint" in listed
        qemu_io(s.uri, "write -P 0x5a 0 64k", "read -P 0x5a 0 64k")


def test_over_the_cap_new_clients_are_refused_at_once_and_logged_once(tmp_path, caplog) -> None:
    with serve(tmp_path, max_connections=3) as s, caplog.at_level(logging.WARNING):
        holders = [RawClient(s.sock) for _ in range(2)] + [greeted(s.sock)]  # one mid-handshake
        assert wait_for(lambda: s.server.active_connections == 3)
        start = time.monotonic()
        for _ in range(50):
            late = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            late.settimeout(5)
            late.connect(s.sock)
            assert closed_by_server(late), "a client over the cap got a greeting"
            late.close()
        took = time.monotonic() - start
        print(f"50 refusals in {took:.2f} s")
        assert took < 5
        assert s.server.refused == 50
        refusals = [r for r in caplog.records if "refused" in r.getMessage()]
        assert len(refusals) == 1, [r.getMessage() for r in refusals]
        assert "3 connections are open" in refusals[0].getMessage()
        assert holders[0].request(p.CMD_WRITE, 0, 5, payload=b"still") == (0, b"")
        assert holders[1].request(p.CMD_READ, 0, 5) == (0, b"still")
        assert holders[2].option(p.OPT_LIST)[-1][0] == p.REP_ACK  # still haggling, fine
        holders[0].close()
        assert wait_for(lambda: "50 NBD connections were refused while 3 were open" in caplog.text)
        qemu_io(s.uri, "read -P 0 4096 4096")  # a slot is free again: a real client gets it
        for h in holders[1:]:
            h.close()


def test_max_connections_must_be_positive(tmp_path) -> None:
    with pytest.raises(ValueError, match="max_connections must be at least 1"):
        NbdServer(object(), unix_path=str(tmp_path / "x.sock"), max_connections=0)


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_serve_flag_caps_connections_and_idle_memory_is_bounded(tmp_path) -> None:
    """`savepoint serve --max-connections 4`: the cap holds on the real command, and idle
    connections cost little memory (the figures in docs/nbd.md come from here)."""
    served = Served(str(tmp_path / "disk.img"), "--max-connections", "4")
    try:
        pid = served.proc.pid
        qemu_io(served.uri, "write -P 0x11 0 4M")  # warm up: the first request's imports
        base = _rss_kib(pid)
        haggling = [greeted(served.nbd) for _ in range(2)]
        time.sleep(0.3)
        handshaking = _rss_kib(pid)
        idle = [RawClient(served.nbd) for _ in range(2)]
        time.sleep(0.3)
        transmitting = _rss_kib(pid)
        late = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        late.settimeout(5)
        late.connect(served.nbd)
        assert closed_by_server(late)
        late.close()
        almost = (4 << 20) - (64 << 10)  # the largest read that fits in the send buffer
        for c in idle:  # the worst case: both 4 MiB buffers touched
            assert c.request(p.CMD_WRITE, 0, 4 << 20, payload=b"\x22" * (4 << 20))[0] == 0
            assert c.request(p.CMD_READ, 0, almost)[0] == 0
        time.sleep(0.3)
        used = _rss_kib(pid)
        per_handshake = (handshaking - base) / 2
        per_idle = (transmitting - handshaking) / 2
        per_used = (used - handshaking) / 2
        print(
            f"RSS {base} KiB serving; per connection: {per_handshake:.0f} KiB in the "
            f"handshake, {per_idle:.0f} KiB idle after it, {per_used:.0f} KiB after a 4 MiB "
            "write and read"
        )
        assert per_handshake < 1024 and per_idle < 1024
        assert per_used < 9 * 1024  # 4 MiB receive + 4 MiB send buffer, at most
        err = served.stderr()
        assert err.count("NBD connection from unix refused: 4 connections are open") == 1
        for c in idle + haggling:
            c.close()
        # the server frees a slot when it sees the close, not when the client makes it
        assert wait_for(lambda: status(served.control).get("nbd_clients") == 0, 30)
        qemu_io(served.uri, "read -P 0x22 0 4M")
    finally:
        served.cleanup()


def test_cap_counts_connections_across_threads(tmp_path) -> None:
    """Many clients racing for the last slots: never more sessions than the cap."""
    with serve(tmp_path, max_connections=4) as s:
        peak = [0]
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], s.server.active_connections)

        watcher = threading.Thread(target=watch)
        watcher.start()
        clients: list[RawClient] = []
        lock = threading.Lock()

        def connect() -> None:
            try:
                c = RawClient(s.sock)
            except (ConnectionError, AssertionError, OSError):
                return
            with lock:
                clients.append(c)

        threads = [threading.Thread(target=connect) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        watcher.join()
        assert len(clients) == 4 and peak[0] <= 4
        assert s.server.refused == 12
        for c in clients:
            c.close()
        assert os.path.exists(s.sock)


@pytest.mark.parametrize("bad", [0, -3])
def test_config_refuses_a_cap_below_one(bad: int) -> None:
    from appliance.config import ConfigError, validate
    from appliance.settings import NoSettings

    with pytest.raises(ConfigError, match=r"\[nbd\] max_connections: .* less than 1"):
        validate({"nbd": {"max_connections": bad}}, settings_for=lambda _s: NoSettings)
