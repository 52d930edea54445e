"""Shared fixtures for the NBD tests: a real store on a temp file, served on a Unix socket."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from appliance.nbd.server import NbdServer
from appliance.store import Store, create_store

MiB = 1 << 20
SYS_PYTHON = "/usr/bin/python3"  # Debian's python3-libnbd belongs to the system interpreter
ENV = {**os.environ, "PATH": "/usr/bin:/usr/sbin:/bin:/sbin:" + os.environ.get("PATH", "")}


@dataclass
class Served:
    server: NbdServer
    store: Store
    path: str  # the store's file
    sock: str

    @property
    def uri(self) -> str:
        return self.server.uris[0]


@contextmanager
def serve(
    tmp_path, size: int = 64 * MiB, unit: int = 4096, create: bool = True, **kwargs
) -> Iterator[Served]:
    path = str(tmp_path / "disk.sp")
    if create:
        create_store(path, size, unit=unit)
    store = Store.open(path)
    sock = str(tmp_path / "nbd.sock")
    server = NbdServer(store, unix_path=sock, **kwargs)
    server.start()
    try:
        yield Served(server, store, path, sock)
    finally:
        server.stop()
        store.close()


def run(*argv: str, timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=ENV, **kw)
    if check and proc.returncode:
        raise AssertionError(f"{argv[0]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def libnbd(script: str, *args: str, timeout: float = 120):
    """Run a python3-libnbd script (system python); it prints one JSON value: return it."""
    proc = subprocess.run(
        [SYS_PYTHON, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def wait_for(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def snapshot(store: Store) -> tuple[bytes, bytes, int]:
    """Everything a client could notice: visible image, saved image, epoch."""
    return store.read(0, store.size), store.read_saved(0, store.size), store.epoch


class RawClient:
    """A bare-bones NBD client over a socket, for requests no real client will send."""

    def __init__(self, sock_path: str, structured: bool = False, meta: bool = False) -> None:
        import socket
        import struct

        from appliance.nbd import protocol as p

        self.p, self.struct = p, struct
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(10)
        self.s.connect(sock_path)
        assert self.recv(18)[:16] == struct.pack(">QQ", p.NBDMAGIC, p.IHAVEOPT)
        self.s.sendall(struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES))
        self.structured = structured
        if structured:
            assert self.option(p.OPT_STRUCTURED_REPLY)[-1][0] == p.REP_ACK
        if meta:
            q = p.BASE_ALLOCATION.encode()
            data = struct.pack(">I", 0) + struct.pack(">II", 1, len(q)) + q
            assert self.option(p.OPT_SET_META_CONTEXT, data)[-1][0] == p.REP_ACK
        replies = self.option(p.OPT_GO, struct.pack(">IH", 0, 0))
        assert replies[-1][0] == p.REP_ACK, replies

    def recv(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.s.recv(n - len(out))
            if not chunk:
                raise ConnectionError("server closed the connection")
            out += chunk
        return out

    def option(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        p = self.p
        self.s.sendall(p.OPTION.pack(p.IHAVEOPT, opt, len(data)) + data)
        replies = []
        while True:
            magic, ropt, rtype, n = p.OPTION_REPLY.unpack(self.recv(p.OPTION_REPLY.size))
            assert magic == p.REPLY_MAGIC and ropt == opt
            replies.append((rtype, self.recv(n)))
            if rtype not in (p.REP_SERVER, p.REP_INFO, p.REP_META_CONTEXT):
                return replies

    def request(
        self,
        cmd: int,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        payload: bytes = b"",
        cookie: bytes = b"cookie01",
    ) -> tuple[int, bytes]:
        """Send one request; return (error, data) of its reply."""
        p = self.p
        self.s.sendall(
            p.REQUEST.pack(p.REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload
        )
        return self.reply(cookie, cmd == p.CMD_READ and not self.structured, length)

    def reply(self, cookie: bytes, simple_read: bool, length: int) -> tuple[int, bytes]:
        p, st = self.p, self.struct
        (magic,) = st.unpack(">I", self.recv(4))
        if magic == p.SIMPLE_REPLY_MAGIC:
            err, ck = st.unpack(">I8s", self.recv(12))
            assert ck == cookie
            return err, (self.recv(length) if simple_read and not err else b"")
        assert magic == p.STRUCTURED_REPLY_MAGIC, hex(magic)
        data, err = b"", 0
        while True:
            flags, rtype, ck, n = st.unpack(">HH8sI", self.recv(16))
            assert ck == cookie
            body = self.recv(n)
            if rtype & 0x8000:
                err = st.unpack(">I", body[:4])[0]
            elif rtype == p.REPLY_TYPE_OFFSET_DATA:
                data += body[8:]
            elif rtype != p.REPLY_TYPE_NONE:
                data += body
            if flags & p.REPLY_FLAG_DONE:
                return err, data
            assert st.unpack(">I", self.recv(4))[0] == p.STRUCTURED_REPLY_MAGIC

    def close(self) -> None:
        self.s.close()
