"""The NBD server: serves one store to any NBD client (kernel, qemu, libnbd tools).

Listening sockets, lifecycle and URIs live here; the wire format is appliance/nbd/protocol.py,
the handshake appliance/nbd/handshake.py, the transmission phase (the hot path)
appliance/nbd/session.py and what each other command means appliance/nbd/commands.py.

Each connection is served by one blocking thread (a `Session`): it reads many pipelined
requests per recv_into into a page-aligned buffer, serves them in order and batches the replies
into one sendmsg. All connections share the one store, whose flush covers every connection:
that is what makes multi-conn safe.
"""

from __future__ import annotations

import errno
import grp
import ipaddress
import logging
import os
import selectors
import socket
import stat
import threading
from urllib.parse import quote

from appliance.nbd.export import BlockExport, WriteActivity
from appliance.nbd.handshake import Export
from appliance.nbd.session import HANDSHAKE_TIMEOUT, Session
from appliance.store import OutOfRangeError, StoreError, StoreIOError

__all__ = ["BlockExport", "NbdServer", "OutOfRangeError", "StoreError", "StoreIOError"]

LOG = logging.getLogger("savepoint.nbd")
DRAIN_TIMEOUT = 30.0  # seconds stop(drain=True) waits for in-flight requests
# Connections served at once (handshaking ones included); more are closed at once. The kernel
# client uses one, nbdcopy four; each costs a thread and up to 8 MiB of buffers (docs/nbd.md).
MAX_CONNECTIONS = 8


def _is_loopback(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve NBD listen address {host!r}: {exc}") from exc
    return all(ipaddress.ip_address(str(i[4][0]).split("%")[0]).is_loopback for i in infos)


class NbdServer:
    """Serve `store` over NBD on a Unix socket and/or TCP. See docs/nbd.md."""

    def __init__(
        self,
        store: BlockExport,
        unix_path: str | None = None,
        tcp: tuple[str, int] | None = None,
        allow_remote: bool = False,
        socket_mode: int = 0o600,
        group: str | None = None,
        export_name: str = "savepoint",
        log: logging.Logger = LOG,
        max_connections: int = MAX_CONNECTIONS,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        if unix_path is None and tcp is None:
            raise ValueError(
                "NbdServer needs a Unix socket path or a TCP (host, port) to listen on"
            )
        if tcp is not None and not _is_loopback(tcp[0]) and not allow_remote:
            raise ValueError(
                f"refusing to serve NBD on non-loopback address {tcp[0]!r}: NBD without TLS has "
                "no authentication, so anyone who can reach it can read and overwrite the disk. "
                "Use a Unix socket or 127.0.0.1, or pass allow_remote (--allow-remote) to accept "
                "the risk."
            )
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        self.store = store
        self.activity: WriteActivity | None = None  # the sessions report the host's writes to it
        self.unix_path = os.path.abspath(unix_path) if unix_path else None
        self.tcp = tcp
        self.allow_remote = allow_remote
        self.socket_mode = socket_mode | (0o060 if group else 0)
        self.group = group
        self.export = Export(
            name=export_name,
            size=store.size,
            min_block=1,
            preferred_block=store.unit_size,
            description="Savepoint disk: writes are provisional until SAVE",
            read_only=store.readonly,
        )
        self.log = log
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.refused = 0  # connections refused at the cap, in all
        self._burst = 0  # refused since the last time a slot was free
        self.stopping = False
        self._listeners: list[socket.socket] = []
        self._tcp_addr: tuple[str, int] | None = None
        self._unix_ino: tuple[int, int] | None = None
        self._sessions: set[Session] = set()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = -1, -1
        self._acceptor: threading.Thread | None = None

    # ----- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Bind, listen and serve in background threads; returns at once."""
        try:
            if self.unix_path:
                self._listeners.append(self._bind_unix(self.unix_path))
            if self.tcp:
                self._listeners.append(self._bind_tcp(*self.tcp))
        except BaseException:
            for s in self._listeners:
                s.close()
            self._listeners.clear()
            raise
        self._wake_r, self._wake_w = os.pipe()
        self._acceptor = threading.Thread(target=self._accept_loop, name="nbd-accept", daemon=True)
        self._acceptor.start()
        for uri in self.uris:
            self.log.info("serving %d-byte disk over NBD at %s", self.export.size, uri)

    def stop(self, drain: bool = True) -> None:
        """Stop accepting, finish in-flight requests (drain), flush the store, close."""
        self.stopping = True
        if self._acceptor is not None:
            os.write(self._wake_w, b"x")
            self._acceptor.join()
            self._acceptor = None
            os.close(self._wake_r)
            os.close(self._wake_w)
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
        self._remove_unix_socket()
        with self._lock:
            sessions = list(self._sessions)
        for s in sessions:
            s.shutdown(drain)
        for s in sessions:
            s.join(DRAIN_TIMEOUT if drain else 2.0)
            if s.is_alive():
                self.log.warning("NBD connection %s did not finish in time; closing it", s.peer)
                s.shutdown(drain=False)
                s.join(2.0)
        try:
            if not self.export.read_only:
                self.store.flush()
        except StoreError as exc:
            self.log.error("flushing the store at NBD shutdown failed: %s", exc)

    # ----- introspection ------------------------------------------------------------------------

    @property
    def uris(self) -> list[str]:
        name = quote(self.export.name)
        out = []
        if self.unix_path:
            out.append(f"nbd+unix:///{name}?socket={quote(self.unix_path)}")
        tcp = self._tcp_addr or self.tcp
        if tcp:
            host, port = tcp
            shown = f"[{host}]" if ":" in host else host
            out.append(f"nbd://{shown}:{port}/{name}")
        return out

    def examples(self) -> str:
        """Ready-to-paste client command lines for every URI served."""
        lines = []
        for uri in self.uris:
            drive = uri.replace(",", ",,")  # qemu -drive option syntax doubles commas
            lines += [
                f"  nbdinfo '{uri}'",
                f"  qemu-img info '{uri}'",
                f"  qemu-system-x86_64 -m 2G -drive 'file={drive},format=raw,if=virtio'",
            ]
        if self.unix_path:
            lines.append(f"  nbd-client -unix {self.unix_path} -N {self.export.name} /dev/nbd0")
        elif self._tcp_addr:
            host, port = self._tcp_addr
            lines.append(f"  nbd-client {host} {port} -N {self.export.name} /dev/nbd0")
        return "\n".join(lines)

    @property
    def active_connections(self) -> int:
        with self._lock:
            return len(self._sessions)

    @property
    def inflight(self) -> int:
        with self._lock:
            sessions = list(self._sessions)
        return sum(s.inflight for s in sessions)

    # ----- sockets ------------------------------------------------------------------------------

    def _bind_unix(self, path: str) -> socket.socket:
        self._clear_stale_socket(path)
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            os.makedirs(parent, mode=0o750 if self.group else 0o700, exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            # Permissions are set before listen(): nobody can connect in between.
            os.chmod(path, self.socket_mode)
            if self.group:
                try:
                    gid = grp.getgrnam(self.group).gr_gid
                except KeyError as exc:
                    raise ValueError(
                        f"group {self.group!r} does not exist; create it "
                        "(groupadd) or leave the group out"
                    ) from exc
                os.chown(path, -1, gid)
            sock.listen(64)
        except BaseException:
            sock.close()
            if os.path.exists(path):
                os.unlink(path)
            raise
        st = os.stat(path)
        self._unix_ino = (st.st_dev, st.st_ino)
        return sock

    @staticmethod
    def _clear_stale_socket(path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ValueError(
                f"{path} exists and is not a socket; remove it or choose another socket path"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # stale: its server is gone
            return
        except OSError:
            pass  # e.g. a timeout: somebody is there but busy; do not steal it
        finally:
            probe.close()
        raise OSError(
            errno.EADDRINUSE,
            f"another server is already listening on {path}; "
            "stop it first or choose another socket path",
        )

    def _remove_unix_socket(self) -> None:
        if not self.unix_path or self._unix_ino is None:
            return
        try:
            st = os.lstat(self.unix_path)
            if (st.st_dev, st.st_ino) == self._unix_ino:  # only ours, never a successor's
                os.unlink(self.unix_path)
        except FileNotFoundError:
            pass
        self._unix_ino = None

    def _bind_tcp(self, host: str, port: int) -> socket.socket:
        if not _is_loopback(host):
            self.log.warning(
                "NBD is listening on non-loopback address %s:%d without TLS or "
                "authentication: anyone who can reach it can read and overwrite "
                "the disk",
                host,
                port,
            )
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(info[4])
            sock.listen(64)
        except BaseException:
            sock.close()
            raise
        self._tcp_addr = sock.getsockname()[:2]
        return sock

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as sel:
            for s in self._listeners:
                sel.register(s, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self.stopping:
                for key, _ in sel.select():
                    if key.fileobj == self._wake_r or self.stopping:
                        return
                    if isinstance(key.fileobj, socket.socket):  # all but the wake pipe
                        self._accept(key.fileobj)

    def _accept(self, listener: socket.socket) -> None:
        try:
            conn, addr = listener.accept()
        except OSError as exc:
            self.log.warning("accepting an NBD connection failed: %s", exc)
            return
        peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) and addr else "unix"
        with self._lock:
            full = len(self._sessions) >= self.max_connections
            if not full:
                session = Session(self, conn, peer)
                self._sessions.add(session)
        if full:
            return self._refuse(conn, peer)
        if conn.family != socket.AF_UNIX:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session.start()

    def _refuse(self, conn: socket.socket, peer: str) -> None:
        """Over the cap: close at once (the client sees end of stream before the greeting)
        rather than leave it waiting in the backlog; one log line per burst of refusals."""
        with self._lock:
            self.refused += 1
            self._burst += 1
            first = self._burst == 1
        conn.close()
        if first:
            self.log.warning(
                "NBD connection from %s refused: %d connections are open, the "
                "most allowed ([nbd] max_connections); further refusals are "
                "counted until one closes",
                peer,
                self.max_connections,
            )

    def _session_ended(self, session: Session) -> None:
        with self._lock:
            self._sessions.discard(session)
            burst, self._burst = self._burst, 0
        if burst > 1:
            self.log.warning(
                "%d NBD connections were refused while %d were open", burst, self.max_connections
            )
