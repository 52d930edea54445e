"""One NBD connection: the handshake, then the transmission phase (the hot path).

Worker threads take turns on the socket (leader/followers): the one holding the receive lock
reads a whole request (header, and payload straight into its own page-aligned buffer), lets go
and serves it, then replies under the send lock with one sendmsg([header, payload]). Requests
are never copied or queued between threads, and up to `workers` run at once per connection.
"""

from __future__ import annotations

import logging
import mmap
import socket
import threading
from typing import TYPE_CHECKING

from appliance import nbd_protocol as p
from appliance.store import OutOfRangeError, StoreError, StoreIOError

if TYPE_CHECKING:
    from appliance.nbd_server import NbdServer

HANDSHAKE_TIMEOUT = 30.0  # seconds a client may take to finish option haggling
KEEP_BUFFER = 4 * 1024 * 1024  # a worker keeps a buffer up to this size between requests
MAX_EXTENTS = 1 << 20
WRITES = (p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES)
SIZED_WRITES = (p.CMD_WRITE, p.CMD_WRITE_ZEROES)  # past the end: ENOSPC, not EINVAL


class _Buffer:
    """A worker's reusable page-aligned buffer (anonymous mmap: aligned, zero-copy views)."""

    def __init__(self, size: int = 1 << 20) -> None:
        self.size = size
        self.view = memoryview(mmap.mmap(-1, size))

    def get(self, n: int) -> memoryview:
        if n > self.size:
            self.size = -(-n // mmap.PAGESIZE) * mmap.PAGESIZE
            self.view = memoryview(mmap.mmap(-1, self.size))
        return self.view[:n]

    def trim(self) -> None:
        if self.size > KEEP_BUFFER:  # do not pin 32 MiB per worker after one big request
            self.__init__()


class Session:
    def __init__(self, server: NbdServer, sock: socket.socket, peer: str) -> None:
        self.server, self.sock, self.peer = server, sock, peer
        self.store = server.store
        self.log: logging.Logger = server.log
        self.recv_lock = threading.Lock()
        self.send_lock = threading.Lock()
        self.closing = False
        self.in_transmission = False
        self.busy: list[bool] = []
        self.neg = p.Negotiated()
        self._threads: list[threading.Thread] = []
        self._main = threading.Thread(target=self._run, name=f"nbd-{peer}", daemon=True)

    # ----- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._main.start()

    def join(self, timeout: float) -> None:
        self._main.join(timeout)

    def is_alive(self) -> bool:
        return self._main.is_alive()

    @property
    def inflight(self) -> int:
        return sum(self.busy)

    def shutdown(self, drain: bool) -> None:
        """Server stop: with drain, stop reading and let in-flight requests finish."""
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
            self.sock.close()
            self.server._session_ended(self)

    # ----- handshake ----------------------------------------------------------------------------

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        if not self._recv_into(memoryview(buf), n):
            raise ConnectionError("client closed the connection")
        return bytes(buf)

    def _handshake(self) -> bool:
        self.sock.settimeout(HANDSHAKE_TIMEOUT)
        hs = p.Handshake(self.server.export, self._recv_exact, self.sock.sendall,
                         lambda: self.server.stopping)
        try:
            self.neg = hs.run()
        except p.Aborted:
            return False
        except p.ProtocolError as exc:
            self.log.warning("NBD client %s broke the handshake (%s); closing that connection",
                             self.peer, exc)
            return False
        except (ConnectionError, TimeoutError, OSError) as exc:
            self.log.info("NBD client %s left during the handshake: %s", self.peer, exc)
            return False
        self.sock.settimeout(None)
        self.in_transmission = True
        return True

    # ----- transmission -------------------------------------------------------------------------

    def _transmission(self) -> None:
        n = self.server.workers
        self.busy = [False] * n
        self._threads = [threading.Thread(target=self._worker, args=(i,), daemon=True,
                                          name=f"nbd-{self.peer}-{i}") for i in range(1, n)]
        for t in self._threads:
            t.start()
        self._worker(0)
        for t in self._threads:
            t.join()

    def _recv_into(self, view: memoryview, n: int) -> bool:
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:], n - got, socket.MSG_WAITALL)
            if k == 0:
                return False
            got += k
        return True

    def _send(self, parts: list) -> None:
        with self.send_lock:
            total = sum(len(x) for x in parts)
            sent = self.sock.sendmsg(parts)
            while sent < total:  # rare: a partial send (signal, huge payload)
                rest = b"".join(bytes(x) for x in parts)[sent:]
                self.sock.sendall(rest)
                sent = total

    def _worker(self, i: int) -> None:
        head = bytearray(p.REQUEST.size)
        hv = memoryview(head)
        buf = _Buffer()
        while True:
            with self.recv_lock:
                if self.closing:
                    return
                try:
                    req = self._read_request(head, hv, buf)
                except (OSError, p.ProtocolError) as exc:
                    if not self.closing and not isinstance(exc, ConnectionResetError):
                        self.log.warning("NBD client %s: %s; closing that connection",
                                         self.peer, exc)
                    self._hangup()
                    return
                if req is None:
                    self.closing = True  # DISC or end of stream: finish in-flight work only
                    return
                self.busy[i] = True
            try:
                self._serve(*req, buf)
            except OSError:
                self._hangup()  # the client went away mid-reply
                return
            finally:
                self.busy[i] = False
                buf.trim()

    def _read_request(self, head: bytearray, hv: memoryview, buf: _Buffer):
        """One request, or None at DISC / end of stream. Raises ProtocolError on garbage."""
        if not self._recv_into(hv, p.REQUEST.size):
            return None
        magic, flags, cmd, cookie, offset, length = p.REQUEST.unpack(head)
        if magic != p.REQUEST_MAGIC:
            raise p.ProtocolError(f"bad request magic 0x{magic:08x}")
        if cmd == p.CMD_DISC:
            return None
        payload = None
        if cmd == p.CMD_WRITE:
            if length > p.MAX_PAYLOAD:
                raise p.ProtocolError(f"write of {length} bytes exceeds the 32 MiB maximum")
            payload = buf.get(length)
            if not self._recv_into(payload, length):
                raise p.ProtocolError("connection closed in the middle of a write payload")
        return flags, cmd, cookie, offset, length, payload

    # ----- serving one request ------------------------------------------------------------------

    def _check(self, flags: int, cmd: int, offset: int, length: int) -> tuple[int, str]:
        """(NBD error, message) for a request the spec says to refuse; (0, '') if valid."""
        allowed = p.ALLOWED_CMD_FLAGS.get(cmd)
        if allowed is None:
            return p.EINVAL, f"unknown command {cmd}"
        if not self.neg.structured:
            allowed &= ~p.CMD_FLAG_DF
        if flags & ~allowed:
            return p.EINVAL, f"flags 0x{flags:x} are not valid for command {cmd}"
        if self.server.stopping:
            return p.ESHUTDOWN, "the server is shutting down"
        if cmd in WRITES and self.server.export.read_only:
            return p.EPERM, "the disk is read-only"
        if cmd == p.CMD_BLOCK_STATUS and not self.neg.contexts:
            return p.EINVAL, "no metadata context was negotiated (NBD_OPT_SET_META_CONTEXT)"
        if cmd != p.CMD_FLUSH and offset + length > self.server.export.size:
            code = p.ENOSPC if cmd in SIZED_WRITES else p.EINVAL
            return code, (f"request at {offset}+{length} is past the end of the "
                          f"{self.server.export.size}-byte disk")
        if cmd == p.CMD_READ and length > p.MAX_PAYLOAD:
            return p.EINVAL, f"read of {length} bytes exceeds the 32 MiB maximum"
        if cmd == p.CMD_BLOCK_STATUS and length == 0:
            return p.EINVAL, "block status of zero bytes"
        return 0, ""

    def _serve(self, flags: int, cmd: int, cookie: bytes, offset: int, length: int,
               payload: memoryview | None, buf: _Buffer) -> None:
        error, message = self._check(flags, cmd, offset, length)
        if not error:
            try:
                if cmd == p.CMD_READ:
                    return self._read(cookie, offset, length, buf)
                if cmd == p.CMD_BLOCK_STATUS:
                    return self._block_status(cookie, flags, offset, length)
                self._execute(flags, cmd, offset, length, payload)
            except OutOfRangeError as exc:
                error, message = (p.ENOSPC if cmd in SIZED_WRITES else p.EINVAL), str(exc)
            except StoreIOError as exc:
                self.log.error("NBD command %d at %d+%d failed with an I/O error: %s",
                               cmd, offset, length, exc)
                error, message = p.EIO, str(exc)
            except StoreError as exc:
                self.log.error("NBD command %d at %d+%d failed: %s", cmd, offset, length, exc)
                error, message = (p.EPERM if "read-only" in str(exc) else p.EIO), str(exc)
            except OSError:
                raise  # the socket: the caller hangs up
            except Exception as exc:  # a bug must cost one request, never a silent hang
                self.log.exception("NBD command %d at %d+%d crashed", cmd, offset, length)
                error, message = p.EIO, f"internal server error: {exc}"
        self._reply_error(cookie, error, message) if error else self._reply_ok(cookie)

    def _execute(self, flags: int, cmd: int, offset: int, length: int,
                 payload: memoryview | None) -> None:
        fua = bool(flags & p.CMD_FLAG_FUA)
        st = self.store
        if cmd == p.CMD_WRITE:
            if length:
                st.write(offset, payload, fua=fua)
        elif cmd == p.CMD_FLUSH:
            st.flush()
        elif cmd == p.CMD_TRIM:
            if length:
                st.trim(offset, length)
                if fua:
                    st.flush()
        elif cmd == p.CMD_WRITE_ZEROES:
            # Metadata only for whole units, so FAST_ZERO is honestly fast, and the unit's
            # slots stay provisioned, which is what NO_HOLE asks for.
            if length:
                st.write_zeroes(offset, length, fua=fua)
        # CMD_CACHE: the range was checked; the store has nothing to prefetch into.

    def _read(self, cookie: bytes, offset: int, length: int, buf: _Buffer) -> None:
        view = buf.get(length)
        if length:
            self.store.readinto(offset, view)
        if not self.neg.structured:
            self._send([p.simple_reply(cookie), view])
        elif length:
            self._send([p.data_chunk_header(cookie, offset, length), view])
        else:
            self._send([p.none_chunk(cookie)])

    def _block_status(self, cookie: bytes, flags: int, offset: int, length: int) -> None:
        extents: list[tuple[int, int]] = []
        for _, n, zero in self.store.block_status(offset, length):
            state = (p.STATE_HOLE | p.STATE_ZERO) if zero else 0
            if extents and extents[-1][1] == state:
                extents[-1] = (extents[-1][0] + n, state)
            else:
                extents.append((n, state))
        if flags & p.CMD_FLAG_REQ_ONE:
            extents = extents[:1]
        ids = list(self.neg.contexts)
        self._send([p.block_status_chunk(cookie, cid, extents[:MAX_EXTENTS], cid == ids[-1])
                    for cid in ids])

    def _reply_ok(self, cookie: bytes) -> None:
        # A simple reply is allowed for anything but READ, even with structured replies.
        self._send([p.simple_reply(cookie)])

    def _reply_error(self, cookie: bytes, error: int, message: str) -> None:
        if self.neg.structured:
            self._send([p.error_chunk(cookie, error, message)])
        else:
            self._send([p.simple_reply(cookie, error)])


