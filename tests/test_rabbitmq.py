"""RabbitMQ backend behaviour the shared conformance suite cannot see.

Heartbeats, TLS and flush run against a RabbitMQ node this module starts itself
(tests/brokers.py RabbitNode), on free loopback ports with its own data directory and
Erlang cookie; the machine's shared node (127.0.0.1:5672) only carries ordinary traffic.
Broker restarts and dropped connections are in tests/test_faults.py.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from brokers import RabbitNode, certificates, free_port, listening, require, require_module

from multilayer import BrokerError, ChannelFull, ChannelLayer, ConfigurationError
from multilayer.backend import LayerSettings
from multilayer.capacity import CapacityPolicy

pika = require_module("pika")

from multilayer.backends.rabbitmq import RabbitMQBackend  # noqa: E402

T = TypeVar("T")
SHARED = "amqp://127.0.0.1:5672/"


def run(body: Callable[[], Awaitable[T]], timeout: float = 60.0) -> T:
    """Run ``body()`` in a fresh event loop, bounded by ``timeout`` seconds."""
    return asyncio.run(asyncio.wait_for(body(), timeout))


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
    parameters = backend._parameters("rabbit.example", 5673)
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
    defaults = _backend("amqp://")._parameters("localhost", None)
    assert (defaults.port, defaults.virtual_host, defaults.credentials.username) == (
        5672,
        "/",
        "guest",
    )
    assert _backend("amqp://h/%2F")._parameters("h", None).virtual_host == "/"


def test_tls_options(tmp_path: Path) -> None:
    certs = certificates(tmp_path)
    ca, cert, key = certs / "ca.pem", certs / "client.pem", certs / "client.key"
    backend = _backend(f"amqps://h?ca_file={ca}&cert_file={cert}&key_file={key}")
    parameters = backend._parameters("h", None)
    assert parameters.port == 5671
    assert parameters.ssl_options.server_hostname == "h"
    assert parameters.ssl_options.context.check_hostname
    unverified = _backend("amqps://h?verify=false")._parameters("h", None)
    assert not unverified.ssl_options.context.check_hostname


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("amqp://h?ca_file=/ca.pem", "amqps://"),
        ("amqps://h?key_file=/k.pem", "cert_file"),
        ("amqp://h?prefetch=0", "prefetch"),
        ("amqp://h?nonsense=1", "unknown option"),
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
                if "skipped member" in caplog.text:
                    break
                await asyncio.sleep(0.05)
        assert "group_send to 'rmq-full' skipped member" in caplog.text
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
        frozen_connection = backend._connection  # type: ignore[attr-defined]
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

    logging.getLogger("multilayer.rabbitmq").disabled = True
    try:
        run(body, timeout=90)
    finally:
        logging.getLogger("multilayer.rabbitmq").disabled = False


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
