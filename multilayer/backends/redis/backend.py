"""The Redis backend class: options, URL checks, and each operation routed to its shard.

URL format::

    redis://[[user]:password@]host[:port][,host[:port]...][/db][?option=value...]
    rediss://[[user]:password@]host[:port][,host[:port]...][/db][?ssl_cafile=...]
    redis+sentinel://[[user]:password@]sentinel[:port][,sentinel[:port]...][/db][?service=NAME]
    redis+cluster://[[user]:password@]host[:port][,host[:port]...][?buckets=16]
    rediss+cluster://[[user]:password@]host[:port][,host[:port]...][?ssl_cafile=...]

``redis://`` and ``rediss://`` default to ``localhost:6379``; several hosts are several
shards (not replicas), and every process must list the same hosts, spelt the same way.
``redis+sentinel://`` lists the Sentinel processes (port 26379 by default); ``service``
names the monitored master, or several masters separated by commas, one shard each. The
URL's credentials and ``/db`` apply to the Redis servers, not to the Sentinels.
``redis+cluster://`` lists seed nodes of one Redis Cluster (the topology is asked of
them), and has no database; :mod:`.cluster` places the keys.

Options (besides the core ones):

``socket_timeout`` (5.0, redis-py's default)
    seconds to wait for a reply before a connection counts as lost; an idle receive
    re-blocks every half of it, so it waits forever without an error.
``connect_timeout`` (5.0)
    seconds to wait for a TCP (and TLS) connection.
``membership_check`` (10.0)
    seconds (jittered) between checks that each server still holds this layer's groups.
``buckets`` (16)
    ``redis+cluster://`` only: how many hash slots the layer's keys are spread over; the
    same in every process.
``service`` (``mymaster``), ``sentinel_password``
    ``redis+sentinel://`` only: the master name(s), and the Sentinels' own password.
``ssl_cafile``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_verify`` (true),
``ssl_check_hostname`` (true)
    ``rediss://`` and ``rediss+cluster://`` only, the shared TLS vocabulary
    (:func:`multilayer.toolkit.tls_options`):
    CA bundle, client certificate and key (mutual TLS), whether to verify the server
    certificate, and whether to check its host name (never when not verifying). The
    older ``ssl_ca_certs`` (``ssl_cafile``) and ``ssl_cert_reqs`` (``none`` is
    ``ssl_verify=false``) still work.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import zlib
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from functools import partial
from typing import Any, ClassVar

import redis
from redis.crc import key_slot
from redis.exceptions import ResponseError, TryAgainError

from ...backend import Backend, BrokerStats, Capabilities, LayerSettings, now
from ...capacity import CapacityPolicy
from ...exceptions import BrokerError, ChannelFull, ConfigurationError
from ...memberships import Membership
from ...names import non_local_name
from ...options import Option
from ...toolkit import check_tls, tls_options
from ...url import LayerURL
from .cluster import Bucket, Cluster, bucket_tags, failover
from .receiver import Receiver
from .ring import Ring
from .scripts import GROUP_ADD, GROUP_SEND, GROUP_SEND_NODE, PUSH, RESTORE, ttl_ms
from .sentry import MembershipSentry
from .shard import Place, Shard, Watched, make_shards
from .wire import discard

__all__ = ["RedisBackend"]

logger = logging.getLogger(__name__)

#: Sends and group sends that may await Redis's answer at once before the next one
#: waits for it.
_MAX_UNANSWERED = 1000
#: Seconds for which sends and group sends wait for Redis's answer after one failed
#: unanswered.
_DISTRUST = 5.0
#: Most places a push asks Redis to reserve for the next pushes to its queue, and for how
#: many milliseconds (used for half of that, counted from before asking, so that a place
#: cannot end while its push travels).
_RESERVE = 256
_RESERVE_MS = 200

_SENTINEL = ("redis+sentinel",)
_CLUSTER = ("redis+cluster", "rediss+cluster")

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
    "buckets": Option(
        int,
        16,
        "redis+cluster: hash slots the layer's keys are spread over (the same in every "
        "process); group_send runs one script per bucket",
        minimum=1,
        check=lambda value: None if value <= 1024 else "at most 1024",
        schemes=_CLUSTER,
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
    **tls_options(
        "rediss",
        "rediss+cluster",
        aliases={"ssl_ca_certs": "ssl_cafile", "ssl_cert_reqs": "ssl_verify"},
    ),
}


class RedisBackend(Backend):
    """Channels as Redis lists, groups as sorted sets, sharded over one or more servers
    or the slots of a Redis Cluster."""

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
    pops_on_arm: ClassVar[bool] = True
    options: ClassVar[Mapping[str, Option]] = _OPTIONS

    @classmethod
    def check_url(cls, url: LayerURL, options: Mapping[str, Any]) -> None:
        where = url.without_query().sanitized()
        if url.scheme in _CLUSTER and url.path not in ("", "0"):
            raise ConfigurationError(f"{where}: a Redis Cluster has only database 0")
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
        self._shards: list[Shard] = []
        self._receivers: dict[str, Receiver] = {}
        self._cluster: Cluster | None = None
        self._buckets: list[Bucket] = []
        self._labels: list[str] = []
        #: Where queues live: the shards, or a cluster's buckets (see :class:`.shard.Place`).
        self._places: list[Place] = []
        self._sentry = MembershipSentry(
            self, self._places, self._place, self.config["membership_check"]
        )
        if url.scheme in _CLUSTER:
            # The prefix cannot hold a brace (the core allows none), so the first brace
            # of every key opens its hash tag.
            self._cluster = Cluster(url, self.config, self._sentry.wake)
            self._buckets = [
                Bucket(self._cluster, tag) for tag in bucket_tags(self.config["buckets"])
            ]
            self._places += self._buckets
        # Shards are named by the URL, never by a resolved address, so that every
        # process given the same URL hashes every name to the same shard.
        elif url.scheme == "redis+sentinel":
            self._labels = [name.strip() for name in self.config["service"].split(",")]
        else:
            hosts = [(host, port or 6379) for host, port in url.hosts] or [("localhost", 6379)]
            self._labels = [f"{host}:{port}" for host, port in hosts]
        self._ring = Ring(self._labels)
        self._guard: asyncio.Task[None] | None = None
        self._queue_prefix = f"{settings.prefix}:q:"
        self._group_prefix = f"{settings.prefix}:g:"
        self._unanswered = _Unanswered()
        #: Whether a pop took messages since the last push to an inbox (see _push_to_inbox).
        self._received = False
        self._reserved = _Reserved()

    async def open(self) -> None:
        if self._cluster is not None:
            await self._cluster.open([bucket.slot for bucket in self._buckets])
        else:
            self._shards += make_shards(self.url, self.config, self._labels, self._sentry.wake)
            self._places += self._shards
        self._guard = asyncio.create_task(self._guard_loop(), name="multilayer redis guard")
        self._sentry.start()

    def _servers(self) -> list[Shard]:
        """Every server this instance has a link to (a cluster's masters of old too)."""
        return self._shards if self._cluster is None else self._cluster.known()

    async def _masters(self) -> list[Shard]:
        """Every server holding keys: the shards, or every master of the cluster."""
        return self._shards if self._cluster is None else await self._cluster.masters()

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
                self._reserved.prune()
                current = loop.time()
                watched: list[Watched] = [shard.link for shard in self._servers()]
                for late in (*watched, *self._receivers.values()):
                    connection = late.overdue(current)
                    if connection is not None:
                        await discard(connection)
        finally:
            for receiver in self._receivers.values():
                await receiver.drop(wait=True)
            sentinels = {}
            for shard in self._servers():
                await shard.link.close()
                if shard.sentinel is not None:
                    sentinels[id(shard.sentinel)] = shard.sentinel
            for sentinel in sentinels.values():
                for client in sentinel.sentinels:
                    await client.aclose()
            if self._cluster is not None:
                await self._cluster.close()

    async def close(self) -> None:
        # Group sends that returned are written before the links go.
        await self._unanswered.drain(self.config["socket_timeout"])
        # The sentry first: it sends through the links the guard releases.
        await self._sentry.stop()
        if self._guard is not None:
            self._guard.cancel()
            await asyncio.gather(self._guard, return_exceptions=True)

    async def restore_memberships(self, entries: list[Membership]) -> None:
        """One script per group and place, run concurrently (pipelined on each link)."""
        by_key: dict[tuple[int, str], list[Any]] = {}
        current = now()
        for group, channel, deadline in entries:
            place = self._places.index(self._place(non_local_name(channel)))
            by_key.setdefault((place, group), []).extend(
                (channel, deadline, ttl_ms(deadline, current))
            )
        await asyncio.gather(
            *(
                self._places[place].call(
                    "EVALSHA",
                    RESTORE.sha,
                    1,
                    self._group_key(self._places[place], group),
                    current,
                    *arguments,
                )
                for (place, group), arguments in by_key.items()
            )
        )

    async def broker_version(self) -> str | None:
        info: bytes = await self._places[0].call("INFO", "server")
        for line in info.decode().splitlines():
            if line.startswith("redis_version:"):
                return line.partition(":")[2]
        return None

    def _place(self, name: str) -> Place:
        """Where the queue ``name`` (and the memberships of its channels) lives."""
        if len(self._places) == 1:
            return self._places[0]
        if self._cluster is not None:
            return self._places[zlib.crc32(name.encode()) % len(self._places)]
        return self._places[self._ring.owner(name)]

    def _group_key(self, place: Place, group: str) -> str:
        return self._group_prefix + place.tag + group

    def _receiver(self, queue: str) -> Receiver:
        receiver = self._receivers.get(queue)
        if receiver is None:
            receiver = Receiver(self, self.consumer, self._place(queue), queue)
            self._receivers[queue] = receiver
        return receiver

    async def declare_inbox(self, inbox: str) -> None:
        """Check that the inbox's shard answers: a Redis list needs no declaration, since
        a message sent to a missing list creates it and waits there."""
        await self._place(inbox).call("PING")

    async def push(self, channel: str, payload: bytes, *, deadline: float, capacity: int) -> None:
        """The push script (:data:`.scripts.PUSH`). To a process inbox, its answer
        reserves places for this instance's next pushes there, which then return once
        written (see :class:`_Reserved`). A push to a normal channel, or on a cluster,
        awaits its answer."""
        if self._unanswered.holds_back:
            await self._unanswered.settled()
        queue = non_local_name(channel)
        current = now()
        place = self._place(queue)
        command = (
            "EVALSHA",
            PUSH.sha,
            1,
            self._queue_prefix + place.tag + queue,
            channel[len(queue) :].encode() + b"\n" + payload,
            capacity,
            current,
            ttl_ms(deadline, current),
            self.consumer,
        )
        if self._cluster is not None or queue == channel:
            accepted = await place.call(*command, 0, 0)
        else:
            accepted = await self._push_to_inbox(channel, queue, place, command)
            if accepted is None:
                return
        if not accepted:
            raise ChannelFull(f"channel {channel!r} is full ({capacity} messages waiting)")

    async def _push_to_inbox(
        self, channel: str, queue: str, place: Place, command: tuple[Any, ...]
    ) -> Any:
        """:meth:`push` to a process inbox: with a place reserved before, written and
        returned at once (None) while Redis's answer is trusted; otherwise awaited, and
        asking for places if none is asked already. A push made after a pop took
        messages neither uses nor asks for places, and gives up those held there."""
        reserved = self._reserved
        # Most likely a reply, whose sender waits next for what it causes: returning early
        # gains nothing then, and the work it leaves for the loop delays Redis (measured:
        # docs/backends/redis.md, "A send made after the layer received").
        reply, self._received = self._received, False
        while (asking := reserved.asking(queue)) is not None:
            # Its answer decides whether this push has a place.
            await asyncio.wait((asking,))
        if reply or not self._unanswered.admits():
            # The script gives up this instance's places in the inbox as well.
            reserved.drop(queue)
            return await place.call(*command, 0, 0)
        if reserved.take(queue):
            link = place.shard().link
            used = (*command, -1, 0)
            future = link.write_now(used)
            if future is not None and link.sent_all():
                self._unanswered.track_push(channel, future)
                return None
            # Not written at once, or not sent yet: awaited, using its place all the same.
            return await (future or link.enqueue([used])[0])
        asked = time.monotonic()
        reserved.ask(queue)
        granted = 0
        try:
            accepted = await place.call(*command, _RESERVE, _RESERVE_MS)
            granted = accepted - 1
        finally:
            reserved.answered(queue, granted, asked)
        return accepted

    async def pop(self, queue: str, limit: int) -> list[tuple[str, bytes]]:
        taken = await self._receiver(queue).pop(limit)
        if taken:
            self._received = True
        return taken

    def arm(self, queue: str, limit: int) -> None:
        self._receiver(queue).arm(limit)

    async def group_add(self, group: str, channel: str, *, deadline: float) -> None:
        await self._unanswered.settled()
        current = now()
        place = self._place(non_local_name(channel))
        await place.call(
            "EVALSHA",
            GROUP_ADD.sha,
            1,
            self._group_key(place, group),
            channel,
            deadline,
            ttl_ms(deadline, current),
            current,
        )

    async def group_discard(self, group: str, channel: str) -> None:
        await self._unanswered.settled()
        place = self._place(non_local_name(channel))
        await place.call("ZREM", self._group_key(place, group), channel)

    async def group_send(
        self, group: str, payload: bytes, *, deadline: float, capacity: CapacityPolicy
    ) -> None:
        """One script per place, run concurrently: each delivers to the members it holds.

        A membership lives in its member's place, so each script finds there the inboxes
        of its process-specific members and seals one envelope per inbox in place. The
        scripts bound for one server share its link, so they go out in one write. On a
        cluster, with a uniform capacity, one script per master serves all its buckets.
        With a uniform capacity, the call may return once its scripts are written (see
        :class:`_Unanswered`).
        """
        current = now()
        ttl = ttl_ms(deadline, current)
        cluster = self._cluster
        if not capacity.uniform:
            await self._group_send_per_place(group, payload, current, ttl, deadline, capacity)
            return
        common = (current, payload, ttl)
        if cluster is None:
            links = [shard.link for shard in self._shards]
            commands: list[tuple[Any, ...]] = [
                ("EVALSHA", GROUP_SEND.sha, 1, self._group_key(shard, group), *common,
                 self._queue_prefix, group, deadline, capacity.default)
                for shard in self._shards
            ]  # fmt: skip
            answer = partial(self._count_full, group)
        elif cluster.cross_slot and deadline > current:
            while self._unanswered.stale(cluster.epoch):
                await self._unanswered.settled()
            by_shard: dict[Shard, list[Bucket]] = {}
            for bucket in self._buckets:
                by_shard.setdefault(bucket.shard(), []).append(bucket)
            links = [shard.link for shard in by_shard]
            commands = []
            for buckets in by_shard.values():
                keys: list[str] = []
                for bucket in buckets:
                    keys += (self._group_key(bucket, group), self._queue_prefix + bucket.tag)
                commands.append(("EVALSHA", GROUP_SEND_NODE.sha, 0, *common, group, deadline,
                                 capacity.default, *keys))  # fmt: skip
            answer = partial(self._answer_by_node, group, list(by_shard.values()), common,
                             deadline, capacity, self._unanswered.latest())  # fmt: skip
        else:
            await self._group_send_per_place(group, payload, current, ttl, deadline, capacity)
            return
        admitted = self._unanswered.admits()
        written = [
            link.write_now(command) if admitted else None
            for link, command in zip(links, commands, strict=True)
        ]
        ready = [future for future in written if future is not None]
        # Bytes that have not left this host yet (a large message, a server slow to read)
        # could be lost if the event loop ended next: then the answer is awaited instead.
        if len(ready) == len(written) and all(link.sent_all() for link in links):
            epoch = None if cluster is None else cluster.epoch
            self._unanswered.track(group, answer(ready), epoch=epoch)
            return
        waiting = [
            future or link.enqueue([command])[0]
            for future, link, command in zip(written, links, commands, strict=True)
        ]
        try:
            await answer(waiting)
        finally:
            for future in waiting:
                future.cancel()

    async def _count_full(self, group: str, waiting: list[asyncio.Future[Any]]) -> None:
        """Await the scripts of :meth:`group_send`; count the full members they return
        (how many they reached stays on Redis)."""
        results: list[list[bytes]] = [await future for future in waiting]
        self.skip_full_members(group, sum(len(full) for full in results))

    async def _group_send_per_place(
        self,
        group: str,
        payload: bytes,
        current: float,
        ttl: int,
        deadline: float,
        capacity: CapacityPolicy,
    ) -> None:
        """:meth:`group_send` as one script per place, awaited: with the capacity of each
        member's queue computed here (the members are read first), or with a uniform
        capacity on a cluster that runs no script per master."""
        await self._unanswered.settled()
        places = self._places
        targets: list[list[Any]] = [[capacity.default]] * len(places)
        if not capacity.uniform:
            live = (f"({current!r}", "+inf")
            asks = [(place, ("ZRANGEBYSCORE", self._group_key(place, group), *live))
                    for place in places]  # fmt: skip
            targets, places = [], []
            for (place, _), members in zip(asks, await self._each(asks), strict=True):
                if members:
                    queues = dict.fromkeys(non_local_name(member.decode()) for member in members)
                    targets.append([""])
                    for queue in queues:
                        targets[-1] += [queue, capacity.for_channel(queue)]
                    places.append(place)
        skipped = await self._script_per_place(
            group, places, targets, current, payload, ttl, deadline
        )
        self.skip_full_members(group, skipped)

    async def _script_per_place(
        self,
        group: str,
        places: Sequence[Place],
        targets: list[list[Any]],
        current: float,
        payload: bytes,
        ttl: int,
        deadline: float,
    ) -> int:
        """Run the group_send script at each of ``places``, for the capacity (or member
        queues and their capacities) ``targets`` gives it; how many members were full."""
        sends = [
            (place, ("EVALSHA", GROUP_SEND.sha, 1, self._group_key(place, group), current,
                     payload, ttl, self._queue_prefix + place.tag, group, deadline, *extra))
            for place, extra in zip(places, targets, strict=True)
        ]  # fmt: skip
        results: list[list[bytes]] = await self._each(sends)
        # The script returns the full members only: how many it reached stays on Redis.
        return sum(len(full) for full in results)

    async def _answer_by_node(
        self,
        group: str,
        shards: list[list[Bucket]],
        common: tuple[float, bytes, int],
        deadline: float,
        capacity: CapacityPolicy,
        before: asyncio.Task[None] | None,
        waiting: list[asyncio.Future[Any]],
    ) -> None:
        """Await a cluster's group_send scripts, one per master for all the buckets it
        holds (:data:`.scripts.GROUP_SEND_NODE`); the buckets of a master whose script
        found a key elsewhere (it then wrote nothing) get one script each, which follows
        redirects. ``before``, the group send tracked before this one, ends first: its
        copies sent again go out before this one's."""
        cluster = self._cluster
        assert cluster is not None
        skipped = 0
        again: list[Bucket] = []
        failed: BrokerError | None = None
        for buckets, future in zip(shards, waiting, strict=True):
            try:
                skipped += len(await future)
            except BrokerError as error:
                cause = error.__cause__
                if isinstance(cause, TryAgainError):
                    # A key was elsewhere, and nothing was written.
                    cluster.refresh()
                    again += buckets
                elif _unflagged(cause):
                    # Refused before it ran: a server without script flags (6.2).
                    logger.info("Redis Cluster: one script per bucket from now: %s", cause)
                    cluster.cross_slot = False
                    again += buckets
                else:
                    # Lost, a master changing, or a failure: the script may have run.
                    if cause is not None and failover(cause):
                        cluster.refresh()
                    failed = failed or error
        if before is not None:
            await asyncio.wait([before])
        if failed is not None:
            raise failed
        if again:
            current, payload, ttl = common
            targets = [[capacity.default]] * len(again)
            skipped += await self._script_per_place(
                group, again, targets, current, payload, ttl, deadline
            )
        self.skip_full_members(group, skipped)

    async def _each(self, calls: list[tuple[Place, tuple[Any, ...]]]) -> list[Any]:
        """Run each command at its place, concurrently: on a cluster, the commands for one
        node in one write (:meth:`.cluster.Cluster.call_each`)."""
        if len(calls) == 1:
            place, command = calls[0]
            return [await place.call(*command)]
        if self._cluster is not None:
            return await self._cluster.call_each(calls)
        return list(await asyncio.gather(*(place.call(*command) for place, command in calls)))

    async def broker_stats(self) -> BrokerStats:
        """LLEN of every queue and ZCOUNT of live members of every group, on every master.

        A queue's length may include expired messages its next receive will drop.
        """
        queues: dict[str, int] = {}
        groups: dict[str, int] = {}
        current = now()
        for shard in await self._masters():
            for prefix, table, kind in (
                (self._queue_prefix, queues, "list"),
                (self._group_prefix, groups, "zset"),
            ):
                # Of a queue's keys, its list only: not the places reserved in it.
                async for keys in _scan(shard, prefix + "*", kind):
                    counts = await asyncio.gather(
                        *(
                            shard.link.call("LLEN", key)
                            if table is queues
                            else shard.link.call("ZCOUNT", key, f"({current!r}", "+inf")
                            for key in keys
                        )
                    )
                    for key, count in zip(keys, counts, strict=True):
                        # Past a cluster's hash tag: channel names have no braces.
                        name = key.decode()[len(prefix) :].rpartition("}")[2]
                        table[name] = table.get(name, 0) + int(count)
        return BrokerStats(
            queues={name: count for name, count in queues.items() if count},
            groups={name: count for name, count in groups.items() if count},
        )

    async def flush(self) -> None:
        """Delete every key under this prefix on every master (SCAN, then UNLINK a page;
        on a cluster, one UNLINK per slot of the page, since a command spans one slot).
        The places reserved for this instance go with them: its next send asks again."""
        await self._unanswered.settled()
        self._reserved.forget()
        for shard in await self._masters():
            async for keys in _scan(shard, f"{self.settings.prefix}:*"):
                if self._cluster is None:
                    await shard.link.call("UNLINK", *keys)
                    continue
                slots: dict[int, list[bytes]] = {}
                for key in keys:
                    slots.setdefault(key_slot(key), []).append(key)
                await asyncio.gather(*(shard.link.call("UNLINK", *page) for page in slots.values()))


class _Reserved:
    """The places in process inboxes that Redis reserved for one backend instance.

    A push's answer reserves places (:data:`.scripts.PUSH`): for ``_RESERVE_MS``, from the
    instance's second push there within that time on, all senders' places together at
    most half the free room, counted as taken for every other sender meanwhile. While this
    instance holds one in an inbox, used for half of that time at most, its next push
    there cannot be refused for capacity, so :meth:`RedisBackend.push` returns once the
    push is written and sent, as a group send does (see :class:`_Unanswered`).

    The server's places and these stay the same: only a push that asks replaces them,
    it asks only once these are used up or old, and the instance's other pushes to that
    inbox wait for its answer. So a single sender's ChannelFull stays exact; another
    sender may see an inbox as full for up to ``_RESERVE_MS`` once messages fill at
    least half of it, places reserved and not used the rest.
    """

    def __init__(self) -> None:
        #: Places by inbox: how many are left, and until when (monotonic) to use them.
        self._places: dict[str, list[float]] = {}
        #: The inboxes a push asks for places in now, and the end of its wait.
        self._asking: dict[str, asyncio.Future[None]] = {}

    def asking(self, queue: str) -> asyncio.Future[None] | None:
        """Set when the push asking for places in ``queue`` has its answer; None if none
        asks."""
        return self._asking.get(queue)

    def take(self, queue: str) -> bool:
        """Whether a place is reserved in ``queue``; it is then used."""
        places = self._places.get(queue)
        if places is None:
            return False
        if places[1] <= time.monotonic():
            del self._places[queue]
            return False
        places[0] -= 1
        if not places[0]:
            del self._places[queue]
        return True

    def ask(self, queue: str) -> None:
        """A push asks for places in ``queue``: the instance's others wait for it."""
        self._asking[queue] = asyncio.get_running_loop().create_future()

    def answered(self, queue: str, count: int, asked: float) -> None:
        """The push that asked at ``asked`` (monotonic) got ``count`` places in ``queue``
        (0: none, or no answer), which replace those held before."""
        if count > 0:
            self._places[queue] = [count, asked + _RESERVE_MS / 2000]
        else:
            self.drop(queue)
        self._asking.pop(queue).set_result(None)

    def drop(self, queue: str) -> None:
        """Forget the places held in ``queue``: a push of this instance that neither uses
        nor asks for one gives them up on Redis."""
        self._places.pop(queue, None)

    def forget(self) -> None:
        """Forget every place held (a flush deleted them on Redis)."""
        self._places.clear()

    def prune(self) -> None:
        """Forget the places that may no longer be used (the inboxes not sent to since)."""
        current = time.monotonic()
        for queue in [queue for queue, (_, until) in self._places.items() if until <= current]:
            del self._places[queue]


class _Unanswered:
    """The sends and group sends of one backend instance that returned before Redis
    answered.

    A group send never raises ChannelFull, and a send that uses a reserved place cannot
    be refused (:class:`_Reserved`), so their callers need Redis's answer only for a
    failure. While none failed lately and fewer than ``_MAX_UNANSWERED`` wait, they
    return once their link wrote their command at once (:meth:`.shard.Link.write_now`),
    in this instance's order of commands on that link, and the socket sent every byte. A
    failure is then logged (the message or copies may be lost, as at-most-once allows),
    and for the next ``_DISTRUST`` seconds sends and group sends wait for Redis and
    raise.

    On a cluster, a script that found a bucket elsewhere (a slot moving, or a master
    mistaken) is sent again per bucket after the call returned. So that nothing
    overtakes those copies:

    * the group sends there are *chained*: each one's copies sent again go out after
      those of the one before;
    * a group send is written behind unanswered ones only while the layer's map of slot
      owners is the one they were written with (:meth:`stale`): its scripts then go to
      the same masters, which refuse them too if they refused an earlier one, since a
      key leaves a master for good once its slot starts moving;
    * every other command of the instance waits until the chained ones are answered
      (:attr:`holds_back`, :meth:`settled`).
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        #: The replies of unanswered sends (a callback each, cheaper than a task).
        self._pushes: set[asyncio.Future[Any]] = set()
        self._distrust_until = 0.0
        #: The latest chained group send, while it is unanswered.
        self._latest: asyncio.Task[None] | None = None
        #: Unanswered chained group sends: other commands wait for them.
        self._chained = 0
        #: The cluster's :attr:`~.cluster.Cluster.epoch` they were written in.
        self._epoch = 0

    @property
    def holds_back(self) -> bool:
        """Whether other commands must wait (:meth:`settled`) before they are written."""
        return self._chained > 0

    def admits(self) -> bool:
        """Whether a send or group send may return before Redis answers it."""
        return (
            len(self._tasks) + len(self._pushes) < _MAX_UNANSWERED
            and time.monotonic() >= self._distrust_until
        )

    def latest(self) -> asyncio.Task[None] | None:
        """The chained group send a new one comes after, if it is still unanswered."""
        return self._latest

    def stale(self, epoch: int) -> bool:
        """Whether chained group sends wait that were written with another map of slot
        owners than the cluster's ``epoch``."""
        return self._chained > 0 and self._epoch != epoch

    def track(self, group: str, answer: Coroutine[Any, Any, None], *, epoch: int | None) -> None:
        """Await ``answer`` (the group send's replies) from now on, in a task of its own;
        on a cluster, chained, written in its ``epoch`` (see above)."""
        task = asyncio.ensure_future(self._await(group, answer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if epoch is not None:
            self._latest = task
            self._chained += 1
            self._epoch = epoch
            task.add_done_callback(self._unchain)

    def track_push(self, channel: str, reply: asyncio.Future[Any]) -> None:
        """Check from now on the ``reply`` of a send to ``channel`` that used a reserved
        place: 1, unless the place was gone (0: the queue was full)."""
        self._pushes.add(reply)
        reply.add_done_callback(partial(self._pushed, channel))

    def _pushed(self, channel: str, reply: asyncio.Future[Any]) -> None:
        self._pushes.discard(reply)
        # Cancelled: the link closed, with its instance or its event loop.
        if reply.cancelled():
            return
        error = reply.exception()
        if error is None and reply.result():
            return
        self._distrust_until = time.monotonic() + _DISTRUST
        logger.warning(
            "send to %r may be lost after it returned: %s",
            channel,
            error or "the queue was full, its reserved place gone (flushed?)",
        )

    def _unchain(self, task: asyncio.Task[None]) -> None:
        self._chained -= 1
        if self._latest is task:
            self._latest = None

    async def settled(self) -> None:
        """Wait until the chained group sends unanswered now are answered."""
        if self._chained:
            pending = [task for task in self._tasks if not task.done()]
            if pending:
                await asyncio.wait(pending)
            else:
                # Done, but not unchained yet: their callbacks run next.
                await asyncio.sleep(0)

    async def _await(self, group: str, answer: Coroutine[Any, Any, None]) -> None:
        try:
            await answer
        except BrokerError as error:
            self._distrust_until = time.monotonic() + _DISTRUST
            logger.warning("group_send to %r may be lost after it returned: %s", group, error)

    async def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the answers still due."""
        if self._tasks or self._pushes:
            await asyncio.wait({*self._tasks, *self._pushes}, timeout=timeout)


def _unflagged(error: BaseException | None) -> bool:
    """Whether ``error`` is a server's refusal of a script with flags (before Redis 7.0
    ``#!lua`` does not compile)."""
    text = str(error)
    return isinstance(error, ResponseError) and ("shebang" in text or "compiling" in text)


async def _scan(shard: Shard, pattern: str, kind: str = "") -> AsyncIterator[list[bytes]]:
    """The keys ``pattern`` matches on ``shard`` (those of type ``kind`` only, if given),
    a non-empty page at a time."""
    cursor = b"0"
    only = ("TYPE", kind) if kind else ()
    while True:
        cursor, keys = await shard.link.call("SCAN", cursor, "MATCH", pattern, "COUNT", 1000, *only)
        if keys:
            yield keys
        if cursor == b"0":
            return
