"""The part's connection to the broker: an aiomqtt client with the part's bounds, its
publishing, and what its errors mean.

Bounds: packets over MAX_PACKET are dropped by the broker (MQTT 5 Maximum Packet Size), at
most QUEUE_IN received messages wait (more are dropped and counted), and reading takes turns
of PACKETS_PER_TURN packets with the rest of the event loop (FairClient), so a broker that
floods the subscription cannot keep the control socket, the bus or the other parts waiting.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqtt.messages import Topics
from mqtt.settings import Broker

MAX_PACKET = 128 * 1024  # the broker drops anything larger before it reaches us
QUEUE_IN = 32  # messages waiting to be handled; at most QUEUE_IN * MAX_PACKET of memory
QUEUE_OUT = 256  # messages waiting to go out
ACK_WAIT = 5.0  # seconds to wait for a PUBACK; a lost one is counted, not fatal
PACKETS_PER_TURN = 4  # packets read in one event-loop callback; then the others get a turn

# aiomqtt logs every dropped message; the part's counts say it once, in status
QUIET = logging.getLogger("savepoint.mqtt.client")
QUIET.setLevel(logging.ERROR)


class FairClient(aiomqtt.Client):
    """aiomqtt's client, reading in turns of at most PACKETS_PER_TURN packets.

    aiomqtt's socket callback calls paho's loop_read, which reads one packet more for every
    message of ours awaiting its acknowledgement, and again while TLS holds decrypted bytes.
    Under a flood those are the part's replies, whose PUBACKs come behind the flood (or never:
    docs/fleet.md; a lost one stays counted for the session): with 100 of them waiting, one
    callback read 100 flood messages while every other callback of the daemon (the control
    socket, the bus, the other parts) waited (tests/test_mqtt_connection.py). This reader
    reads at most PACKETS_PER_TURN packets, then comes back through call_soon, after the
    callbacks already waiting; a turn also ends when nothing is left to read, not even in
    TLS's buffer, and the socket's readiness starts the next. paho's one-packet read is
    private (`_packet_read`, what loop_read calls); that test fails if it changes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._turn_queued = False
        self.turns = 0  # reading turns taken
        self.longest_turn = 0  # most packets read in one turn

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        super()._on_socket_open(client, userdata, sock)  # queues aiomqtt's reader, its misc task
        # queued after aiomqtt's add_reader (one thread, first in first out): replaces it
        self._loop.call_soon_threadsafe(
            self._loop.add_reader, sock.fileno(), self._readable, client
        )

    def _readable(self, client: paho.Client) -> None:
        if not self._turn_queued:  # a queued turn reads anyway
            self._read_turn(client)

    def _read_turn(self, client: paho.Client) -> None:
        self._turn_queued = False
        self.turns += 1
        try:
            for n in range(PACKETS_PER_TURN):
                if client.socket() is None:
                    return
                rc = client._packet_read()
                if rc != paho.MQTT_ERR_SUCCESS:
                    self.longest_turn = max(self.longest_turn, n)
                    if rc != paho.MQTT_ERR_AGAIN:  # as loop_read: close, tell on_disconnect
                        client._loop_rc_handle(rc)
                    return
            self.longest_turn = PACKETS_PER_TURN
            self._turn_queued = True
            self._loop.call_soon(self._read_turn, client)
        except Exception as exc:  # as aiomqtt: a broken connection ends the session
            if not self._disconnected.done():
                self._disconnected.set_exception(exc)


def make_client(
    broker: Broker,
    topics: Topics,
    node: str,
    *,
    username: str | None,
    password: str | None,
    tls: ssl.SSLContext | None,
    keepalive: int,
    counts: dict[str, int],
) -> FairClient:
    """A client for one connection; messages aiomqtt drops on a full queue are counted in
    counts["dropped"]."""
    props = Properties(PacketTypes.CONNECT)
    props.MaximumPacketSize = MAX_PACKET

    class CountingQueue(asyncio.Queue):  # aiomqtt drops on full: count what it drops
        def put_nowait(self, item: Any) -> None:
            if self.full():
                counts["dropped"] += 1
            super().put_nowait(item)

    return FairClient(
        broker.host,
        broker.port,
        username=username,
        password=password,
        identifier=f"savepoint-{node}",
        protocol=aiomqtt.ProtocolVersion.V5,
        will=aiomqtt.Will(topics.availability, "offline", qos=1, retain=True),
        clean_start=True,
        keepalive=keepalive,
        timeout=10,
        tls_context=tls,
        properties=props,
        queue_type=CountingQueue,
        max_queued_incoming_messages=QUEUE_IN,
        max_queued_outgoing_messages=QUEUE_OUT,
        logger=QUIET,
    )


async def publish(
    client: aiomqtt.Client,
    topic: str,
    body: bytes | str,
    counts: dict[str, int],
    *,
    retain: bool = False,
) -> None:
    """QoS 1, but a PUBACK that does not come within ACK_WAIT is counted, not fatal.

    Under a flood to this client, mosquitto 2.0.11 logs "Sending PUBACK" for our
    publish and the client never reads it (docs/fleet.md); waiting for it with
    aiomqtt's timeout ended the session and lost every command acknowledged meanwhile.
    A connection that is really gone still ends the session: the message iterator
    raises and paho's keepalive notices."""
    try:
        await client.publish(topic, body, qos=1, retain=retain, timeout=ACK_WAIT)
    except aiomqtt.MqttCodeError:  # not queued at all: the connection is gone
        raise
    except aiomqtt.MqttError:  # only "Operation timed out" is left
        counts["unacked"] += 1


def why(error: aiomqtt.MqttError) -> tuple[str, str]:
    """(reason, hint) for the part's status when the connection failed."""
    text = str(error).lower()
    if "not authorized" in text or "bad user name" in text or "password" in text:
        return (
            "broker refused the login",
            "check username and password in [mqtt] secrets and the broker's password file",
        )
    if "certificate" in text or "ssl" in text or "tls" in text:
        return (
            "TLS with the broker failed",
            "check [mqtt] ca_file (it must have signed the broker's certificate) and that "
            "the broker's name matches its certificate",
        )
    return ("broker unreachable", "the appliance works on; retrying with backoff")


def stop_if_cancelled() -> None:
    """aiomqtt's context exit can raise MqttError (its disconnect timed out) while a
    cancellation is under way; that error replaces the CancelledError, so re-raise it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
