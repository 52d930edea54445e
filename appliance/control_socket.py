"""The local control socket: JSON lines over a Unix socket, and the client the CLI uses.

Request:  {"cmd": "save"|"restore"|"unlock"|"lock"|"status"|"history"|"pair"|"watch"|<part>,
           "args": {...}}
Reply:    {"ok": true|false, "reason": "...", "data": {...}}
"watch" replies once, sends the current state as a "state" event, then streams
{"event": kind, "data": {...}} lines until the client closes. Malformed or unknown
requests get {"ok": false, "reason": ...}; the connection and the daemon stay up.
`dispatch()` is the same grammar for other channels (host serial).
Grammar and examples: docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import socket
from typing import Any

from appliance.commands import Action, Command, CommandSink

log = logging.getLogger("savepoint.control")

MAX_LINE = 64 * 1024


def _error(reason: str) -> dict[str, Any]:
    return {"ok": False, "reason": reason, "data": {}}


def parse_request(line: bytes | str) -> tuple[str, dict[str, Any]]:
    """(cmd, args) from one request line; ValueError with a user-facing reason otherwise."""
    try:
        req = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"malformed request: not JSON ({e.msg if hasattr(e, 'msg') else e}); "
                         'send one object per line, e.g. {"cmd": "status"}') from None
    except RecursionError:  # json's C decoder gives up on ~1,000 nested brackets
        raise ValueError("malformed request: nested too deeply; a request is one flat object "
                         'like {"cmd": "status"}') from None
    if not isinstance(req, dict):
        raise ValueError('malformed request: expected an object like {"cmd": "status"}')
    cmd, args = req.get("cmd"), req.get("args", {})
    if not isinstance(cmd, str) or not cmd:
        raise ValueError('malformed request: "cmd" must be a command name, e.g. "status"')
    if not isinstance(args, dict):
        raise ValueError('malformed request: "args" must be an object')
    unknown = set(req) - {"cmd", "args", "id"}
    if unknown:
        raise ValueError(f"malformed request: unknown field(s) {', '.join(sorted(unknown))}")
    return cmd, args


async def dispatch(bus: CommandSink, line: bytes | str, source: str,
                   authenticated: bool = True) -> dict[str, Any]:
    """Run one request line through the bus; always returns a reply object."""
    try:
        cmd, args = parse_request(line)
    except ValueError as e:
        return _error(str(e))
    try:
        action = Action(cmd)
    except ValueError:
        handler = getattr(bus, "handler", lambda _name: None)(cmd)
        if handler is None:
            known = ", ".join(a.value for a in Action)
            also = ", watch" if source == "cli" else ""  # watch streams events: local socket only
            return _error(f"unknown command {cmd!r} (known: {known}{also})")
        if source != "cli":  # part commands (fob list/rename/revoke) are for the local admin
            return _error(f"{cmd!r} is only available on the appliance's local control socket")
        try:
            return {"ok": True, "reason": "", "data": await handler(args)}
        except Exception as e:  # a part's handler failing must not take the channel down
            return _error(f"{cmd} failed: {e}")
    outcome = await bus.submit(Command(action, source, authenticated, args))
    return {"ok": outcome.ok, "reason": outcome.reason, "data": outcome.data}


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
    raise RuntimeError(f"{path}: another savepoint daemon is listening there; "
                       "stop it or choose another path")


class ControlServer:
    def __init__(self, bus: CommandSink, path: str, group: str = "savepoint",
                 source: str = "cli") -> None:
        self.bus, self.path, self.group, self.source = bus, path, group, source
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        clear_stale(self.path)
        old = os.umask(0o177)  # no window in which the socket is reachable by others
        try:
            self._server = await asyncio.start_unix_server(self._serve, self.path,
                                                           limit=MAX_LINE)
        finally:
            os.umask(old)
        secure_socket(self.path, self.group)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._clients):
                task.cancel()
            await asyncio.gather(*self._clients, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            await self._session(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._clients.discard(task)
            writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.LimitOverrunError:
                await _send(writer, _error(f"request longer than {MAX_LINE} bytes"))
                return  # cannot find the next line boundary reliably: close this client
            except asyncio.IncompleteReadError as e:
                if not e.partial.strip():
                    return
                line = e.partial
            if not line.strip():
                continue
            if _is_watch(line):
                await self._watch(reader, writer)
                return
            await _send(writer, await dispatch(self.bus, line, self.source))
            if reader.at_eof():
                return

    async def _watch(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue = self.bus.subscribe()
        try:
            await _send(writer, {"ok": True, "reason": "", "data": {"watching": True}})
            snapshot = getattr(self.bus, "snapshot", None)
            if snapshot is not None:  # the current state first, then every change
                await _send(writer, {"event": "state", "data": await snapshot()})
            closed = asyncio.ensure_future(reader.read())  # EOF: the watcher went away
            while not closed.done():
                get = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({get, closed}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    break
                event = get.result()
                await _send(writer, {"event": event.kind, "data": event.data})
            closed.cancel()
        finally:
            self.bus.unsubscribe(queue)


def _is_watch(line: bytes) -> bool:
    try:
        return parse_request(line)[0] == "watch"
    except ValueError:
        return False


async def _send(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
    writer.write(json.dumps(obj, default=str).encode() + b"\n")
    await writer.drain()


class ControlError(Exception):
    """The daemon could not be reached or broke the protocol; the message is for the user."""


class ControlClient:
    """Blocking client for the CLI: one request, one reply; or a stream of watch events."""

    def __init__(self, path: str, timeout: float | None = 120) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            self.sock.close()
            raise ControlError(f"no savepoint daemon at {path} (start one with "
                               "`savepoint serve` or `savepoint daemon`, or pass --control)"
                               ) from None
        except PermissionError:
            self.sock.close()
            raise ControlError(f"{path}: permission denied (join the `savepoint` group "
                               "or run as the daemon's user)") from None
        self.file = self.sock.makefile("rb")

    def request(self, cmd: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        self.sock.sendall(json.dumps({"cmd": cmd, "args": args or {}}).encode() + b"\n")
        return self.read()

    def read(self) -> dict[str, Any]:
        try:
            line = self.file.readline()
        except TimeoutError:
            raise ControlError(f"the daemon at {self.path} did not answer in time") from None
        if not line:
            raise ControlError(f"the daemon at {self.path} closed the connection")
        return json.loads(line)

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
