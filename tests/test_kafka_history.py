"""Start-up independent of history: a process opening a layer on a prefix whose log holds
1,000,000 operations is ready in 2 s on Apache Kafka, because it starts from the newest
snapshot of the state (multilayer/backends/kafka/snapshot.py) rather than the log's start.

The history is written raw with kafka-python (operations packed 1,024 to a record, as the
layer's writer packs them) while a running layer replays it and snapshots the state, as
the processes of a deployment would; a new process then opens the layer."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import msgpack
import pytest

from multilayer import ChannelLayer
from multilayer.serialization import pack
from tests.support.apache_kafka import ApacheKafka, require_tools
from tests.support.brokers import require_module, started

kafka = require_module("kafka")

from multilayer.backends.kafka.log import (  # noqa: E402
    GROUP_ADD,
    OPERATIONS_PER_RECORD,
    SEND,
    queue_partition,
)
from multilayer.backends.kafka.snapshot import (  # noqa: E402
    Snapshot,
    decode_snapshot,
    state_topic,
)

T = TypeVar("T")

#: Operations in the history, and the live memberships among them.
HISTORY = 1_000_000
MEMBERSHIPS = 2_000
#: Partitions of the log (the layer's default).
PARTITIONS = 8
#: The promise: ready within this many seconds, whatever the history.
READY_WITHIN = 2.0


def run(body: Callable[[], Awaitable[T]], timeout: float = 120.0) -> T:
    """Run ``body()`` in a fresh event loop, bounded."""

    async def bounded() -> T:
        return await asyncio.wait_for(body(), timeout)

    return asyncio.run(bounded())


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    require_tools()
    with started(ApacheKafka(1)) as node:
        yield node.url


def history(prefix: str) -> Iterator[tuple[int, bytes]]:
    """Kafka records (partition, value) holding ``HISTORY`` operations where the layer
    puts them: sends of messages that expired long ago to 100 channels, in their
    channels' partitions, and ``MEMBERSHIPS`` group memberships that stay live, in
    control (partition 0)."""
    expired = pack({"n": 0}, time.time() - 3600, max_size=1000)
    sent_at = time.time() - 1800
    every = HISTORY // MEMBERSHIPS
    operations: dict[int, list[bytes]] = {}
    for n in range(HISTORY):
        if n % every == 0:
            member = n // every
            operation: list[Any] = [
                GROUP_ADD,
                None,
                sent_at,
                f"g{member % 100}",
                f"{prefix}.m{member}",
                4e9,
            ]
            partition = 0
        else:
            channel = f"{prefix}.c{n % 100}"
            operation = [SEND, f"h:{n}", sent_at, channel, None, expired]
            partition = queue_partition(channel, PARTITIONS)
        waiting = operations.setdefault(partition, [])
        waiting.append(msgpack.packb(operation, use_bin_type=True))
        if len(waiting) == OPERATIONS_PER_RECORD:
            yield partition, b"".join(waiting)
            waiting.clear()
    for partition, waiting in operations.items():
        if waiting:
            yield partition, b"".join(waiting)


def end_of(bootstrap: str, topic: str, number: int = 0) -> int:
    """The end offset of partition ``number`` (control by default) of ``topic``."""
    consumer = kafka.KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        partition = kafka.TopicPartition(topic, number)
        return int(consumer.end_offsets([partition])[partition])
    finally:
        consumer.close()


def newest_snapshot(bootstrap: str, prefix: str, number: int = 0) -> Snapshot | None:
    """The newest snapshot of log partition ``number`` of ``prefix``, if any."""
    consumer = kafka.KafkaConsumer(
        bootstrap_servers=bootstrap, receive_message_max_bytes=100_000_000
    )
    try:
        partition = kafka.TopicPartition(state_topic(f"multilayer.{prefix}"), number)
        consumer.assign([partition])
        end = int(consumer.end_offsets([partition])[partition])
        if end == 0:
            return None
        consumer.seek(partition, end - 1)
        for batch in consumer.poll(timeout_ms=2000).values():
            return decode_snapshot(batch[-1].value)
        return None
    finally:
        consumer.close()


def newest_snapshot_at(bootstrap: str, prefix: str, number: int = 0) -> int:
    """The offset the newest snapshot of log partition ``number`` of ``prefix`` resumes
    from; -1 without one."""
    snapshot = newest_snapshot(bootstrap, prefix, number)
    return -1 if snapshot is None else snapshot.resume


async def snapshotted(bootstrap: str, prefix: str, within: float = 30.0) -> None:
    """Wait until every partition of ``prefix``'s log has a snapshot as of its end."""
    give_up = time.monotonic() + within
    for number in range(PARTITIONS):
        end = await asyncio.to_thread(end_of, bootstrap, f"multilayer.{prefix}", number)
        while await asyncio.to_thread(newest_snapshot_at, bootstrap, prefix, number) < end:
            assert time.monotonic() < give_up, f"no snapshot of partition {number} in {within} s"
            await asyncio.sleep(0.2)


def digests_in(bootstrap: str, topic: str, number: int) -> set[bytes]:
    """The digests (as the replay computes them) of every record of one partition."""
    consumer = kafka.KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        partition = kafka.TopicPartition(topic, number)
        consumer.assign([partition])
        consumer.seek_to_beginning(partition)
        end = int(consumer.end_offsets([partition])[partition])
        found: set[bytes] = set()
        give_up = time.monotonic() + 30
        while consumer.position(partition) < end and time.monotonic() < give_up:
            for batch in consumer.poll(timeout_ms=500).values():
                found.update(hashlib.blake2b(r.value, digest_size=16).digest() for r in batch)
        return found
    finally:
        consumer.close()


def test_a_process_joining_a_long_history_is_ready_in_two_seconds(url: str) -> None:
    prefix = "history"
    bootstrap = url.removeprefix("kafka://")
    # Snapshots every 100,000 operations, and half a second after the last ones.
    running = ChannelLayer(url, prefix=prefix, snapshot_every=100_000, snapshot_interval=0.5)

    async def replay_history() -> float:
        await running.new_channel()  # creates the topics
        producer = kafka.KafkaProducer(
            bootstrap_servers=bootstrap, max_request_size=8_000_000, linger_ms=50
        )
        try:
            for partition, value in history(prefix):
                producer.send(f"multilayer.{prefix}", value, partition=partition)
            producer.flush(60)
        finally:
            producer.close()
        # The running process uses a channel of every partition, as a deployment's
        # processes do: it replays and snapshots them all.
        started = time.monotonic()
        for n in range(100):
            await running.send(f"{prefix}.c{n}", {"n": n})
            assert await running.receive(f"{prefix}.c{n}") == {"n": n}
        # The running process has replayed the history once its stats see the groups.
        stats = await running.stats()
        assert stats.groups is not None
        assert len(stats.groups) == 100 and sum(stats.groups.values()) == MEMBERSHIPS
        return time.monotonic() - started

    async def join() -> tuple[float, Any, int | None]:
        # Other options than the running layer's: a hub of its own, as in a new process.
        late = ChannelLayer(url, prefix=prefix, claim_lease=9.0)
        try:
            started = time.monotonic()
            inbox = await late.new_channel()
            await late.send(f"{prefix}.ready", {"n": 1})
            assert await late.receive(f"{prefix}.ready") == {"n": 1}
            await late.group_add("g0", inbox)
            ready = time.monotonic() - started
            stats = await late.stats()
            hub = late._state().backend.hub  # type: ignore[attr-defined]
            return ready, stats, hub.replay.started_from
        finally:
            await late.close()

    async def body() -> tuple[float, float, Any, int | None]:
        try:
            replayed = await replay_history()
            await snapshotted(bootstrap, prefix)
            return (replayed, *await join())
        finally:
            await running.close()

    replayed, ready, stats, started_from = run(body)
    print(f"history replayed by the running process in {replayed:.1f}s; joined in {ready:.2f}s")
    assert started_from is not None and started_from > 0, "the new process started from 0"
    assert ready <= READY_WITHIN, f"ready after {ready:.2f}s"
    # Every live membership is known, the new one included.
    assert stats.groups is not None
    assert sum(stats.groups.values()) == MEMBERSHIPS + 1


def test_a_partition_snapshot_remembers_only_its_own_records(url: str) -> None:
    # Each snapshot carries the digests a joining process needs to apply a record met
    # twice once; another partition's digests would only make all 8 snapshots larger.
    prefix = "digests"
    bootstrap = url.removeprefix("kafka://")
    layer = ChannelLayer(url, prefix=prefix, snapshot_every=100_000, snapshot_interval=0.5)

    async def body() -> None:
        try:
            await layer.group_add("g", await layer.new_channel())
            for n in range(40):
                await layer.send(f"{prefix}.c{n}", {"n": n})
                assert await layer.receive(f"{prefix}.c{n}") == {"n": n}
            await snapshotted(bootstrap, prefix)
        finally:
            await layer.close()

    run(body)
    for number in range(PARTITIONS):
        snapshot = newest_snapshot(bootstrap, prefix, number)
        assert snapshot is not None
        own = digests_in(bootstrap, f"multilayer.{prefix}", number)
        assert snapshot.digests, f"partition {number}'s snapshot remembers nothing"
        assert set(snapshot.digests) <= own, f"partition {number} has others' digests"


def test_a_snapshot_replays_like_the_state_it_was_taken_from() -> None:
    # A process starting from a snapshot must decide every later operation as the
    # processes that replayed the whole log do: same receivers, same fan-out, same order.
    from multilayer.backends.kafka.log import CLAIM, GROUP_SEND, Machine
    from multilayer.backends.kafka.snapshot import encode_snapshot

    live = pack({"n": 1}, time.time() + 600, max_size=1000)
    before: list[list[Any]] = [
        [SEND, None, time.time(), "q", None, live],
        [SEND, None, time.time(), "q", None, live],
        [CLAIM, "c1", time.time(), "idle", 1, time.time() + 60],
        [GROUP_ADD, None, time.time(), "g", "q", 4e9],
        [GROUP_ADD, None, time.time(), "g", "specific.p!a", 4e9],
    ]
    after: list[list[Any]] = [
        [CLAIM, "c2", time.time(), "q", 5, time.time() + 60],
        [SEND, None, time.time(), "idle", None, live],
        [GROUP_SEND, "t", time.time(), "g", live, 100, {}],
    ]
    replayed = Machine()
    for position, operation in enumerate(before):
        replayed.apply(position, operation)
    snapshot = decode_snapshot(encode_snapshot(replayed, 5, (4, b"d" * 16), [b"x" * 16]))
    assert snapshot is not None
    assert (snapshot.resume, snapshot.anchor, snapshot.digests) == (5, (4, b"d" * 16), [b"x" * 16])
    for position, operation in enumerate(after, start=len(before)):
        assert snapshot.machine.apply(position, operation) == replayed.apply(position, operation)
    assert snapshot.machine.queues == replayed.queues
    assert snapshot.machine.groups == replayed.groups
    assert decode_snapshot(b"\x93garbage") is None


def test_a_principal_without_the_snapshot_topic_still_gets_a_layer(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ACLs written before snapshots allow only multilayer.*: the layer works on, and its
    # processes replay the whole log.
    from kafka.admin import KafkaAdminClient
    from kafka.errors import TopicAuthorizationFailedError

    create = KafkaAdminClient.create_topics

    def refuse_snapshots(admin: Any, topics: list[Any], *args: Any, **kwargs: Any) -> Any:
        if any(topic.name.startswith("multilayer-state.") for topic in topics):
            raise TopicAuthorizationFailedError("not allowed")
        return create(admin, topics, *args, **kwargs)

    monkeypatch.setattr(KafkaAdminClient, "create_topics", refuse_snapshots)

    async def body() -> bool:
        layer = ChannelLayer(url, prefix="nosnapshots", snapshot_interval=0.1)
        try:
            await layer.send("nosnapshots.q", {"n": 1})
            assert await asyncio.wait_for(layer.receive("nosnapshots.q"), 10) == {"n": 1}
            await asyncio.sleep(0.5)  # past snapshot_interval: nothing to write to
            hub = layer._state().backend.hub  # type: ignore[attr-defined]
            return bool(hub.replay.snapshots.enabled)
        finally:
            await layer.close()

    assert run(body) is False
    # The channel's records are in its partition of the log (queue_partition).
    from multilayer.backends.kafka.log import queue_partition

    partition = queue_partition("nosnapshots.q", 8)
    assert end_of(url.removeprefix("kafka://"), "multilayer.nosnapshots", partition) > 0
