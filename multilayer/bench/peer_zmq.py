"""ZeroMQ peers for ``multilayer bench zmq://... --vs PEER``.

* ``raw_zmq``: the ceiling of plain pyzmq asyncio sockets on loopback: PUSH/PULL for
  throughput (a) and (b), DEALER/ROUTER for ping-pong (c); no queue, capacity, expiry or
  groups, so (d) does not apply.
* ``channels_zmq``: the PyPI ``channels-zmq`` layer (``DedicatedZmqChannelLayer``) with its
  PULL-to-PUB forwarder run here, since the package ships that daemon as an empty file.

Neither needs the hub: both bind their own sockets on free loopback ports.
"""

from __future__ import annotations

import asyncio
import importlib.util
import secrets
import socket
import threading
import time
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from . import LayerContender, NotApplicable, payload, retry_while_full, timed_rounds

__all__ = ["channels_zmq", "raw_zmq"]


def _free_endpoint() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


class RawZmq:
    """Plain pyzmq asyncio sockets: what the layer pays its contract against."""

    name = "raw_zmq"

    def __init__(self) -> None:
        self._context = zmq.asyncio.Context()
        self._sockets: list[zmq.asyncio.Socket] = []

    def _socket(self, kind: int) -> zmq.asyncio.Socket:
        sock = self._context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        self._sockets.append(sock)
        return sock

    async def _push_pull(self, n: int) -> float:
        endpoint = _free_endpoint()
        pull, push = self._socket(zmq.PULL), self._socket(zmq.PUSH)
        pull.bind(endpoint)
        push.connect(endpoint)
        frames = [msgpack.packb(payload(i)) for i in range(n)]

        async def produce() -> None:
            for frame in frames:
                await push.send(frame)

        async def consume() -> None:
            for _ in range(n):
                msgpack.unpackb(await pull.recv())

        started = time.perf_counter()
        await asyncio.gather(produce(), consume())
        return n / (time.perf_counter() - started)

    async def throughput_normal(self, n: int) -> float:
        return await self._push_pull(n)

    async def throughput_specific(self, n: int) -> float:
        return await self._push_pull(n)

    async def pingpong(self, n: int) -> list[float]:
        endpoint = _free_endpoint()
        router, dealer = self._socket(zmq.ROUTER), self._socket(zmq.DEALER)
        router.bind(endpoint)
        dealer.connect(endpoint)

        async def echo() -> None:
            await router.send_multipart(await router.recv_multipart())

        async def round_trip(i: int) -> None:
            await dealer.send(msgpack.packb(payload(i)))
            msgpack.unpackb(await dealer.recv())

        return await timed_rounds(n, echo, round_trip)

    async def group_send(self, members: int, n: int) -> tuple[float, float]:
        raise NotApplicable("raw pyzmq has no groups")

    async def close(self) -> None:
        for sock in self._sockets:
            sock.close(0)
        self._sockets.clear()


def raw_zmq(url: str, capacity: int) -> RawZmq:
    """Raw pyzmq asyncio PUSH/PULL and DEALER/ROUTER on loopback (``url`` is not used)."""
    return RawZmq()


class _Forwarder:
    """The PULL-to-PUB proxy ``DedicatedZmqChannelLayer`` expects to find running."""

    def __init__(self) -> None:
        self.pull, self.pub = _free_endpoint(), _free_endpoint()
        self._context = zmq.Context()
        frontend, backend = self._context.socket(zmq.PULL), self._context.socket(zmq.PUB)
        frontend.bind(self.pull)
        backend.bind(self.pub)
        self._thread = threading.Thread(
            target=self._run, args=(frontend, backend), name="channels_zmq forwarder", daemon=True
        )
        self._thread.start()

    @staticmethod
    def _run(frontend: zmq.Socket[bytes], backend: zmq.Socket[bytes]) -> None:
        try:
            zmq.proxy(frontend, backend)
        except zmq.ContextTerminated:
            pass
        finally:
            frontend.close(0)
            backend.close(0)

    def stop(self) -> None:
        self._context.term()
        self._thread.join(5)


class _ChannelsZmq(LayerContender):
    """channels-zmq over a pub/sub forwarder. Its receivers subscribe on first use and
    drop what was published before, so each scenario subscribes and waits first. Its
    process-specific channels never deliver (it publishes to the inbox name but subscribes
    to the full channel name), so (b) and (c) use an inbox-only name such as
    ``specific.abc!``, which it does deliver."""

    def __init__(self, capacity: int) -> None:
        super().__init__("channels_zmq", self._new_layer)
        self._capacity = capacity
        self._forwarder: _Forwarder | None = None

    def _new_layer(self) -> Any:
        from channels_zmq.core import DedicatedZmqChannelLayer  # type: ignore[import-untyped]

        # One forwarder per scenario run: close() ends it with the run's layers.
        if self._forwarder is None:
            self._forwarder = _Forwarder()
        forwarder = self._forwarder
        return DedicatedZmqChannelLayer(forwarder.pull, forwarder.pub, capacity=self._capacity)

    async def _subscribed(self, layer: Any, *channels: str) -> None:
        for channel in channels:
            await layer._get_sub_socket(channel)
        await asyncio.sleep(0.3)

    async def _queue(self, sender: Any, receiver: Any) -> str:
        channel = f"bench.a{secrets.token_hex(4)}"
        await self._subscribed(receiver, channel)
        return channel

    async def _inbox(self, layer: Any) -> str:
        created: str = await layer.new_channel()
        channel = created.partition("!")[0] + "!"
        await self._subscribed(layer, channel)
        return channel

    async def _joined(self, receiver: Any) -> None:
        await self._subscribed(receiver)

    def _echo(self, message: dict[str, Any]) -> dict[str, Any]:
        # It refuses to send a message carrying the routing key it added itself.
        message.pop("__asgi_channel__", None)
        return message

    async def _group_send(self, layer: Any, group: str, message: dict[str, Any]) -> None:
        # channels-zmq raises ChannelFull from group_send when its socket buffer is full.
        await retry_while_full(lambda: layer.group_send(group, message))

    async def close(self) -> None:
        layers = list(self._layers)
        await super().close()
        for layer in layers:
            if layer.zmq_push_socket is not None:
                layer.zmq_push_socket.close(0)
        if self._forwarder is not None:
            self._forwarder.stop()
            self._forwarder = None


def channels_zmq(url: str, capacity: int) -> LayerContender:
    """channels-zmq's DedicatedZmqChannelLayer with a forwarder of our own (``url`` unused)."""
    if importlib.util.find_spec("channels_zmq") is None:
        raise NotApplicable("channels-zmq is not installed (pip install channels-zmq)")
    return _ChannelsZmq(capacity)
