"""Logs never hold a credential or a message body, whatever the backend does.

Each backend runs against a broker this test owns (so that it may restart it), with a
known secret in its URL: a password (Redis, RabbitMQ), a CURVE secret key (ZeroMQ), or,
for Kafka, whose test broker has no SASL, a password in the URL of the connection that
fails. Every record of every logger is captured at DEBUG while a layer connects, sends,
receives, sees its broker restart and reconnects, and fails to connect; multilayer's own
records must hold neither at any level, client libraries' none at INFO or above.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from test_rabbitmq import node  # noqa: F401 (the fixture is used by name)

from multilayer import BrokerError, ChannelLayer
from tests.support.brokers import (
    BrokerProcess,
    RabbitNode,
    broker,
    free_port,
    hub_argv,
    require_binary,
)

SECRET = "pw-Zq8x31-never-logged"
BODY = "body-Kp4d92-never-logged"


@dataclass
class Target:
    """A broker of this test: the layer URL, a URL nothing answers, and a restart."""

    url: str
    unreachable: str
    restart: Callable[[], None] | None
    secret: str = SECRET


def _redis(stack: contextlib.ExitStack, tmp: Path) -> Target:
    port = free_port()
    argv = [
        require_binary("redis-server"),
        "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--requirepass", SECRET,
    ]  # fmt: skip
    process = stack.enter_context(broker(argv, port, tmp))
    return Target(
        f"redis://:{SECRET}@127.0.0.1:{port}/0?socket_timeout=2",
        f"redis://:{SECRET}@127.0.0.1:{free_port()}/0?connect_timeout=2",
        process.restart,
    )


def _amqp(rabbit: RabbitNode) -> Target:
    rabbit.ctl("add_user", "logtest", SECRET)
    rabbit.ctl("set_permissions", "-p", "/", "logtest", ".*", ".*", ".*")
    return Target(
        f"amqp://logtest:{quote(SECRET)}@127.0.0.1:{rabbit.port}/%2F",
        f"amqp://logtest:{quote(SECRET)}@127.0.0.1:{free_port()}/%2F?connect_timeout=2",
        rabbit.restart,
    )


def _kafka(stack: contextlib.ExitStack, tmp: Path) -> Target:
    from tests.support.kafka_broker import tansu

    process = stack.enter_context(tansu(tmp))
    return Target(
        f"kafka://127.0.0.1:{process.port}",
        f"kafka://logtest:{SECRET}@127.0.0.1:{free_port()}",
        process.restart,
    )


def _zmq(stack: contextlib.ExitStack, tmp: Path) -> Target:
    import zmq

    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    secret = client_secret.decode()
    port = free_port()
    argv = [
        *hub_argv(port),
        f"--curve-secret-key={server_secret.decode()}",
        f"--curve-allow={client_public.decode()}",
    ]
    process: BrokerProcess = stack.enter_context(broker(argv, port, tmp))
    keys = (
        f"curve_serverkey={quote(server_public.decode(), safe='')}"
        f"&curve_secretkey={quote(secret, safe='')}&timeout=2"
    )
    return Target(
        f"zmq://127.0.0.1:{port}?{keys}&heartbeat=0.2",
        f"zmq://127.0.0.1:{free_port()}?{keys}",
        process.restart,
        secret=secret,
    )


@pytest.fixture
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target | None]:
    scheme: str = request.param
    with contextlib.ExitStack() as stack:
        if scheme == "memory":
            yield None
        elif scheme == "redis":
            yield _redis(stack, tmp_path)
        elif scheme == "amqp":
            # The RabbitMQ node the RabbitMQ tests own (module-scoped there, so here too).
            yield _amqp(request.getfixturevalue("node"))
        elif scheme == "kafka":
            yield _kafka(stack, tmp_path)
        else:
            yield _zmq(stack, tmp_path)


async def _receive(layer: ChannelLayer, channel: str, timeout: float = 30.0) -> str:
    message = await asyncio.wait_for(layer.receive(channel), timeout)
    text: str = message["text"]
    return text


async def _exercise(url: str, restart: Callable[[], None] | None) -> ChannelLayer:
    layer = ChannelLayer(url, prefix="logtest")
    inbox = await layer.new_channel()
    await layer.group_add("log-room", inbox)
    await layer.send(inbox, {"text": BODY})
    assert await _receive(layer, inbox) == BODY
    await layer.group_send("log-room", {"text": BODY})
    assert await _receive(layer, inbox) == BODY
    await layer.send("log.normal", {"text": BODY})
    assert await _receive(layer, "log.normal") == BODY
    if restart is not None:
        waiting = asyncio.ensure_future(layer.receive("log.after"))
        await asyncio.sleep(0.5)
        await asyncio.to_thread(restart)
        # Sends fail until the layer has its connection back, and one that an in-memory
        # broker (Tansu) took before the layer saw that the broker came back empty may be
        # lost (docs/backends/kafka.md, "Broker restarts"): send until the waiting receive resumes.
        give_up = time.monotonic() + 90
        while not waiting.done():
            assert time.monotonic() < give_up, "the waiting receive never resumed"
            with contextlib.suppress(BrokerError, asyncio.TimeoutError):
                await asyncio.wait_for(layer.send("log.after", {"text": BODY}), 5)
            await asyncio.wait([waiting], timeout=2)
        assert waiting.result()["text"] == BODY
    return layer


async def _fail_to_connect(url: str, secret: str) -> None:
    layer = ChannelLayer(url, prefix="logtest")
    try:
        with pytest.raises((BrokerError, asyncio.TimeoutError)) as failure:
            await asyncio.wait_for(layer.send("log.never", {"text": BODY}), 20)
        assert secret not in str(failure.value)
    finally:
        await asyncio.wait_for(layer.close(), 20)


@pytest.mark.parametrize(
    "target", ["memory", "redis", "amqp", "kafka", "zmq"], indirect=True, ids=str
)
def test_no_credential_or_body_in_any_log_record(
    target: Target | None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    async def body() -> None:
        if target is None:
            layer = await _exercise("memory://logtest", None)
            await layer.close()
            return
        layer = await _exercise(target.url, target.restart)
        try:
            stats = await layer.stats()
            assert stats.reconnects >= 1, stats
        finally:
            await layer.flush()
            await layer.close()
        await _fail_to_connect(target.unreachable, target.secret)

    asyncio.run(asyncio.wait_for(body(), 240))
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    # A snapshot: background threads (a ZeroMQ node, kafka-python) may still be logging.
    records = list(caplog.records)
    texts = [formatter.format(record) for record in records]
    assert texts, "nothing was logged at all: the capture is not working"
    secret = SECRET if target is None else target.secret
    # multilayer's own records at every level; client libraries' at INFO and above (at
    # DEBUG kafka-python prints its configuration, SASL password included, and every
    # record it produces: see docs/operations.md).
    leaks = [
        text
        for record, text in zip(records, texts, strict=True)
        if (record.name.startswith("multilayer") or record.levelno >= logging.INFO)
        and (secret in text or BODY in text)
    ]
    assert not leaks, "\n".join(leaks)
    if target is not None:
        assert any(record.name.startswith("multilayer.") for record in records)
