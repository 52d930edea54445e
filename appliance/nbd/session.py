"""One NBD connection: the handshake, then the transmission phase (the hot path).

One blocking thread per connection. It reads as many pipelined requests as the socket holds
with one recv_into into a large page-aligned receive buffer, parses and serves them in a loop
(write payloads go to the store straight from that buffer), and collects the replies, read
data included, in a page-aligned send buffer that leaves in one sendmsg when the received
requests are used up, before anything slow (FLUSH, FUA), or when a batch gets large. Measured
here, this beat handing requests between threads: for small requests the GIL hand-offs and
context switches cost more than the work. Replies leave in request order, each only after its
request is done, so a reply to WRITE always means the data is in the store.
"""

from __future__ import annotations

import logging
import mmap
import socket
import threading
import time
from typing import Protocol

from appliance.nbd import protocol as p
from appliance.nbd import replies as nbd_replies
from appliance.nbd.commands import block_status, check, execute, failure
from appliance.nbd.export import BlockExport, WriteActivity
from appliance.nbd.handshake import Aborted, Export, Handshake, Negotiated
from appliance.nbd.replies import Replies, pages

HANDSHAKE_TIMEOUT = 30.0  # seconds from accept() to the end of option haggling, in all
RECV_SIZE = 4 << 20  # receive buffer: many pipelined requests per recv_into
HEAD = p.REQUEST.size


class SessionHost(Protocol):
    """What a session needs of the server that accepted it. NbdServer is one; the session
    never imports the server, so server and session have no import circle."""

    store: BlockExport
    log: logging.Logger
    export: Export
    handshake_timeout: float
    stopping: bool
    activity: WriteActivity | None  # the session reports the host's writes to it

    def _session_ended(self, session: Session) -> None: ...


class Session:
    def __init__(self, server: SessionHost, sock: socket.socket, peer: str) -> None:
        self.server, self.sock, self.peer = server, sock, peer
        self.store = server.store
        self.log: logging.Logger = server.log
        self.closing = False
        self.in_transmission = False
        self.inflight = 0  # 1 while requests are being served, 0 while waiting for the client
        self.neg = Negotiated()
        self._main = threading.Thread(target=self._run, name=f"nbd-{peer}", daemon=True)

    # ----- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._main.start()

    def join(self, timeout: float) -> None:
        self._main.join(timeout)

    def is_alive(self) -> bool:
        return self._main.is_alive()

    def shutdown(self, drain: bool) -> None:
        """Server stop: with drain, stop reading and let the requests received finish."""
        how = socket.SHUT_RD if drain and self.in_transmission else socket.SHUT_RDWR
        try:
            self.sock.shutdown(how)
        except OSError:
            pass

    def _hangup(self) -> None:
        self.closing = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _run(self) -> None:
        try:
            if self._handshake():
                self._transmission()
        finally:
            self.inflight = 0
            self.sock.close()
            self.server._session_ended(self)

    # ----- handshake ----------------------------------------------------------------------------

    def _fill(self, view: memoryview, got: int, n: int) -> int:
        """Receive into view[got:n]; returns how far it got (short only at end of stream)."""
        while got < n:
            k = self.sock.recv_into(view[got:n], n - got, socket.MSG_WAITALL)
            if k == 0:
                break
            got += k
        return got

    def _handshake(self) -> bool:
        deadline = time.monotonic() + self.server.handshake_timeout

        def within_deadline() -> None:
            """One deadline for the whole handshake, not one per receive: a client that
            trickles a byte at a time must not keep the connection (and its slot) longer."""
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError()
            self.sock.settimeout(left)

        def recv_exact(n: int) -> bytes:
            buf = bytearray(n)
            got = 0
            while got < n:  # without MSG_WAITALL: each receive re-arms the remaining time
                within_deadline()
                k = self.sock.recv_into(memoryview(buf)[got:], n - got)
                if k == 0:
                    raise ConnectionError("client closed the connection")
                got += k
            return bytes(buf)

        def send(data: bytes) -> None:
            within_deadline()  # sendall's timeout is its total time (a client that never reads)
            self.sock.sendall(data)

        hs = Handshake(self.server.export, recv_exact, send, lambda: self.server.stopping)
        try:
            self.neg = hs.run()
        except Aborted:
            return False
        except p.ProtocolError as exc:
            self.log.warning(
                "NBD client %s broke the handshake (%s); closing that connection", self.peer, exc
            )
            return False
        except TimeoutError:
            self.log.warning(
                "NBD client %s did not finish the handshake within %g s; closing that connection",
                self.peer,
                self.server.handshake_timeout,
            )
            return False
        except (ConnectionError, OSError) as exc:
            self.log.info("NBD client %s left during the handshake: %s", self.peer, exc)
            return False
        self.sock.settimeout(None)
        self.in_transmission = True
        return True

    # ----- transmission -------------------------------------------------------------------------

    def _transmission(self) -> None:
        out = Replies(self.sock)
        try:
            self._loop(out)
            out.send()  # DISC or end of stream: the requests received get their replies
        except p.ProtocolError as exc:
            try:
                out.send()  # the requests before the garbage were served: answer them
            except OSError:
                pass
            self.log.warning("NBD client %s: %s; closing that connection", self.peer, exc)
            self._hangup()
        except OSError as exc:
            if not self.closing and not isinstance(exc, (ConnectionResetError, BrokenPipeError)):
                self.log.warning("NBD client %s: %s; closing that connection", self.peer, exc)
            self._hangup()

    def _loop(self, out: Replies) -> None:
        """Serve requests until DISC or end of stream. Raises ProtocolError or OSError."""
        rb = pages(RECV_SIZE)
        rv = memoryview(rb)
        start = end = 0  # received, not yet parsed: rb[start:end]
        unpack, pack_reply = p.REQUEST.unpack_from, p.SIMPLE_REPLY.pack_into
        store, server, sock = self.store, self.server, self.sock
        size = server.export.size
        writable = not server.export.read_only
        read_flags = p.CMD_FLAG_FUA | (p.CMD_FLAG_DF if self.neg.structured else 0)
        activity = server.activity  # the host's writes, for a SAVE that waits for quiet
        READ, WRITE, FUA = p.CMD_READ, p.CMD_WRITE, p.CMD_FLAG_FUA
        while True:
            if end - start < HEAD:
                if start:  # keep a partial request header at the front
                    rb.move(0, start, end - start)
                    start, end = 0, end - start
                out.send()
                self.inflight = 0
                k = sock.recv_into(rv[end:], RECV_SIZE - end)
                if not k:
                    if end:
                        raise p.ProtocolError("connection closed in the middle of a request")
                    return
                self.inflight = 1
                end += k
                continue
            magic, flags, cmd, cookie, offset, length = unpack(rb, start)
            if magic != p.REQUEST_MAGIC:
                raise p.ProtocolError(f"bad request magic 0x{magic:08x}")
            start += HEAD
            if cmd == READ:
                if (
                    not flags & ~read_flags
                    and offset + length <= size
                    and length <= p.MAX_PAYLOAD
                    and not server.stopping
                ):
                    self._read(out, cookie, offset, length)
                else:
                    self._other(out, flags, cmd, cookie, offset, length, None)
            elif cmd == WRITE:
                if length > p.MAX_PAYLOAD:
                    raise p.ProtocolError(f"write of {length} bytes exceeds the 32 MiB maximum")
                if start + length <= end:
                    payload = rv[start : start + length]
                    start += length
                else:
                    out.send()  # do not hold replies while the payload trickles in
                    payload, start, end = self._payload(rb, rv, start, end, length)
                if (
                    not flags & ~FUA
                    and offset + length <= size
                    and writable
                    and not server.stopping
                ):
                    if flags:
                        out.send()  # FUA flushes: earlier replies need not wait for it
                    if activity is not None:
                        activity.wrote()
                    try:
                        if length:
                            store.write(offset, payload, fua=bool(flags))
                    except Exception as exc:  # mapped to an NBD error
                        self._reply_error(out, cookie, *failure(self.log, cmd, offset, length, exc))
                    else:
                        pack_reply(out.buf, out.header(16), p.SIMPLE_REPLY_MAGIC, 0, cookie)
                else:
                    self._other(out, flags, cmd, cookie, offset, length, payload)
                del payload
            elif cmd == p.CMD_DISC:
                return
            else:
                self._other(out, flags, cmd, cookie, offset, length, None)

    def _payload(
        self, rb: mmap.mmap, rv: memoryview, start: int, end: int, length: int
    ) -> tuple[memoryview, int, int]:
        """Receive the rest of a write payload that begins at rb[start:end].
        Returns the payload and the new (start, end) of the receive buffer."""
        have = end - start
        if length > RECV_SIZE:  # larger than the receive buffer: a buffer of its own
            big = memoryview(pages(length))
            big[:have] = rv[start:end]
            if self._fill(big, have, length) < length:
                raise p.ProtocolError("connection closed in the middle of a write payload")
            return big[:length], 0, 0
        if start + length > RECV_SIZE:
            rb.move(0, start, have)
            start = 0
        if self._fill(rv, start + have, start + length) < start + length:
            raise p.ProtocolError("connection closed in the middle of a write payload")
        return rv[start : start + length], start + length, start + length

    # ----- serving one request (the checks and the slow commands: commands.py) ------------------

    def _other(
        self,
        out: Replies,
        flags: int,
        cmd: int,
        cookie: bytes,
        offset: int,
        length: int,
        payload: memoryview | None,
    ) -> None:
        """Everything but a valid READ or WRITE: refusals, FLUSH, TRIM, zeroes, block status."""
        out.send()  # FLUSH and friends may be slow: the replies before them go first
        server = self.server
        error, message = check(self.neg, server.export, server.stopping, flags, cmd, offset, length)
        if not error:
            try:
                if cmd == p.CMD_READ:
                    return self._read(out, cookie, offset, length)
                if cmd == p.CMD_BLOCK_STATUS:
                    chunks = block_status(
                        self.store, self.neg.contexts, cookie, flags, offset, length
                    )
                    for chunk in chunks:
                        out.add(chunk)
                    return None
                execute(self.store, server.activity, flags, cmd, offset, length, payload)
            except Exception as exc:  # mapped to an NBD error
                error, message = failure(self.log, cmd, offset, length, exc)
        if error:
            self._reply_error(out, cookie, error, message)
        else:
            p.SIMPLE_REPLY.pack_into(out.buf, out.header(16), p.SIMPLE_REPLY_MAGIC, 0, cookie)

    def _read(self, out: Replies, cookie: bytes, offset: int, length: int) -> None:
        """Read into the send buffer behind its header (one OFFSET_DATA chunk, so DF holds)."""
        structured = self.neg.structured
        if structured and not length:
            return out.add(p.none_chunk(cookie))
        head = p.CHUNK_DATA.size if structured else p.SIMPLE_REPLY.size
        at = out.payload(head, length)
        if at < 0:  # larger than the send buffer
            return self._read_big(out, cookie, offset, length)
        try:
            if length:
                self.store.readinto(offset, out.view[at + head : at + head + length])
        except Exception as exc:  # mapped to an NBD error
            out.pos = at  # drop the slot
            return self._reply_error(
                out, cookie, *failure(self.log, p.CMD_READ, offset, length, exc)
            )
        if structured:
            p.CHUNK_DATA.pack_into(
                out.buf,
                at,
                p.STRUCTURED_REPLY_MAGIC,
                p.REPLY_FLAG_DONE,
                p.REPLY_TYPE_OFFSET_DATA,
                cookie,
                length + 8,
                offset,
            )
        else:
            p.SIMPLE_REPLY.pack_into(out.buf, at, p.SIMPLE_REPLY_MAGIC, 0, cookie)
        if out.pos >= nbd_replies.SEND_EARLY:
            out.send()

    def _read_big(self, out: Replies, cookie: bytes, offset: int, length: int) -> None:
        data = memoryview(pages(length))[:length]
        try:
            self.store.readinto(offset, data)
        except Exception as exc:  # mapped to an NBD error
            return self._reply_error(
                out, cookie, *failure(self.log, p.CMD_READ, offset, length, exc)
            )
        out.add(
            p.data_chunk_header(cookie, offset, length)
            if self.neg.structured
            else p.simple_reply(cookie)
        )
        out.send()
        self.sock.sendall(data)

    def _reply_error(self, out: Replies, cookie: bytes, error: int, message: str) -> None:
        # A simple reply is allowed for anything but a successful READ, even when structured.
        if self.neg.structured:
            out.add(p.error_chunk(cookie, error, message))
        else:
            p.SIMPLE_REPLY.pack_into(out.buf, out.header(16), p.SIMPLE_REPLY_MAGIC, error, cookie)
