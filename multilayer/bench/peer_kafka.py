"""Kafka peers for ``multilayer bench kafka://... --vs PEER``.

* ``channels_kafka``: the PyPI ``channels-kafka`` layer (aiokafka, one shared topic and one
  shared consumer group for every instance); each scenario is bounded, because it hangs
  on brokers where its consumer-group join or idempotent producer fails;
* ``raw_kafka``: the ceiling of plain kafka-python: batched produce (acks=1) and a manually
  assigned consumer, no capacity, expiry, groups or exactly-one delivery among processes.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import msgpack

from ..url import LayerURL
from . import PINGPONG_SECONDS, LayerContender, NotApplicable, payload

__all__ = ["channels_kafka", "raw_kafka"]

T = TypeVar("T")

#: How long one channels-kafka scenario may run before it counts as not running at all.
PEER_BOUND = 30.0


def _bootstrap(url: str) -> list[str]:
    return [f"{host}:{port or 9092}" for host, port in LayerURL.parse(url).hosts]


class _BoundedContender(LayerContender):
    """A layer peer whose scenarios turn a hang into a NotApplicable with the reason."""

    async def _bounded(self, scenario: str, work: Awaitable[T]) -> T:
        try:
            return await asyncio.wait_for(work, PEER_BOUND)
        except asyncio.TimeoutError:
            raise NotApplicable(
                f"{self.name} did not finish ({scenario}) within {PEER_BOUND:g}s on this broker"
            ) from None

    async def throughput_normal(self, n: int) -> float:
        return await self._bounded("a", super().throughput_normal(n))

    async def throughput_specific(self, n: int) -> float:
        return await self._bounded("b", super().throughput_specific(n))

    async def pingpong(self, n: int) -> list[float]:
        return await self._bounded("c", super().pingpong(n))

    async def group_send(self, members: int, n: int) -> tuple[float, float]:
        return await self._bounded("d", super().group_send(members, n))

    async def close(self) -> None:
        try:
            await asyncio.wait_for(super().close(), 20)
        except (Exception, asyncio.CancelledError):
            # After a failed start channels-kafka's flush() awaits its own cancelled producer
            # future and raises CancelledError; only a cancellation of this task propagates.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
        self._layers.clear()


def channels_kafka(url: str, capacity: int) -> LayerContender:
    """channels_kafka.core.KafkaChannelLayer on the same brokers (``capacity`` is its
    local buffer size; it has no broker-side capacity)."""
    from channels_kafka.core import KafkaChannelLayer  # type: ignore[import-untyped]

    hosts = _bootstrap(url)
    run = secrets.token_hex(3)
    return _BoundedContender(
        "channels_kafka",
        lambda: KafkaChannelLayer(
            hosts=hosts,
            topic=f"bench-ck-{run}",
            group_id=f"bench-ck-{run}",
            local_capacity=capacity,
        ),
    )


class RawKafka:
    """kafka-python with nothing around it: what the broker and client can do at best.

    A producer thread sends a batch with acks=1 and flushes once; a consumer thread reads
    the partition it was assigned (no consumer group, so no rebalance).
    """

    name = "raw_kafka"

    def __init__(self, url: str) -> None:
        self._servers = _bootstrap(url)
        self._topics: list[str] = []

    def _topic(self) -> str:
        from kafka.admin import KafkaAdminClient, NewTopic

        topic = f"bench-raw-{secrets.token_hex(4)}"
        admin = KafkaAdminClient(bootstrap_servers=self._servers)
        try:
            admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=-1)])
        finally:
            admin.close()
        self._topics.append(topic)
        return topic

    def _stream(self, n: int) -> float:
        from kafka import KafkaConsumer, KafkaProducer, TopicPartition

        topic = self._topic()
        producer = KafkaProducer(bootstrap_servers=self._servers, acks=1, linger_ms=5)
        consumer = KafkaConsumer(
            bootstrap_servers=self._servers, enable_auto_commit=False, fetch_max_wait_ms=10
        )
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        consumer.seek(partition, 0)
        body = msgpack.packb(payload(0))
        received = 0

        def consume() -> None:
            nonlocal received
            deadline = time.monotonic() + PEER_BOUND
            while received < n and time.monotonic() < deadline:
                for records in consumer.poll(timeout_ms=100).values():
                    for record in records:
                        msgpack.unpackb(record.value)
                        received += 1

        reader = threading.Thread(target=consume)
        started = time.perf_counter()
        reader.start()
        try:
            for _ in range(n):
                producer.send(topic, body)
            producer.flush()
            reader.join()
        finally:
            producer.close()
            consumer.close()
        if received < n:
            raise NotApplicable(f"raw_kafka received {received} of {n} messages")
        return n / (time.perf_counter() - started)

    def _pingpong(self, n: int) -> list[float]:
        from kafka import KafkaConsumer, KafkaProducer, TopicPartition

        topics = self._topic(), self._topic()
        producer = KafkaProducer(bootstrap_servers=self._servers, acks=1)
        consumers = []
        for topic in topics:
            consumer = KafkaConsumer(
                bootstrap_servers=self._servers, enable_auto_commit=False, fetch_max_wait_ms=5
            )
            partition = TopicPartition(topic, 0)
            consumer.assign([partition])
            consumer.seek(partition, 0)
            consumers.append(consumer)

        def next_record(consumer: Any) -> bytes:
            deadline = time.monotonic() + PEER_BOUND
            while time.monotonic() < deadline:
                for records in consumer.poll(timeout_ms=100, max_records=1).values():
                    value: bytes = records[0].value
                    return value
            raise NotApplicable(f"raw_kafka: no echo within {PEER_BOUND:g}s")

        stop = threading.Event()

        def echo() -> None:
            while not stop.is_set():
                for records in consumers[0].poll(timeout_ms=100, max_records=1).values():
                    producer.send(topics[1], records[0].value)
                    producer.flush()

        echoer = threading.Thread(target=echo)
        echoer.start()
        rounds: list[float] = []
        began = time.perf_counter()
        try:
            while len(rounds) < n or time.perf_counter() - began < PINGPONG_SECONDS:
                started = time.perf_counter()
                producer.send(topics[0], msgpack.packb(payload(len(rounds))))
                producer.flush()
                next_record(consumers[1])
                rounds.append(time.perf_counter() - started)
        finally:
            stop.set()
            echoer.join()
            producer.close()
            for consumer in consumers:
                consumer.close()
        return rounds

    async def throughput_normal(self, n: int) -> float:
        return await asyncio.to_thread(self._stream, n)

    async def throughput_specific(self, n: int) -> float:
        raise NotApplicable("a raw topic has no process-specific channels; see (a)")

    async def pingpong(self, n: int) -> list[float]:
        return await asyncio.to_thread(self._pingpong, n)

    async def group_send(self, members: int, n: int) -> tuple[float, float]:
        raise NotApplicable("raw Kafka has no groups")

    async def close(self) -> None:
        from kafka.admin import KafkaAdminClient

        if not self._topics:
            return
        topics, self._topics = self._topics, []

        def delete() -> None:
            admin = KafkaAdminClient(bootstrap_servers=self._servers)
            try:
                admin.delete_topics(topics)
            finally:
                admin.close()

        await asyncio.to_thread(delete)


def raw_kafka(url: str, capacity: int) -> RawKafka:
    """Raw kafka-python produce and manually assigned consume (``capacity`` unused)."""
    return RawKafka(url)
