"""What an NBD request means, apart from moving its bytes: which requests the spec says to
refuse, how the commands other than a plain READ or WRITE run against the export, and how a
store error becomes an NBD error.

appliance/nbd/session.py serves a valid READ or WRITE inline (the hot path) and hands
everything else here: a request with bad flags or range, FLUSH, TRIM, WRITE_ZEROES, CACHE,
BLOCK_STATUS. These are pure functions of their arguments, so they hold no state of the
session's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from appliance.nbd import protocol as p
from appliance.nbd.export import BlockExport, WriteActivity
from appliance.nbd.handshake import Export, Negotiated
from appliance.store import OutOfRangeError, StoreError, StoreIOError
from appliance.store.errors import StoreFullError

MAX_EXTENTS = 1 << 20  # extents in one block status reply
WRITES = (p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES)
SIZED_WRITES = (p.CMD_WRITE, p.CMD_WRITE_ZEROES)  # past the end: ENOSPC, not EINVAL


def check(
    neg: Negotiated, export: Export, stopping: bool, flags: int, cmd: int, offset: int, length: int
) -> tuple[int, str]:
    """(NBD error, message) for a request the spec says to refuse; (0, '') if valid."""
    allowed = p.ALLOWED_CMD_FLAGS.get(cmd)
    if allowed is None:
        return p.EINVAL, f"unknown command {cmd}"
    if not neg.structured:
        allowed &= ~p.CMD_FLAG_DF
    if flags & ~allowed:
        return p.EINVAL, f"flags 0x{flags:x} are not valid for command {cmd}"
    if stopping:
        return p.ESHUTDOWN, "the server is shutting down"
    if cmd in WRITES and export.read_only:
        return p.EPERM, "the disk is read-only"
    if cmd == p.CMD_BLOCK_STATUS and not neg.contexts:
        return p.EINVAL, "no metadata context was negotiated (NBD_OPT_SET_META_CONTEXT)"
    if cmd != p.CMD_FLUSH and offset + length > export.size:
        code = p.ENOSPC if cmd in SIZED_WRITES else p.EINVAL
        return code, f"request at {offset}+{length} is past the end of the {export.size}-byte disk"
    if cmd == p.CMD_READ and length > p.MAX_PAYLOAD:
        return p.EINVAL, f"read of {length} bytes exceeds the 32 MiB maximum"
    if cmd == p.CMD_BLOCK_STATUS and length == 0:
        return p.EINVAL, "block status of zero bytes"
    return 0, ""


def failure(
    log: logging.Logger, cmd: int, offset: int, length: int, exc: Exception
) -> tuple[int, str]:
    """The NBD error for a store call that raised; logs what the operator must see."""
    if isinstance(exc, OutOfRangeError):
        return (p.ENOSPC if cmd in SIZED_WRITES else p.EINVAL), str(exc)
    if isinstance(exc, StoreFullError):  # logged once by the store, not per request
        return p.ENOSPC, str(exc)  # QEMU's werror=enospc pauses the VM on this
    if isinstance(exc, StoreIOError):
        log.error("NBD command %d at %d+%d failed with an I/O error: %s", cmd, offset, length, exc)
        return p.EIO, str(exc)
    if isinstance(exc, StoreError):
        log.error("NBD command %d at %d+%d failed: %s", cmd, offset, length, exc)
        return (p.EPERM if "read-only" in str(exc) else p.EIO), str(exc)
    # A bug must cost one request, never a silent hang.
    log.error("NBD command %d at %d+%d crashed", cmd, offset, length, exc_info=exc)
    return p.EIO, f"internal server error: {exc}"


def execute(
    store: BlockExport,
    activity: WriteActivity | None,
    flags: int,
    cmd: int,
    offset: int,
    length: int,
    payload: memoryview | None,
) -> None:
    """Run a checked WRITE (one `check` let through the slow path), FLUSH, TRIM,
    WRITE_ZEROES or CACHE; raises what the store raised."""
    fua = bool(flags & p.CMD_FLAG_FUA)
    if activity is not None and cmd != p.CMD_CACHE:
        (activity.flushed if cmd == p.CMD_FLUSH else activity.wrote)()
    if cmd == p.CMD_WRITE:
        if length and payload is not None:  # a WRITE always comes with its payload
            store.write(offset, payload, fua=fua)
    elif cmd == p.CMD_FLUSH:
        store.flush()
    elif cmd == p.CMD_TRIM:
        if length:
            store.trim(offset, length)
            if fua:
                store.flush()
    elif cmd == p.CMD_WRITE_ZEROES:
        # Metadata only for whole units, so FAST_ZERO is honestly fast, and the unit's
        # slots stay provisioned, which is what NO_HOLE asks for.
        if length:
            store.write_zeroes(offset, length, fua=fua)
    # CMD_CACHE: the range was checked; the store has nothing to prefetch into.


def block_status(
    store: BlockExport,
    contexts: Iterable[int],
    cookie: bytes,
    flags: int,
    offset: int,
    length: int,
) -> list[bytes]:
    """The reply chunks to a checked BLOCK_STATUS: one per negotiated context, the last done."""
    extents: list[tuple[int, int]] = []
    for _, n, zero in store.block_status(offset, length):
        state = (p.STATE_HOLE | p.STATE_ZERO) if zero else 0
        if extents and extents[-1][1] == state:
            extents[-1] = (extents[-1][0] + n, state)
        else:
            extents.append((n, state))
    if flags & p.CMD_FLAG_REQ_ONE:
        extents = extents[:1]
    ids = list(contexts)
    return [p.block_status_chunk(cookie, cid, extents[:MAX_EXTENTS], cid == ids[-1]) for cid in ids]
