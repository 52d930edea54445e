"""The blocking client of the local control socket (the CLI's, the host tools' and the
tests'): one request, one reply; or, after "watch", a stream of event lines.

The daemon's side is appliance/control/socket.py; the grammar appliance/control/requests.py.
"""

from __future__ import annotations

import json
import socket
from typing import Any


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
            raise ControlError(
                f"no savepoint daemon at {path} (start one with "
                "`savepoint serve` or `savepoint daemon`, or pass --control)"
            ) from None
        except PermissionError:
            self.sock.close()
            raise ControlError(
                f"{path}: permission denied (join the `savepoint` group "
                "or run as the daemon's user)"
            ) from None
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
