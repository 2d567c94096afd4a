"""The Redis backend class: options, URL checks, and each operation routed to its shard.

URL format::

    redis://[[user]:password@]host[:port][,host[:port]...][/db][?option=value...]
    rediss://[[user]:password@]host[:port][,host[:port]...][/db][?ssl_cafile=...]
    redis+sentinel://[[user]:password@]sentinel[:port][,sentinel[:port]...][/db][?service=NAME]

``redis://`` and ``rediss://`` default to ``localhost:6379``; several hosts are several
shards (not replicas), and every process must list the same hosts, spelt the same way.
``redis+sentinel://`` lists the Sentinel processes (port 26379 by default); ``service``
names the monitored master, or several masters separated by commas, one shard each. The
URL's credentials and ``/db`` apply to the Redis servers, not to the Sentinels.

Options (besides the core ones):

``socket_timeout`` (5.0, redis-py's default)
    seconds to wait for a reply before a connection counts as lost; an idle receive
    re-blocks every half of it, so it waits forever without an error.
``connect_timeout`` (5.0)
    seconds to wait for a TCP (and TLS) connection.
``membership_check`` (10.0)
    seconds (jittered) between checks that each server still holds this layer's groups.
``service`` (``mymaster``), ``sentinel_password``
    ``redis+sentinel://`` only: the master name(s), and the Sentinels' own password.
``ssl_cafile``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_verify`` (true),
``ssl_check_hostname`` (true)
    ``rediss://`` only, the shared TLS vocabulary (:func:`multilayer.toolkit.tls_options`):
    CA bundle, client certificate and key (mutual TLS), whether to verify the server
    certificate, and whether to check its host name (never when not verifying). The
    older ``ssl_ca_certs`` (``ssl_cafile``) and ``ssl_cert_reqs`` (``none`` is
    ``ssl_verify=false``) still work.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Mapping
from typing import Any, ClassVar

import redis

from ...backend import Backend, BrokerStats, Capabilities, LayerSettings, now
from ...capacity import CapacityPolicy
from ...exceptions import ChannelFull, ConfigurationError
from ...memberships import Membership
from ...names import non_local_name
from ...options import Option
from ...toolkit import check_tls, tls_options
from ...url import LayerURL
from .receiver import Receiver
from .ring import Ring
from .scripts import GROUP_ADD, GROUP_SEND, PUSH, RESTORE, ttl_ms
from .sentry import MembershipSentry
from .shard import Shard, Watched, discard, make_shards

__all__ = ["RedisBackend"]

_SENTINEL = ("redis+sentinel",)

_OPTIONS: dict[str, Option] = {
    "socket_timeout": Option(
        float,
        5.0,
        "seconds to wait for a Redis reply; idle receives re-block every half of it",
        minimum=0.2,
    ),
    "connect_timeout": Option(float, 5.0, "seconds to wait for a connection", minimum=0.1),
    "membership_check": Option(
        float,
        10.0,
        "seconds (jittered by +-50%) between checks that Redis still holds this layer's "
        "group memberships",
        minimum=0.5,
    ),
    "service": Option(
        str,
        "mymaster",
        "redis+sentinel: master name(s), comma-separated, one shard each",
        schemes=_SENTINEL,
    ),
    "sentinel_password": Option(
        str,
        None,
        "redis+sentinel: password of the Sentinels themselves",
        secret=True,
        schemes=_SENTINEL,
    ),
    # The names this backend documented before the shared vocabulary keep working.
    **tls_options("rediss", aliases={"ssl_ca_certs": "ssl_cafile", "ssl_cert_reqs": "ssl_verify"}),
}


class RedisBackend(Backend):
    """Channels as Redis lists, groups as sorted sets, sharded over one or more servers."""

    capabilities: ClassVar[Capabilities] = Capabilities(
        multiprocess=True,
        native_expiry=True,
        native_fanout=True,
        restartable=False,
        restores_memberships=True,
        queue_depth=True,
        group_sizes=True,
    )
    extra: ClassVar[str | None] = "redis"
    options: ClassVar[Mapping[str, Option]] = _OPTIONS

    @classmethod
    def check_url(cls, url: LayerURL, options: Mapping[str, Any]) -> None:
        where = url.without_query().sanitized()
        if url.path and not url.path.isdigit():
            raise ConfigurationError(
                f"{where}: the path must be a database number like /0, not {url.path!r}"
            )
        if len(set(url.hosts)) != len(url.hosts):
            raise ConfigurationError(f"{where}: a host appears twice in the host list")
        if url.scheme == "redis+sentinel":
            if not url.hosts:
                raise ConfigurationError(f"{where}: list the Sentinels, as host:port[,host:port]")
            services = options.get("service", "mymaster").split(",")
            if not all(service.strip() for service in services):
                raise ConfigurationError(f"{where}: option 'service' has an empty master name")
            if len(set(services)) != len(services):
                raise ConfigurationError(f"{where}: option 'service' names a master twice")
        check_tls(where, options)

    @classmethod
    def versions(cls) -> dict[str, str]:
        return {"redis-py": redis.__version__}

    def __init__(self, url: LayerURL, settings: LayerSettings, options: Mapping[str, Any]) -> None:
        super().__init__(url, settings, options)
        #: Names this instance's landing and in-flight lists; unique per instance.
        self.consumer = secrets.token_hex(8)
        # Shards are named by the URL, never by a resolved address, so that every
        # process given the same URL hashes every name to the same shard.
        if url.scheme == "redis+sentinel":
            self._labels = [name.strip() for name in self.config["service"].split(",")]
        else:
            hosts = [(host, port or 6379) for host, port in url.hosts] or [("localhost", 6379)]
            self._labels = [f"{host}:{port}" for host, port in hosts]
        self._ring = Ring(self._labels)
        self._shards: list[Shard] = []
        self._receivers: dict[str, Receiver] = {}
        self._sentry = MembershipSentry(
            self, self._shards, self._shard, self.config["membership_check"]
        )
        self._guard: asyncio.Task[None] | None = None
        self._queue_prefix = f"{settings.prefix}:q:"
        self._group_prefix = f"{settings.prefix}:g:"

    async def open(self) -> None:
        self._shards += make_shards(self.url, self.config, self._labels, self._sentry.wake)
        self._guard = asyncio.create_task(self._guard_loop(), name="multilayer redis guard")
        self._sentry.start()

    async def _guard_loop(self) -> None:
        """Close the connections of overdue replies until close(), then release them all.

        asyncio.run() cancels every pending task before it closes its loop, so the
        release also runs when the loop ends without close(): no socket is left open.
        """
        loop = asyncio.get_running_loop()
        period = min(1.0, self.config["socket_timeout"] / 4)
        try:
            while True:
                await asyncio.sleep(period)
                current = loop.time()
                watched: list[Watched] = [shard.link for shard in self._shards]
                for late in (*watched, *self._receivers.values()):
                    connection = late.overdue(current)
                    if connection is not None:
                        await discard(connection)
        finally:
            for receiver in self._receivers.values():
                await receiver.drop(wait=True)
            sentinels = {}
            for shard in self._shards:
                await shard.link.close()
                if shard.sentinel is not None:
                    sentinels[id(shard.sentinel)] = shard.sentinel
            for sentinel in sentinels.values():
                for client in sentinel.sentinels:
                    await client.aclose()

    async def close(self) -> None:
        # The sentry first: it sends through the links the guard releases.
        await self._sentry.stop()
        if self._guard is not None:
            self._guard.cancel()
            await asyncio.gather(self._guard, return_exceptions=True)

    async def restore_memberships(self, entries: list[Membership]) -> None:
        """One script per group and server, run concurrently (pipelined on each link)."""
        by_key: dict[tuple[int, str], list[Any]] = {}
        current = now()
        for group, channel, deadline in entries:
            shard = self._shards.index(self._shard(non_local_name(channel)))
            by_key.setdefault((shard, group), []).extend(
                (channel, deadline, ttl_ms(deadline, current))
            )
        await asyncio.gather(
            *(
                self._shards[shard].link.call(
                    "EVALSHA", RESTORE.sha, 1, self._group_prefix + group, current, *arguments
                )
                for (shard, group), arguments in by_key.items()
            )
        )

    async def broker_version(self) -> str | None:
        info: bytes = await self._shards[0].link.call("INFO", "server")
        for line in info.decode().splitlines():
            if line.startswith("redis_version:"):
                return line.partition(":")[2]
        return None

    def _shard(self, name: str) -> Shard:
        if len(self._shards) == 1:
            return self._shards[0]
        return self._shards[self._ring.owner(name)]

    def _receiver(self, queue: str) -> Receiver:
        receiver = self._receivers.get(queue)
        if receiver is None:
            receiver = Receiver(self, self.consumer, self._shard(queue), queue)
            self._receivers[queue] = receiver
        return receiver

    async def declare_inbox(self, inbox: str) -> None:
        """Check that the inbox's shard answers: a Redis list needs no declaration, since
        a message sent to a missing list creates it and waits there."""
        await self._shard(inbox).link.call("PING")

    async def push(self, channel: str, payload: bytes, *, deadline: float, capacity: int) -> None:
        queue = non_local_name(channel)
        current = now()
        accepted = await self._shard(queue).link.call(
            "EVALSHA",
            PUSH.sha,
            1,
            self._queue_prefix + queue,
            channel[len(queue) :].encode() + b"\n" + payload,
            capacity,
            current,
            ttl_ms(deadline, current),
        )
        if not accepted:
            raise ChannelFull(f"channel {channel!r} is full ({capacity} messages waiting)")

    async def pop(self, queue: str, limit: int) -> list[tuple[str, bytes]]:
        return await self._receiver(queue).pop(limit)

    async def group_add(self, group: str, channel: str, *, deadline: float) -> None:
        current = now()
        await self._shard(non_local_name(channel)).link.call(
            "EVALSHA",
            GROUP_ADD.sha,
            1,
            self._group_prefix + group,
            channel,
            deadline,
            ttl_ms(deadline, current),
            current,
        )

    async def group_discard(self, group: str, channel: str) -> None:
        await self._shard(non_local_name(channel)).link.call(
            "ZREM", self._group_prefix + group, channel
        )

    async def group_send(
        self, group: str, payload: bytes, *, deadline: float, capacity: CapacityPolicy
    ) -> None:
        """One script per shard, run concurrently: each delivers to the members it holds.

        A membership lives on its member's shard, so each script finds there the inboxes
        of its process-specific members and seals one envelope per inbox in place.
        """
        key = self._group_prefix + group
        current = now()
        ttl = ttl_ms(deadline, current)

        async def fan_out(shard: Shard) -> list[bytes]:
            if capacity.uniform:
                targets: list[Any] = [capacity.default]
            else:
                members = await shard.link.call("ZRANGEBYSCORE", key, f"({current!r}", "+inf")
                if not members:
                    return []
                targets = [""]
                for queue in dict.fromkeys(non_local_name(member.decode()) for member in members):
                    targets += [queue, capacity.for_channel(queue)]
            full: list[bytes] = await shard.link.call(
                "EVALSHA", GROUP_SEND.sha, 1, key, current, payload, ttl,
                self._queue_prefix, group, deadline, *targets,
            )  # fmt: skip
            return full

        if len(self._shards) == 1:
            results = [await fan_out(self._shards[0])]
        else:
            results = await asyncio.gather(*(fan_out(shard) for shard in self._shards))
        # The script returns the full members only: how many it reached stays on Redis.
        self.skip_full_members(group, sum(len(full) for full in results))

    async def broker_stats(self) -> BrokerStats:
        """LLEN of every queue and ZCOUNT of live members of every group, on every shard.

        A queue's length may include expired messages its next receive will drop.
        """
        queues: dict[str, int] = {}
        groups: dict[str, int] = {}
        current = now()
        for shard in self._shards:
            for prefix, table in ((self._queue_prefix, queues), (self._group_prefix, groups)):
                async for keys in _scan(shard, prefix + "*"):
                    counts = await asyncio.gather(
                        *(
                            shard.link.call("LLEN", key)
                            if table is queues
                            else shard.link.call("ZCOUNT", key, f"({current!r}", "+inf")
                            for key in keys
                        )
                    )
                    for key, count in zip(keys, counts, strict=True):
                        name = key.decode()[len(prefix) :]
                        table[name] = table.get(name, 0) + int(count)
        return BrokerStats(
            queues={name: count for name, count in queues.items() if count},
            groups={name: count for name, count in groups.items() if count},
        )

    async def flush(self) -> None:
        """Delete every key under this prefix on every shard (SCAN, then UNLINK a page)."""
        for shard in self._shards:
            async for keys in _scan(shard, f"{self.settings.prefix}:*"):
                await shard.link.call("UNLINK", *keys)


async def _scan(shard: Shard, pattern: str) -> AsyncIterator[list[bytes]]:
    """The keys ``pattern`` matches on ``shard``, a non-empty page at a time."""
    cursor = b"0"
    while True:
        cursor, keys = await shard.link.call("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
        if keys:
            yield keys
        if cursor == b"0":
            return
