"""The local control socket: JSON request lines over a Unix socket, served by the daemon.

Each line is a request of the grammar in appliance/control/requests.py, answered by one reply
line; "watch" (this socket only) replies once, sends the current state as a "state" event,
then streams {"event": kind, "data": {...}} lines until the client closes. Malformed or
unknown requests get {"ok": false, "reason": ...}; the connection and the daemon stay up.
Who may do what (admins, readers) is appliance/control/roles.py; how many clients, for how
long, is ControlLimits. The client is appliance/control/client.py. Examples: docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import grp
import json
import logging
import os
import socket
from dataclasses import dataclass, fields
from typing import Any

from appliance.control.commands import CommandSink
from appliance.control.requests import MAX_LINE, dispatch, error_reply, parse_request
from appliance.control.roles import Peer, Roles, peer_of

log = logging.getLogger("savepoint.control")


def socket_group(name: str) -> int | None:
    """The group's id when it exists and we may give files to it (root, or a member)."""
    try:
        gid = grp.getgrnam(name).gr_gid if name else None
    except KeyError:
        return None
    if gid is None or os.geteuid() == 0 or gid == os.getegid() or gid in os.getgroups():
        return gid
    return None


def secure_socket(path: str, group: str) -> int:
    """0660 + group when the group exists, else 0600. Returns the mode set."""
    gid = socket_group(group)
    mode = 0o660 if gid is not None else 0o600
    if gid is not None:
        os.chown(path, -1, gid)
    os.chmod(path, mode)
    return mode


def clear_stale(path: str) -> None:
    """Remove a socket file left by a dead daemon; refuse if a live one answers."""
    if not os.path.exists(path):
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            os.unlink(path)
            return
    raise RuntimeError(
        f"{path}: another savepoint daemon is listening there; stop it or choose another path"
    )


@dataclass(frozen=True)
class ControlLimits:
    """Bounds on what callers of the control socket may hold (docs/security.md)."""

    admin_group: str = "savepoint-admin"
    max_clients: int = 32
    max_watchers: int = 8
    idle_timeout: float = 60.0  # seconds a request client may wait before sending a line
    watch_stall: float = 10.0  # seconds a watcher may leave its events unread

    @classmethod
    def from_config(cls, control: dict[str, Any]) -> ControlLimits:
        return cls(**{f.name: control[f.name] for f in fields(cls) if f.name in control})


@dataclass
class _Client:
    peer: Peer | None
    writer: asyncio.StreamWriter
    idle_since: float | None = None  # waiting for a request line since then; None: busy
    watching: bool = False

    @property
    def uid(self) -> int:
        return -1 if self.peer is None else self.peer.uid


class ControlServer:
    def __init__(
        self,
        bus: CommandSink,
        path: str,
        group: str = "savepoint",
        source: str = "cli",
        limits: ControlLimits | None = None,
    ) -> None:
        self.bus, self.path, self.group, self.source = bus, path, group, source
        self.limits = limits or ControlLimits()
        self.roles = Roles(self.limits.admin_group)
        self._server: asyncio.AbstractServer | None = None
        self._clients: dict[asyncio.Task[Any], _Client] = {}
        self.counters = {
            "refused": 0,
            "evicted": 0,
            "idle_closed": 0,
            "watchers_dropped": 0,
            "denied": 0,
        }

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        clear_stale(self.path)
        old = os.umask(0o177)  # no window in which the socket is reachable by others
        try:
            self._server = await asyncio.start_unix_server(self._serve, self.path, limit=MAX_LINE)
        finally:
            os.umask(old)
        secure_socket(self.path, self.group)
        extras = getattr(self.bus, "status_extras", None)
        if isinstance(extras, list):
            extras.append(self._status)

    async def stop(self) -> None:
        extras = getattr(self.bus, "status_extras", None)
        if isinstance(extras, list) and self._status in extras:
            extras.remove(self._status)
        if self._server is not None:
            self._server.close()
            for task in list(self._clients):
                task.cancel()
            await asyncio.gather(*self._clients, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _status(self) -> dict[str, Any]:
        watchers = sum(c.watching for c in self._clients.values())
        return {"control": {"clients": len(self._clients), "watchers": watchers, **self.counters}}

    # -- admission: a bounded number of clients, none of them idle for ever -------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        client = _Client(peer_of(writer.get_extra_info("socket")), writer)
        share = self.limits.max_clients // 2  # a reader's most: the rest stays for others
        mine = sum(c.uid == client.uid for c in self._clients.values())
        if mine >= max(1, share) and not self.roles.is_admin(client.peer):
            self.counters["refused"] += 1
            _note(writer, f"too many connections from uid {client.uid} ({mine}); close some")
            writer.close()
            return
        if len(self._clients) >= self.limits.max_clients and not self._evict_for(client):
            self.counters["refused"] += 1
            _note(
                writer,
                f"too many control clients ({self.limits.max_clients} connected, "
                "all busy); try again in a moment",
            )
            writer.close()
            return
        self._clients[task] = client
        try:
            await self._session(reader, writer, client)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._clients.pop(task, None)
            writer.close()

    def _evict_for(self, newcomer: _Client) -> bool:
        """Make room: close the longest-idle request client of whoever holds most slots, so
        one user's idle connections cannot lock everyone else out."""
        held = collections.Counter(c.uid for c in self._clients.values())
        held[newcomer.uid] += 1
        idle = [
            (held[c.uid], -(c.idle_since or 0.0), task)
            for task, c in self._clients.items()
            if c.idle_since is not None
        ]
        if not idle:
            return False
        *_, task = max(idle, key=lambda item: item[:2])
        victim = self._clients.pop(task)
        self.counters["evicted"] += 1
        _note(victim.writer, "closed: the control socket is full and this connection was idle")
        task.cancel()
        return True

    async def _session(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: _Client
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            client.idle_since = loop.time()
            try:
                line = await asyncio.wait_for(reader.readuntil(b"\n"), self.limits.idle_timeout)
            except TimeoutError:
                self.counters["idle_closed"] += 1
                _note(writer, f"closed: no request for {self.limits.idle_timeout:g} s")
                return
            except asyncio.LimitOverrunError:
                await self._send(writer, error_reply(f"request longer than {MAX_LINE} bytes"))
                return  # cannot find the next line boundary reliably: close this client
            except asyncio.IncompleteReadError as e:
                if not e.partial.strip():
                    return
                line = e.partial
            client.idle_since = None
            if not line.strip():
                continue
            if _is_watch(line):
                await self._watch(reader, writer, client)
                return
            await self._send(writer, await self._answer(line, client))
            if reader.at_eof():
                return

    async def _answer(self, line: bytes, client: _Client) -> dict[str, Any]:
        try:
            cmd, args = parse_request(line)
        except ValueError as e:
            return error_reply(str(e))
        refusal = self.roles.refusal(client.peer, cmd, args)
        if refusal:
            self.counters["denied"] += 1
            log.warning("%s from uid %d refused: not an admin", cmd.upper(), client.uid)
            return error_reply(refusal)
        return await dispatch(self.bus, line, self.source)

    async def _send(
        self, writer: asyncio.StreamWriter, obj: dict[str, Any], within: float | None = None
    ) -> None:
        """Write one line; a client that does not take it within the bound is dropped."""
        writer.write(json.dumps(obj, default=str).encode() + b"\n")
        try:
            await asyncio.wait_for(writer.drain(), within or self.limits.idle_timeout)
        except TimeoutError:
            writer.transport.abort()  # its unread output goes: memory stays bounded
            raise ConnectionResetError("client not reading") from None

    # -- watch: a bounded stream that never holds the bus up -----------------------------
    async def _watch(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: _Client
    ) -> None:
        if sum(c.watching for c in self._clients.values()) >= self.limits.max_watchers:
            self.counters["refused"] += 1
            await self._send(
                writer,
                error_reply(
                    f"too many watchers ({self.limits.max_watchers}); "
                    "stop one, or raise [control] max_watchers"
                ),
            )
            return
        client.watching = True
        queue = self.bus.subscribe()  # the bus drops a slow watcher's oldest events
        try:
            await self._send(writer, {"ok": True, "reason": "", "data": {"watching": True}})
            snapshot = getattr(self.bus, "snapshot", None)
            if snapshot is not None:  # the current state first, then every change
                await self._send(writer, {"event": "state", "data": await snapshot()})
            await self._stream(reader, writer, queue, client)
        finally:
            self.bus.unsubscribe(queue)

    async def _stream(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        queue: asyncio.Queue[Any],
        client: _Client,
    ) -> None:
        closed = asyncio.ensure_future(reader.read())  # EOF: the watcher went away
        try:
            while not closed.done():
                get = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({get, closed}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    break
                event = get.result()
                try:
                    await self._send(
                        writer,
                        {"event": event.kind, "data": event.data},
                        within=self.limits.watch_stall,
                    )
                except ConnectionResetError:
                    self.counters["watchers_dropped"] += 1
                    log.warning(
                        "dropped a watcher (uid %d): its events were unread for %g s",
                        client.uid,
                        self.limits.watch_stall,
                    )
                    return
        finally:
            closed.cancel()


def _note(writer: asyncio.StreamWriter, reason: str) -> None:
    """A last line for a client being closed; never waited for."""
    with contextlib.suppress(Exception):
        writer.write(json.dumps(error_reply(reason)).encode() + b"\n")


def _is_watch(line: bytes) -> bool:
    try:
        return parse_request(line)[0] == "watch"
    except ValueError:
        return False
