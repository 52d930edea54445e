"""The `mqtt` part: the appliance on a site's MQTT broker (aiomqtt, MQTT 5, TLS).

One task keeps a connection: connect (a last will marks the appliance offline), publish
"online", subscribe to the appliance's and its groups' command topics, publish Home Assistant
discovery, then serve commands and publish status until the connection drops; then wait
(1 s doubling to `reconnect_max`, with jitter so a room does not reconnect in step) and go
again. While the broker is unreachable the part is "failed: broker unreachable" and the
appliance goes on as before. Another task follows the bus, so SAVE/RESTORE outcomes that
happen while offline are sent on reconnect (the last 64).

Bounds: a command is at most `max_payload` bytes (larger: an error reply) and `rate`/`burst`
limit the commands run; the connection's own bounds (packet size, queue, reading in turns
with the rest of the daemon) are in mqtt/connection.py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import aiomqtt

from appliance.control.commands import Action, Command, CommandSink, Event, PartUnavailable
from mqtt import connection, discovery, settings
from mqtt.messages import (
    RateLimit,
    RequestError,
    Topics,
    dumps,
    event_payload,
    iso,
    parse_request,
    status_payload,
)

log = logging.getLogger("savepoint.mqtt")  # not "mqtt": aiomqtt's own logger

EVENTS_KEPT = 64  # SAVE/RESTORE outcomes kept for the event topic while offline
STOP_WAIT = 5.0  # seconds stop() waits for the part's tasks to end
REPLIES_WAITING = 32  # replies waiting for their PUBACK; more and the consumer waits


class MqttPart:
    name = "mqtt"

    def __init__(
        self,
        cfg: settings.MqttSettings | dict[str, Any],
        bus: CommandSink,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = settings.MqttSettings.of(cfg)
        self.bus, self.clock, self.wall = bus, clock, wall
        self.node = settings.node_id(self.cfg)
        self.topics = Topics(self.cfg.topic_prefix, self.node)
        self.limit = RateLimit(self.cfg.rate, self.cfg.burst, clock)
        self.client: aiomqtt.Client | None = None
        self.counts = {
            "connects": 0,
            "commands": 0,
            "errors": 0,
            "rate_limited": 0,
            "dropped": 0,
            "unacked": 0,
        }
        self.last: dict[str, dict[str, Any]] = {}  # "save"/"restore" -> latest outcome
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=EVENTS_KEPT)
        self._wake = asyncio.Event()
        self._status_sent: bytes | None = None
        self._limited_reply_at = -1e9
        self._queue: asyncio.Queue[Event] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._replies = asyncio.Semaphore(REPLIES_WAITING)
        self._sending: set[asyncio.Task[None]] = set()
        self._state, self._reason = "", ""
        self.broker = settings.Broker("", 0, True)

    # -- life cycle ----------------------------------------------------------------------
    async def start(self) -> None:
        try:
            settings.validate_config(self.cfg)
            if not self.cfg.broker:
                raise ValueError("broker is not set: give mqtts://HOST[:PORT]")
            self.broker = settings.parse_broker(self.cfg.broker)
            self.username, self.password = settings.read_secrets(self.cfg.secrets)
            self.tls = settings.tls_context(self.cfg) if self.broker.tls else None
        except settings.SecretsError as e:
            raise PartUnavailable(str(e), "fix [mqtt] secrets") from e
        except ValueError as e:
            raise PartUnavailable(f"[mqtt] {e}", "fix [mqtt] in the config") from e
        except OSError as e:  # ssl.SSLError is an OSError: a bad CA file or client key
            raise PartUnavailable(
                f"[mqtt] TLS files: {e}", "check [mqtt] ca_file, client_cert and client_key"
            ) from e
        self._queue = self.bus.subscribe()
        extras = getattr(self.bus, "status_extras", None)
        if isinstance(extras, list):
            extras.append(self.status)
        # The tasks first run after start() returns, so the daemon's "up" comes before the
        # connection's own state (connected, or failed: broker unreachable).
        self._tasks = [
            asyncio.create_task(self._follow(self._queue), name="mqtt-follow"),
            asyncio.create_task(self._run(), name="mqtt"),
        ]

    async def stop(self) -> None:
        client = self.client
        if client is not None:  # a clean disconnect sends no will: say offline ourselves
            with contextlib.suppress(Exception):
                await client.publish(
                    self.topics.availability, "offline", qos=1, retain=True, timeout=2
                )
        for task in self._tasks:
            task.cancel()
        if self._tasks:  # bounded: a part that will not end must not hold the daemon's stop
            _, late = await asyncio.wait(self._tasks, timeout=STOP_WAIT)
            for task in late:
                log.warning("mqtt task %s did not stop within %g s", task.get_name(), STOP_WAIT)
        self._tasks = []
        if self._queue is not None:
            self.bus.unsubscribe(self._queue)
            self._queue = None
        extras = getattr(self.bus, "status_extras", None)
        if isinstance(extras, list) and self.status in extras:
            extras.remove(self.status)

    def status(self) -> dict[str, Any]:
        return {
            "mqtt": {
                "connected": self.client is not None,
                "node": self.node,
                "broker": f"{self.broker.host}:{self.broker.port}",
                **self.counts,
            }
        }

    def _set_state(self, state: str, reason: str = "", hint: str = "") -> None:
        if (state, reason) == (self._state, self._reason):
            return  # one fault event per change, not one per retry
        self._state, self._reason = state, reason
        set_part = getattr(self.bus, "set_part", None)
        if callable(set_part):
            set_part("mqtt", state, reason, hint)

    # -- the connection ----------------------------------------------------------------------
    def _client(self) -> aiomqtt.Client:
        return connection.make_client(
            self.broker,
            self.topics,
            self.node,
            username=self.username,
            password=self.password,
            tls=self.tls,
            keepalive=self.cfg.keepalive,
            counts=self.counts,
        )

    async def _run(self) -> None:
        delay = 1.0
        where = f"{'mqtts' if self.broker.tls else 'mqtt'}://{self.broker.host}:{self.broker.port}"
        while True:
            try:
                async with self._client() as client:
                    self.client, delay = client, 1.0
                    self.counts["connects"] += 1
                    log.info("connected to %s as %s", where, self.node)
                    self._set_state("up", f"connected to {where} as {self.node}")
                    await self._session(client)
            except aiomqtt.MqttError as e:
                connection.stop_if_cancelled()  # a disconnect that timed out while stopping
                reason, hint = connection.why(e)
                if self.client is not None:
                    log.warning("lost the broker %s: %s", where, e)
                elif self._state != "failed":
                    log.warning("cannot reach the broker %s: %s", where, e)
                self._set_state("failed", reason, f"{where}: {e}; {hint}")
            except Exception as e:  # a bug must not end the part for good: report, retry
                connection.stop_if_cancelled()
                log.exception("mqtt session crashed")
                self._set_state("failed", f"crashed: {e}", "see the log; retrying")
            finally:
                self.client = None
            await asyncio.sleep(delay * random.uniform(0.75, 1.25))
            delay = min(delay * 2, self.cfg.reconnect_max)

    async def _session(self, client: aiomqtt.Client) -> None:
        await client.publish(self.topics.availability, "online", qos=1, retain=True)
        subs = [(self.topics.command, 1)] + [(self.topics.group(g), 1) for g in self.cfg.groups]
        await client.subscribe(subs)
        self._status_sent = None  # the broker may have lost it: send the status again
        self._wake.set()
        # Commands are read from the first moment: messages that wait behind discovery
        # would fill the queue and be dropped.
        tasks = [
            asyncio.create_task(self._commands(client)),
            asyncio.create_task(self._publisher(client)),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # re-raise the MqttError that ended the session
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _discovery(self, client: aiomqtt.Client) -> None:
        payloads = discovery.configs(self.topics, self.cfg.name, self.cfg.discovery_prefix)
        for topic, payload in payloads.items():
            body = dumps(payload) if self.cfg.discovery else b""  # empty: HA removes it
            await self._publish(client, topic, body, retain=True)

    async def _publish(
        self, client: aiomqtt.Client, topic: str, body: bytes | str, *, retain: bool = False
    ) -> None:
        await connection.publish(client, topic, body, self.counts, retain=retain)

    # -- state out -------------------------------------------------------------------------
    async def _follow(self, queue: asyncio.Queue[Event]) -> None:
        while True:
            event = await queue.get()
            action = event.data.get("action")
            if event.kind == "outcome" and action in ("save", "restore"):
                now = self.wall()
                self.last[action] = {
                    "ok": event.data.get("ok"),
                    "source": event.data.get("source"),
                    "reason": event.data.get("reason", ""),
                    "time": iso(now),
                }
                self._events.append(event_payload(self.node, event.data, now))
            if event.kind in ("outcome", "state", "host", "fault", "progress"):
                self._wake.set()

    async def _publisher(self, client: aiomqtt.Client) -> None:
        await self._discovery(client)
        sent_at = -1e9
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.cfg.poll_interval)
            self._wake.clear()
            await self._send_events(client)
            wait = self.cfg.status_interval - (self.clock() - sent_at)
            if wait > 0:  # throttle: changes during the wait go out together
                await asyncio.sleep(wait)
                await self._send_events(client)
            snap = await self.bus.snapshot() if hasattr(self.bus, "snapshot") else {}
            body = dumps(status_payload(snap, self.node, self.last))
            if body != self._status_sent:
                await self._publish(client, self.topics.status, body, retain=True)
                self._status_sent, sent_at = body, self.clock()

    async def _send_events(self, client: aiomqtt.Client) -> None:
        while self._events:
            await self._publish(client, self.topics.event, dumps(self._events[0]))
            self._events.popleft()

    # -- commands in -------------------------------------------------------------------------
    async def _commands(self, client: aiomqtt.Client) -> None:
        self._replies = asyncio.Semaphore(REPLIES_WAITING)  # a new session starts afresh
        self._sending = set()
        try:
            async for message in client.messages:
                try:
                    await self.handle(client, str(message.topic), message.payload, message.retain)
                except aiomqtt.MqttError:
                    raise
                except Exception:  # one bad message must not end the session
                    log.exception("handling a message on %s failed", message.topic)
        finally:
            for task in self._sending:
                task.cancel()

    async def _send_reply(self, client: aiomqtt.Client, body: bytes) -> None:
        """Send without waiting for its PUBACK, so the next command is read meanwhile;
        at most REPLIES_WAITING wait, then the consumer waits too."""
        await self._replies.acquire()

        async def send() -> None:
            try:
                await self._publish(client, self.topics.reply, body)
            finally:
                self._replies.release()

        task = asyncio.create_task(send())
        self._sending.add(task)
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("a reply was not sent: %s", task.exception())

    async def handle(
        self, client: aiomqtt.Client, topic: str, payload: Any, retained: bool
    ) -> None:
        body = payload if isinstance(payload, bytes) else str(payload or "").encode()
        if not body:  # how a retained message is cleared: nothing to answer
            return
        if not self.limit.take():
            self.counts["rate_limited"] += 1
            if self.clock() - self._limited_reply_at >= 1.0:  # one reply a second in a flood
                self._limited_reply_at = self.clock()
                await self._reply(
                    client,
                    None,
                    f"too many commands: at most "
                    f"{self.cfg.rate:g}/s after a burst of "
                    f"{self.cfg.burst}; dropped, nothing ran",
                )
            return
        source = (
            "mqtt" if topic == self.topics.command else f"mqtt:{topic.split('/')[-2]}"
        )  # <prefix>/group/<name>/cmd
        try:
            rid, action, args = parse_request(body, self.cfg.max_payload)
            if retained:  # a retained RESTORE would run again at every reconnect
                raise RequestError(
                    "retained command ignored: publish commands without the "
                    "retain flag (and clear it: an empty retained message)",
                    rid,
                )
        except RequestError as e:
            self.counts["errors"] += 1
            log.warning("bad request on %s: %s", topic, e.reason)
            await self._reply(client, e.request_id, e.reason)
            return
        self.counts["commands"] += 1
        outcome = await self.bus.submit(Command(action, source=source, args=args))
        data, reason = outcome.data, outcome.reason
        if action is Action.UNLOCK and not outcome.ok:
            reason += (
                "; UNLOCK is never possible over MQTT: it must be a person's gesture at "
                "the appliance (docs/fleet.md)"
            )
        if action is Action.STATUS and outcome.ok:
            data = status_payload(data, self.node, self.last)
        await self._send_reply(
            client,
            dumps(
                {
                    "id": rid,
                    "node": self.node,
                    "via": source,
                    "ok": outcome.ok,
                    "action": action.value,
                    "reason": reason,
                    "data": data,
                }
            ),
        )

    async def _reply(self, client: aiomqtt.Client, rid: str | None, error: str) -> None:
        await self._send_reply(
            client, dumps({"id": rid, "node": self.node, "ok": False, "reason": error})
        )
