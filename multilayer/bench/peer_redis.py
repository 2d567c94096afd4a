"""Redis peers for ``multilayer bench redis://... --vs PEER``.

* ``channels_redis``: channels_redis's core ``RedisChannelLayer`` (lists, Lua, queue semantics);
* ``channels_redis_pubsub``: its ``RedisPubSubChannelLayer`` (a broadcast: messages sent
  while nobody is subscribed are lost);
* ``raw_redis``: the ceiling of plain redis-py, LPUSH and BRPOP with no layer around them.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import msgpack
from redis.asyncio import Redis

from ..url import LayerURL
from . import LayerContender, NotApplicable, payload, timed_rounds

__all__ = ["channels_redis", "channels_redis_hosts", "channels_redis_pubsub", "raw_redis"]


def _host_urls(url: str) -> list[str]:
    """One plain ``redis://`` URL per host of a layer URL, credentials and db kept."""
    parsed = LayerURL.parse(url)
    if parsed.scheme.endswith("+cluster"):
        # Given a cluster's nodes as shards, its keys would land on nodes that answer
        # MOVED: the peers' own users report exactly that.
        raise NotApplicable(
            "channels_redis does not support Redis Cluster (channels_redis issues 381, 420)"
        )
    scheme = "rediss" if parsed.scheme == "rediss" else "redis"
    hosts = parsed.hosts or (("localhost", 6379),)
    return [
        LayerURL(
            scheme, ((host, port or 6379),), parsed.username, parsed.password, parsed.path
        ).render()
        for host, port in hosts
    ]


def channels_redis_hosts(url: str) -> list[dict[str, Any]]:
    """channels_redis's ``hosts`` for a layer URL, as its careful users write them.

    redis-py 8 made ``socket_timeout`` default to 5 seconds, the same as channels_redis's
    blocking BZPOPMIN, so an idle receive raised TimeoutError and the consumer died
    (channels_redis issue #422); the fix its users apply is ``socket_timeout: None``.
    """
    return [{"address": address, "socket_timeout": None} for address in _host_urls(url)]


def channels_redis(url: str, capacity: int) -> LayerContender:
    """channels_redis.core.RedisChannelLayer on the same Redis server(s)."""
    from channels_redis.core import RedisChannelLayer

    prefix = f"benchcr{secrets.token_hex(3)}"
    hosts = channels_redis_hosts(url)
    return LayerContender(
        "channels_redis",
        lambda: RedisChannelLayer(hosts=hosts, prefix=prefix, capacity=capacity),
        # The room runs with the default capacity, as deployed.
        {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": hosts, "prefix": prefix},
        },
    )


class _PubSubContender(LayerContender):
    """A pub/sub layer drops what is sent before its receiver subscribes, and it
    subscribes to a normal channel only on the first receive: the receiver is started,
    and given time to subscribe, before the clock starts."""

    async def _queue(self, sender: Any, receiver: Any) -> str:
        channel = f"bench.a{secrets.token_hex(4)}"
        first = asyncio.ensure_future(receiver.receive(channel))
        await asyncio.sleep(0.2)
        await self._send(sender, channel, payload(-1))
        await asyncio.wait_for(first, 10)
        return channel


def channels_redis_pubsub(url: str, capacity: int) -> LayerContender:
    """channels_redis.pubsub.RedisPubSubChannelLayer (it has no capacity setting)."""
    from channels_redis.pubsub import RedisPubSubChannelLayer

    prefix = f"benchps{secrets.token_hex(3)}"
    hosts = channels_redis_hosts(url)
    return _PubSubContender(
        "channels_redis_pubsub",
        lambda: RedisPubSubChannelLayer(hosts=hosts, prefix=prefix),
        {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": hosts, "prefix": prefix},
        },
    )


class RawRedis:
    """Plain redis-py LPUSH/BRPOP on lists: no expiry, capacity, groups or cancellation
    safety, one round trip per message each way. The ceiling a layer pays its features
    against."""

    name = "raw_redis"

    def __init__(self, url: str) -> None:
        self._url = _host_urls(url)[0]
        self._prefix = f"benchraw{secrets.token_hex(3)}"
        self._clients: list[Redis] = []

    def _client(self) -> Redis:
        client = Redis.from_url(self._url)
        self._clients.append(client)
        return client

    async def throughput_normal(self, n: int) -> float:
        sender, receiver = self._client(), self._client()
        key = f"{self._prefix}:a"
        body = msgpack.packb(payload(0))

        async def produce() -> None:
            for _ in range(n):
                await sender.lpush(key, body)

        async def consume() -> None:
            for _ in range(n):
                msgpack.unpackb(await _brpop(receiver, key))

        started = time.perf_counter()
        await asyncio.gather(produce(), consume())
        return n / (time.perf_counter() - started)

    async def throughput_specific(self, n: int) -> float:
        raise NotApplicable("raw lists have no process-specific channels; see (a)")

    async def pingpong(self, n: int) -> list[float]:
        a, b = self._client(), self._client()
        ping, pong = f"{self._prefix}:ping", f"{self._prefix}:pong"

        async def echo() -> None:
            await b.lpush(pong, await _brpop(b, ping))

        async def round_trip(i: int) -> None:
            await a.lpush(ping, msgpack.packb(payload(i)))
            msgpack.unpackb(await _brpop(a, pong))

        return await timed_rounds(n, echo, round_trip)

    async def group_send(self, members: int, n: int) -> tuple[float, float]:
        raise NotApplicable("raw lists have no groups")

    async def close(self) -> None:
        for client in self._clients:
            keys = [key async for key in client.scan_iter(match=f"{self._prefix}:*")]
            if keys:
                await client.delete(*keys)
            await client.aclose()
        self._clients.clear()


async def _brpop(client: Redis, key: str) -> Any:
    # A short server-side timeout keeps the wait below redis-py's 5 s socket timeout.
    while True:
        reply = await client.brpop([key], timeout=1)
        if reply is not None:
            return reply[1]


def raw_redis(url: str, capacity: int) -> RawRedis:
    """Raw redis-py LPUSH/BRPOP on the first Redis server of ``url`` (capacity unused)."""
    return RawRedis(url)
