"""The NBD handshake: fixed newstyle option haggling, as a small state machine over two
callables, so a real socket (appliance/nbd/session.py) or a test can drive it.

It answers the options real clients send (GO, INFO, LIST, STRUCTURED_REPLY and the
base:allocation meta context), refuses the rest with the spec's error replies, and bounds
what one connection may send (MAX_OPTION_DATA, MAX_OPTIONS, MAX_STRING). The wire format's
numbers and structs are in appliance/nbd/protocol.py.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from appliance.nbd import protocol as p


class Aborted(Exception):
    """The client ended option haggling (NBD_OPT_ABORT): close the connection quietly."""


@dataclass
class Export:
    """What the handshake advertises about the one export."""

    name: str
    size: int
    min_block: int
    preferred_block: int
    description: str = ""
    read_only: bool = False


@dataclass
class Negotiated:
    """The result of the handshake, as the transmission phase needs it."""

    structured: bool = False
    contexts: dict[int, str] = field(default_factory=dict)
    flags: int = 0


def transmission_flags(export: Export, structured: bool) -> int:
    flags = (
        p.FLAG_HAS_FLAGS
        | p.FLAG_SEND_FLUSH
        | p.FLAG_SEND_FUA
        | p.FLAG_SEND_TRIM
        | p.FLAG_SEND_WRITE_ZEROES
        | p.FLAG_SEND_FAST_ZERO
        | p.FLAG_CAN_MULTI_CONN
        | p.FLAG_SEND_CACHE
    )
    if structured:
        flags |= p.FLAG_SEND_DF  # every read is answered by a single content chunk anyway
    if export.read_only:
        flags |= p.FLAG_READ_ONLY
    return flags


class _Reader:
    """Bounds-checked parsing of one option's data; any overrun is p.REP_ERR_INVALID."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError("option data too short")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def string(self) -> str:
        n = self.u32()
        if n > p.MAX_STRING:
            raise ValueError("string longer than 4096 bytes")
        text = self.take(n).decode()  # UnicodeDecodeError is a ValueError
        if "\0" in text:
            raise ValueError("string contains NUL")
        return text

    def done(self) -> bool:
        return self.pos == len(self.data)


class Handshake:
    """Fixed newstyle option haggling for one connection.

    recv_exact(n) returns exactly n bytes or raises ConnectionError; send(b) sends all of b.
    `stopping()` tells whether the server is shutting down (options get p.REP_ERR_SHUTDOWN).
    """

    def __init__(
        self,
        export: Export,
        recv_exact: Callable[[int], bytes],
        send: Callable[[bytes], None],
        stopping: Callable[[], bool],
    ) -> None:
        self.export = export
        self.recv_exact, self.send, self.stopping = recv_exact, send, stopping
        self.structured = False
        self.contexts: dict[int, str] = {}
        self.no_zeroes = False

    def run(self) -> Negotiated:
        """Return what was negotiated; raise ProtocolError, Aborted or ConnectionError."""
        self.send(
            p.SERVER_GREETING.pack(p.NBDMAGIC, p.IHAVEOPT, p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES)
        )
        (client_flags,) = struct.unpack(">I", self.recv_exact(4))
        if client_flags & ~(p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES):
            raise p.ProtocolError(f"unknown client flags 0x{client_flags:x}")
        self.no_zeroes = bool(client_flags & p.FLAG_C_NO_ZEROES)
        count = 0
        while True:
            count += 1
            magic, opt, length = p.OPTION.unpack(self.recv_exact(p.OPTION.size))
            if magic != p.IHAVEOPT:
                raise p.ProtocolError(f"bad option magic 0x{magic:x}")
            if length > p.MAX_OPTION_DATA:
                raise p.ProtocolError(f"option {opt} carries {length} bytes of data: refused")
            data = self.recv_exact(length) if length else b""
            if count > p.MAX_OPTIONS:
                self._error(
                    opt,
                    p.REP_ERR_POLICY,
                    f"more than {p.MAX_OPTIONS} options on one "
                    "connection: choose an export (NBD_OPT_GO) sooner",
                )
                raise p.ProtocolError(f"more than {p.MAX_OPTIONS} options during the handshake")
            done = self._option(opt, data)
            if done is not None:
                return done

    def _reply(self, opt: int, rtype: int, data: bytes = b"") -> None:
        self.send(p.OPTION_REPLY.pack(p.REPLY_MAGIC, opt, rtype, len(data)) + data)

    def _error(self, opt: int, rtype: int, message: str) -> None:
        self._reply(opt, rtype, message.encode())

    def _option(self, opt: int, data: bytes) -> Negotiated | None:
        if opt == p.OPT_ABORT:
            self._reply(opt, p.REP_ACK)
            raise Aborted()
        if opt == p.OPT_EXPORT_NAME:
            return self._export_name(data)
        if self.stopping():
            self._error(opt, p.REP_ERR_SHUTDOWN, "the server is shutting down")
            return None
        handler = {
            p.OPT_LIST: self._list,
            p.OPT_INFO: self._info,
            p.OPT_GO: self._info,
            p.OPT_STRUCTURED_REPLY: self._structured_reply,
            p.OPT_LIST_META_CONTEXT: self._meta_context,
            p.OPT_SET_META_CONTEXT: self._meta_context,
        }.get(opt)
        if handler is None:
            what = "TLS is not supported" if opt == p.OPT_STARTTLS else f"unknown option {opt}"
            self._error(opt, p.REP_ERR_UNSUP, what)
            return None
        try:
            return handler(opt, data)
        except ValueError as exc:
            self._error(opt, p.REP_ERR_INVALID, f"malformed option {opt}: {exc}")
            return None

    def _known(self, name: str) -> bool:
        return name in ("", self.export.name)

    def _negotiated(self) -> Negotiated:
        return Negotiated(
            self.structured, dict(self.contexts), transmission_flags(self.export, self.structured)
        )

    def _export_name(self, data: bytes) -> Negotiated:
        try:
            name = data.decode()
        except UnicodeDecodeError as exc:
            raise p.ProtocolError("export name is not UTF-8") from exc
        if not self._known(name) or self.stopping():
            raise p.ProtocolError(f"no export named {name!r}")  # cannot reply with an error
        neg = self._negotiated()
        tail = b"" if self.no_zeroes else bytes(124)
        self.send(p.EXPORT_REPLY.pack(self.export.size, neg.flags) + tail)
        return neg

    def _list(self, opt: int, data: bytes) -> None:
        if data:
            raise ValueError("NBD_OPT_LIST takes no data")
        name = self.export.name.encode()
        self._reply(
            opt,
            p.REP_SERVER,
            struct.pack(">I", len(name)) + name + self.export.description.encode(),
        )
        self._reply(opt, p.REP_ACK)

    def _info(self, opt: int, data: bytes) -> Negotiated | None:
        r = _Reader(data)
        name = r.string()
        requests = [r.u16() for _ in range(r.u16())]
        if not r.done():
            raise ValueError("trailing bytes after the information requests")
        if not self._known(name):
            self._error(
                opt, p.REP_ERR_UNKNOWN, f"no export named {name!r}; try {self.export.name!r}"
            )
            return None
        neg = self._negotiated()
        ex = self.export
        self._reply(opt, p.REP_INFO, p.INFO_EXPORT_S.pack(p.INFO_EXPORT, ex.size, neg.flags))
        self._reply(
            opt,
            p.REP_INFO,
            p.INFO_BLOCK_SIZE_S.pack(
                p.INFO_BLOCK_SIZE, ex.min_block, ex.preferred_block, p.MAX_PAYLOAD
            ),
        )
        if p.INFO_NAME in requests:
            self._reply(opt, p.REP_INFO, struct.pack(">H", p.INFO_NAME) + ex.name.encode())
        if p.INFO_DESCRIPTION in requests and ex.description:
            self._reply(
                opt, p.REP_INFO, struct.pack(">H", p.INFO_DESCRIPTION) + ex.description.encode()
            )
        self._reply(opt, p.REP_ACK)
        return neg if opt == p.OPT_GO else None

    def _structured_reply(self, opt: int, data: bytes) -> None:
        if data:
            raise ValueError("NBD_OPT_STRUCTURED_REPLY takes no data")
        self.structured = True
        self._reply(opt, p.REP_ACK)

    def _meta_context(self, opt: int, data: bytes) -> None:
        if opt == p.OPT_SET_META_CONTEXT:
            self.contexts = {}  # replaced even when this request fails
        r = _Reader(data)
        name = r.string()
        queries = [r.string() for _ in range(r.u32())]
        if not r.done():
            raise ValueError("trailing bytes after the queries")
        if not self.structured:
            self._error(opt, p.REP_ERR_INVALID, "negotiate NBD_OPT_STRUCTURED_REPLY first")
            return
        if not self._known(name):
            self._error(opt, p.REP_ERR_UNKNOWN, f"no export named {name!r}")
            return
        if opt == p.OPT_LIST_META_CONTEXT:
            wanted = not queries or any(q in ("base:", p.BASE_ALLOCATION) for q in queries)
        else:
            wanted = p.BASE_ALLOCATION in queries
            if wanted:
                self.contexts = {p.BASE_ALLOCATION_ID: p.BASE_ALLOCATION}
        if wanted:
            self._reply(
                opt,
                p.REP_META_CONTEXT,
                struct.pack(">I", p.BASE_ALLOCATION_ID if opt == p.OPT_SET_META_CONTEXT else 0)
                + p.BASE_ALLOCATION.encode(),
            )
        self._reply(opt, p.REP_ACK)
