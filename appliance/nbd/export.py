"""What the NBD server serves: a `BlockExport`, named by exactly what the server and its
sessions call. `appliance.store.Store` is one; a test or another engine can be another."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

Buffer = bytes | bytearray | memoryview


class BlockExport(Protocol):
    """A disk of `size` bytes. Each call raises a StoreError (appliance/store/errors.py) the
    session maps to an NBD error: OutOfRangeError, StoreFullError, StoreIOError, the rest."""

    size: int  # bytes, fixed while served
    unit_size: int  # the preferred block size clients are told
    readonly: bool  # writes, trims and zeroes are refused with EPERM before reaching the store

    def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill `buf` with the disk's bytes at `offset`."""

    def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        """Write `data` at `offset`; with `fua`, durable before it returns."""

    def write_zeroes(self, offset: int, length: int, fua: bool = False) -> None:
        """Make `length` bytes at `offset` read as zeroes."""

    def trim(self, offset: int, length: int) -> None:
        """The host no longer needs these bytes (they may read as anything afterwards)."""

    def flush(self) -> None:
        """Everything written before is durable once this returns (every connection's)."""

    def block_status(self, offset: int, length: int) -> Iterable[tuple[int, int, bool]]:
        """(offset, length, reads-as-zero) extents covering the range, in order."""


class WriteActivity(Protocol):
    """Told of the host's writes and flushes, for a SAVE that waits for quiet
    (appliance/control/host_quiet.py HostActivity is the one the daemon gives)."""

    def wrote(self) -> None: ...

    def flushed(self) -> None: ...
