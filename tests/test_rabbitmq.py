"""RabbitMQ backend behaviour the shared conformance suite cannot see.

Heartbeats, TLS and flush run against a RabbitMQ node this module starts itself
(tests/brokers.py RabbitNode), on free loopback ports with its own data directory and
Erlang cookie; the machine's shared node (127.0.0.1:5672) only carries ordinary traffic.
Broker restarts and dropped connections are in tests/test_faults.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from multilayer import BrokerError, ChannelFull, ChannelLayer, ConfigurationError
from multilayer.backend import LayerSettings
from multilayer.capacity import CapacityPolicy
from tests.support.brokers import (
    RabbitNode,
    certificates,
    connections_to,
    free_port,
    listening,
    require,
    require_binary,
    require_module,
)

pika = require_module("pika")

from multilayer.backends.rabbitmq import RabbitMQBackend, consumer, frames, groups  # noqa: E402
from multilayer.backends.rabbitmq.backend import check_quorum_support  # noqa: E402

T = TypeVar("T")
SHARED = "amqp://127.0.0.1:5672/"


def run(body: Callable[[], Awaitable[T]], timeout: float = 60.0) -> T:
    """Run ``body()`` in a fresh event loop, bounded by ``timeout`` seconds."""
    return asyncio.run(asyncio.wait_for(body(), timeout))


def run_quietly(body: Callable[[], Awaitable[T]], timeout: float) -> T:
    """:func:`run`, without the backend's warnings about the connection losses it causes."""
    backend_logs = logging.getLogger("multilayer.backends.rabbitmq")
    backend_logs.disabled = True
    try:
        return run(body, timeout)
    finally:
        backend_logs.disabled = False


async def recv(layer: ChannelLayer, channel: str, timeout: float = 10.0) -> dict[str, Any]:
    return await asyncio.wait_for(layer.receive(channel), timeout)


async def nothing(layer: ChannelLayer, channel: str, wait: float = 0.5) -> None:
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(layer.receive(channel), wait)


@pytest.fixture
def shared() -> str:
    require(listening(5672), "no RabbitMQ on 127.0.0.1:5672")
    return SHARED


def _layer(url: str, **options: Any) -> ChannelLayer:
    options.setdefault("prefix", "rmqtest" + secrets.token_hex(4))
    return ChannelLayer(url, **options)


# -- a RabbitMQ node of our own ---------------------------------------------------------


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    owned = RabbitNode(tmp_path_factory.mktemp("rabbitmq"))
    owned.start()
    try:
        yield owned
    finally:
        owned.stop(kill=True)


# -- the frame short path -----------------------------------------------------------------


def test_pika_internals_the_frame_short_path_relies_on_are_there() -> None:
    """frames.py reaches into pika's private parts; a pika release that changes them must
    fail here, by name, rather than corrupt traffic."""
    problems = frames.missing_internals()
    assert not problems, (
        f"pika {pika.__version__} changed internals that multilayer/backends/rabbitmq/"
        f"frames.py relies on: {'; '.join(problems)}"
    )


def test_the_pika_internals_check_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    connection_class = pika.connection.Connection
    methods, attributes = frames.INTERNALS[connection_class]
    changed = {**methods, "_on_data_available": ("data",), "_gone": ()}
    monkeypatch.setitem(frames.INTERNALS, connection_class, (changed, (*attributes, "_never_set")))
    problems = "\n".join(frames.missing_internals())
    assert "Connection._on_data_available takes ('data_in',), not ('data',)" in problems
    assert "Connection._gone is gone" in problems
    assert "no longer sets self._never_set" in problems


def _bare_connection() -> Any:
    """A FastConnection with the state its frame short path uses, and no socket."""
    connection: Any = object.__new__(frames.FastConnection)
    connection.deliveries, connection.confirms, connection._incoming = {}, {}, {}
    connection._publish_methods = {}
    connection._frame_buffer = b""
    connection.bytes_received = connection.frames_received = 0
    connection.bytes_sent = connection.frames_sent = 0
    connection._body_max_length = 1000
    connection._transport = None
    return connection


def test_published_frames_are_valid_amqp() -> None:
    """What the short path writes decodes, with pika's own decoder, to the publish meant."""
    connection = _bare_connection()
    written: list[bytes] = []
    connection._adapter_emit_data = written.append
    connection.connection_state = connection.CONNECTION_OPEN
    body = bytes(range(256)) * 10  # three body frames of at most 1000 bytes
    connection.publish(3, "ex", "rk", body, "specific.a!b", "id-1", mandatory=True)
    connection.publish(3, "", "q", b"", None, "id-2", mandatory=False)
    data = b"".join(written)
    frames = []
    while data:
        consumed, frame = pika.frame.decode_frame(data)
        assert frame is not None
        frames.append(frame)
        data = data[consumed:]
    method, header, *bodies, method2, header2 = frames
    assert isinstance(method.method, pika.spec.Basic.Publish)
    assert (method.channel_number, method.method.exchange, method.method.routing_key) == (
        3,
        "ex",
        "rk",
    )
    assert method.method.mandatory is True
    assert (header.body_size, header.properties.type, header.properties.message_id) == (
        len(body),
        "specific.a!b",
        "id-1",
    )
    assert b"".join(frame.fragment for frame in bodies) == body
    assert [len(frame.fragment) for frame in bodies] == [1000, 1000, 560]
    assert (method2.method.routing_key, method2.method.mandatory) == ("q", False)
    assert (header2.body_size, header2.properties.type, header2.properties.message_id) == (
        0,
        None,
        "id-2",
    )
    assert connection.frames_sent == len(frames)
    with pytest.raises(BrokerError, match="255 bytes"):
        connection.publish(3, "", "q" * 256, b"x", None, "id-3", mandatory=True)


def test_delivery_frames_are_decoded_whatever_the_read_boundaries() -> None:
    """Deliveries and confirms split anywhere across reads, with the properties this
    backend sets or others (dead-lettered copies carry headers), reach their callbacks."""
    connection = _bare_connection()
    got: list[tuple[Any, ...]] = []
    confirmed: list[tuple[bool, int, bool]] = []
    connection.deliveries[1] = lambda tag, delivery: got.append((tag, *delivery))
    connection.confirms[2] = lambda *confirm: confirmed.append(confirm)

    def delivery(tag: int, properties: Any, body: bytes, redelivered: bool) -> bytes:
        deliver = pika.spec.Basic.Deliver("ctag", tag, redelivered, "ex", f"rk{tag}")
        frames = [pika.frame.Method(1, deliver), pika.frame.Header(1, len(body), properties)]
        frames += [pika.frame.Body(1, body[i : i + 700]) for i in range(0, len(body), 700)]
        return b"".join(frame.marshal() for frame in frames)

    big = bytes(range(256)) * 8
    stream = b"".join(
        (
            delivery(1, pika.BasicProperties(type="chan", message_id="m1"), b"one", False),
            pika.frame.Method(2, pika.spec.Basic.Ack(5, multiple=True)).marshal(),
            delivery(2, pika.BasicProperties(message_id="m2"), big, True),
            pika.frame.Method(2, pika.spec.Basic.Nack(6, multiple=False)).marshal(),
            delivery(3, pika.BasicProperties(headers={"x-death": [{"count": 1}]}), b"3", False),
            delivery(4, pika.BasicProperties(), b"", False),
        )
    )
    for cut in (1, 7, 64, 1000, len(stream)):
        got.clear()
        confirmed.clear()
        for start in range(0, len(stream), cut):
            connection._on_data_available(stream[start : start + cut])
        assert connection._frame_buffer == b""
        assert got == [
            ("ctag", 1, False, "rk1", "chan", "m1", b"one"),
            ("ctag", 2, True, "rk2", None, "m2", big),
            ("ctag", 3, False, "rk3", None, None, b"3"),
            ("ctag", 4, False, "rk4", None, None, b""),
        ]
        assert confirmed == [(True, 5, True), (False, 6, False)]


# -- options and URL --------------------------------------------------------------------


def _backend(url: str, **options: Any) -> RabbitMQBackend:
    layer = ChannelLayer(url, **options)
    settings = LayerSettings("p", 60.0, 86400.0, CapacityPolicy(100), 1 << 20)
    return RabbitMQBackend(layer.url, settings, layer.backend_options)


def test_url_and_options_reach_pika() -> None:
    backend = _backend(
        "amqp://alice:s%40cret@rabbit.example:5673/tenant"
        "?heartbeat=15&connection_name=web-1&prefetch=8"
    )
    parameters = backend.link.parameters("rabbit.example", 5673)
    assert (parameters.host, parameters.port, parameters.virtual_host) == (
        "rabbit.example",
        5673,
        "tenant",
    )
    assert (parameters.credentials.username, parameters.credentials.password) == (
        "alice",
        "s@cret",
    )
    assert parameters.heartbeat == 15
    assert parameters.client_properties == {"connection_name": "web-1"}
    assert parameters.ssl_options is None
    assert backend.prefetch == 8
    defaults = _backend("amqp://").link.parameters("localhost", None)
    assert (defaults.port, defaults.virtual_host, defaults.credentials.username) == (
        5672,
        "/",
        "guest",
    )
    assert _backend("amqp://h/%2F").link.parameters("h", None).virtual_host == "/"


def test_tls_options(tmp_path: Path) -> None:
    certs = certificates(tmp_path)
    ca, cert, key = certs / "ca.pem", certs / "client.pem", certs / "client.key"
    for query in (
        f"ssl_cafile={ca}&ssl_certfile={cert}&ssl_keyfile={key}",
        f"ca_file={ca}&cert_file={cert}&key_file={key}",  # the documented aliases
    ):
        parameters = _backend(f"amqps://h?{query}").link.parameters("h", None)
        assert parameters.port == 5671
        assert parameters.ssl_options.server_hostname == "h"
        context = parameters.ssl_options.context
        assert context.check_hostname
        assert context.verify_mode == ssl.CERT_REQUIRED
    for query in ("verify=false", "ssl_verify=false"):
        # As before the shared vocabulary: no certificate check means no host-name check.
        context = _backend(f"amqps://h?{query}").link.parameters("h", None).ssl_options.context
        assert (context.check_hostname, context.verify_mode) == (False, ssl.CERT_NONE)
    context = _backend("amqps://h?ssl_check_hostname=false").link.parameters("h", None)
    assert not context.ssl_options.context.check_hostname
    assert context.ssl_options.context.verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("amqp://h?ca_file=/ca.pem", "amqps://"),
        ("amqp://h?ssl_cafile=/ca.pem", "amqps://"),
        ("amqp://h?verify=false", "amqps://"),
        ("amqps://h?key_file=/k.pem", "ssl_keyfile needs ssl_certfile"),
        ("amqps://h?ssl_keyfile=/k.pem", "ssl_keyfile needs ssl_certfile"),
        ("amqps://h?ca_file=/a.pem&ssl_cafile=/b.pem", "same thing"),
        ("amqp://h?prefetch=0", "prefetch"),
        ("amqp://h?nonsense=1", "unknown option"),
        ("amqp://h?queue_type=mirrored", "classic, quorum"),
    ],
)
def test_bad_configuration_is_refused_without_io(url: str, problem: str) -> None:
    with pytest.raises(ConfigurationError, match=problem):
        ChannelLayer(url)


def test_password_never_in_errors() -> None:
    layer = ChannelLayer(f"amqp://u:hunter2@127.0.0.1:{free_port()}/?connect_timeout=0.5")

    async def body() -> None:
        with pytest.raises(BrokerError) as raised:
            await layer.send("x", {})
        assert "hunter2" not in str(raised.value)
        assert "***" in str(raised.value)

    run(body)


# -- behaviour on the shared node -------------------------------------------------------


def test_membership_added_by_another_process(shared: str) -> None:
    """group_add/group_discard on a channel owned by another OS process travel to its
    inbox as control messages, ordered before later group messages."""
    owner = _layer(shared)
    script = textwrap.dedent(
        """
        import asyncio, sys
        from multilayer import ChannelLayer
        url, prefix, op, channel = sys.argv[1:]
        async def main():
            layer = ChannelLayer(url, prefix=prefix)
            await getattr(layer, op)("rmq-remote", channel)
            await layer.close()
        asyncio.run(asyncio.wait_for(main(), 30))
        """
    )

    def other_process(op: str, channel: str) -> None:
        subprocess.run(
            [sys.executable, "-c", script, shared, owner.prefix, op, channel],
            check=True,
            timeout=60,
        )

    async def body() -> None:
        member, bystander = await owner.new_channel(), await owner.new_channel()
        await asyncio.to_thread(other_process, "group_add", member)
        await owner.group_send("rmq-remote", {"n": 1})
        assert await recv(owner, member) == {"n": 1}
        await nothing(owner, bystander)
        await asyncio.to_thread(other_process, "group_discard", member)
        await owner.group_send("rmq-remote", {"n": 2})
        await nothing(owner, member)
        await owner.flush()
        await owner.close()

    run(body, timeout=120)


@pytest.mark.slow
def test_normal_channel_membership_expires_on_the_broker(shared: str) -> None:
    """RabbitMQ itself deletes an unrenewed membership queue (x-expires = group_expiry)."""
    layer = _layer(shared, group_expiry=1)

    async def body() -> None:
        await layer.group_add("rmq-exp", "rmq.worker")
        await asyncio.sleep(1.8)
        await layer.group_send("rmq-exp", {"n": 1})
        await nothing(layer, "rmq.worker")
        await layer.group_add("rmq-exp", "rmq.worker")
        await layer.group_send("rmq-exp", {"n": 2})
        assert await recv(layer, "rmq.worker") == {"n": 2}
        await layer.flush()
        await layer.close()

    run(body)


def test_an_idle_consumer_hands_back_its_prefetch(shared: str) -> None:
    """Prefetched messages do not count against max-length, so a consumer with no
    receive waiting must give them back: capacity stays exact after a receive."""
    sender, receiver = _layer(shared, capacity=3), None

    async def body() -> None:
        nonlocal receiver
        receiver = _layer(shared, capacity=3, prefix=sender.prefix)
        await sender.send("rmq.cap", {"n": 0})
        assert await recv(receiver, "rmq.cap") == {"n": 0}
        await asyncio.sleep(0.1)
        for n in range(1, 4):
            await sender.send("rmq.cap", {"n": n})
        with pytest.raises(ChannelFull):
            await sender.send("rmq.cap", {"n": 4})
        assert [await recv(receiver, "rmq.cap") for _ in range(3)] == [{"n": n} for n in (1, 2, 3)]
        await sender.flush()
        await sender.close()
        await receiver.close()

    run(body)


def test_process_wide_queue_state_is_dropped_with_the_last_layer_using_it(shared: str) -> None:
    """What this process remembers per consumed queue does not stay for good: a process
    that consumes many channels over its life, or opens and closes layers, does not keep
    an entry for each one. Handed-out ids live while a layer using the queue is open; an
    inbox's memberships as long as the layer that owns it, which may be used again after
    close(), in another event loop."""
    baseline = (len(consumer.handed_ids), len(groups.inbox_members))

    async def body() -> None:
        first = _layer(shared)
        second = _layer(shared, prefix=first.prefix)
        try:
            inbox = await first.new_channel()
            await first.group_add("rmq.state", inbox)
            for n in range(20):
                await second.send(f"rmq.state{n}", {"n": n})
                assert await recv(first, f"rmq.state{n}") == {"n": n}
                assert await recv_or_none(second, f"rmq.state{n}") is None
            await second.group_send("rmq.state", {"to": "group"})
            assert await recv(first, inbox) == {"to": "group"}
            assert len(consumer.handed_ids) >= baseline[0] + 21
            assert len(groups.inbox_members) == baseline[1] + 1
            await second.close()  # it consumed the same channels: the first still uses them
            assert len(consumer.handed_ids) >= baseline[0] + 21
            assert len(groups.inbox_members) == baseline[1] + 1
        finally:
            await first.close()
            await second.close()
        assert len(consumer.handed_ids) == baseline[0]
        assert len(groups.inbox_members) == baseline[1] + 1
        await first.flush()
        await first.close()

    run(body)
    gc.collect()  # the layers are gone
    assert (len(consumer.handed_ids), len(groups.inbox_members)) == baseline


async def recv_or_none(layer: ChannelLayer, channel: str) -> dict[str, Any] | None:
    """A message if one arrives within 0.05 s (here: to make ``layer`` consume ``channel``)."""
    try:
        return await asyncio.wait_for(layer.receive(channel), 0.05)
    except asyncio.TimeoutError:
        return None


def test_receive_after_another_layer_flushed_the_queue(shared: str) -> None:
    """A paused consumer resumes without re-declaring a queue it declared recently; when
    flush() deleted it meanwhile, RabbitMQ refuses the consume and the queue is re-made."""
    receiver = _layer(shared)
    other = _layer(shared, prefix=receiver.prefix)

    async def body() -> None:
        await other.send("rmq.gone", {"n": 0})
        assert await recv(receiver, "rmq.gone") == {"n": 0}
        await asyncio.sleep(0.1)
        await other.flush()
        waiting = asyncio.ensure_future(receiver.receive("rmq.gone"))
        await asyncio.sleep(0.3)
        await other.send("rmq.gone", {"n": 1})
        assert await asyncio.wait_for(waiting, 10) == {"n": 1}
        await other.flush()
        await other.close()
        await receiver.close()

    run(body)


@contextlib.contextmanager
def _admin(url: str) -> Iterator[Any]:
    """A channel on a blocking connection of its own, for what a test does to the broker
    behind the layers' backs (pika's BlockingChannel)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        yield connection.channel()
    finally:
        connection.close()


def _passive(url: str, kind: str, name: str) -> Any:
    """The declare-ok of queue or exchange ``name`` by a passive declare; None when it
    does not exist (404)."""
    with _admin(url) as channel:
        declare = channel.queue_declare if kind == "queue" else channel.exchange_declare
        try:
            return declare(name, passive=True)
        except pika.exceptions.ChannelClosedByBroker as error:
            if error.reply_code == 404:
                return None
            raise


def _on_broker(url: str, kind: str, name: str) -> bool:
    """Whether queue or exchange ``name`` exists."""
    return _passive(url, kind, name) is not None


async def _topology(url: str, prefix: str) -> tuple[bool, bool]:
    """Whether the catalog queue and the groups exchange of ``prefix`` exist."""
    return (
        await asyncio.to_thread(_on_broker, url, "queue", f"{prefix}::catalog"),
        await asyncio.to_thread(_on_broker, url, "exchange", f"{prefix}::groups"),
    )


async def _until_gone(url: str, prefix: str, within: float) -> None:
    # Polls the exchange only: a passive declare of the catalog would renew its lease.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while await asyncio.to_thread(_on_broker, url, "exchange", f"{prefix}::groups"):
        assert loop.time() < deadline, f"{prefix}'s exchange outlived the catalog's lease"
        await asyncio.sleep(0.5)
    assert await _topology(url, prefix) == (False, False)


#: Queues idle for 1 s expire, and so does the catalog 2 s after the prefix's last use.
SHORT_LIVED = {"expiry": 0.5, "queue_expiry": 1.0}


def test_flush_leaves_nothing_once_the_prefix_is_unused(shared: str) -> None:
    """What flush() cannot delete at once (other open layers of the prefix may need the
    catalog and the exchange) disappears by itself: nothing of a prefix stays behind."""
    layer = _layer(shared, **SHORT_LIVED)
    url = "amqp://guest:guest@127.0.0.1:5672/%2F"

    async def body() -> None:
        inbox = await layer.new_channel()
        await layer.group_add("rmq-topo", inbox)
        await layer.group_add("rmq-topo", "rmq.topo")
        await layer.group_send("rmq-topo", {"n": 1})
        member = f"{layer.prefix}::member:rmq-topo:rmq.topo"
        assert await asyncio.to_thread(_on_broker, url, "queue", member)
        await layer.flush()
        for queue in (member, f"{layer.prefix}:rmq.topo", f"{layer.prefix}:{inbox[:-12]}"):
            assert not await asyncio.to_thread(_on_broker, url, "queue", queue), queue
        assert await _topology(url, layer.prefix) == (True, True)
        await layer.close()
        await _until_gone(url, layer.prefix, within=15)

    run(body)


def test_flush_without_its_catalog_deletes_what_the_layer_declared(shared: str) -> None:
    """The catalog is a queue of one node: a cluster that lost that node has lost it too.
    flush() then deletes the queues this layer declared, and succeeds (it raised
    NOT_FOUND, failing a cluster fault test's clean-up)."""
    layer = _layer(shared)
    url = "amqp://guest:guest@127.0.0.1:5672/%2F"

    async def body() -> None:
        inbox = await layer.new_channel()
        await layer.send("rmq.nocatalog", {"n": 1})
        queues = (f"{layer.prefix}:rmq.nocatalog", f"{layer.prefix}:{inbox[:-12]}")
        for queue in queues:
            assert await asyncio.to_thread(_on_broker, url, "queue", queue), queue
        await asyncio.to_thread(_delete_queues, url, [f"{layer.prefix}::catalog"])
        await layer.flush()
        for queue in queues:
            assert not await asyncio.to_thread(_on_broker, url, "queue", queue), queue
        assert await _topology(url, layer.prefix) == (True, True)
        await layer.close()

    run(body)


@pytest.mark.parametrize("lost", ["inbox", "inbox and catalog"])
def test_an_inbox_made_again_binds_its_groups_again(shared: str, lost: str) -> None:
    """An inbox deleted under its receiving owner (as a cluster node's death deletes the
    queues it held, whenever RabbitMQ gets to it) took its bindings along; with the
    catalog too, the exchange went with its last binding. The owner declares the inbox
    again, consumes it and binds its groups again: the first group message after a
    direct one reaches it."""
    url = "amqp://guest:guest@127.0.0.1:5672/%2F"

    async def body() -> None:
        async with _grouped_inbox(shared, "rmq-again") as grouped:
            grouped.receive()
            await grouped.sender.group_send("rmq-again", {"group": 1})
            await grouped.until(1, "the first group message")
            queues = [grouped.queue]
            if lost == "inbox and catalog":
                queues.append(f"{grouped.owner.prefix}::catalog")
            await asyncio.to_thread(_delete_queues, url, queues)
            await grouped.sender.send(grouped.inbox, {"direct": 1})
            await grouped.until(2, "a direct message to the inbox made again")
            await grouped.sender.group_send("rmq-again", {"group": 2})
            await grouped.until(3, "the group message after it")
            assert grouped.got == [{"group": 1}, {"direct": 1}, {"group": 2}]

    run(body)


class _GroupedInbox:
    """An owner's inbox in one group, a sender of the same prefix, and the owner
    receiving from the inbox into ``got`` once :meth:`receive` is called."""

    def __init__(self, owner: ChannelLayer, sender: ChannelLayer, inbox: str) -> None:
        self.owner, self.sender, self.inbox = owner, sender, inbox
        self.queue = f"{owner.prefix}:{inbox[: inbox.index('!') + 1]}"
        self.got: list[dict[str, Any]] = []
        self.receiving: asyncio.Future[None] | None = None

    def receive(self) -> None:
        self.receiving = asyncio.ensure_future(_receive_into(self.owner, self.inbox, self.got))

    async def until(self, count: int, what: str) -> None:
        assert self.receiving is not None
        await _until(self.got, count, what, self.receiving)


@contextlib.asynccontextmanager
async def _grouped_inbox(shared: str, group: str) -> AsyncIterator[_GroupedInbox]:
    owner = _layer(shared)
    sender = _layer(shared, prefix=owner.prefix)
    grouped: _GroupedInbox | None = None
    try:
        inbox = await owner.new_channel()
        await owner.group_add(group, inbox)
        grouped = _GroupedInbox(owner, sender, inbox)
        yield grouped
    finally:
        if grouped is not None and grouped.receiving is not None:
            grouped.receiving.cancel()
            await asyncio.gather(grouped.receiving, return_exceptions=True)
        await owner.flush()
        await owner.close()
        await sender.close()


async def _rabbitmq_backend(layer: ChannelLayer) -> RabbitMQBackend:
    backend = await layer._backend()
    assert isinstance(backend, RabbitMQBackend)
    return backend


def test_an_inbox_gone_again_after_its_declare_is_declared_and_bound_again(
    shared: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a cluster, RabbitMQ may remove a dead node's queue after a layer declared a
    queue of that name again (the declare saw the old one): the binds that follow find
    no queue. The owner's receive does not fail: its consumer declares the inbox and
    binds its groups once more, and a group message then reaches it."""
    url = "amqp://guest:guest@127.0.0.1:5672/%2F"

    async def body() -> None:
        async with _grouped_inbox(shared, "rmq-twice") as grouped:
            backend = await _rabbitmq_backend(grouped.owner)
            declare = backend.topology.declare
            vanished: list[str] = []

            async def declare_then_lose(queue_name: str, name: str, **kwargs: Any) -> None:
                await declare(queue_name, name, **kwargs)
                if queue_name == grouped.queue and not vanished:
                    vanished.append(queue_name)
                    await asyncio.to_thread(_delete_queues, url, [queue_name])

            monkeypatch.setattr(backend.topology, "declare", declare_then_lose)
            grouped.receive()
            await asyncio.sleep(0.2)
            await asyncio.to_thread(_delete_queues, url, [grouped.queue])
            # Nothing sent until the owner consumes again: a send would declare the inbox.
            for _ in range(100):
                if grouped.receiving is not None and grouped.receiving.done():
                    error = grouped.receiving.exception()
                    raise AssertionError(f"the receive failed: {error!r}")
                if vanished and await asyncio.to_thread(_consumers, url, grouped.queue) == 1:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"the owner did not consume again within 5s ({vanished})")
            await grouped.sender.send(grouped.inbox, {"direct": 1})
            await grouped.until(1, "a direct message to the inbox made again")
            await grouped.sender.group_send("rmq-twice", {"group": 1})
            await grouped.until(2, "the group message after it")
            assert grouped.got == [{"direct": 1}, {"group": 1}]

    run(body)


def test_an_inbox_replaced_after_its_binds_is_bound_again(
    shared: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a cluster, RabbitMQ may remove a dead node's inbox right after its owner's
    consumer bound its groups again, and a sender's send then makes the inbox anew,
    without them (seen in CI: a group message lost after a node loss). The owner binds
    its groups on the queue it consumes, or starts over when that queue goes: the group
    message after the direct one reaches it."""
    url = "amqp://guest:guest@127.0.0.1:5672/%2F"

    async def body() -> None:
        async with _grouped_inbox(shared, "rmq-replaced") as grouped:
            backend = await _rabbitmq_backend(grouped.owner)
            rebind = backend.groups.rebind
            replaced: list[str] = []

            async def rebind_then_replace(inboxes: set[str]) -> None:
                await rebind(inboxes)
                if not replaced:
                    replaced.append(grouped.queue)
                    await asyncio.to_thread(_delete_queues, url, [grouped.queue])
                    # Declares the inbox, unbound.
                    await grouped.sender.send(grouped.inbox, {"direct": 1})

            # Before the first receive, which makes the consumer and its hook.
            monkeypatch.setattr(backend.groups, "rebind", rebind_then_replace)
            grouped.receive()
            await asyncio.sleep(0.2)
            # Its consumer, cancelled, declares the inbox again and binds its groups.
            await asyncio.to_thread(_delete_queues, url, [grouped.queue])
            await grouped.until(1, "the direct message to the inbox made again")
            assert replaced, "the consumer did not bind the inbox's groups again"
            await grouped.sender.group_send("rmq-replaced", {"group": 1})
            await grouped.until(2, "the group message after it")
            assert grouped.got == [{"direct": 1}, {"group": 1}]

    run(body)


def _consumers(url: str, queue: str) -> int | None:
    """How many consumers ``queue`` has, None if it does not exist."""
    frame = _passive(url, "queue", queue)
    if frame is None:
        return None
    count: int = frame.method.consumer_count
    return count


async def _receive_into(layer: ChannelLayer, channel: str, got: list[dict[str, Any]]) -> None:
    while True:
        got.append(await layer.receive(channel))


async def _until(got: list[Any], count: int, what: str, receiving: asyncio.Future[None]) -> None:
    """Wait up to 5 s for ``count`` messages in ``got``; a failed receive fails at once."""
    for _ in range(100):
        if receiving.done():
            raise AssertionError(
                f"the receive failed, waiting for {what}: {receiving.exception()!r}"
            )
        if len(got) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} did not arrive within 5s: got {got}")


def test_a_membership_made_after_the_exchange_went_declares_it_again(shared: str) -> None:
    """The groups exchange went (with its last binding, or deleted by hand) while layers
    stay connected: group_add declares it again and binds, for an inbox and for a normal
    channel, and group_send reaches both."""
    layer = _layer(shared)
    url = "amqp://guest:guest@127.0.0.1:5672/%2F"

    async def body() -> None:
        inbox = await layer.new_channel()
        await layer.group_add("rmq-gone", inbox)
        await asyncio.to_thread(_delete_exchange, url, f"{layer.prefix}::groups")
        assert not await asyncio.to_thread(_on_broker, url, "exchange", f"{layer.prefix}::groups")
        await layer.group_add("rmq-back", inbox)
        await layer.group_add("rmq-back", "rmq.back")
        await layer.group_send("rmq-back", {"n": 1})
        assert await recv(layer, inbox) == {"n": 1}
        assert await recv(layer, "rmq.back") == {"n": 1}
        await layer.flush()
        await layer.close()

    run(body)


def test_a_group_send_finding_no_exchange_declares_it_again(
    shared: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A group_send to an exchange gone with its last binding is logged, and the exchange
    is declared again: later ones do not fail (each would close the publishing channel,
    with every send waiting on it)."""
    layer = _layer(shared)
    url = "amqp://guest:guest@127.0.0.1:5672/%2F"
    exchange = f"{layer.prefix}::groups"

    async def body() -> None:
        await layer.send("rmq.nogroup", {"n": 0})
        await asyncio.to_thread(_delete_exchange, url, exchange)
        with caplog.at_level(logging.WARNING, logger="multilayer"):
            await layer.group_send("rmq-nobody", {"n": 1})
            for _ in range(100):
                if await asyncio.to_thread(_on_broker, url, "exchange", exchange):
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the exchange was not declared again within 5s")
        assert "group_send to 'rmq-nobody' may be lost" in caplog.text
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="multilayer"):
            await layer.group_add("rmq-nobody", "rmq.nogroup")
            await layer.group_send("rmq-nobody", {"n": 2})
            await layer.send("rmq.nogroup", {"n": 3})
            # Unordered: a group copy takes its detour through the membership queue.
            got = [(await recv(layer, "rmq.nogroup"))["n"] for _ in range(3)]
            assert sorted(got) == [0, 2, 3]
        assert "may be lost" not in caplog.text
        await layer.flush()
        await layer.close()

    run(body)


def _delete_exchange(url: str, exchange: str) -> None:
    with _admin(url) as channel:
        channel.exchange_delete(exchange)


def _delete_queues(url: str, queues: list[str]) -> None:
    with _admin(url) as channel:
        for queue in queues:
            channel.queue_delete(queue)


def test_flush_keeps_the_topology_for_other_open_layers(shared: str) -> None:
    """A layer still open renews the catalog, which keeps the exchange: its groups keep
    working long after another layer of the prefix flushed and closed."""
    flusher = _layer(shared, **SHORT_LIVED)
    other = _layer(shared, **SHORT_LIVED, prefix=flusher.prefix)
    url = "amqp://guest:guest@127.0.0.1:5672/%2F"

    async def body() -> None:
        await other.group_add("rmq-open", "rmq.open")
        await flusher.flush()
        await flusher.close()
        await asyncio.sleep(3)  # longer than the catalog's 2 s lease
        assert await _topology(url, flusher.prefix) == (True, True)
        await other.group_add("rmq-open", "rmq.open")
        await other.group_send("rmq-open", {"n": 1})
        assert await recv(other, "rmq.open") == {"n": 1}
        await other.flush()
        await other.close()
        await _until_gone(url, flusher.prefix, within=15)

    run(body)


def test_group_send_logs_a_refused_copy(shared: str, caplog: pytest.LogCaptureFixture) -> None:
    """group_send returns before RabbitMQ's confirm; a negative one is logged on arrival."""
    owner = _layer(shared, capacity=1)
    sender = _layer(shared, capacity=1, prefix=owner.prefix)

    async def body() -> None:
        full = await owner.new_channel()
        await owner.group_add("rmq-full", full)
        await sender.send(full, {"n": 0})
        with caplog.at_level(logging.WARNING, logger="multilayer"):
            await sender.group_send("rmq-full", {"n": 1})
            for _ in range(50):
                if "skipped" in caplog.text:
                    break
                await asyncio.sleep(0.05)
        assert "group_send to 'rmq-full' skipped at least 1 member: channel full" in caplog.text
        assert await recv(owner, full) == {"n": 0}
        await nothing(owner, full)
        await owner.flush()
        await owner.close()
        await sender.close()

    run(body)


def test_other_settings_on_the_same_queue_are_a_clear_error(shared: str) -> None:
    first = _layer(shared, capacity=5)
    second = _layer(shared, capacity=7, prefix=first.prefix)

    async def body() -> None:
        await first.send("rmq.args", {"n": 1})
        with pytest.raises(BrokerError, match="other arguments"):
            await second.send("rmq.args", {"n": 2})
        await first.flush()
        await first.close()
        await second.close()

    run(body)


# -- quorum normal channels (queue_type=quorum) ----------------------------------------


def _rabbitmqctl_rows(*argv: str) -> list[list[str]]:
    """The tab-separated rows ``rabbitmqctl -q ARGV`` prints about the shared node."""
    listing = subprocess.run(
        ["rabbitmqctl", "-q", *argv], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    return [line.split("\t") for line in listing.splitlines()]


def _queue_types(prefix: str) -> dict[str, str]:
    rows = _rabbitmqctl_rows("list_queues", "name", "type")
    return {name: kind for name, kind in rows if name.startswith(prefix + ":")}


def test_quorum_normal_channels_classic_inboxes_and_gates(shared: str) -> None:
    require_binary("rabbitmqctl")
    layer = _layer(shared, queue_type="quorum")

    async def body() -> None:
        inbox = await layer.new_channel()
        await layer.send("rmq.qq", {"n": 1})
        await layer.send(inbox, {"n": 2})
        assert await recv(layer, "rmq.qq") == {"n": 1}
        assert await recv(layer, inbox) == {"n": 2}
        types = await asyncio.to_thread(_queue_types, layer.prefix)
        assert types[f"{layer.prefix}:rmq.qq"] == "quorum"
        assert types[f"{layer.prefix}::gate:rmq.qq"] == "classic"
        assert types[f"{layer.prefix}:{inbox[:-12]}"] == "classic"
        await layer.flush()
        assert not set(await asyncio.to_thread(_queue_types, layer.prefix)) - {
            f"{layer.prefix}::catalog"
        }
        await layer.close()

    run(body)


def test_quorum_capacity_is_exact_under_concurrent_senders(shared: str) -> None:
    """RabbitMQ 3.10's quorum queues let in-flight publishes past x-max-length (measured:
    20 of 60 concurrent sends into capacity 5); the classic gate keeps it exact."""
    senders = [_layer(shared, queue_type="quorum", capacity=5)]

    async def body() -> None:
        senders.extend(
            _layer(shared, queue_type="quorum", capacity=5, prefix=senders[0].prefix)
            for _ in range(2)
        )

        async def attempt(layer: ChannelLayer, n: int) -> bool:
            try:
                await layer.send("rmq.qcap", {"n": n})
            except ChannelFull:
                return False
            return True

        accepted = await asyncio.gather(*(attempt(senders[n % 3], n) for n in range(60)))
        assert sum(accepted) == 5
        got = [(await recv(senders[0], "rmq.qcap"))["n"] for _ in range(5)]
        assert sorted(got) == [n for n, ok in enumerate(accepted) if ok]
        await asyncio.sleep(0.3)  # the receiver gives the places back in the background
        assert await attempt(senders[1], 100)
        await senders[0].flush()
        for sender in senders:
            await sender.close()

    run(body)


def test_quorum_messages_left_by_a_paused_receiver_reach_another_in_order(shared: str) -> None:
    """On 3.10 a quorum queue puts a requeued (nacked) message behind the others, so a
    quorum consumer never requeues: it returns unread messages by closing its channel."""
    first = _layer(shared, queue_type="quorum")
    second = _layer(shared, queue_type="quorum", prefix=first.prefix)

    async def body() -> None:
        for n in range(4):
            await first.send("rmq.qorder", {"n": n})
        assert await recv(first, "rmq.qorder") == {"n": 0}
        await asyncio.sleep(0.2)  # the first receiver's consumer pauses
        assert [(await recv(second, "rmq.qorder"))["n"] for _ in range(3)] == [1, 2, 3]
        await first.flush()
        await first.close()
        await second.close()

    run(body)


def test_quorum_needs_rabbitmq_3_10() -> None:
    check_quorum_support("3.10.8", "amqp://h")
    check_quorum_support("4.0.2", "amqp://h")
    check_quorum_support(None, "amqp://h")  # a broker that does not tell is tried
    with pytest.raises(ConfigurationError, match=r"needs RabbitMQ 3\.10.*runs 3\.9\.29"):
        check_quorum_support("3.9.29", "amqp://h")


def _connection_pids(name: str) -> list[str]:
    rows = _rabbitmqctl_rows("list_connections", "pid", "client_properties")
    return [row[0] for row in rows if f'"{name}"' in "\t".join(row)]


async def _close_connections(rabbitmqctl: str, name: str) -> None:
    """Close, on the broker, every connection named ``name``."""
    pids = await asyncio.to_thread(_connection_pids, name)
    assert pids, "the layer's connection is not listed"
    for pid in pids:
        await asyncio.to_thread(
            subprocess.run,
            [rabbitmqctl, "-q", "close_connection", pid, "test"],
            check=True,
            timeout=60,
        )


def _droppable_receiver(shared: str) -> tuple[str, str, ChannelLayer, ChannelLayer]:
    """rabbitmqctl, a connection name, a receiving layer whose connection has that name
    (for :func:`_close_connections`), and a sending layer of the same prefix."""
    rabbitmqctl = require_binary("rabbitmqctl")
    name = "mltest-" + secrets.token_hex(4)
    receiver = _layer(f"{shared}?connection_name={name}")
    return rabbitmqctl, name, receiver, _layer(shared, prefix=receiver.prefix)


async def _received_once(receiver: ChannelLayer, sender: ChannelLayer) -> tuple[str, Any]:
    """A new inbox of ``receiver``, connected and consuming (a message went through), and
    ``receiver``'s backend."""
    channel = await receiver.new_channel()
    await sender.send(channel, {"n": 1})
    assert await recv(receiver, channel) == {"n": 1}
    return channel, await receiver._backend()


def test_no_message_arrives_twice_after_the_connection_is_closed(shared: str) -> None:
    """An inbox acknowledges in batches, so RabbitMQ delivers again what this process
    received before its connection dropped; those redeliveries must not reach a receive."""
    rabbitmqctl, name, receiver, sender = _droppable_receiver(shared)

    async def body() -> None:
        channel = await receiver.new_channel()
        await receiver.group_add("rmq-twice", channel)
        for n in range(3):
            await sender.send(channel, {"n": n})
        await sender.group_send("rmq-twice", {"n": 3})
        assert [await recv(receiver, channel) for _ in range(4)] == [{"n": n} for n in range(4)]
        waiting = asyncio.ensure_future(receiver.receive(channel))
        await _close_connections(rabbitmqctl, name)
        await asyncio.sleep(0.5)
        await sender.send(channel, {"n": 4})
        assert await asyncio.wait_for(waiting, 20) == {"n": 4}
        await nothing(receiver, channel)
        await sender.flush()
        await sender.close()
        await receiver.close()

    run_quietly(body, timeout=120)


def test_a_connection_lost_while_reconnecting_is_made_again(shared: str) -> None:
    """The connection made after a drop drops too, while the layer declares its topology
    on it: the layer goes on reconnecting, and the waiting receive gets a later message.
    (Closing the dead connection raised in pika and ended the reconnecting for good: the
    layer stayed disconnected.)"""
    rabbitmqctl, name, receiver, sender = _droppable_receiver(shared)

    async def body() -> None:
        channel, backend = await _received_once(receiver, sender)
        declare_topology = backend.topology.declare_topology
        dropped: list[object] = []

        async def drop_first(connection: Any) -> None:
            if not dropped:
                dropped.append(connection)
                closed = asyncio.Event()
                connection.add_on_close_callback(lambda _connection, _reason: closed.set())
                connection._transport._sock.shutdown(socket.SHUT_RDWR)
                await asyncio.wait_for(closed.wait(), 10)
            await declare_topology(connection)

        backend.topology.declare_topology = drop_first
        waiting = asyncio.ensure_future(receiver.receive(channel))
        await _close_connections(rabbitmqctl, name)
        for _ in range(100):
            if dropped and backend.link.connection is not None:
                break
            await asyncio.sleep(0.1)
        assert dropped, "no reconnection was attempted"
        await sender.send(channel, {"n": 2})
        assert await asyncio.wait_for(waiting, 20) == {"n": 2}
        assert receiver.counters().reconnects == 1
        await sender.flush()
        await sender.close()
        await receiver.close()

    run_quietly(body, timeout=120)


def test_an_inbox_made_again_by_a_sender_after_a_reconnection_gets_its_groups(
    shared: str,
) -> None:
    """In a cluster, RabbitMQ may delete a dead node's queue after a reconnected owner
    declared its inbox again and bound its groups; a sender then makes the inbox again,
    without the bindings (seen in CI: a group message lost after a node loss). The
    owner's consumer, first started on the new connection, declares and binds once
    more: the group message after a direct one reaches it."""
    rabbitmqctl, name, receiver, sender = _droppable_receiver(shared)
    url = "amqp://guest:guest@127.0.0.1:5672/%2F"

    async def body() -> None:
        channel, backend = await _received_once(receiver, sender)
        await receiver.group_add("rmq-remade", channel)
        queue = f"{receiver.prefix}:{channel[: channel.index('!') + 1]}"
        # No receive waits across the reconnection: the consumer starts after it.
        await _close_connections(rabbitmqctl, name)
        for _ in range(100):
            if receiver.counters().reconnects == 1:
                break
            await asyncio.sleep(0.1)
        assert receiver.counters().reconnects == 1, "the layer did not reconnect"
        # The restore (declare and bind, then up to 0.5 s of spread) is over.
        await asyncio.sleep(1.5)
        assert not backend.topology.stale(queue)
        await asyncio.to_thread(_delete_queues, url, [queue])
        # The sender's publish comes back unroutable: it declares the inbox again.
        await sender.send(channel, {"n": 2})
        assert await recv(receiver, channel) == {"n": 2}
        await sender.group_send("rmq-remade", {"n": 3})
        assert await recv(receiver, channel) == {"n": 3}
        await sender.flush()
        await sender.close()
        await receiver.close()

    run_quietly(body, timeout=120)


def test_a_consumer_deaf_after_a_reconnection_is_restarted(shared: str) -> None:
    """For a while after a reconnection every consumer is watched: one that gets nothing
    while its queue holds ready messages is started again. (After a cluster node died, an
    inbox consumer was seen to get nothing more.) Here the first consumer started on the
    new connection listens to another queue, as deaf as that one was."""
    rabbitmqctl, name, receiver, sender = _droppable_receiver(shared)

    async def body() -> None:
        channel, backend = await _received_once(receiver, sender)
        [inbox_consumer] = backend._consumers.values()
        inbox, decoy = inbox_consumer.queue, f"{receiver.prefix}:rmq.decoy"
        reconnected, start = backend.link._reconnected, inbox_consumer._start
        deaf: list[str | None] = []

        def deafen() -> None:
            reconnected()
            if not deaf:
                inbox_consumer.queue = decoy  # for the start waiting for this connection

        async def start_and_hear_again() -> None:
            try:
                await start()
            finally:
                if inbox_consumer.queue == decoy:
                    deaf.append(inbox_consumer.tag)
                    inbox_consumer.queue = inbox

        backend.link._reconnected = deafen
        inbox_consumer._start = start_and_hear_again
        waiting = asyncio.ensure_future(receiver.receive(channel))
        await _close_connections(rabbitmqctl, name)
        for _ in range(100):
            if deaf:
                break
            await asyncio.sleep(0.1)
        assert deaf and deaf[0] is not None, "the consumer did not listen to the decoy"
        await sender.send(channel, {"n": 2})
        assert await asyncio.wait_for(waiting, 3 * consumer.STUCK_AFTER + 5) == {"n": 2}
        await sender.flush()
        await sender.close()
        await receiver.close()

    run_quietly(body, timeout=120)


def test_a_send_never_confirmed_fails_and_the_next_uses_a_new_channel(shared: str) -> None:
    """A publish RabbitMQ never confirms (as a 3.10 channel left talking to a dead quorum
    leader never did) fails its send with a BrokerError saying so after answer_timeout,
    instead of waiting forever; the publishing channel is dropped, and the next send goes
    through a new one."""
    layer = _layer(shared, answer_timeout=1)

    async def body() -> None:
        try:
            await layer.send("rmq.unconfirmed", {"n": 1})
            backend = await layer._backend()
            publisher = backend.link.publisher
            # The confirms RabbitMQ sends on this channel go unheard from now on.
            publisher.channel.connection.confirms[publisher.channel.number] = lambda *_: None
            started = time.monotonic()
            with pytest.raises(BrokerError, match=r"no confirm within 1s .*'[^']*rmq.unconfirmed'"):
                await asyncio.wait_for(layer.send("rmq.unconfirmed", {"n": 2}), 10)
            assert time.monotonic() - started < 3
            await asyncio.wait_for(layer.send("rmq.unconfirmed", {"n": 3}), 10)
            assert backend.link.publisher is not publisher
            # The failed send had been stored, as its error says it may have been.
            assert [(await recv(layer, "rmq.unconfirmed"))["n"] for _ in range(3)] == [1, 2, 3]
        finally:
            await layer.flush()
            await layer.close()

    run(body)


def test_a_method_never_answered_fails_and_the_next_uses_a_new_channel(shared: str) -> None:
    """A method RabbitMQ never answers fails with a BrokerError saying so after
    answer_timeout, instead of waiting forever; its channel is dropped, and the next
    operation opens a new one."""
    layer = _layer(shared, answer_timeout=1)

    async def body() -> None:
        try:
            channel = await layer.new_channel()
            await layer.group_add("rmq-unanswered", channel)
            backend = await layer._backend()
            admin = backend.link.admin

            def queue_bind(*_args: Any, **_kwargs: Any) -> None:
                """Asks nothing, so no answer comes."""

            admin.channel.queue_bind = queue_bind
            started = time.monotonic()
            with pytest.raises(BrokerError, match=r"did not answer queue_bind within 1s"):
                await asyncio.wait_for(layer.group_add("rmq-unanswered-2", channel), 10)
            assert time.monotonic() - started < 3
            await asyncio.wait_for(layer.group_add("rmq-unanswered-2", channel), 10)
            assert backend.link.admin is not admin
            await layer.group_send("rmq-unanswered-2", {"n": 1})
            assert await recv(layer, channel) == {"n": 1}
        finally:
            await layer.flush()
            await layer.close()

    run(body)


def test_a_slow_answer_within_answer_timeout_is_awaited(shared: str) -> None:
    """An answer slower than connect_timeout but within answer_timeout (a quorum queue's
    delete while a cluster node is just back takes RabbitMQ 5 s and more) is awaited:
    the operation succeeds and its channel is kept."""
    layer = _layer(shared, connect_timeout=0.5, answer_timeout=10)

    async def body() -> None:
        try:
            channel = await layer.new_channel()
            backend = await layer._backend()
            admin = backend.link.admin
            queue_bind = admin.channel.queue_bind
            loop = asyncio.get_running_loop()

            def slow_queue_bind(*args: Any, **kwargs: Any) -> None:
                """Asks RabbitMQ 1.5 s late, so its answer comes after connect_timeout."""
                loop.call_later(1.5, lambda: queue_bind(*args, **kwargs))

            admin.channel.queue_bind = slow_queue_bind
            started = time.monotonic()
            await asyncio.wait_for(layer.group_add("rmq-slow", channel), 10)
            assert time.monotonic() - started >= 1.5
            assert backend.link.admin is admin and admin.usable
            await layer.group_send("rmq-slow", {"n": 1})
            assert await recv(layer, channel) == {"n": 1}
        finally:
            await layer.flush()
            await layer.close()

    run(body)


# -- behaviour on our own node ----------------------------------------------------------


def test_heartbeats_detect_a_frozen_broker(node: RabbitNode) -> None:
    """SIGSTOP the node past two heartbeats: the layer gives the silent connection up,
    reconnects once the node runs again, and the waiting receive gets a later message."""
    receiver = _layer(node.url, heartbeat=1)
    sender = _layer(node.url, prefix=receiver.prefix)

    async def body() -> None:
        channel = await receiver.new_channel()
        waiting = asyncio.ensure_future(receiver.receive(channel))
        await asyncio.sleep(0.2)
        backend = await receiver._backend()
        frozen_connection = backend.link.connection  # type: ignore[attr-defined]
        node.signal(signal.SIGSTOP)
        try:
            # pika checks for silence every heartbeat + 5 seconds.
            for _ in range(200):
                if frozen_connection.is_closed:
                    break
                await asyncio.sleep(0.1)
        finally:
            node.signal(signal.SIGCONT)
        assert frozen_connection.is_closed, "the silent connection was kept"
        await sender.send(channel, {"n": 1})
        assert await asyncio.wait_for(waiting, 30) == {"n": 1}
        await sender.close()
        await receiver.close()

    run_quietly(body, timeout=90)


@pytest.mark.slow
def test_a_restart_restores_normal_channel_memberships_without_extending_them(
    node: RabbitNode,
) -> None:
    """The node is SIGKILLed and started again empty: the layer makes its normal-channel
    membership again from the core's ledger, for what it had left of group_expiry only."""
    layer = _layer(node.url, group_expiry=25, heartbeat=2, connect_timeout=5)

    async def body() -> None:
        await layer.group_add("rmq-back", "rmq.back")
        joined = time.time()
        await asyncio.to_thread(node.restart, kill=True)
        got: list[int] = []
        number = 0
        while not got:
            assert time.time() - joined < 20, "the membership never came back"
            number += 1
            with contextlib.suppress(BrokerError):
                await layer.group_send("rmq-back", {"n": number})
            with contextlib.suppress(asyncio.TimeoutError):
                got.append((await asyncio.wait_for(layer.receive("rmq.back"), 0.5))["n"])
        backend = await layer._backend()
        assert backend.reasserted >= 1
        await asyncio.sleep(joined + 25.5 - time.time())
        await layer.group_send("rmq-back", {"n": 0})
        await nothing(layer, "rmq.back")  # gone at its original deadline
        await layer.flush()
        await layer.close()

    run_quietly(body, timeout=90)


def test_tls_listener(node: RabbitNode) -> None:
    verified = _layer(f"amqps://localhost:{node.tls_port}/?ca_file={node.ca_file}")
    untrusted = _layer(f"amqps://localhost:{node.tls_port}/?connect_timeout=3")

    async def body() -> None:
        channel = await verified.new_channel()
        await verified.send(channel, {"tls": True})
        assert await recv(verified, channel) == {"tls": True}
        with pytest.raises(BrokerError):
            await untrusted.send("rmq.tls", {})
        await verified.flush()
        await verified.close()
        await untrusted.close()

    run(body)


def test_close_or_the_event_loop_ending_leaves_no_tls_socket_open(node: RabbitNode) -> None:
    """Once close() returns, or the event loop ends without close(), no socket the layer
    opened to the TLS listener is left: a TLS connection is shut down in the loop, so it
    must be done before the loop ends."""
    url = f"amqps://127.0.0.1:{node.tls_port}/?ca_file={node.ca_file}"

    async def used() -> ChannelLayer:
        layer = _layer(url)
        channel = await layer.new_channel()
        await layer.send(channel, {"n": 0})
        assert await recv(layer, channel) == {"n": 0}
        assert connections_to(node.tls_port) > 0
        return layer

    async def closed() -> None:
        await (await used()).close()
        assert connections_to(node.tls_port) == 0

    for body in (closed, used):
        run(body)
        assert connections_to(node.tls_port) == 0


def test_flush_removes_only_its_prefix_on_a_shared_vhost(node: RabbitNode) -> None:
    ours = _layer(node.url)
    theirs = _layer(node.url)

    async def body() -> None:
        await ours.send("rmq.flush", {"n": 1})
        await theirs.send("rmq.flush", {"n": 2})
        await ours.group_add("rmq-flush", "rmq.member")
        await ours.flush()
        queues = await asyncio.to_thread(node.ctl, "list_queues", "name")
        assert not [
            q
            for q in queues.split()
            if q.startswith(ours.prefix + ":") and not q.startswith(ours.prefix + "::")
        ], queues
        assert f"{theirs.prefix}:rmq.flush" in queues.split()
        assert await recv(theirs, "rmq.flush") == {"n": 2}
        await ours.group_send("rmq-flush", {"n": 3})
        await nothing(ours, "rmq.member")
        await theirs.flush()
        await ours.close()
        await theirs.close()

    run(body)
