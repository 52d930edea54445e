"""The send side of an NBD connection: replies batched into one page-aligned buffer.

Replies (read data included) are laid out back to back and leave in one sendmsg, so a burst of
small pipelined requests costs one system call instead of one per reply.
"""

from __future__ import annotations

import mmap
import socket

SEND_SIZE = 4 << 20  # replies (read data included) waiting for one sendmsg
SEND_EARLY = 256 << 10  # send as soon as this much is waiting: the client can start copying
ALIGN_FROM = 16 << 10  # reads this large get page-aligned data (fast copies)
MAX_PARTS = 512  # iovecs per sendmsg (IOV_MAX is 1024)
PAGE = mmap.PAGESIZE


def pages(n: int) -> mmap.mmap:
    """An anonymous mmap: page-aligned, zero-copy memoryviews, given back to the OS on drop."""
    return mmap.mmap(-1, -(-n // PAGE) * PAGE)


class Replies:
    """Replies laid out back to back in one buffer, sent with one sendmsg.

    Contiguous replies form one iovec; a read of ALIGN_FROM bytes or more starts its data on a
    page boundary (its header just before it), which opens a new iovec.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = pages(SEND_SIZE)
        self.view = memoryview(self.buf)
        self.parts: list[memoryview] = []
        self.seg = self.pos = 0  # current iovec: buf[seg:pos]

    def header(self, n: int) -> int:
        """Room for n bytes of reply; returns their offset in buf."""
        at = self.pos
        if at + n > SEND_SIZE:
            self.send()
            at = 0
        self.pos = at + n
        return at

    def payload(self, head: int, length: int) -> int:
        """Room for a header of `head` bytes and `length` bytes of read data; returns the
        header's offset, or -1 when the data does not fit in the buffer at all."""
        align = length >= ALIGN_FROM
        at = -(-(self.pos + head) // PAGE) * PAGE - head if align else self.pos
        if at + head + length > SEND_SIZE:
            self.send()
            at = PAGE - head if align else 0
            if at + head + length > SEND_SIZE:
                return -1
        if at != self.pos:  # a gap before page-aligned data: close the current iovec
            if self.pos > self.seg:
                self.parts.append(self.view[self.seg : self.pos])
                self.seg = self.pos
                if len(self.parts) >= MAX_PARTS:
                    self.send()
                    at = PAGE - head
            self.seg = at
        self.pos = at + head + length
        return at

    def add(self, data: bytes) -> None:
        if len(data) > SEND_SIZE:
            self.send()
            self.sock.sendall(data)
        else:
            at = self.header(len(data))
            self.buf[at : at + len(data)] = data

    def send(self) -> None:
        if self.pos > self.seg:
            self.parts.append(self.view[self.seg : self.pos])
        parts = self.parts
        self.seg = self.pos = 0
        if not parts:
            return
        try:
            if len(parts) == 1:
                self.sock.sendall(parts[0])
                return
            sent, total = self.sock.sendmsg(parts), sum(map(len, parts))
            while sent < total:  # rare: a partial send (signal, huge batch)
                while sent >= len(parts[0]):
                    sent -= len(parts.pop(0))
                parts[0] = parts[0][sent:]
                total = sum(map(len, parts))
                sent = self.sock.sendmsg(parts)
        finally:
            parts.clear()
