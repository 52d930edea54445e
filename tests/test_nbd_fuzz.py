"""Fuzz the handshake and the request parser with hypothesis: whatever a client sends, the
server neither crashes nor hangs, answers or hangs up, keeps serving others, and the store does
not change (writes that would be valid are pushed past the end of the disk).

CI runs 200 fixed inputs per test; SAVEPOINT_FUZZ_EXAMPLES=N runs N fresh random ones (a soak).
"""

from __future__ import annotations

import os
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.nbd import protocol as p
from tests.nbd_helpers import MiB, RawClient, serve, snapshot, wait_for

SIZE = 1 * MiB
COUNT = {"handshake": 0, "requests": 0}
EXAMPLES = int(os.environ.get("SAVEPOINT_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=EXAMPLES or 200,
    deadline=None,
    database=None,
    derandomize=not EXAMPLES,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with serve(tmp_path_factory.mktemp("fuzz"), size=SIZE) as s:
        s.store.write(0, b"saved-data" * 100)
        s.store.save("fuzz")
        s.store.write(SIZE // 2, b"working" * 100)
        yield s, snapshot(s.store)
    print(f"\nNBD fuzz: {COUNT['handshake']} handshake inputs, {COUNT['requests']} request streams")


def exchange(sock_path: str, data: bytes) -> None:
    """Send everything, half-close, and require the server to finish and close in time."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(sock_path)
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server already hung up on garbage: fine
    try:
        while s.recv(1 << 16):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail("the server neither answered nor closed within 10 s")
    finally:
        s.close()


def check_unharmed(served) -> None:
    s, before = served
    assert wait_for(lambda: s.server.active_connections == 0)
    assert snapshot(s.store) == before
    c = RawClient(s.sock)
    assert c.request(p.CMD_READ, 0, 10) == (0, b"saved-data")
    c.close()


def option(opt: int, data: bytes, length: int | None = None) -> bytes:
    return p.OPTION.pack(p.IHAVEOPT, opt, len(data) if length is None else length) + data


options = st.builds(
    option,
    st.sampled_from([1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 0, 99, 2**32 - 1]),
    st.binary(max_size=64)
    | st.builds(
        lambda n, name, reqs: (
            struct.pack(">I", n)
            + name
            + struct.pack(">H", len(reqs))
            + b"".join(struct.pack(">H", r) for r in reqs)
        ),
        st.integers(0, 20),
        st.sampled_from([b"", b"savepoint", b"x"]),
        st.lists(st.integers(0, 5), max_size=4),
    ),
    st.none() | st.integers(0, 100),
)
handshakes = st.builds(
    lambda flags, opts, tail: flags + b"".join(opts) + tail,
    st.sampled_from([struct.pack(">I", f) for f in (0, 1, 2, 3, 4, 0xFFFFFFFF)])
    | st.binary(max_size=4),
    st.lists(options, max_size=6),
    st.binary(max_size=32),
)


@FUZZ
@given(data=handshakes)
def test_fuzz_handshake(served, data):
    COUNT["handshake"] += 1
    exchange(served[0].sock, data)
    check_unharmed(served)


MODIFYING = (p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES)


def request(magic_ok: bool, flags: int, cmd: int, offset: int, length: int) -> bytes:
    allowed = p.ALLOWED_CMD_FLAGS.get(cmd, 0)
    if magic_ok and cmd in MODIFYING and not flags & ~allowed and offset + length <= SIZE:
        offset = SIZE + offset % 4096  # a valid write would change the store: make it invalid
    magic = p.REQUEST_MAGIC if magic_ok else 0x12345678
    head = p.REQUEST.pack(magic, flags, cmd, b"fuzzcook", offset % 2**64, length)
    payload = b"\xee" * min(length, 4096) if cmd == p.CMD_WRITE else b""
    return head + payload


requests = st.builds(
    request,
    st.booleans() | st.just(True),
    st.sampled_from(
        [
            0,
            p.CMD_FLAG_FUA,
            p.CMD_FLAG_DF,
            p.CMD_FLAG_REQ_ONE,
            p.CMD_FLAG_NO_HOLE | p.CMD_FLAG_FAST_ZERO,
        ]
    )
    | st.integers(0, 0xFFFF),
    st.integers(0, 9) | st.integers(0, 0xFFFF),
    st.sampled_from([0, 1, SIZE - 1, SIZE, SIZE + 1, 2**63, 2**64 - 1]) | st.integers(0, SIZE),
    st.sampled_from([0, 1, 512, 4096, p.MAX_PAYLOAD + 1, 2**32 - 1]) | st.integers(0, 70000),
)


def session_prefix(structured: bool, meta: bool) -> bytes:
    out = struct.pack(">I", 3)
    if structured:
        out += option(p.OPT_STRUCTURED_REPLY, b"")
    if meta:
        q = p.BASE_ALLOCATION.encode()
        out += option(p.OPT_SET_META_CONTEXT, struct.pack(">III", 0, 1, len(q)) + q)
    return out + option(p.OPT_GO, struct.pack(">IH", 0, 0))


@FUZZ
@given(
    structured=st.booleans(),
    meta=st.booleans(),
    reqs=st.lists(requests, max_size=8),
    tail=st.binary(max_size=40),
)
def test_fuzz_requests(served, structured, meta, reqs, tail):
    COUNT["requests"] += 1
    exchange(
        served[0].sock, session_prefix(structured, meta and structured) + b"".join(reqs) + tail
    )
    check_unharmed(served)
