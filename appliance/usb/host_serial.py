"""Part [serial]: the host computer's command channel over the gadget's CDC-ACM serial port.

The gadget side is a tty (/dev/ttyGS0). It speaks the local socket's JSON-lines grammar
(docs/protocol.md) with the source "host", so the policy table decides what host software
may do: for example SAVE only while the appliance is UNLOCKED, never UNLOCK itself.

The host may be hostile, so nothing it sends or fails to read can stall the daemon
(docs/security.md): the tty is read and written through asyncio pipe transports; replies
the host does not read pile up to `output_buffer` bytes, then are dropped and counted; at
most `queue` request lines wait, and while they do the tty is not read (the host's writes
block in its own kernel); a line is at most 64 KiB; a request that fails gets an error
reply; and a crash of the serving task is a logged fault and a restart.

When the host disconnects the kernel hangs the tty up (reads give EOF or EIO, writes EIO);
the part then reopens it, so a host that comes back finds the channel working again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import termios
import tty
from dataclasses import dataclass
from typing import Any

from appliance.control.commands import CommandSink, PartUnavailable
from appliance.control.requests import MAX_LINE, dispatch
from appliance.parts import PartSpec, TaskSet
from appliance.settings import Settings, setting

log = logging.getLogger("savepoint.serial")


@dataclass(frozen=True)
class SerialSettings(Settings):
    """The [serial] section: the host command channel over the gadget's CDC-ACM tty."""

    device: str = setting("/dev/ttyGS0", "gadget-side tty of the CDC-ACM function ([gadget] acm)")
    source: str = setting("host", "command source name the policy table sees: host or host:<name>")
    reopen_after: float = setting(0.5, "seconds before reopening the tty after a hang-up")
    queue: int = setting(16, "request lines that may wait; while full the tty is not read")
    output_buffer: int = setting(65536, "bytes of unread replies kept; later replies are dropped")
    restart_after: float = setting(1.0, "seconds before the serving task restarts after a crash")


OVERLONG = None  # queued in place of a line over MAX_LINE: the answer is an error reply


def validate_config(cfg: dict[str, Any]) -> None:
    if cfg["source"].split(":", 1)[0] != "host":  # never a gesture source such as "cli"
        raise ValueError(
            f'source: {cfg["source"]!r} must be "host" or "host:<name>": '
            "the host computer is never a person's gesture"
        )
    if cfg["queue"] < 1:
        raise ValueError(f"queue: {cfg['queue']} must be at least 1")
    if cfg["output_buffer"] < 4096:
        raise ValueError(f"output_buffer: {cfg['output_buffer']} must be at least 4096 bytes")


class _Pipe(asyncio.Protocol):
    """One end of the tty; tells the part when it is gone (generation: ignore old ends)."""

    def __init__(self, part: SerialPart, generation: int) -> None:
        self.part, self.generation = part, generation

    def data_received(self, data: bytes) -> None:
        self.part._received(data)

    def eof_received(self) -> bool:
        return False  # close: a hang-up

    def connection_lost(self, exc: Exception | None) -> None:
        self.part._hung_up(self.generation, exc)


class SerialPart:
    name = "serial"

    def __init__(self, cfg: SerialSettings | dict[str, Any], bus: CommandSink) -> None:
        self.cfg = SerialSettings.of(cfg)
        self.bus = bus
        self._reader: asyncio.ReadTransport | None = None
        self._writer: asyncio.WriteTransport | None = None
        self._generation = 0
        self._buf = bytearray()
        self._skipping = False  # inside an over-long line: discard up to its newline
        self._lines: asyncio.Queue[bytes | None] = asyncio.Queue(int(self.cfg.queue))
        self._tasks = TaskSet()
        self._reopening: asyncio.Task[Any] | None = None
        self.counters = {
            "requests": 0,
            "request_errors": 0,
            "replies_dropped": 0,
            "overlong_lines": 0,
            "restarts": 0,
            "hangups": 0,
        }

    async def start(self) -> None:
        device = self.cfg.device
        if not os.path.exists(device):
            raise PartUnavailable(
                f"{device} does not exist", "enable the CDC-ACM function: [gadget] acm = true"
            )
        await self._open()
        self._tasks.spawn(self._supervise(), "serial")
        extras = getattr(self.bus, "status_extras", None)
        if isinstance(extras, list):
            extras.append(self._status)
        log.info("host command channel on %s", device)

    async def stop(self) -> None:
        extras = getattr(self.bus, "status_extras", None)
        if isinstance(extras, list) and self._status in extras:
            extras.remove(self._status)
        tasks = [*self._tasks, *([self._reopening] if self._reopening else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._reopening = None
        self._close()

    def _status(self) -> dict[str, Any]:
        return {
            "serial": {
                "device": self.cfg.device,
                "open": self._reader is not None,
                "waiting": self._lines.qsize(),
                **self.counters,
            }
        }

    # -- the tty -------------------------------------------------------------------
    async def _open(self) -> None:
        fd = os.open(self.cfg.device, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            tty.setraw(fd)  # no echo, no line editing: the host gets only our replies
            termios.tcflush(fd, termios.TCIOFLUSH)
        except termios.error:  # not a tty (unit tests may use a pipe pair)
            pass
        loop = asyncio.get_running_loop()
        self._generation += 1
        gen = self._generation
        pipes = [os.fdopen(fd, "rb", buffering=0), os.fdopen(os.dup(fd), "wb", buffering=0)]
        try:  # two transports on one tty: reading can pause while writing goes on
            self._reader, _ = await loop.connect_read_pipe(lambda: _Pipe(self, gen), pipes[0])
            self._writer, _ = await loop.connect_write_pipe(lambda: _Pipe(self, gen), pipes[1])
        except BaseException:
            self._close()
            for pipe in pipes:
                pipe.close()
            raise
        self._buf.clear()
        self._skipping = False

    def _close(self) -> None:
        self._generation += 1  # the transports' connection_lost calls are now stale
        if self._writer is not None:
            self._writer.abort()  # unread replies go too: the host left
        if self._reader is not None:
            self._reader.close()
        self._reader = self._writer = None

    def _hung_up(self, generation: int, exc: Exception | None) -> None:
        if generation != self._generation:
            return
        self.counters["hangups"] += 1
        log.info("%s hung up%s; reopening", self.cfg.device, f" ({exc})" if exc else "")
        self._close()
        if self._reopening is None or self._reopening.done():
            self._reopening = asyncio.get_running_loop().create_task(self._reopen())

    async def _reopen(self) -> None:
        while self._reader is None:
            await asyncio.sleep(float(self.cfg.reopen_after))
            try:
                await self._open()
            except OSError as e:
                log.debug("reopen %s: %s", self.cfg.device, e)

    # -- requests in: bounded line, bounded queue, backpressure ----------------------
    def _received(self, data: bytes) -> None:
        self._buf += data
        self._split()
        if self._reader is not None and (self._lines.full() or len(self._buf) > MAX_LINE):
            self._reader.pause_reading()  # the host's writes now wait in its kernel

    def _split(self) -> None:
        while not self._lines.full():
            end = self._buf.find(b"\n")
            if end < 0 and len(self._buf) <= MAX_LINE and not self._skipping:
                return  # the rest of the line is still on its way
            if self._skipping or end < 0 or end > MAX_LINE:  # drop the line, answer once
                if not self._skipping:
                    self.counters["overlong_lines"] += 1
                    self._lines.put_nowait(OVERLONG)
                if end < 0:
                    self._buf.clear()
                    self._skipping = True
                    return
                del self._buf[: end + 1]
                self._skipping = False
                continue
            line = bytes(self._buf[:end]).strip(b"\r")
            del self._buf[: end + 1]
            if line.strip():
                self._lines.put_nowait(line)

    def _take_more(self) -> None:
        self._split()
        if self._reader is not None and not self._lines.full() and len(self._buf) <= MAX_LINE:
            self._reader.resume_reading()

    # -- serving: one request at a time, so replies come back in order ---------------
    async def _supervise(self) -> None:
        set_part = getattr(self.bus, "set_part", None)
        while True:
            try:
                await self._serve()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug, not a request: say so, then serve again
                self.counters["restarts"] += 1
                log.exception("the host command channel crashed; restarting")
                if callable(set_part):
                    set_part(self.name, "failed", f"crashed: {e!r}", "restarting; see the log")
                await asyncio.sleep(float(self.cfg.restart_after))
                if callable(set_part):
                    set_part(self.name, "up")

    async def _serve(self) -> None:
        while True:
            line = await self._lines.get()
            self._take_more()
            self._reply(await self._answer(line))

    async def _answer(self, line: bytes | None) -> dict[str, Any]:
        self.counters["requests"] += 1
        if line is OVERLONG:
            return _error(f"request longer than {MAX_LINE} bytes; the line was dropped")
        try:
            return await dispatch(self.bus, line, self.cfg.source)
        except Exception as e:  # one request must not take the channel down
            self.counters["request_errors"] += 1
            log.exception("request from the host failed")
            return _error(
                f"internal error serving this request ({type(e).__name__}); the channel is still up"
            )

    def _reply(self, reply: dict[str, Any]) -> None:
        data = json.dumps(reply, default=str).encode() + b"\n"
        writer = self._writer
        if writer is None or writer.is_closing():
            return  # the host left before the answer: nobody to tell
        if writer.get_write_buffer_size() + len(data) > int(self.cfg.output_buffer):
            self.counters["replies_dropped"] += 1  # the host is not reading: never wait for it
            if (
                self.counters["replies_dropped"] in (1, 10, 100)
                or not self.counters["replies_dropped"] % 1000
            ):
                log.warning(
                    "host is not reading its replies: %d dropped so far",
                    self.counters["replies_dropped"],
                )
            return
        with contextlib.suppress(OSError, RuntimeError):
            writer.write(data)


def _error(reason: str) -> dict[str, Any]:
    return {"ok": False, "reason": reason, "data": {}}


SPEC = PartSpec(
    "serial", SerialSettings, lambda s, ctx: SerialPart(s, ctx.bus), validate=validate_config
)
