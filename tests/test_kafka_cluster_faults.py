"""A broker of a 3-node Apache Kafka cluster (replication factor 3, min.insync.replicas=2,
the layer's acks=all) killed with SIGKILL in the middle of traffic: nothing a send
returned for is lost, nothing is delivered twice, waiting receives resume within 30 s,
and the layer works on after the broker restarts.

The broker killed is the leader of the layer's log, the worst one to lose: its
followers must take over what it acknowledged. Its own cluster (tests/support)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from multilayer import ChannelLayer
from multilayer.exceptions import BrokerError, ChannelFull
from tests.support.apache_kafka import ApacheKafka, require_tools
from tests.support.brokers import require_module, started

kafka = require_module("kafka")

PREFIX = "clusterfaults"
#: Seconds of traffic before the kill, with the broker down, and after its restart.
BEFORE, DOWN, AFTER = 3.0, 12.0, 5.0
#: The promise: a waiting receive gets messages again within this many seconds.
RESUME_WITHIN = 30.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[ApacheKafka]:
    require_tools()
    with started(ApacheKafka(3)) as nodes:
        yield nodes


def leader_of(bootstrap: str, topic: str) -> int:
    """The node id (1-based) leading ``topic``'s partition 0."""
    consumer = kafka.KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        consumer.partitions_for_topic(topic)  # fetches the topic's metadata
        leader = consumer._client.cluster.leader_for_partition(kafka.TopicPartition(topic, 0))
        assert leader is not None and leader >= 0, f"{topic} has no leader"
        return int(leader)
    finally:
        consumer.close()


def test_a_killed_leader_loses_nothing_sent_and_delivers_nothing_twice(
    cluster: ApacheKafka,
) -> None:
    url = cluster.url

    async def body() -> tuple[list[str], Counter[str], float, int]:
        # Other options than the sender's: a hub of its own, as in another process.
        sender = ChannelLayer(url, prefix=PREFIX, capacity=100_000)
        receiver = ChannelLayer(url, prefix=PREFIX, capacity=100_000, claim_lease=9.0)
        inbox = await receiver.new_channel()
        await sender.new_channel()
        sent: list[str] = []
        got: Counter[str] = Counter()
        # When each message arrived (monotonic).
        arrivals: list[float] = []
        stop_receiving = asyncio.Event()
        arrived = asyncio.Event()

        async def until(condition: Callable[[], bool], seconds: float) -> None:
            give_up = time.monotonic() + seconds
            while not condition() and time.monotonic() < give_up:
                arrived.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(arrived.wait(), give_up - time.monotonic())

        async def receive_from(channel: str) -> None:
            while not stop_receiving.is_set():
                try:
                    message = await asyncio.wait_for(receiver.receive(channel), 1.0)
                except asyncio.TimeoutError:
                    continue
                got[message["id"]] += 1
                arrived.set()
                arrivals.append(time.monotonic())

        async def send_for(seconds: float, start: int) -> int:
            n, until = start, time.monotonic() + seconds
            while time.monotonic() < until:
                key = f"m{n}"
                channel = inbox if n % 2 else f"{PREFIX}.q"
                try:
                    await sender.send(channel, {"id": key})
                    sent.append(key)
                except (BrokerError, ChannelFull):
                    pass  # not returned: may be lost
                n += 1
                await asyncio.sleep(0.005)
            return n

        receivers = [
            asyncio.ensure_future(receive_from(channel)) for channel in (inbox, f"{PREFIX}.q")
        ]
        try:
            n = await send_for(BEFORE, 0)
            leader = await asyncio.to_thread(leader_of, cluster.bootstrap, f"multilayer.{PREFIX}")
            killed_at = time.monotonic()
            cluster.kill(leader - 1)
            n = await send_for(DOWN, n)
            await asyncio.to_thread(cluster.restart, leader - 1)
            n = await send_for(AFTER, n)
            # Everything sent arrives, or the wait ends at 60 s.
            await until(lambda: set(sent) <= set(got), 60)
            await asyncio.sleep(1.0)  # a duplicate would arrive by now
            # The layer works after the restart: a fresh message on each kind of channel.
            await sender.send(inbox, {"id": "after"})
            await sender.send(f"{PREFIX}.q", {"id": "after2"})
            await until(lambda: {"after", "after2"} <= set(got), 30)
            # The longest wait for a message from the kill on (the last gap: the second
            # of silence above plus a fresh message's trip); none at all counts as forever.
            window = [killed_at, *(t for t in arrivals if t > killed_at)]
            gaps = [later - earlier for earlier, later in itertools.pairwise(window)]
            return sent, got, max(gaps, default=float("inf")), n
        finally:
            stop_receiving.set()
            await asyncio.gather(*receivers, return_exceptions=True)
            await sender.flush()
            await sender.close()
            await receiver.close()

    sent, got, resumed, attempted = asyncio.run(asyncio.wait_for(body(), 240))
    print(f"{len(sent)} of {attempted} sends returned; longest receive gap {resumed:.1f}s")
    assert len(sent) > 1000, "too little traffic to mean anything"
    lost = set(sent) - set(got)
    assert not lost, f"{len(lost)} messages lost after their send returned: {sorted(lost)[:5]}"
    twice = [key for key, count in got.items() if count > 1]
    assert not twice, f"{len(twice)} messages delivered twice: {twice[:5]}"
    assert not set(got) - set(sent) - {"after", "after2"}, "messages nobody sent"
    assert resumed <= RESUME_WITHIN, f"receives waited {resumed:.1f}s"
    assert {"after", "after2"} <= set(got), "the layer does not work after the restart"
