"""RabbitMQ peers for ``multilayer bench amqp://... --vs PEER``.

* ``channels_rabbitmq``: channels-rabbitmq's ``RabbitmqChannelLayer``. It has process-specific
  channels only, so scenario (a) does not apply to it.
* ``raw_pika``: the ceiling of plain pika on its asyncio adapter, with the guarantees the
  layer gives: every publish waits for RabbitMQ's confirm (so a full queue could be
  reported), the consumer acknowledges each message, prefetch is bounded.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any
from urllib.parse import quote

import msgpack
import pika
import pika.channel
from pika.adapters.asyncio_connection import AsyncioConnection

from ..url import LayerURL
from . import LayerContender, NotApplicable, payload, timed_rounds

__all__ = ["channels_rabbitmq", "raw_pika"]


class _ChannelsRabbitmq(LayerContender):
    """channels_rabbitmq connects on first use and drops what is sent to a process queue
    before that queue is consumed, so each instance receives once before the clock starts."""

    async def _inbox(self, layer: Any) -> str:
        channel: str = await layer.new_channel()
        first = asyncio.ensure_future(layer.receive(channel))
        await asyncio.sleep(0.2)
        await self._send(layer, channel, payload(-1))
        await asyncio.wait_for(first, 10)
        return channel

    async def _warm(self, layer: Any) -> None:
        await self._inbox(layer)

    async def _queue(self, sender: Any, receiver: Any) -> str:
        raise NotApplicable("channels_rabbitmq has no normal channels, only process-specific ones")


def _plain_url(url: str) -> str:
    """The first broker of a layer URL as an AMQP URL with pika's defaults written out
    (channels_rabbitmq's client assumes no user, password or vhost)."""
    parsed = LayerURL.parse(url)
    host, port = (parsed.hosts or (("localhost", None),))[0]
    port = port or (5671 if parsed.scheme == "amqps" else 5672)
    user = quote(parsed.username if parsed.username is not None else "guest", safe="")
    password = quote(parsed.password if parsed.password is not None else "guest", safe="")
    host = f"[{host}]" if ":" in host else host
    return f"{parsed.scheme}://{user}:{password}@{host}:{port}/{quote(parsed.path or '/', safe='')}"


def channels_rabbitmq(url: str, capacity: int) -> LayerContender:
    """channels_rabbitmq.core.RabbitmqChannelLayer on the same broker and vhost."""
    from channels_rabbitmq.core import RabbitmqChannelLayer

    host = _plain_url(url)
    group_exchange = f"benchcr{secrets.token_hex(3)}"
    return _ChannelsRabbitmq(
        "channels_rabbitmq",
        lambda: RabbitmqChannelLayer(
            host=host,
            local_capacity=capacity,
            remote_capacity=capacity,
            groups_exchange=group_exchange,
        ),
        # The room runs with the default capacities (100 local, 100 remote), as deployed.
        {
            "BACKEND": "channels_rabbitmq.core.RabbitmqChannelLayer",
            "CONFIG": {"host": host, "groups_exchange": group_exchange},
        },
    )


class _Link:
    """One pika connection with a confirm-mode channel and a consume channel."""

    def __init__(self, connection: AsyncioConnection) -> None:
        self.connection = connection
        self.publisher: Any = None
        self.consumer: Any = None
        self._sent = 0
        self._confirms: dict[int, asyncio.Future[None]] = {}
        self.messages: asyncio.Queue[bytes] = asyncio.Queue()

    @classmethod
    async def open(cls, parameters: pika.URLParameters) -> _Link:
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[AsyncioConnection] = loop.create_future()
        AsyncioConnection(
            parameters,
            on_open_callback=opened.set_result,
            on_open_error_callback=lambda _c, error: opened.set_exception(
                error if isinstance(error, BaseException) else OSError(str(error))
            ),
            custom_ioloop=loop,
        )
        link = cls(await opened)
        link.publisher = await link._channel()
        confirming: asyncio.Future[None] = loop.create_future()
        link.publisher.confirm_delivery(
            link._confirmed, callback=lambda _f: confirming.set_result(None)
        )
        await confirming
        link.consumer = await link._channel()
        qos: asyncio.Future[None] = loop.create_future()
        link.consumer.basic_qos(prefetch_count=64, callback=lambda _f: qos.set_result(None))
        await qos
        return link

    async def _channel(self) -> pika.channel.Channel:
        opened: asyncio.Future[pika.channel.Channel] = asyncio.get_running_loop().create_future()
        self.connection.channel(on_open_callback=opened.set_result)
        return await opened

    def _confirmed(self, frame: Any) -> None:
        method = frame.method
        tags = (
            [t for t in self._confirms if t <= method.delivery_tag]
            if method.multiple
            else [method.delivery_tag]
        )
        for tag in tags:
            future = self._confirms.pop(tag, None)
            if future is not None and not future.done():
                future.set_result(None)

    async def declare(self, queue: str) -> None:
        declared: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.publisher.queue_declare(
            queue, auto_delete=True, callback=lambda _f: declared.set_result(None)
        )
        await declared

    async def publish(self, queue: str, body: bytes) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sent += 1
        self._confirms[self._sent] = future
        self.publisher.basic_publish("", queue, body)
        await future

    def consume(self, queue: str) -> None:
        def delivered(channel: Any, method: Any, _properties: Any, body: bytes) -> None:
            channel.basic_ack(method.delivery_tag)
            self.messages.put_nowait(body)

        self.consumer.basic_consume(queue, delivered)

    async def receive(self) -> Any:
        return msgpack.unpackb(await self.messages.get())

    def close(self) -> None:
        if not (self.connection.is_closed or self.connection.is_closing):
            self.connection.close()


class RawPika:
    """Plain pika: confirmed publishes to a queue and a manually acknowledging consumer.
    No expiry, capacity, groups, channel names or cancellation safety: the ceiling the
    layer pays its features against."""

    name = "raw_pika"

    def __init__(self, url: str) -> None:
        self._parameters = pika.URLParameters(_plain_url(url))
        self._prefix = f"benchraw{secrets.token_hex(3)}"
        self._links: list[_Link] = []

    async def _link(self) -> _Link:
        link = await _Link.open(self._parameters)
        self._links.append(link)
        return link

    async def throughput_normal(self, n: int) -> float:
        sender, receiver = await self._link(), await self._link()
        queue = f"{self._prefix}.a"
        await receiver.declare(queue)
        receiver.consume(queue)
        body = msgpack.packb(payload(0))

        async def produce() -> None:
            for _ in range(n):
                await sender.publish(queue, body)

        async def consume() -> None:
            for _ in range(n):
                await receiver.receive()

        started = time.perf_counter()
        await asyncio.gather(produce(), consume())
        return n / (time.perf_counter() - started)

    async def throughput_specific(self, n: int) -> float:
        raise NotApplicable("raw queues have no process-specific channels; see (a)")

    async def pingpong(self, n: int) -> list[float]:
        a, b = await self._link(), await self._link()
        ping, pong = f"{self._prefix}.ping", f"{self._prefix}.pong"
        await b.declare(ping)
        await a.declare(pong)
        b.consume(ping)
        a.consume(pong)

        async def echo() -> None:
            await b.publish(pong, msgpack.packb(await b.receive()))

        async def round_trip(i: int) -> None:
            await a.publish(ping, msgpack.packb(payload(i)))
            await a.receive()

        return await timed_rounds(n, echo, round_trip)

    async def group_send(self, members: int, n: int) -> tuple[float, float]:
        raise NotApplicable("raw queues have no groups")

    async def close(self) -> None:
        for link in self._links:
            link.close()
        self._links.clear()
        # Let the close frames go out before the event loop ends.
        await asyncio.sleep(0.05)


def raw_pika(url: str, capacity: int) -> RawPika:
    """Raw pika on the first broker of ``url`` (capacity unused)."""
    return RawPika(url)
