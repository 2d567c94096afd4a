"""Garbage from the broker: another client writes junk where a layer's messages wait.

Each backend is fed with its broker's own client: redis-py into a channel's list,
pika into a queue and the groups exchange, kafka-python into the layer's log topic, and
raw ZeroMQ frames to the hub and to a process's node. Hypothesis makes the junk; after
each piece a good message must still arrive, and the junk must never come out of
``receive()`` as an exception. Known-bad samples also check the WARNING (without bytes).
Redis, Tansu and the hub are started here on free ports; RabbitMQ is the shared node,
used for ordinary traffic only.
"""

from __future__ import annotations

import logging
import secrets
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from multilayer import ChannelLayer
from tests.support.brokers import (
    BrokerProcess,
    free_port,
    hub_argv,
    private_redis,
    require,
    require_module,
)
from tests.support.kafka_broker import tansu
from tests.support.looping import BROKER_EXAMPLES, LoopThread

#: A way to inject one junk payload, and whether this process logs dropping it (junk the
#: hub refuses is logged by the hub process).
Injection = tuple[Callable[[], None], bool]
Envelopes = Callable[[str, bytes], list[Injection]]


def _future() -> bytes:
    """A deadline an hour ahead without a newline byte: in a Redis element with no channel
    suffix, a newline inside it would frame the bytes after it as an expired message,
    which the take script drops without a log (a junk test failing by the clock)."""
    at = time.time() + 3600
    while b"\n" in struct.pack("!d", at):
        at += 1.0
    return struct.pack("!d", at)


FUTURE = _future()
#: Payloads that cannot be messages, whatever envelope carries them.
BAD_PAYLOADS = [
    b"",
    b"short",
    FUTURE,
    FUTURE + b"\xc1",  # a byte msgpack never uses
    FUTURE + msgpack.packb([1, 2, 3]),
    FUTURE + msgpack.packb({1: "int key"}),
    FUTURE + msgpack.packb({"a": 1}) + b"trailing",
    FUTURE + b"\xff" * 40,
]
PAYLOADS = st.one_of(
    st.binary(max_size=64),
    st.binary(max_size=64).map(lambda body: FUTURE + body),
    st.sampled_from(BAD_PAYLOADS),
)


def _dropped(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno >= logging.WARNING and "malformed" in record.getMessage()
    ]


class Fuzz:
    """A layer receiving on a normal channel and an inbox while junk is injected."""

    def __init__(self, url: str, thread: LoopThread) -> None:
        self.thread = thread
        self.prefix = "junk" + secrets.token_hex(4)
        self.layer = ChannelLayer(url, prefix=self.prefix)
        self.inbox = thread.run(self.layer.new_channel())
        self.channels = ("junk.q", self.inbox)
        self.count = 0

    def good_after(self, channel: str, inject: Callable[[], None]) -> list[dict[str, Any]]:
        """Inject, send a good message, and receive until it arrives; returns what came
        before it (junk that happens to be a valid message, at most one).
        """
        inject()
        self.count += 1
        good = {"good": self.count}
        self.thread.run(self.layer.send(channel, good))
        before: list[dict[str, Any]] = []
        while True:
            message = self.thread.run(self.layer.receive(channel), 15)
            if message == good:
                return before
            before.append(message)
            assert len(before) <= 1, before

    def close(self) -> None:
        self.thread.run(self.layer.flush(), 30)
        self.thread.run(self.layer.close(), 30)


@pytest.fixture
def thread() -> Iterator[LoopThread]:
    loop_thread = LoopThread()
    try:
        yield loop_thread
    finally:
        loop_thread.close()


def _exercise(
    fuzz: Fuzz,
    caplog: pytest.LogCaptureFixture,
    envelopes: Envelopes,
) -> None:
    """Known-bad payloads in every envelope (each logged and dropped), then hypothesis."""
    for channel in fuzz.channels:
        for payload in BAD_PAYLOADS:
            for index, (inject, logged) in enumerate(envelopes(channel, payload)):
                caplog.clear()
                with caplog.at_level(logging.WARNING, logger="multilayer"):
                    assert fuzz.good_after(channel, inject) == []
                    # Junk sent to a ZeroMQ node takes another path than the good message.
                    until = time.monotonic() + 3
                    while logged and not _dropped(caplog) and time.monotonic() < until:
                        time.sleep(0.01)
                dropped = _dropped(caplog)
                if logged:
                    assert dropped, f"junk #{index} {payload!r} on {channel!r} was not logged"
                if len(payload) > 12:
                    assert all(repr(payload[8:])[2:14] not in text for text in dropped)

    @BROKER_EXAMPLES
    @given(st.sampled_from(fuzz.channels), PAYLOADS, st.data())
    def any_junk(channel: str, payload: bytes, data: st.DataObject) -> None:
        injections = envelopes(channel, payload)
        inject, _logged = data.draw(st.sampled_from(injections))
        fuzz.good_after(channel, inject)

    any_junk()


# -- Redis ---------------------------------------------------------------------------------


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    with private_redis(tmp_path) as url:
        yield url


def test_redis_junk_elements(
    redis_url: str, thread: LoopThread, caplog: pytest.LogCaptureFixture
) -> None:
    import redis

    fuzz = Fuzz(redis_url, thread)
    client = redis.Redis.from_url(redis_url)

    def envelopes(channel: str, payload: bytes) -> list[Injection]:
        bang = channel.find("!")
        queue, suffix = (
            (channel, b"") if bang < 0 else (channel[: bang + 1], channel[bang + 1 :].encode())
        )
        key = f"{fuzz.prefix}:q:{queue}"
        return [
            (lambda: client.rpush(key, suffix + b"\n" + payload), True),  # well framed
            (lambda: client.rpush(key, payload), True),  # no channel suffix
            (lambda: client.rpush(key, b"\xff\xfe\n" + payload), True),  # not UTF-8
        ]

    try:
        _exercise(fuzz, caplog, envelopes)
    finally:
        client.close()
        fuzz.close()


# -- RabbitMQ ------------------------------------------------------------------------------


def test_rabbitmq_junk_messages(thread: LoopThread, caplog: pytest.LogCaptureFixture) -> None:
    pika = require_module("pika")
    with socket.socket() as sock:
        sock.settimeout(1)
        require(sock.connect_ex(("127.0.0.1", 5672)) == 0, "no RabbitMQ on 127.0.0.1:5672")
    fuzz = Fuzz("amqp://guest:guest@127.0.0.1:5672/%2F", thread)
    thread.run(fuzz.layer.group_add("junk-group", fuzz.inbox))
    connection = pika.BlockingConnection(
        pika.URLParameters("amqp://guest:guest@127.0.0.1:5672/%2F")
    )
    channel = connection.channel()
    channel.confirm_delivery()  # with mandatory=True an unroutable publish raises

    def publish(exchange: str, key: str, payload: bytes, kind: str | None) -> None:
        properties = pika.BasicProperties(type=kind)
        channel.basic_publish(exchange, key, payload, properties, mandatory=True)

    def envelopes(name: str, payload: bytes) -> list[Injection]:
        queue = f"{fuzz.prefix}:{name.partition('!')[0]}{'!' if '!' in name else ''}"
        injections: list[Injection] = [(lambda: publish("", queue, payload, None), True)]
        if "!" in name:
            groups = f"{fuzz.prefix}::groups"
            injections += [
                (lambda: publish("", queue, payload, "+"), True),  # a junk membership
                (lambda: publish("", queue, payload, "-"), True),
                (lambda: publish("", queue, payload, name), True),  # to the channel
                (lambda: publish(groups, "junk-group", payload, None), True),  # to the group
            ]
        return injections

    try:
        # The normal channel's queue exists once something was sent to it.
        thread.run(fuzz.layer.send("junk.q", {"first": True}))
        assert thread.run(fuzz.layer.receive("junk.q")) == {"first": True}
        _exercise(fuzz, caplog, envelopes)
    finally:
        connection.close()
        fuzz.close()


# -- Kafka (Tansu) -------------------------------------------------------------------------


def test_kafka_junk_records(
    tmp_path: Path, thread: LoopThread, caplog: pytest.LogCaptureFixture
) -> None:
    kafka = require_module("kafka")
    with tansu(tmp_path) as process:
        url = f"kafka://127.0.0.1:{process.port}"
        fuzz = Fuzz(url, thread)
        topic = f"multilayer.{fuzz.prefix}"
        producer = kafka.KafkaProducer(bootstrap_servers=f"127.0.0.1:{process.port}")

        async def hub_of() -> Any:
            return fuzz.layer._state().backend.hub  # type: ignore[attr-defined]

        hub = thread.run(hub_of())

        def produce(channel: str, value: bytes) -> None:
            # Where the layer writes the channel's records (its partition, and an inbox's
            # key), so that the receiving process reads the junk.
            partition, key = hub.view.route(["S", None, 0.0, channel, None, b""])
            producer.send(topic, value, key=key, partition=partition).get(timeout=10)

        def envelopes(channel: str, payload: bytes) -> list[Injection]:
            # Operations that do not fit their shapes, and a well-formed send of junk.
            def junk(value: bytes) -> Callable[[], None]:
                return lambda: produce(channel, value)

            return [
                (junk(payload), bool(payload)),  # an empty record holds nothing
                (junk(msgpack.packb(["S", None, time.time(), channel, 100, payload])), True),
                (junk(msgpack.packb(["S", 7, "now", channel, None, payload])), True),
                (junk(msgpack.packb(["A", None, time.time(), ["g"], channel, "x"])), True),
                (junk(msgpack.packb(["S", None, time.time(), channel, None, payload])), True),
            ]

        try:
            _exercise(fuzz, caplog, envelopes)
        finally:
            producer.close()
            fuzz.close()


# -- ZeroMQ --------------------------------------------------------------------------------


def test_zmq_junk_frames_to_hub_and_node(
    tmp_path: Path, thread: LoopThread, caplog: pytest.LogCaptureFixture
) -> None:
    zmq = require_module("zmq")
    port = free_port()
    hub = BrokerProcess(hub_argv(port), port, log=tmp_path / "hub.log")
    hub.start()
    context = zmq.Context.instance()
    to_hub = context.socket(zmq.DEALER)
    to_node = context.socket(zmq.DEALER)
    try:
        fuzz = Fuzz(f"zmq://127.0.0.1:{port}", thread)
        backend = thread.run(fuzz.layer._backend())
        for sock, endpoint in (
            (to_hub, f"tcp://127.0.0.1:{port}"),
            (to_node, backend._node.endpoint),
        ):
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)

        def deliver(channel: str, payload: bytes, name: Any = None) -> None:
            # A well-formed delivery of junk into the node's inbox for ``channel``, under
            # the channel's name or a ``name`` that is none.
            key = backend._prefix + channel.partition("!")[0] + "!"
            item = [key, channel if name is None else name, None]
            header = msgpack.packb(["deliver", 1, [item], time.time() + 60, 0])
            to_node.send_multipart([header, payload])

        def envelopes(channel: str, payload: bytes) -> list[Injection]:
            injections: list[Injection] = [
                (lambda: to_hub.send_multipart([payload]), False),
                (
                    lambda: to_hub.send_multipart([msgpack.packb(["push", 3, channel]), payload]),
                    False,
                ),
                (lambda: to_node.send_multipart([payload, payload]), True),
                (
                    lambda: to_node.send_multipart(
                        [msgpack.packb(["deliver", 2, payload]), payload]
                    ),
                    True,
                ),
                (lambda: to_node.send_multipart([msgpack.packb(["flush", 4, 5])]), True),
            ]
            if "!" in channel:
                injections += [
                    (lambda: deliver(channel, payload), True),
                    (lambda: deliver(channel, FUTURE + b"\x80", ["a", "list"]), True),
                    (lambda: deliver(channel, FUTURE + b"\x80", 42), True),
                ]
            return injections

        try:
            _exercise(fuzz, caplog, envelopes)
        finally:
            fuzz.close()
    finally:
        to_hub.close(0)
        to_node.close(0)
        hub.stop()
