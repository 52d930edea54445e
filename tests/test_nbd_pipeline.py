"""Pipelined requests, as the kernel client and fio at QD16 send them: many requests per
receive, payloads split across receives or larger than the receive buffer, reads larger than
the send buffer, and garbage after valid requests. Every reply must match a model of the disk.
"""

from __future__ import annotations

import random
import struct
import threading
import time

import pytest

from appliance.nbd import protocol as p
from appliance.nbd import replies as nbd_replies
from appliance.nbd import session as nbd_session
from tests.nbd_helpers import MiB, RawClient, serve, wait_for

SIZE = 16 * MiB


class Pipeline:
    """Requests queued locally, sent in one go (or in pieces) by a thread, replies by cookie."""

    def __init__(self, client: RawClient) -> None:
        self.c, self.out, self.expect = client, bytearray(), {}
        self.n = 0

    def add(
        self, cmd: int, offset: int, length: int, payload: bytes = b"", flags: int = 0
    ) -> bytes:
        self.n += 1
        cookie = struct.pack(">Q", self.n)
        self.out += p.REQUEST.pack(p.REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload
        self.expect[cookie] = (cmd, length)
        return cookie

    def run(self, pieces: int = 1) -> dict[bytes, tuple[int, bytes]]:
        data, step = bytes(self.out), -(-len(self.out) // pieces)

        def send() -> None:
            for i in range(0, len(data), step):
                self.c.s.sendall(data[i : i + step])
                if pieces > 1:
                    time.sleep(0.001)

        sender = threading.Thread(target=send)
        sender.start()  # the server answers while we still send: read concurrently
        replies = dict(self.reply() for _ in self.expect)
        sender.join()
        return replies

    def reply(self) -> tuple[bytes, tuple[int, bytes]]:
        (magic,) = struct.unpack(">I", self.c.recv(4))
        if magic == p.SIMPLE_REPLY_MAGIC:
            err, cookie = struct.unpack(">I8s", self.c.recv(12))
            cmd, length = self.expect[cookie]
            data = self.c.recv(length) if cmd == p.CMD_READ and not err else b""
            return cookie, (err, data)
        assert magic == p.STRUCTURED_REPLY_MAGIC, hex(magic)
        flags, rtype, cookie, n = struct.unpack(">HH8sI", self.c.recv(16))
        body = self.c.recv(n)
        assert flags & p.REPLY_FLAG_DONE  # this server answers every request with one chunk
        if rtype & 0x8000:
            return cookie, (struct.unpack(">I", body[:4])[0], b"")
        return cookie, (0, body[8:] if rtype == p.REPLY_TYPE_OFFSET_DATA else b"")


def workload(pipe: Pipeline, rnd: random.Random, model: bytearray) -> dict[bytes, bytes]:
    """Queue a mix of requests; returns what each read must return."""
    reads: dict[bytes, bytes] = {}
    big = nbd_session.RECV_SIZE + 3 * 4096 + 5  # larger than the receive buffer
    for i in range(300):
        kind = rnd.choice(["w4k", "w4k", "r4k", "r4k", "wodd", "r64k", "flush", "bad"])
        if i == 150:
            kind = "wbig"
        if i == 200:
            kind = "rbig"
        if kind in ("w4k", "wodd", "wbig"):
            n = {"w4k": 4096, "wodd": rnd.randint(1, 70000), "wbig": big}[kind]
            off = rnd.randrange(0, SIZE - n)
            data = rnd.randbytes(n)
            model[off : off + n] = data
            pipe.add(p.CMD_WRITE, off, n, data, flags=rnd.choice([0, 0, p.CMD_FLAG_FUA]))
        elif kind in ("r4k", "r64k", "rbig"):
            n = {"r4k": 4096, "r64k": 65536 + rnd.randint(0, 9), "rbig": SIZE}[kind]
            off = rnd.randrange(0, SIZE - n + 1)
            reads[pipe.add(p.CMD_READ, off, n)] = bytes(model[off : off + n])
        elif kind == "flush":
            pipe.add(p.CMD_FLUSH, 0, 0)
        else:
            pipe.add(p.CMD_READ, SIZE - 10, 11)  # past the end: EINVAL, nothing else changes
    return reads


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("pieces", [1, 97])
@pytest.mark.parametrize("small", [False, True])
def test_pipelined_requests_match_the_model(tmp_path, monkeypatch, structured, pieces, small):
    if small:  # tiny buffers: every edge (payload wraps, oversized requests) is hit often
        monkeypatch.setattr(nbd_session, "RECV_SIZE", 64 << 10)
        for name, value in [
            ("SEND_SIZE", 48 << 10),
            ("SEND_EARLY", 40 << 10),
            ("MAX_PARTS", 3),
            ("ALIGN_FROM", 4096),
        ]:
            monkeypatch.setattr(nbd_replies, name, value)
    with serve(tmp_path, size=SIZE) as s:
        model = bytearray(SIZE)
        c = RawClient(s.sock, structured=structured)
        pipe = Pipeline(c)
        reads = workload(pipe, random.Random(pieces + small), model)
        replies = pipe.run(pieces)
        assert set(replies) == set(pipe.expect)  # every request got exactly one reply
        for cookie, (cmd, _) in pipe.expect.items():
            err, data = replies[cookie]
            if cookie in reads:
                assert err == 0 and data == reads[cookie], f"read {cookie.hex()} differs"
            elif cmd == p.CMD_READ:
                assert err == p.EINVAL
            else:
                assert err == 0
        c.s.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_DISC, b"disc0001", 0, 0))
        assert c.s.recv(1) == b""  # DISC: no reply, the connection closes
        c.close()
        assert s.store.read(0, SIZE) == bytes(model)


def test_garbage_after_valid_requests_answers_them_then_hangs_up(tmp_path):
    with serve(tmp_path, size=SIZE) as s:
        c = RawClient(s.sock)
        pipe = Pipeline(c)
        for i in range(20):
            pipe.add(p.CMD_WRITE, i * 4096, 4096, bytes([i]) * 4096)
        pipe.out += b"\x00" * 28  # a bad magic
        replies = pipe.run()
        assert all(err == 0 for err, _ in replies.values()) and len(replies) == 20
        assert c.s.recv(1) == b""  # then the server hung up on the garbage
        assert s.store.read(19 * 4096, 4096) == bytes([19]) * 4096
        assert wait_for(lambda: s.server.active_connections == 0)
