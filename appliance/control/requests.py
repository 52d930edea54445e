"""The request grammar of every line channel: the local control socket
(appliance/control/socket.py) and the host's USB serial line (appliance/usb/host_serial.py).

Request:  {"cmd": "save"|"restore"|"unlock"|"lock"|"status"|"history"|"pair"|<part>,
           "args": {...}}
Reply:    {"ok": true|false, "reason": "...", "data": {...}}
A malformed or unknown request gets {"ok": false, "reason": ...} and changes nothing.
Grammar and examples: docs/protocol.md.
"""

from __future__ import annotations

import json
from typing import Any

from appliance.control.commands import Action, Command, CommandSink

MAX_LINE = 64 * 1024  # bytes in one request line, on every channel


def error_reply(reason: str) -> dict[str, Any]:
    return {"ok": False, "reason": reason, "data": {}}


def parse_request(line: bytes | str) -> tuple[str, dict[str, Any]]:
    """(cmd, args) from one request line; ValueError with a user-facing reason otherwise."""
    try:
        req = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"malformed request: not JSON ({e.msg if hasattr(e, 'msg') else e}); "
            'send one object per line, e.g. {"cmd": "status"}'
        ) from None
    except RecursionError:  # json's C decoder gives up on ~1,000 nested brackets
        raise ValueError(
            "malformed request: nested too deeply; a request is one flat object "
            'like {"cmd": "status"}'
        ) from None
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


async def dispatch(
    bus: CommandSink, line: bytes | str, source: str, authenticated: bool = True
) -> dict[str, Any]:
    """Run one request line through the bus; always returns a reply object."""
    try:
        cmd, args = parse_request(line)
    except ValueError as e:
        return error_reply(str(e))
    try:
        action = Action(cmd)
    except ValueError:
        handler = getattr(bus, "handler", lambda _name: None)(cmd)
        if handler is None:
            known = ", ".join(a.value for a in Action)
            also = ", watch" if source == "cli" else ""  # watch streams events: local socket only
            return error_reply(f"unknown command {cmd!r} (known: {known}{also})")
        if source != "cli":  # part commands (fob list/rename/revoke) are for the local admin
            return error_reply(f"{cmd!r} is only available on the appliance's local control socket")
        try:
            return {"ok": True, "reason": "", "data": await handler(args)}
        except Exception as e:  # a part's handler failing must not take the channel down
            return error_reply(f"{cmd} failed: {e}")
    outcome = await bus.submit(Command(action, source, authenticated, args))
    return {"ok": outcome.ok, "reason": outcome.reason, "data": outcome.data}
