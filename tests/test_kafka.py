"""Kafka backend tests beyond the conformance suite: URLs and client settings, the replayed
state machine's rules, the topic layout, a joining receiver, latency and idle CPU (broker
restarts are in tests/test_faults.py). The broker here is an Apache Kafka node started by
the module on free loopback ports (``KINDS["kafka"]`` in tests/support/brokers.py, as
``scripts/broker.sh kafka`` starts it); the conformance suite runs against one with
``--multilayer-url '{kafka}'``.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import pytest
from asgiref.sync import async_to_sync

from multilayer import BrokerError, ChannelFull, ChannelLayer, ConfigurationError
from multilayer.backends.kafka import KafkaBackend
from multilayer.backends.kafka import hub as kafka_hub
from multilayer.backends.kafka.backend import Turnstile
from multilayer.backends.kafka.client import broker_release, client_config, describe_features
from multilayer.backends.kafka.log import Machine
from multilayer.backends.kafka.replay import Replay, _Part
from multilayer.backends.kafka.view import View
from multilayer.backends.kafka.writer import Writer
from multilayer.fanout import open_envelope
from multilayer.serialization import deadline_of, largest_payload, pack
from tests.support.apache_kafka import kafka_version
from tests.support.brokers import KINDS, certificates, free_port, require, require_module, started

kafka = require_module("kafka")

T = TypeVar("T")


def run(body: Callable[[], Awaitable[T]], timeout: float = 60.0) -> T:
    """Run ``body()`` in a fresh event loop, bounded."""

    async def bounded() -> T:
        return await asyncio.wait_for(body(), timeout)

    return asyncio.run(bounded())


@pytest.fixture(scope="module")
def broker_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with started(KINDS["kafka"](tmp_path_factory.mktemp("kafka"))) as broker:
        yield broker.url


def topics_on(url: str) -> set[str]:
    consumer = kafka.KafkaConsumer(bootstrap_servers=url.removeprefix("kafka://"))
    try:
        return set(consumer.topics())
    finally:
        consumer.close()


def records_in(url: str, topic: str) -> int:
    """How many Kafka records ``topic``'s one partition holds."""
    consumer = kafka.KafkaConsumer(bootstrap_servers=url.removeprefix("kafka://"))
    try:
        partition = kafka.TopicPartition(topic, 0)
        return int(consumer.end_offsets([partition])[partition])
    finally:
        consumer.close()


# -- URLs and client settings (no broker) --------------------------------------------------


def backend_for(url: str, **options: Any) -> KafkaBackend:
    layer = ChannelLayer(url, **options)
    backend = layer.backend_class(layer.url, layer.settings, layer.backend_options)
    assert isinstance(backend, KafkaBackend)
    return backend


def config_of(backend: KafkaBackend) -> dict[str, Any]:
    return client_config(backend.url, backend.config)


def test_plain_url_defaults_the_port_and_keeps_every_host() -> None:
    config = config_of(backend_for("kafka://one,two:9093"))
    assert config["bootstrap_servers"] == ["one:9092", "two:9093"]
    assert "security_protocol" not in config


def test_ssl_url_builds_the_tls_context_and_passes_sasl_credentials(tmp_path: Path) -> None:
    certs = certificates(tmp_path)
    url = (
        f"kafka+ssl://app:s%3Acret@broker:9094?ssl_cafile={certs / 'ca.pem'}"
        "&sasl_mechanism=SCRAM-SHA-512"
    )
    backend = backend_for(
        url, ssl_certfile=str(certs / "client.pem"), ssl_keyfile=str(certs / "client.key")
    )
    config = config_of(backend)
    assert config["security_protocol"] == "SASL_SSL"
    assert config["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (config["sasl_plain_username"], config["sasl_plain_password"]) == ("app", "s:cret")
    # The layer's own context (kafka-python's would use the deprecated ssl.PROTOCOL_TLS).
    context = config["ssl_context"]
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert [ca["subject"] for ca in context.get_ca_certs()] == [
        ((("commonName", "multilayer test CA"),),)
    ]
    unverified = config_of(backend_for("kafka+ssl://broker?ssl_verify=false"))
    assert unverified["ssl_context"].verify_mode == ssl.CERT_NONE
    assert config_of(backend_for("kafka+ssl://broker"))["security_protocol"] == "SSL"
    plain_sasl = config_of(backend_for("kafka://app:pw@broker"))
    assert plain_sasl["security_protocol"] == "SASL_PLAINTEXT"


def test_reconnections_wait_at_most_a_second() -> None:
    # kafka-python's own cap, 30 s: a node held down for 20 s was reached 24 s after it
    # came back, which failed the conformance restart test's first send now and then.
    assert config_of(backend_for("kafka://broker"))["reconnect_backoff_max_ms"] == 1000


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("kafka://", "at least one broker host"),
        ("kafka://broker/topic", "no path"),
        ("kafka://u:hunter2@broker?ssl_cafile=/ca.pem", r"applies only to kafka\+ssl:// URLs"),
        ("kafka://broker?acks=0", "acks"),
        ("kafka://broker?linger_ms=-1", "linger_ms"),
    ],
)
def test_bad_urls_are_refused_without_showing_the_password(url: str, problem: str) -> None:
    with pytest.raises(ConfigurationError, match=problem) as caught:
        ChannelLayer(url)
    assert "hunter2" not in str(caught.value)


# -- the replayed state machine (no broker) ------------------------------------------------


def payload(body: int, *, expires: float = 1e12) -> bytes:
    return pack({"n": body}, expires, max_size=1000)


def test_the_log_order_decides_capacity_and_claims() -> None:
    machine = Machine()
    sends = [machine.apply(i, ["S", None, 1.0, "q", 2, payload(i)]) for i in range(3)]
    assert [outcome.accepted for outcome in sends] == [True, True, False]
    claim = machine.apply(3, ["C", "c1", 1.0, "q", 5, 100.0])
    assert [(cid, [m.offset for m in got]) for cid, got in claim.delivered] == [("c1", [0, 1])]
    # A claim with nothing waiting stays open and takes exactly the next message.
    assert not machine.apply(4, ["C", "c2", 1.0, "q", 5, 100.0]).delivered
    later = machine.apply(5, ["S", None, 2.0, "q", 2, payload(5)])
    assert [(cid, len(got)) for cid, got in later.delivered] == [("c2", 1)]
    assert not machine.queues


class _Positions:
    """The replay's consumer, as far as a reset uses it."""

    def seek(self, partition: Any, offset: int) -> None:
        pass


def test_a_reset_noticed_late_rebuilds_groups_and_delivers_nothing_twice() -> None:
    """After a broker restart, the replay read records of the new log from its old
    position before it noticed the new log; it then replays the new log from its start.
    The membership those records carried comes back (the reset wiped the groups: no
    group message would reach the member), and their message is not delivered again."""
    options = ChannelLayer("kafka://127.0.0.1:9").backend_options
    view = View("multilayer.t", 2.0)
    replay = Replay(
        "multilayer.t",
        options,
        view,
        Writer("multilayer.t", options, view.busy, view.route),
        create_topic=lambda: None,
        reconnected=lambda: None,
        log_lost=lambda: None,
    )
    replay.consumer = _Positions()
    replay.parts[0] = _Part(replay.snapshots.schedule())
    member = ["A", None, time.time(), "room", "specific.p!c", time.time() + 600]
    message = ["S", None, time.time(), "work", 100, payload(1)]
    records = [msgpack.packb(record, use_bin_type=True) for record in (member, message)]
    with view.lock:
        replay._apply(0, 7, None, records[0])
        replay._apply(0, 8, None, records[1])
        assert "specific.p!c" in view.machine.groups["room"]
        assert len(view.machine.queues["work"].pending) == 1
        replay._start_over("lost its records (test)")
        assert not view.machine.groups and not view.machine.queues
        for offset, record in enumerate(records):
            replay._apply(0, offset, None, record)
        assert "specific.p!c" in view.machine.groups["room"]
        assert "work" not in view.machine.queues
        # A producer's retry that wrote the membership twice is not applied twice.
        view.machine.groups.clear()
        replay._apply(0, 2, None, records[0])
        assert not view.machine.groups


def test_dead_claims_and_expired_messages_take_nothing() -> None:
    machine = Machine()
    machine.apply(0, ["C", "crashed", 1.0, "q", 1, 5.0])
    # Written after the crashed receiver's lease ran out: the message waits instead.
    assert not machine.apply(1, ["S", None, 6.0, "q", 9, payload(1)]).delivered
    machine.apply(2, ["S", None, 6.0, "q", 9, payload(2, expires=7.0)])
    claim = machine.apply(3, ["C", "live", 8.0, "q", 9, 20.0])
    assert [[m.offset for m in got] for _, got in claim.delivered] == [[1]]


def test_inbox_capacity_counts_untaken_messages_and_flush_keeps_claims() -> None:
    machine = Machine()
    machine.apply(0, ["S", None, 1.0, "specific.p!a", 2, payload(0)])
    machine.apply(1, ["S", None, 1.0, "specific.p!b", 2, payload(1)])
    assert not machine.apply(2, ["S", None, 1.0, "specific.p!a", 2, payload(2)]).accepted
    machine.apply(3, ["T", None, 1.0, "specific.p!", [[0, "specific.p!a"]]])
    assert machine.apply(4, ["S", None, 1.0, "specific.p!a", 2, payload(4)]).accepted
    machine.apply(5, ["C", "waiting", 1.0, "q", 1, 100.0])
    machine.apply(6, ["A", None, 1.0, "g", "q", 100.0])
    assert machine.apply(7, ["F", None, 1.0]).flushed
    assert not machine.groups and not machine.queues["q"].pending
    assert [claim.cid for claim in machine.queues["q"].claims] == ["waiting"]


def test_group_send_is_one_record_with_per_member_capacity() -> None:
    machine = Machine()
    for offset, member in enumerate(["a", "b", "specific.p!x"]):
        machine.apply(offset, ["A", None, 1.0, "g", member, 50.0])
    machine.apply(3, ["A", None, 1.0, "g", "old", 1.5])
    machine.apply(4, ["S", None, 1.0, "b", 1, payload(0)])
    outcome = machine.apply(5, ["G", None, 2.0, "g", payload(5), 1, {"a": 3}])
    assert outcome.full_members == ["b"]
    assert outcome.appended == {"a", "specific.p!"}
    assert "old" not in machine.groups["g"]


def test_group_send_puts_one_envelope_per_inbox_counted_once() -> None:
    machine = Machine()
    members = [f"specific.p!m{index}" for index in range(5)]
    for offset, member in enumerate(members):
        machine.apply(offset, ["A", None, 1.0, "g", member, 50.0 + offset])
    machine.apply(5, ["A", None, 1.0, "g", "specific.p!late", 1.5])
    machine.apply(6, ["A", None, 1.0, "g", "worker", 50.0])
    # Five members in one inbox of capacity 2: one message there, not five.
    for position in (7, 8):
        outcome = machine.apply(
            position, ["G", None, 2.0, "g", payload(position), 9, {"specific.p!": 2}]
        )
        assert not outcome.full_members
    inbox = machine.queues["specific.p!"].pending
    assert [message.key for message in inbox] == [(7, "specific.p!"), (8, "specific.p!")]
    envelope = open_envelope("specific.p!", inbox[0].payload)
    assert (envelope.group, envelope.sent_at, envelope.payload) == ("g", 2.0, payload(7))
    assert envelope.members == [(member, 50.0 + offset) for offset, member in enumerate(members)]
    assert inbox[0].deadline == deadline_of(payload(7))
    assert len(machine.queues["worker"].pending) == 2
    # The inbox is full: every member it carries is skipped, the worker still gets its copy.
    refused = machine.apply(9, ["G", None, 2.0, "g", payload(9), 9, {"specific.p!": 2}])
    assert refused.full_members == members
    assert refused.live_members == len(members) + 1
    assert len(machine.queues["worker"].pending) == 3
    # A take record naming the envelope frees its one place.
    machine.apply(10, ["T", None, 2.0, "specific.p!", [[7, "specific.p!"]]])
    assert not machine.apply(
        11, ["G", None, 2.0, "g", payload(11), 9, {"specific.p!": 2}]
    ).full_members


def test_group_send_records_of_older_layers_give_members_capacities() -> None:
    # Before envelopes a record keyed capacities by member; a member's is its inbox's.
    machine = Machine()
    for offset, member in enumerate(["specific.p!a", "specific.p!b"]):
        machine.apply(offset, ["A", None, 1.0, "g", member, 50.0])
    record = ["G", None, 2.0, "g", payload(2), 9, {"specific.p!b": 1, "specific.p!a": 1}]
    assert not machine.apply(2, record).full_members
    refused = machine.apply(3, [*record[:4], payload(3), *record[5:]])
    assert refused.full_members == ["specific.p!a", "specific.p!b"]


def test_admitted_sends_are_appended_whatever_the_capacity() -> None:
    # The writer saw room; every replay must agree, so capacity is not checked again.
    machine = Machine()
    machine.apply(0, ["S", None, 1.0, "q", 1, payload(0)])
    assert machine.apply(1, ["S", None, 1.0, "q", None, payload(1)]).accepted
    assert len(machine.queues["q"].pending) == 2


def test_given_back_messages_serve_open_claims_then_return_to_the_head() -> None:
    machine = Machine()
    machine.apply(0, ["S", None, 1.0, "q", 9, payload(0)])
    machine.apply(1, ["S", None, 1.0, "q", 9, payload(1)])
    machine.apply(2, ["C", "greedy", 1.0, "q", 2, 100.0])
    machine.apply(3, ["S", None, 1.0, "q", 9, payload(3)])
    # Nobody wanted 0 and 1: they go back ahead of 3, except the expired one.
    back = [["q", payload(0)], ["q", payload(1, expires=1.5)]]
    assert machine.apply(4, ["R", None, 2.0, "q", back]).appended == {"q"}
    # The given-back message is keyed by the give-back's position, ahead of message 3.
    assert [m.offset for m in machine.queues["q"].pending] == [4, 3]
    taken = machine.apply(5, ["C", "other", 2.0, "q", 5, 100.0]).delivered
    assert [[m.offset for m in got] for _, got in taken] == [[4, 3]]
    assert not machine.apply(6, ["C", "waiting", 2.0, "q", 1, 100.0]).delivered
    served = machine.apply(7, ["R", None, 2.0, "q", [["q", payload(9)]]])
    assert [(cid, [m.offset for m in got]) for cid, got in served.delivered] == [("waiting", [7])]


# -- one process's operations on a key, while a first step is slow (no broker) -------------


def _line_of_sends(
    turnstile: Turnstile, release: asyncio.Event
) -> tuple[Callable[[int], Awaitable[None]], list[int]]:
    """An operation like a send (numbered): it writes (notes its number) at once if the
    step is done (``release`` set) and nobody waits for it, else through ``turnstile``."""
    written: list[int] = []

    async def step() -> None:
        await release.wait()

    async def send(number: int) -> None:
        if not release.is_set() or turnstile.busy("q"):
            await turnstile.through("q", step)
        written.append(number)

    return send, written


def test_a_turnstile_keeps_operations_that_come_once_the_step_is_done_in_line() -> None:
    async def body() -> list[int]:
        turnstile, release = Turnstile(), asyncio.Event()
        send, written = _line_of_sends(turnstile, release)
        waiting = [asyncio.ensure_future(send(n)) for n in range(5)]
        await asyncio.sleep(0)
        release.set()
        # These find the step done, but the first five not gone on yet.
        later = [asyncio.ensure_future(send(n)) for n in range(5, 8)]
        await asyncio.wait_for(asyncio.gather(*waiting, *later), 5)
        assert not turnstile.busy("q")
        await send(8)
        return written

    assert run(body) == list(range(9))


def test_an_operation_cancelled_in_a_turnstile_keeps_the_others_in_order() -> None:
    async def body() -> list[int]:
        turnstile, release = Turnstile(), asyncio.Event()
        send, written = _line_of_sends(turnstile, release)
        line = [asyncio.ensure_future(send(n)) for n in range(6)]
        await asyncio.sleep(0)
        line[3].cancel()
        await asyncio.sleep(0)
        release.set()
        await asyncio.wait(line, timeout=5)
        assert not turnstile.busy("q")
        return written

    assert run(body) == [0, 1, 2, 4, 5]


def test_a_turnstile_step_that_fails_fails_its_line_and_is_tried_again() -> None:
    async def body() -> None:
        turnstile = Turnstile()
        steps = []

        async def step() -> None:
            steps.append(len(steps))
            await asyncio.sleep(0.01)
            if len(steps) == 1:
                raise BrokerError("not read")

        outcomes = await asyncio.wait_for(
            asyncio.gather(
                *(turnstile.through("q", step) for _ in range(3)), return_exceptions=True
            ),
            5,
        )
        assert [type(outcome) for outcome in outcomes] == [BrokerError] * 3
        assert not turnstile.busy("q")
        await asyncio.wait_for(turnstile.through("q", step), 5)
        assert steps == [0, 1]

    run(body)


# -- against a Tansu broker ----------------------------------------------------------------


def _features(*features: tuple[str, int, int]) -> bytes:
    """A features array of ApiVersions' answer: (name, first level, second level)."""
    from kafka.protocol.types import Int16, UnsignedVarInt32

    out = UnsignedVarInt32.encode(len(features) + 1)
    for name, first, second in features:
        raw = name.encode()
        out += UnsignedVarInt32.encode(len(raw) + 1) + raw
        out += Int16.encode(first) + Int16.encode(second) + UnsignedVarInt32.encode(0)
    return out


@pytest.mark.parametrize(
    ("tagged", "described"),
    [
        # A fresh 4.4 cluster: supports up to 4.4-IV2 and runs it.
        (
            {0: _features(("metadata.version", 7, 33)),
             2: _features(("group.version", 1, 1), ("metadata.version", 33, 33))},
            "Kafka 4.4, metadata.version 4.4-IV2",
        ),
        # 4.4 software on a cluster upgraded from 3.9 and not finalized yet.
        (
            {0: _features(("metadata.version", 7, 33)),
             2: _features(("metadata.version", 21, 21))},
            "Kafka 4.4, metadata.version 3.9-IV0",
        ),
        # A release newer than the table: said so, not guessed.
        (
            {0: _features(("metadata.version", 7, 40)),
             2: _features(("metadata.version", 40, 40))},
            "Kafka newer than 4.5, metadata.version level 40, newer than 4.5-IV0",
        ),
        # No features: an emulator, or a ZooKeeper-era broker.
        ({}, None),
        ({0: _features(("group.version", 0, 1))}, None),
    ],
)  # fmt: skip
def test_the_broker_release_comes_from_its_metadata_version(
    tagged: dict[int, bytes], described: str | None
) -> None:
    assert describe_features(tagged) == described


def test_no_broker_answering_names_no_release() -> None:
    config = {"bootstrap_servers": [f"127.0.0.1:{free_port()}"], "client_id": "multilayer"}
    assert broker_release(config, timeout=1.0) is None


def test_apache_kafka_names_its_release(broker_url: str) -> None:
    async def body() -> str | None:
        layer = ChannelLayer(broker_url, prefix="release")
        try:
            await layer.new_channel()
            return await layer._state().backend.broker_version()
        finally:
            await layer.close()

    release = ".".join(kafka_version().split(".")[:2])
    # A freshly formatted cluster runs the newest metadata.version its release supports.
    assert (run(body) or "").startswith(f"Kafka {release}, metadata.version {release}-IV")


def test_two_topics_per_prefix_whatever_the_traffic(broker_url: str) -> None:
    # The log and its snapshots; none per channel, process or group.
    async def body() -> None:
        sender, receiver = (
            ChannelLayer(broker_url, prefix="layout"),
            ChannelLayer(broker_url, prefix="layout"),
        )
        try:
            channels = [await receiver.new_channel() for _ in range(5)]
            for index, channel in enumerate(channels):
                await receiver.group_add("layout-g", channel)
                await sender.send(f"layout.normal{index}", {"n": index})
            await sender.group_send("layout-g", {"n": -1})
            for channel in channels:
                assert await asyncio.wait_for(receiver.receive(channel), 10) == {"n": -1}
        finally:
            await sender.flush()
            await sender.close()
            await receiver.close()

    run(body)
    assert {topic for topic in topics_on(broker_url) if "layout" in topic} == {
        "multilayer.layout",
        "multilayer-state.layout",
    }


def test_size_limits_admit_the_largest_encrypted_message(broker_url: str) -> None:
    # The topic, the producer and the fetches take an encrypted payload at
    # max_message_size plus the operation around it, even for a layer that does not
    # encrypt: the topic is shared, and made by whichever process comes first.
    largest = largest_payload(300_000, encrypted=True)

    async def body() -> None:
        layer = ChannelLayer(broker_url, prefix="sized", max_message_size=300_000)
        try:
            await layer.send("sized.q", {"n": 1})
            assert await asyncio.wait_for(layer.receive("sized.q"), 10) == {"n": 1}
            backend = layer._state().backend
            assert isinstance(backend, KafkaBackend) and backend.hub is not None
            hub = backend.hub
            assert hub.options["max_record"] == largest + 4096
            assert hub.writer.producer.config["max_request_size"] == largest + 4096
            assert hub.replay.consumer.config["max_partition_fetch_bytes"] == largest + 4096
        finally:
            await layer.close()

    run(body)
    admin = kafka.KafkaAdminClient(bootstrap_servers=broker_url.removeprefix("kafka://"))
    try:
        topic = kafka.admin.ConfigResource(kafka.admin.ConfigResourceType.TOPIC, "multilayer.sized")
        [response] = admin.describe_configs([topic])
    finally:
        admin.close()
    configs = {entry[0]: entry[1] for entry in response.resources[0][4]}
    assert configs["max.message.bytes"] == str(largest + 4096)


def test_operations_written_together_share_a_kafka_record(broker_url: str) -> None:
    async def body() -> None:
        layer = ChannelLayer(broker_url, prefix="packed", capacity=1000)
        try:
            await layer.new_channel()
            await asyncio.gather(*(layer.send("packed.q", {"i": i}) for i in range(500)))
            got = [(await asyncio.wait_for(layer.receive("packed.q"), 10))["i"] for _ in range(500)]
            assert got == list(range(500))
        finally:
            await layer.close()

    run(body)
    records = records_in(broker_url, "multilayer.packed")
    # 500 sends and the claims and takes around them: far fewer records than operations.
    assert records < 250, f"{records} Kafka records for 500 sends"


def test_sends_keep_their_order_while_another_process_inbox_is_assigned(broker_url: str) -> None:
    # The sender (a hub of its own, as in another process) assigns the inbox a partition,
    # its owner not having received yet, while sends keep coming, ten at a time: those
    # that come once the partition is known must not overtake those waiting for it
    # (before, they did in 8 runs of 8: up to the first 136 of 500 arrived last).
    async def body() -> list[int]:
        owner = ChannelLayer(broker_url, prefix="assigning", capacity=1000)
        sender = ChannelLayer(broker_url, prefix="assigning", capacity=1000, claim_lease=9.0)
        try:
            await sender.new_channel()  # opened: the sends wait only for the inbox
            channel = f"specific.{owner.process_name}!order"
            sends = []
            for i in range(500):
                sends.append(asyncio.ensure_future(sender.send(channel, {"i": i})))
                if i % 10 == 9:
                    await asyncio.sleep(0.001)
            await asyncio.gather(*sends)
            return [(await asyncio.wait_for(owner.receive(channel), 10))["i"] for _ in range(500)]
        finally:
            await owner.flush()
            await sender.close()
            await owner.close()

    got = run(body)
    assert got == list(range(500)), f"arrived first: {got[:3]}, last: {got[-3:]}"


def test_inbox_takes_ride_along_with_the_next_record(broker_url: str) -> None:
    """Taking a message from an inbox is recorded for the other processes, but not as a
    Kafka record of its own each time: one-at-a-time traffic costs about a record per
    message, not two."""

    # A prefix of its own: the count must not include an earlier run's records.
    prefix = f"takes{time.time_ns()}"

    async def body() -> None:
        layer = ChannelLayer(broker_url, prefix=prefix)
        try:
            inbox = await layer.new_channel()
            for i in range(100):
                await layer.send(inbox, {"i": i})
                assert await asyncio.wait_for(layer.receive(inbox), 10) == {"i": i}
                await asyncio.sleep(0.005)  # a paced sender: the take goes out before it
            await asyncio.sleep(0.5)  # the last take goes out on its own, within 20 ms
            stats = await layer.stats()
            assert stats.queues == {}, "every take reached the log"
        finally:
            await layer.close()

    run(body)
    records = records_in(broker_url, f"multilayer.{prefix}")
    assert records < 130, f"{records} Kafka records for 100 sends and their takes"


def test_linger_reaches_the_producer_and_paced_traffic_flows(broker_url: str) -> None:
    async def body() -> None:
        backend = backend_for(broker_url, prefix="linger", linger_ms=50)
        await backend.open()
        try:
            assert backend.hub.writer.producer.config["linger_ms"] == 50
        finally:
            await backend.close()
        layer = ChannelLayer(broker_url, prefix="linger", linger_ms=50)
        try:
            for i in range(20):
                await layer.send("linger.q", {"i": i})
                await asyncio.sleep(0.005)
            got = [(await asyncio.wait_for(layer.receive("linger.q"), 10))["i"] for _ in range(20)]
            assert got == list(range(20))
        finally:
            await layer.close()

    run(body)
    assert backend_for(broker_url).config["linger_ms"] == 0


def test_a_new_process_sees_the_present_before_it_sends(broker_url: str) -> None:
    # A send returns without a round trip only when the sender's replayed view has room;
    # a layer that had not caught up with the log would see an empty channel instead. A
    # send returns before the broker has its record (docs/backends/kafka.md, "A send"), so
    # the new process is opened once the broker has them: stats() waits for their replay.
    async def body() -> None:
        first = ChannelLayer(broker_url, prefix="present", capacity=5)
        try:
            for i in range(5):
                await first.send("present.q", {"i": i})
            assert (await first.stats()).queues == {"present.q": 5}
            # Different options give the late layer a hub of its own, like a new process.
            late = ChannelLayer(broker_url, prefix="present", capacity=5, claim_lease=9.0)
            try:
                await late.new_channel()
                with pytest.raises(ChannelFull):
                    await late.send("present.q", {"i": 5})
            finally:
                await late.close()
        finally:
            await first.flush()
            await first.close()

    run(body)


def test_prefetched_messages_go_back_when_no_receive_wants_them(broker_url: str) -> None:
    async def body() -> None:
        greedy = ChannelLayer(broker_url, prefix="prefetch", prefetch_hold=0.3)
        other = ChannelLayer(broker_url, prefix="prefetch")
        try:
            await other.new_channel()
            for i in range(5):
                await other.send("prefetch.q", {"i": i})
            # One claim takes all five; its receive wants one, the rest wait in its process.
            assert await asyncio.wait_for(greedy.receive("prefetch.q"), 10) == {"i": 0}
            got = [(await asyncio.wait_for(other.receive("prefetch.q"), 10))["i"] for _ in range(4)]
            assert got == [1, 2, 3, 4]
        finally:
            await other.flush()
            await greedy.close()
            await other.close()

    run(body)


def _hub_threads(topic: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"multilayer kafka {topic} ")]


def test_the_log_connection_ends_with_the_last_event_loop_using_it(broker_url: str) -> None:
    """async_to_sync runs each call in a new event loop that ends without close(): the
    backend of each is abandoned once the next loop's is open, so the process's one
    connection to the log is kept across the calls, and close() in the last loop stops
    its threads (before, each ended loop's backend held it forever)."""
    layer = ChannelLayer(broker_url, prefix="loops")
    try:
        channel = async_to_sync(layer.new_channel)()
        threads = _hub_threads("multilayer.loops")
        assert threads
        for n in range(4):
            async_to_sync(layer.send)(channel, {"n": n})
            # One connection to the log serves every call: its threads are the same.
            assert _hub_threads("multilayer.loops") == threads
        got = [async_to_sync(layer.receive)(channel)["n"] for _ in range(4)]
        assert got == [0, 1, 2, 3]
        async_to_sync(layer.flush)()
    finally:
        async_to_sync(layer.close)()
    deadline = time.monotonic() + 15
    while _hub_threads("multilayer.loops") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _hub_threads("multilayer.loops"), "the hub outlived the last loop's close()"


def test_retention_shorter_than_group_expiry_is_refused(broker_url: str) -> None:
    async def body() -> None:
        layer = ChannelLayer(broker_url, prefix="short", retention_hours=2, group_expiry=86400)
        try:
            with pytest.raises(ConfigurationError, match="retention_hours=2 is shorter"):
                await layer.send("short.q", {})
        finally:
            await layer.close()

    run(body)
    assert "multilayer.short" not in topics_on(broker_url)


def test_a_joining_receiver_does_not_stall_the_others(broker_url: str) -> None:
    async def body() -> float:
        sender, first, second = (ChannelLayer(broker_url, prefix="join") for _ in range(3))
        gaps: list[float] = []
        try:

            async def produce() -> None:
                for i in range(150):
                    await sender.send("join.work", {"i": i})
                    await asyncio.sleep(0.01)

            async def consume_first() -> None:
                last = time.monotonic()
                while True:
                    await first.receive("join.work")
                    gaps.append(time.monotonic() - last)
                    last = time.monotonic()

            consumer = asyncio.ensure_future(consume_first())
            producer = asyncio.ensure_future(produce())
            await asyncio.sleep(0.5)
            joined = asyncio.ensure_future(second.receive("join.work"))
            await asyncio.wait_for(producer, 30)
            consumer.cancel()
            joined.cancel()
            await asyncio.gather(consumer, joined, return_exceptions=True)
        finally:
            await sender.flush()
            for layer in (sender, first, second):
                await layer.close()
        return max(gaps[1:])

    worst = run(body)
    # A consumer-group join would pause every receiver for seconds; claims never do.
    assert worst < 0.5, f"a receiver stalled {worst:.3f}s while another joined"


def _cpu_by_thread() -> dict[int, float]:
    """CPU seconds (user + system) of each thread of this process, by thread id."""
    ticks = os.sysconf("SC_CLK_TCK")
    found: dict[int, float] = {}
    for task in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{task}/stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()
        found[int(task)] = (int(fields[11]) + int(fields[12])) / ticks
    return found


def test_an_idle_layer_does_not_spin(broker_url: str) -> None:
    # Latency is measured by `multilayer bench` (scenario c); this checks the polling
    # design: waiting receives, one renewing its claim, cost almost no CPU. Counted on
    # the event loop's thread and the threads the layer started, not the whole process:
    # in a long session, threads other tests left behind would count too.
    require(Path("/proc/self/task").is_dir(), "needs /proc to count CPU per thread")

    async def body() -> float:
        earlier = set(_cpu_by_thread()) - {threading.get_native_id()}
        a = ChannelLayer(broker_url, prefix="idle", claim_lease=3.0)
        try:
            inbox = await a.new_channel()
            waiting = [
                asyncio.ensure_future(a.receive("idle.work")),
                asyncio.ensure_future(a.receive(inbox)),
            ]
            await asyncio.sleep(3)
            before = _cpu_by_thread()
            await asyncio.sleep(3)
            after = _cpu_by_thread()
            for task in waiting:
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
        finally:
            await a.flush()
            await a.close()
        ours = set(after) - earlier
        return sum(after[tid] - before.get(tid, 0.0) for tid in ours) / 3

    idle_share = run(body)
    # Busy polling would take most of a core; the design takes about 2.5 %.
    assert idle_share < 0.2, f"an idle layer used {100 * idle_share:.1f}% of a core"


def test_a_full_inbox_of_another_process_refuses_sends(broker_url: str) -> None:
    # The sender does not replay the receiver's inbox (a hub of its own, as in another
    # process): the owner reports it near capacity in control, and from then on sends
    # are checked and answered by the owner's verdict (docs/backends/kafka.md,
    # "Capacity of another process's inbox").
    async def body() -> tuple[int, int]:
        receiver = ChannelLayer(broker_url, prefix="verdict", capacity=10)
        sender = ChannelLayer(broker_url, prefix="verdict", capacity=10, claim_lease=9.0)
        try:
            channel = await receiver.new_channel()
            accepted = 0
            with pytest.raises(ChannelFull):
                for n in range(200):
                    await sender.send(channel, {"n": n})
                    accepted += 1
                    await asyncio.sleep(0.002)
            got = [(await asyncio.wait_for(receiver.receive(channel), 10))["n"] for _ in range(10)]
            assert got == list(range(10)), "FIFO, from the first message on"
            rest = 0
            while True:
                try:
                    await asyncio.wait_for(receiver.receive(channel), 0.5)
                    rest += 1
                except asyncio.TimeoutError:
                    break
            # Drained: the owner says so, and sends go again.
            await sender.send(channel, {"n": "again"})
            assert await asyncio.wait_for(receiver.receive(channel), 10) == {"n": "again"}
            return accepted, 10 + rest
        finally:
            await receiver.flush()
            await receiver.close()
            await sender.close()

    accepted, delivered = run(body)
    # Overshoot: what the sender wrote while the owner's report was on its way. The
    # receiving process keeps at most a channel's capacity of it (multilayer.local drops
    # the rest, logged): the cost of sending without a round trip (see the docs).
    assert 10 <= accepted <= 40, accepted
    assert delivered == min(accepted, 10), (accepted, delivered)


def test_a_checked_send_to_a_killed_owner_raises_channel_full(
    broker_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Near capacity, a send to another process's inbox waits for its owner's verdict.
    # An owner that was SIGKILLed never answers: the send raises ChannelFull once
    # VERDICT_TIMEOUT passed (shortened here), and a later one does the same.
    monkeypatch.setattr(kafka_hub, "VERDICT_TIMEOUT", 2.0)
    owner = subprocess.Popen(
        [sys.executable, "-m", "multilayer.conformance.worker", "hold", broker_url, "gone",
         json.dumps({"capacity": 4}), ""],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert owner.stdout is not None
        channel = str(json.loads(owner.stdout.readline())["channel"])
        assert channel.startswith("specific."), channel

        async def body() -> list[float]:
            sender = ChannelLayer(broker_url, prefix="gone", capacity=4)
            try:
                with pytest.raises(ChannelFull):
                    for n in range(200):
                        await sender.send(channel, {"n": n})
                        await asyncio.sleep(0.002)
                owner.kill()
                owner.wait(10)
                waits = []
                for n in range(2):
                    started = time.monotonic()
                    with pytest.raises(ChannelFull):
                        await sender.send(channel, {"late": n})
                    waits.append(time.monotonic() - started)
                return waits
            finally:
                await sender.close()

        waits = run(body)
        # Each refusal came from the timeout, not from a verdict.
        assert all(1.9 <= wait < 10 for wait in waits), waits
    finally:
        owner.kill()
        owner.wait(10)
        if owner.stdout is not None:
            owner.stdout.close()


def test_a_topic_of_one_partition_keeps_everything_in_it(broker_url: str) -> None:
    # Topics made before issue 14 have one partition: a layer uses the topic's own count
    # (partitions applies when it creates the topic), so everything stays in partition 0.
    async def body() -> None:
        old = ChannelLayer(broker_url, prefix="onepart", partitions=1)
        new = ChannelLayer(broker_url, prefix="onepart", claim_lease=9.0)
        try:
            inbox = await old.new_channel()
            other = await new.new_channel()
            hub = new._state().backend.hub  # type: ignore[attr-defined]
            assert hub.view.partitions == 1 and hub.view.part_of(other) == 0
            await new.send(inbox, {"n": 1})
            assert await asyncio.wait_for(old.receive(inbox), 10) == {"n": 1}
            await old.send("onepart.q", {"n": 2})
            assert await asyncio.wait_for(new.receive("onepart.q"), 10) == {"n": 2}
            await old.group_add("onepart-g", inbox)
            await new.group_add("onepart-g", other)
            await new.group_send("onepart-g", {"n": 3})
            assert await asyncio.wait_for(old.receive(inbox), 10) == {"n": 3}
            assert await asyncio.wait_for(new.receive(other), 10) == {"n": 3}
        finally:
            await old.flush()
            await old.close()
            await new.close()

    run(body)
    consumer = kafka.KafkaConsumer(bootstrap_servers=broker_url.removeprefix("kafka://"))
    try:
        assert consumer.partitions_for_topic("multilayer.onepart") == {0}
    finally:
        consumer.close()


class _RacingProducer:
    """A producer whose first close() fails as kafka-python's does when its sender thread
    closes the wake-up socket pair under it."""

    def __init__(self) -> None:
        self.closes = 0

    def close(self, timeout: float) -> None:
        self.closes += 1
        if self.closes == 1:
            raise BrokenPipeError(32, "Broken pipe")


def test_a_producer_close_that_loses_the_race_to_its_own_sender_is_finished() -> None:
    options = ChannelLayer("kafka://127.0.0.1:9").backend_options
    view = View("multilayer.t", 2.0)
    writer = Writer("multilayer.t", options, view.busy, view.route)
    writer.producer = producer = _RacingProducer()
    writer.stop()
    assert producer.closes == 2
