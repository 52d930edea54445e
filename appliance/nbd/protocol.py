"""NBD wire format (NetworkBlockDevice/nbd doc/proto.md): the numbers, the structs and the
builders of the replies the transmission phase sends.

The handshake that uses them is appliance/nbd/handshake.py; the transmission phase (the hot
path) is appliance/nbd/session.py, which checks and runs the other commands through
appliance/nbd/commands.py.
"""

from __future__ import annotations

import struct

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
