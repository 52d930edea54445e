"""The store's view of its backing storage: a regular file or a block device.

Everything the store persists goes through a `Backing`, so tests can put a
crash-simulating backing (tests/crashsim.py) in its place.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
from functools import cache
from typing import Any, Protocol

BLKGETSIZE64 = 0x80081272
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


class Backing(Protocol):
    """Byte-addressed storage with explicit durability points."""

    size: int
    fd: int | None  # a real descriptor (for sendfile), or None for simulated storage

    def pread_into(self, buf: memoryview, offset: int) -> None: ...
    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None: ...
    def sync(self) -> None: ...
    def discard(self, offset: int, length: int) -> None: ...
    def close(self) -> None: ...

    # Optional: def next_data(self, offset: int) -> int (FileBacking.next_data); a backing
    # without it has every map page read.


class FileBacking:
    """A regular file (kept sparse) or a block device, opened read-write."""

    def __init__(self, path: str, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self._fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR)  # -1 once closed
        self.fd: int | None = self._fd
        st = os.fstat(self._fd)
        self.is_block = stat.S_ISBLK(st.st_mode)
        self.size = block_device_size(self._fd) if self.is_block else st.st_size

    def fileno(self) -> int:
        return self._fd

    def pread_into(self, buf: memoryview, offset: int) -> None:
        done = os.preadv(self._fd, [buf], offset)
        while done < len(buf):
            n = os.preadv(self._fd, [buf[done:]], offset + done)
            if n == 0:  # past the end of a file that was never written there: zeros
                buf[done:] = bytes(len(buf) - done)
                return
            done += n

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        done = os.pwrite(self._fd, data, offset)
        if done == len(data):
            return
        view = memoryview(data)
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], offset + done)

    def sync(self) -> None:
        os.fdatasync(self._fd)

    def next_data(self, offset: int) -> int:
        """An offset >= `offset` before which the file reads as zeros (lseek SEEK_DATA: holes
        and unwritten extents), so the map need not read a page that lies wholly before it.
        `offset` itself where unknown (a block device, a file system without SEEK_DATA)."""
        if self.is_block:
            return offset
        try:
            return os.lseek(self._fd, offset, os.SEEK_DATA)  # we only pread/pwrite: no position
        except OSError as e:
            return self.size if e.errno == errno.ENXIO else offset  # ENXIO: no data after it

    def discard(self, offset: int, length: int) -> None:
        """Give the space back where the file system can; correctness never depends on it."""
        if self.is_block or length <= 0:
            return
        try:
            fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise

    def close(self) -> None:
        if self.fd is not None:
            os.close(self._fd)
            self.fd, self._fd = None, -1


def block_device_size(fd: int) -> int:
    buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
    return struct.unpack("<Q", buf)[0]


@cache
def _libc_fallocate() -> Any:  # the ctypes function (ctypes' own type is private)
    # The process's own C library: looked up once (find_library would run ldconfig per call).
    fn = ctypes.CDLL(None, use_errno=True).fallocate
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return fn


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) itself: unlike posix_fallocate it never falls back to writing the range,
    so a file system without it says EOPNOTSUPP instead of being written over."""
    if _libc_fallocate()(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
