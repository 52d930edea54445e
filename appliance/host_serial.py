"""Part [serial]: the host computer's command channel over the gadget's CDC-ACM serial port.

The gadget side is a tty (/dev/ttyGS0). It speaks the local socket's JSON-lines grammar
(docs/protocol.md) with the source "host", so the policy table decides what host software
may do: for example SAVE only while the appliance is UNLOCKED, never UNLOCK itself.

When the host disconnects the kernel hangs the tty up (reads give EOF, writes EIO); the part
then reopens it, so a host that comes back finds the channel working again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import termios
import tty
from typing import Any

from appliance.commands import CommandSink, PartUnavailable
from appliance.control_socket import MAX_LINE, dispatch

log = logging.getLogger("savepoint.serial")

CONFIG_SCHEMA: dict[str, tuple[type | tuple[type, ...], object, str]] = {
    "device": (str, "/dev/ttyGS0", "gadget-side tty of the CDC-ACM function ([gadget] acm)"),
    "source": (str, "host", "command source name the policy table sees"),
    "reopen_after": ((int, float), 0.5, "seconds before reopening the tty after a hang-up"),
}


class SerialPart:
    name = "serial"

    def __init__(self, cfg: dict[str, Any], bus: CommandSink) -> None:
        self.cfg = {key: default for key, (_, default, _) in CONFIG_SCHEMA.items()} | cfg
        self.bus = bus
        self.fd: int | None = None
        self._buf = bytearray()
        self._lines: asyncio.Queue[bytes] = asyncio.Queue()
        self._tasks: list[asyncio.Task[Any]] = []

    async def start(self) -> None:
        device = self.cfg["device"]
        if not os.path.exists(device):
            raise PartUnavailable(f"{device} does not exist",
                                  "enable the CDC-ACM function: [gadget] acm = true")
        self._open()
        self._tasks = [asyncio.create_task(self._serve(), name="serial")]
        log.info("host command channel on %s", device)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._close()

    # -- the tty -------------------------------------------------------------------
    def _open(self) -> None:
        fd = os.open(self.cfg["device"], os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            tty.setraw(fd)  # no echo, no line editing: the host gets only our replies
            termios.tcflush(fd, termios.TCIOFLUSH)
        except termios.error:  # not a tty (unit tests use a pty or a pipe pair)
            pass
        self.fd = fd
        self._buf.clear()
        asyncio.get_running_loop().add_reader(fd, self._readable)

    def _close(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.fd)
        os.close(self.fd)
        self.fd = None

    def _readable(self) -> None:
        assert self.fd is not None
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno != errno.EIO:
                log.warning("%s: %s", self.cfg["device"], e)
            data = b""
        if not data:  # hang-up: the host went away
            self._close()
            self._tasks.append(asyncio.create_task(self._reopen()))
            return
        self._buf += data
        while (end := self._buf.find(b"\n")) >= 0:
            line = bytes(self._buf[:end]).strip(b"\r")
            del self._buf[: end + 1]
            if line.strip():
                self._lines.put_nowait(line)
        if len(self._buf) > MAX_LINE:
            self._buf.clear()
            self._reply({"ok": False, "reason": f"request longer than {MAX_LINE} bytes",
                         "data": {}})

    async def _reopen(self) -> None:
        while self.fd is None:
            await asyncio.sleep(float(self.cfg["reopen_after"]))
            try:
                self._open()
            except OSError as e:
                log.debug("reopen %s: %s", self.cfg["device"], e)

    # -- requests ------------------------------------------------------------------
    async def _serve(self) -> None:
        while True:  # one request at a time, so replies come back in order
            line = await self._lines.get()
            reply = await dispatch(self.bus, line, self.cfg["source"])
            self._reply(reply)

    def _reply(self, reply: dict[str, Any]) -> None:
        data = json.dumps(reply, default=str).encode() + b"\n"
        if self.fd is None:
            return  # the host left before the answer: nobody to tell
        try:
            view = memoryview(data)
            while view:
                try:
                    view = view[os.write(self.fd, view):]
                except BlockingIOError:
                    os.set_blocking(self.fd, True)  # rare: the host is slow to read
                    view = view[os.write(self.fd, view):]
                    os.set_blocking(self.fd, False)
        except OSError as e:
            log.info("reply to the host lost: %s", e)
