"""Every error case: the spec's error code, the connection kept where the spec allows, and the
store unchanged afterwards (visible image, saved image and epoch)."""

from __future__ import annotations

import errno
import logging
import struct

import pytest

from appliance.nbd import protocol as p
from appliance.store import Store
from tests.nbd_helpers import MiB, RawClient, libnbd, serve, snapshot

SIZE = 8 * MiB


@pytest.fixture
def served(tmp_path):
    with serve(tmp_path, size=SIZE) as s:
        s.store.write(0, b"saved" * 1000)
        s.store.save("test")
        s.store.write(MiB, b"work" * 1000)
        yield s


LIBNBD_ERRORS = """
import json, sys, nbd
h = nbd.NBD()
h.set_strict_mode(0)  # let requests the client would refuse reach the server
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(sys.argv[1])
size = h.get_size()
def err(f):
    try:
        f()
        return 0
    except nbd.Error as e:
        return e.errnum
cb = lambda *a: 0
out = {
    "write_past_end": err(lambda: h.pwrite(b"x" * 8192, size - 4096)),
    "write_at_end": err(lambda: h.pwrite(b"x", size)),
    "write_fua_past_end": err(lambda: h.pwrite(b"x" * 512, size, nbd.CMD_FLAG_FUA)),
    "zero_past_end": err(lambda: h.zero(8192, size - 4096)),
    "read_past_end": err(lambda: h.pread(8192, size - 4096)),
    "trim_past_end": err(lambda: h.trim(8192, size - 4096)),
    "cache_past_end": err(lambda: h.cache(8192, size - 4096)),
    "block_status_past_end": err(lambda: h.block_status(8192, size - 4096, cb)),
    "write_unknown_flag": err(lambda: h.pwrite(b"x" * 512, 0, 1 << 9)),
    "write_no_hole_flag": err(lambda: h.pwrite(b"x" * 512, 0, nbd.CMD_FLAG_NO_HOLE)),
    "trim_fast_zero_flag": err(lambda: h.trim(4096, 0, nbd.CMD_FLAG_FAST_ZERO)),
    "read_req_one_flag": err(lambda: h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE)),
    "flush_ok_after_errors": err(lambda: h.flush()),
    "still_reads": h.pread(5, 0).decode(),
}
h.shutdown()
print(json.dumps(out))
"""


def test_libnbd_error_codes_keep_the_connection_and_the_store(served):
    before = snapshot(served.store)
    got = libnbd(LIBNBD_ERRORS, served.uri)
    assert got == {
        "write_past_end": errno.ENOSPC,
        "write_at_end": errno.ENOSPC,
        "write_fua_past_end": errno.ENOSPC,
        "zero_past_end": errno.ENOSPC,
        "read_past_end": errno.EINVAL,
        "trim_past_end": errno.EINVAL,
        "cache_past_end": errno.EINVAL,
        "block_status_past_end": errno.EINVAL,
        "write_unknown_flag": errno.EINVAL,
        "write_no_hole_flag": errno.EINVAL,
        "trim_fast_zero_flag": errno.EINVAL,
        "read_req_one_flag": errno.EINVAL,
        "flush_ok_after_errors": 0,
        "still_reads": "saved",
    }
    assert snapshot(served.store) == before


@pytest.mark.parametrize("structured", [False, True])
def test_unknown_command_and_bad_flags_get_einval_connection_survives(served, structured):
    before = snapshot(served.store)
    c = RawClient(served.sock, structured=structured)
    assert c.request(99, 0, 4096)[0] == p.EINVAL
    assert c.request(p.CMD_FLUSH, flags=p.CMD_FLAG_NO_HOLE)[0] == p.EINVAL
    assert c.request(p.CMD_READ, 0, 64, flags=1 << 7)[0] == p.EINVAL
    assert c.request(p.CMD_BLOCK_STATUS, 0, 4096)[0] == p.EINVAL  # no context negotiated
    assert c.request(p.CMD_READ, 0, p.MAX_PAYLOAD + 1)[0] == p.EINVAL
    assert c.request(p.CMD_WRITE, SIZE, 4, payload=b"late")[0] == p.ENOSPC
    assert c.request(p.CMD_WRITE_ZEROES, SIZE - 1, 2)[0] == p.ENOSPC
    assert c.request(p.CMD_TRIM, SIZE, 1)[0] == p.EINVAL
    if not structured:  # DF is only advertised (so only valid) with structured replies
        assert c.request(p.CMD_READ, 0, 64, flags=p.CMD_FLAG_DF)[0] == p.EINVAL
    assert c.request(p.CMD_READ, 0, 5) == (0, b"saved")
    c.close()
    assert snapshot(served.store) == before


def test_block_status_req_one_and_extents(served):
    c = RawClient(served.sock, structured=True, meta=True)
    err, data = c.request(p.CMD_BLOCK_STATUS, 0, 2 * MiB)
    assert err == 0
    ctx, *ext = struct.unpack(f">I{(len(data) - 4) // 4}I", data)
    assert ctx == p.BASE_ALLOCATION_ID
    pairs = list(zip(ext[::2], ext[1::2], strict=True))
    assert pairs == [(8192, 0), (MiB - 8192, 3), (4096, 0), (MiB - 4096, 3)]
    err, data = c.request(p.CMD_BLOCK_STATUS, 4096, MiB, flags=p.CMD_FLAG_REQ_ONE)
    assert err == 0 and struct.unpack(">III", data) == (p.BASE_ALLOCATION_ID, 4096, 0)
    c.close()


def test_protocol_garbage_closes_only_that_connection(served):
    before = snapshot(served.store)
    good = RawClient(served.sock)
    bad = RawClient(served.sock)
    bad.s.sendall(b"\xde\xad\xbe\xef" + bytes(24))  # bad request magic
    assert bad.s.recv(1) == b""  # hard disconnect
    huge = RawClient(served.sock)
    huge.s.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_WRITE, b"c" * 8, 0, p.MAX_PAYLOAD + 1))
    assert huge.s.recv(1) == b""
    assert good.request(p.CMD_READ, 0, 5) == (0, b"saved")
    good.close()
    assert snapshot(served.store) == before


def _handshake(sock: str, client_flags: int = 1) -> RawClient:
    c = RawClient.__new__(RawClient)
    import socket

    c.p, c.struct = p, struct
    c.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.s.settimeout(10)
    c.s.connect(sock)
    c.recv(18)
    c.s.sendall(struct.pack(">I", client_flags))
    return c


def test_handshake_errors_are_option_replies_or_a_closed_connection(served):
    before = snapshot(served.store)
    c = _handshake(served.sock)
    assert c.option(77)[0][0] == p.REP_ERR_UNSUP
    assert c.option(p.OPT_STARTTLS)[0][0] == p.REP_ERR_UNSUP
    assert c.option(p.OPT_LIST, b"junk")[0][0] == p.REP_ERR_INVALID
    assert c.option(p.OPT_INFO, b"\0\0")[0][0] == p.REP_ERR_INVALID  # truncated
    assert c.option(p.OPT_GO, struct.pack(">I", 5) + b"other" + bytes(2))[0][0] == p.REP_ERR_UNKNOWN
    q = p.BASE_ALLOCATION.encode()
    meta = struct.pack(">III", 0, 1, len(q)) + q
    assert c.option(p.OPT_SET_META_CONTEXT, meta)[0][0] == p.REP_ERR_INVALID  # no SR yet
    assert c.option(p.OPT_STRUCTURED_REPLY)[0][0] == p.REP_ACK
    listed = c.option(p.OPT_LIST_META_CONTEXT, struct.pack(">II", 0, 0))
    assert listed[0][0] == p.REP_META_CONTEXT and listed[0][1][4:] == q
    assert c.option(p.OPT_LIST)[0][1][4:13] == b"savepoint"
    assert c.option(p.OPT_ABORT)[0][0] == p.REP_ACK
    assert c.s.recv(1) == b""
    for client_flags, garbage in (
        (0x80, b""),  # unknown client flag
        (1, b"NOTMAGIC" + bytes(8)),  # bad option magic
        (1, p.OPTION.pack(p.IHAVEOPT, p.OPT_LIST, 1 << 30)),  # absurd option length
        (1, p.OPTION.pack(p.IHAVEOPT, p.OPT_EXPORT_NAME, 4) + b"nope"),  # unknown export
    ):
        bad = _handshake(served.sock, client_flags)
        try:
            bad.s.sendall(garbage)
            assert bad.s.recv(1) == b""
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server hung up before the garbage was all sent: also a close
    assert RawClient(served.sock).request(p.CMD_READ, 0, 5) == (0, b"saved")
    assert snapshot(served.store) == before


def test_backend_io_error_is_eio_with_a_log_line(served, monkeypatch, caplog):
    c = RawClient(served.sock, structured=True)
    before = snapshot(served.store)

    def broken(*a, **k):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(served.store._b, "pread_into", broken)
    monkeypatch.setattr(served.store._b, "pwrite", broken)
    with caplog.at_level(logging.ERROR, logger="savepoint.nbd"):
        assert c.request(p.CMD_READ, 0, 4096)[0] == p.EIO
        assert c.request(p.CMD_WRITE, 2 * MiB, 4096, payload=bytes(4096))[0] == p.EIO
    assert sum("I/O error" in r.getMessage() for r in caplog.records) == 2
    monkeypatch.undo()
    assert c.request(p.CMD_READ, 0, 5) == (0, b"saved")  # the connection survived
    assert snapshot(served.store) == before


def test_read_only_store_refuses_writes_with_eperm(tmp_path):
    with serve(tmp_path, size=SIZE) as s:
        s.store.write(0, b"data")
    store = Store.open(s.path, readonly=True)
    from appliance.nbd.server import NbdServer

    srv = NbdServer(store, unix_path=str(tmp_path / "ro.sock"))
    srv.start()
    try:
        c = RawClient(str(tmp_path / "ro.sock"))
        for cmd in (p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES):
            payload = b"xxxx" if cmd == p.CMD_WRITE else b""
            assert c.request(cmd, 0, 4, payload=payload)[0] == p.EPERM
        assert c.request(p.CMD_READ, 0, 4) == (0, b"data")
        assert c.request(p.CMD_FLUSH)[0] == 0
    finally:
        srv.stop()
        store.close()
