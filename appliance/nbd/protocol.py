"""NBD wire format (NetworkBlockDevice/nbd doc/proto.md): constants, structs and the handshake.

The handshake (fixed newstyle option haggling) lives here as a small state machine over two
callables, so it can be driven by a real socket or by a test. The transmission phase (the hot
path) is in appliance/nbd/session.py.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

# Magics
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9  # option replies
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Handshake flags (server) and client flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# Transmission flags
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11

# Options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# Option replies
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = 2**31 + 1
REP_ERR_POLICY = 2**31 + 2
REP_ERR_INVALID = 2**31 + 3
REP_ERR_UNKNOWN = 2**31 + 6
REP_ERR_SHUTDOWN = 2**31 + 7

# Info types
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# Commands and command flags
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# Structured reply flags and chunk types
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = 2**15 + 1
REPLY_TYPE_ERROR_OFFSET = 2**15 + 2

# Errors (the spec's fixed set, not the host's errno)
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

# base:allocation
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
BASE_ALLOCATION = "base:allocation"
BASE_ALLOCATION_ID = 1

MAX_PAYLOAD = 32 * 1024 * 1024  # advertised maximum payload: 2^25, the spec's portable limit
MAX_OPTION_DATA = 64 * 1024  # larger option data is a denial of service: hard disconnect
MAX_STRING = 4096  # the spec's hard limit for names and queries
# Options one connection may send before it must choose an export (nbdkit's limit too). Real
# clients send fewer than ten (nbdinfo --list about six); more is a client that never
# finishes haggling, so it gets NBD_REP_ERR_POLICY and a hard disconnect.
MAX_OPTIONS = 32

# Structs (network byte order). REQUEST keeps the cookie opaque (8 raw bytes).
REQUEST = struct.Struct(">IHH8sQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">II8s")  # magic, error, cookie
CHUNK = struct.Struct(">IHH8sI")  # magic, flags, type, cookie, payload length
CHUNK_DATA = struct.Struct(">IHH8sIQ")  # chunk header + offset of an OFFSET_DATA payload
CHUNK_ERROR = struct.Struct(">IHH8sIIH")  # chunk header + error + message length
OPTION = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
SERVER_GREETING = struct.Struct(">QQH")
EXPORT_REPLY = struct.Struct(">QH")  # size, transmission flags (OPT_EXPORT_NAME)
INFO_EXPORT_S = struct.Struct(">HQH")
INFO_BLOCK_SIZE_S = struct.Struct(">HIII")
EXTENT = struct.Struct(">II")

ALLOWED_CMD_FLAGS = {
    CMD_READ: CMD_FLAG_FUA | CMD_FLAG_DF,
    CMD_WRITE: CMD_FLAG_FUA,
    CMD_DISC: CMD_FLAG_FUA,
    CMD_FLUSH: CMD_FLAG_FUA,
    CMD_TRIM: CMD_FLAG_FUA,
    CMD_CACHE: CMD_FLAG_FUA,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    CMD_BLOCK_STATUS: CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
}


def simple_reply(cookie: bytes, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def data_chunk_header(cookie: bytes, offset: int, length: int) -> bytes:
    """Header of one final OFFSET_DATA chunk carrying `length` bytes read at `offset`."""
    return CHUNK_DATA.pack(
        STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, length + 8, offset
    )


def error_chunk(cookie: bytes, error: int, message: str) -> bytes:
    msg = message.encode()[:MAX_STRING]
    return (
        CHUNK_ERROR.pack(
            STRUCTURED_REPLY_MAGIC,
            REPLY_FLAG_DONE,
            REPLY_TYPE_ERROR,
            cookie,
            6 + len(msg),
            error,
            len(msg),
        )
        + msg
    )


def block_status_chunk(
    cookie: bytes, context_id: int, extents: list[tuple[int, int]], done: bool = True
) -> bytes:
    payload = struct.pack(">I", context_id) + b"".join(EXTENT.pack(n, f) for n, f in extents)
    head = CHUNK.pack(
        STRUCTURED_REPLY_MAGIC,
        REPLY_FLAG_DONE if done else 0,
        REPLY_TYPE_BLOCK_STATUS,
        cookie,
        len(payload),
    )
    return head + payload


def none_chunk(cookie: bytes) -> bytes:
    return CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0)


class ProtocolError(Exception):
    """The peer broke a mandatory rule: the connection is closed (hard disconnect)."""


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
        FLAG_HAS_FLAGS
        | FLAG_SEND_FLUSH
        | FLAG_SEND_FUA
        | FLAG_SEND_TRIM
        | FLAG_SEND_WRITE_ZEROES
        | FLAG_SEND_FAST_ZERO
        | FLAG_CAN_MULTI_CONN
        | FLAG_SEND_CACHE
    )
    if structured:
        flags |= FLAG_SEND_DF  # every read is answered by a single content chunk anyway
    if export.read_only:
        flags |= FLAG_READ_ONLY
    return flags


class _Reader:
    """Bounds-checked parsing of one option's data; any overrun is REP_ERR_INVALID."""

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
        if n > MAX_STRING:
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
    `stopping()` tells whether the server is shutting down (options get REP_ERR_SHUTDOWN).
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
        self.send(SERVER_GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (client_flags,) = struct.unpack(">I", self.recv_exact(4))
        if client_flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
            raise ProtocolError(f"unknown client flags 0x{client_flags:x}")
        self.no_zeroes = bool(client_flags & FLAG_C_NO_ZEROES)
        count = 0
        while True:
            count += 1
            magic, opt, length = OPTION.unpack(self.recv_exact(OPTION.size))
            if magic != IHAVEOPT:
                raise ProtocolError(f"bad option magic 0x{magic:x}")
            if length > MAX_OPTION_DATA:
                raise ProtocolError(f"option {opt} carries {length} bytes of data: refused")
            data = self.recv_exact(length) if length else b""
            if count > MAX_OPTIONS:
                self._error(
                    opt,
                    REP_ERR_POLICY,
                    f"more than {MAX_OPTIONS} options on one "
                    "connection: choose an export (NBD_OPT_GO) sooner",
                )
                raise ProtocolError(f"more than {MAX_OPTIONS} options during the handshake")
            done = self._option(opt, data)
            if done is not None:
                return done

    def _reply(self, opt: int, rtype: int, data: bytes = b"") -> None:
        self.send(OPTION_REPLY.pack(REPLY_MAGIC, opt, rtype, len(data)) + data)

    def _error(self, opt: int, rtype: int, message: str) -> None:
        self._reply(opt, rtype, message.encode())

    def _option(self, opt: int, data: bytes) -> Negotiated | None:
        if opt == OPT_ABORT:
            self._reply(opt, REP_ACK)
            raise Aborted()
        if opt == OPT_EXPORT_NAME:
            return self._export_name(data)
        if self.stopping():
            self._error(opt, REP_ERR_SHUTDOWN, "the server is shutting down")
            return None
        handler = {
            OPT_LIST: self._list,
            OPT_INFO: self._info,
            OPT_GO: self._info,
            OPT_STRUCTURED_REPLY: self._structured_reply,
            OPT_LIST_META_CONTEXT: self._meta_context,
            OPT_SET_META_CONTEXT: self._meta_context,
        }.get(opt)
        if handler is None:
            what = "TLS is not supported" if opt == OPT_STARTTLS else f"unknown option {opt}"
            self._error(opt, REP_ERR_UNSUP, what)
            return None
        try:
            return handler(opt, data)
        except ValueError as exc:
            self._error(opt, REP_ERR_INVALID, f"malformed option {opt}: {exc}")
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
            raise ProtocolError("export name is not UTF-8") from exc
        if not self._known(name) or self.stopping():
            raise ProtocolError(f"no export named {name!r}")  # cannot reply with an error
        neg = self._negotiated()
        tail = b"" if self.no_zeroes else bytes(124)
        self.send(EXPORT_REPLY.pack(self.export.size, neg.flags) + tail)
        return neg

    def _list(self, opt: int, data: bytes) -> None:
        if data:
            raise ValueError("NBD_OPT_LIST takes no data")
        name = self.export.name.encode()
        self._reply(
            opt, REP_SERVER, struct.pack(">I", len(name)) + name + self.export.description.encode()
        )
        self._reply(opt, REP_ACK)

    def _info(self, opt: int, data: bytes) -> Negotiated | None:
        r = _Reader(data)
        name = r.string()
        requests = [r.u16() for _ in range(r.u16())]
        if not r.done():
            raise ValueError("trailing bytes after the information requests")
        if not self._known(name):
            self._error(opt, REP_ERR_UNKNOWN, f"no export named {name!r}; try {self.export.name!r}")
            return None
        neg = self._negotiated()
        ex = self.export
        self._reply(opt, REP_INFO, INFO_EXPORT_S.pack(INFO_EXPORT, ex.size, neg.flags))
        self._reply(
            opt,
            REP_INFO,
            INFO_BLOCK_SIZE_S.pack(INFO_BLOCK_SIZE, ex.min_block, ex.preferred_block, MAX_PAYLOAD),
        )
        if INFO_NAME in requests:
            self._reply(opt, REP_INFO, struct.pack(">H", INFO_NAME) + ex.name.encode())
        if INFO_DESCRIPTION in requests and ex.description:
            self._reply(
                opt, REP_INFO, struct.pack(">H", INFO_DESCRIPTION) + ex.description.encode()
            )
        self._reply(opt, REP_ACK)
        return neg if opt == OPT_GO else None

    def _structured_reply(self, opt: int, data: bytes) -> None:
        if data:
            raise ValueError("NBD_OPT_STRUCTURED_REPLY takes no data")
        self.structured = True
        self._reply(opt, REP_ACK)

    def _meta_context(self, opt: int, data: bytes) -> None:
        if opt == OPT_SET_META_CONTEXT:
            self.contexts = {}  # replaced even when this request fails
        r = _Reader(data)
        name = r.string()
        queries = [r.string() for _ in range(r.u32())]
        if not r.done():
            raise ValueError("trailing bytes after the queries")
        if not self.structured:
            self._error(opt, REP_ERR_INVALID, "negotiate NBD_OPT_STRUCTURED_REPLY first")
            return
        if not self._known(name):
            self._error(opt, REP_ERR_UNKNOWN, f"no export named {name!r}")
            return
        if opt == OPT_LIST_META_CONTEXT:
            wanted = not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries)
        else:
            wanted = BASE_ALLOCATION in queries
            if wanted:
                self.contexts = {BASE_ALLOCATION_ID: BASE_ALLOCATION}
        if wanted:
            self._reply(
                opt,
                REP_META_CONTEXT,
                struct.pack(">I", BASE_ALLOCATION_ID if opt == OPT_SET_META_CONTEXT else 0)
                + BASE_ALLOCATION.encode(),
            )
        self._reply(opt, REP_ACK)
