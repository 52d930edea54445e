"""The part's broker connection against a real mosquitto: a flood to its subscription is read
in turns, so the daemon's other callbacks (the control socket, the bus) run in between."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from mqtt import connection
from mqtt.messages import Topics
from mqtt.settings import Broker as BrokerAddress
from mqtt.settings import MqttSettings, tls_context
from tests.mqtt_broker import MISSING, Broker, Client, mosquitto_installed

pytestmark = pytest.mark.skipif(not mosquitto_installed(), reason=MISSING)

FLOOD = 2000
REPLIES = 100


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    b = Broker(tmp_path_factory.mktemp("broker"), {"pi1": "pi1-secret"})
    yield b
    b.stop()


async def flood_and_count_between_ticks(broker: Broker) -> tuple[list[int], int]:
    """Messages the client read in between two ticks of another task while FLOOD messages
    arrive (kept in its queue or dropped: it is not consumed), and how many it read."""
    counts = {"dropped": 0, "unacked": 0}
    topics = Topics("savepoint", "pi1")
    client = connection.make_client(
        BrokerAddress("127.0.0.1", broker.port, True),
        topics,
        "pi1",
        username="pi1",
        password="pi1-secret",
        tls=tls_context(MqttSettings(ca_file=broker.pki["ca.pem"])),
        keepalive=30,
        counts=counts,
    )

    def taken() -> int:
        return counts["dropped"] + len(client.messages)

    gaps: list[int] = []
    async with client:
        await client.subscribe(topics.command, qos=1)
        admin = Client(broker, subscribe=())
        stop = asyncio.Event()

        async def ticker() -> None:
            last = taken()
            while not stop.is_set():
                await asyncio.sleep(0)  # one tick per event-loop iteration
                gaps.append(taken() - last)
                last = taken()

        tick = asyncio.create_task(ticker())
        body = json.dumps({"id": "f", "action": "restore", "args": {"pad": "x" * 3000}})
        flood = asyncio.create_task(
            asyncio.to_thread(
                lambda: [admin.c.publish(topics.command, body, qos=0) for _ in range(FLOOD)]
            )
        )
        # Replies whose PUBACK comes behind the flood: paho's loop_read reads one packet more
        # for each (the part's replies under a flood are these).
        await asyncio.sleep(0.05)
        replies = [
            asyncio.create_task(client.publish(topics.reply, b"{}", qos=1, timeout=20))
            for _ in range(REPLIES)
        ]
        try:
            await flood
            deadline = time.monotonic() + 30
            while taken() < FLOOD * 0.9 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        finally:
            stop.set()
            await tick
            await asyncio.gather(*replies, return_exceptions=True)
            admin.close()
        return gaps, taken()


def test_a_flood_is_read_in_turns_with_the_rest_of_the_loop(broker):
    gaps, taken = asyncio.run(flood_and_count_between_ticks(broker))
    print(f"\n{taken} messages read; at most {max(gaps)} between two ticks of another task")
    assert taken >= FLOOD * 0.9  # the flood was read (most of it dropped: the queue is full)
    # One loop iteration may run a queued turn and then the socket's readiness callback (the
    # selector put it in the same iteration's queue): at most two turns between ticks.
    assert max(gaps) <= 2 * connection.PACKETS_PER_TURN
