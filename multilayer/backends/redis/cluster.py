"""Redis Cluster: where each queue's keys live, and how a command follows its slot.

A cluster only runs a script whose keys all hash to one slot. So every key of the layer
carries a hash tag naming one of ``buckets`` fixed slots (16 by default): a queue goes to
the bucket its name (up to ``!``) hashes to, with its receivers' in-flight and landing
lists, and a group keeps one sorted set per bucket holding the members whose queues are
there. A ``group_send`` thus runs one script per master for all the buckets it holds
(flagged to reach several slots of its node; one script per bucket, in one pipelined
write per node, when a key is elsewhere or the server predates script flags): one round
trip per node, whatever the member count. The
buckets' slots are spread evenly over the 16,384, so a cluster whose slots are split
evenly holds an even share of them on each master.

:class:`Cluster` learns the topology through redis-py's asyncio ``RedisCluster`` (the
URL's hosts are only seeds) and keeps one :class:`~.shard.Shard` per master, whose
pipelined link carries every command for its slots. A ``MOVED`` reply (the command did not
run) updates the slot's owner and the command is sent there; ``ASK`` (a slot being
migrated) sends it once to the importing node behind ``ASKING``; ``TRYAGAIN`` waits a
little and tries again. A lost connection, ``CLUSTERDOWN`` or ``READONLY`` (a failover)
refreshes the topology in the background and raises: the command may have run.
"""

from __future__ import annotations

import asyncio
import binascii
import functools
import itertools
import logging
import string
from collections.abc import Callable, Mapping
from typing import Any

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import ConnectionPool
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)

from ...exceptions import BrokerError
from ...url import LayerURL
from .shard import TRANSIENT, Place, Shard, connection_options

__all__ = ["SLOTS", "Bucket", "Cluster", "bucket_tags", "failover"]

logger = logging.getLogger(__name__)

#: Hash slots of a Redis Cluster.
SLOTS = 16384
#: Redirects one command follows before its error is raised; a slot moves once per
#: migration, so more would mean the cluster's nodes disagree.
_REDIRECTS = 5
#: Seconds between two topology refreshes, at least: every failing command asks for one.
_REFRESH_EVERY = 0.5


def _slot(tag: str) -> int:
    return binascii.crc_hqx(tag.encode(), 0) % SLOTS


@functools.cache
def _shortest_tags() -> dict[int, str]:
    """The shortest tag (of up to three letters or digits) of each slot that has one."""
    found: dict[int, str] = {}
    alphabet = string.digits + string.ascii_lowercase
    for size in (1, 2, 3):
        for letters in itertools.product(alphabet, repeat=size):
            tag = "".join(letters)
            found.setdefault(_slot(tag), tag)
    return found


@functools.cache
def bucket_tags(buckets: int) -> tuple[str, ...]:
    """The hash tag of each bucket: the shortest string whose slot is nearest to the middle
    of the bucket's 1/``buckets`` of the slot range, so the buckets spread evenly."""
    found = _shortest_tags()
    tags = []
    for bucket in range(buckets):
        middle = (2 * bucket + 1) * SLOTS // (2 * buckets)
        # Outwards from the middle: 46,656 tags cover about 94% of the slots.
        nearest = next(
            slot
            for distance in range(SLOTS)
            for slot in (middle - distance, middle + distance)
            if slot in found
        )
        tags.append(found[nearest])
    return tuple(tags)


def failover(error: BaseException) -> bool:
    """Whether ``error`` says the slot's master is changing: lost, down, or demoted."""
    if isinstance(error, (*TRANSIENT, ClusterDownError, ReadOnlyError)):
        return True
    # A blocked receive on a master that became a replica is ended with UNBLOCKED.
    return isinstance(error, ResponseError) and str(error).startswith("UNBLOCKED")


class Cluster:
    """The masters of one Redis Cluster, as this backend instance reaches them."""

    def __init__(
        self,
        url: LayerURL,
        config: Mapping[str, Any],
        on_change: Callable[[Shard], None],
    ) -> None:
        self._options = connection_options(url, config)
        self._timeout = config["socket_timeout"]
        self._connect_timeout = config["connect_timeout"]
        #: The backend's own callback (the membership check), told after a refresh is asked.
        self._told = on_change
        discovery = {
            key: value
            for key, value in self._options.items()
            if key not in {"db", "retry", "connection_class", "socket_timeout"}
        }
        # Only asked for the topology (CLUSTER SLOTS); every command goes through the
        # shards' links, whose retries are ours to decide.
        self._client = RedisCluster(
            startup_nodes=[
                ClusterNode(host, port or 6379) for host, port in url.hosts or [("localhost", 6379)]
            ],
            require_full_coverage=False,
            ssl=url.scheme == "rediss+cluster",
            socket_timeout=self._timeout,
            **discovery,
        )
        #: The master of each slot this layer uses, as last learned.
        self._owners: dict[int, tuple[str, int]] = {}
        #: How many times a slot's master changed in :attr:`_owners`.
        self.epoch = 0
        self._shards: dict[tuple[str, int], Shard] = {}
        self._refreshing: asyncio.Task[None] | None = None
        #: Loop time of the last refresh's end.
        self._refreshed_at = -_REFRESH_EVERY
        self._closed = False
        #: Whether a group_send may run one script per master for all its buckets (script
        #: flags, Redis 7.0); cleared when a master refuses that script.
        self.cross_slot = True

    async def open(self, slots: list[int]) -> None:
        """Learn the topology, for the ``slots`` this layer uses."""
        self._owners = dict.fromkeys(slots, ("", 0))
        try:
            await self._client.initialize()
        except (RedisError, RedisClusterException) as error:
            # redis-py says so with an error outside its RedisError tree.
            await self._client.aclose()
            raise BrokerError(f"Redis Cluster: no seed node answered: {error}") from error
        self._learn()

    def _learn(self) -> None:
        cache = self._client.nodes_manager.slots_cache
        for slot in self._owners:
            nodes = cache.get(slot)
            if nodes:
                self._own(slot, (nodes[0].host, int(nodes[0].port)))

    def _own(self, slot: int, address: tuple[str, int]) -> None:
        if self._owners[slot] != address:
            self._owners[slot] = address
            self.epoch += 1

    async def masters(self) -> list[Shard]:
        """A shard for every master of the cluster, asked of it now (a MOVED reply teaches
        one slot's owner, not the others')."""
        try:
            await self._client.nodes_manager.initialize()
        except (RedisError, RedisClusterException) as error:
            raise BrokerError(f"Redis Cluster: no node answered: {error}") from error
        self._learn()
        return [self.at((node.host, int(node.port))) for node in self._client.get_primaries()]

    def known(self) -> list[Shard]:
        """Every shard made so far, masters of old included (released on close)."""
        return list(self._shards.values())

    def at(self, address: tuple[str, int]) -> Shard:
        """The shard of the node at ``address``, made on first use."""
        shard = self._shards.get(address)
        if shard is None:
            host, port = address
            pool = ConnectionPool(host=host, port=port, **self._options)
            shard = Shard(
                f"{host}:{port}", pool, None, self._timeout, self._connect_timeout, self._changed
            )
            self._shards[address] = shard
        return shard

    def _changed(self, shard: Shard) -> None:
        # A connection lost may be a master gone: ask who holds its slots now.
        if shard.lost:
            self.refresh()
        self._told(shard)

    def owner(self, slot: int) -> tuple[str, int]:
        """The address of the master of ``slot``, as last learned."""
        return self._owners[slot]

    async def call(self, slot: int, *command: Any) -> Any:
        """Run ``command`` on the master of ``slot``, following MOVED, ASK and TRYAGAIN."""
        ask: tuple[str, int] | None = None
        attempt = 0
        while True:
            shard = self.at(ask or self._owners[slot])
            try:
                return await shard.link.call(*(("ASKING",) if ask else ()), *command)
            except BrokerError as error:
                cause = error.__cause__
                attempt += 1
                ask = None
                if attempt > _REDIRECTS:
                    raise
                if isinstance(cause, MovedError):
                    self._own(slot, (str(cause.host), int(cause.port)))
                    self.refresh()
                elif isinstance(cause, AskError):
                    ask = (str(cause.host), int(cause.port))
                elif isinstance(cause, TryAgainError):
                    # Keys of one script split between the two nodes of a migration.
                    await asyncio.sleep(0.05 * attempt)
                else:
                    if cause is not None and failover(cause):
                        self.refresh()
                    raise

    async def call_each(self, calls: list[tuple[Place, tuple[Any, ...]]]) -> list[Any]:
        """Run each command at its place: those for one master in one write, the masters
        concurrently. A command redirected is sent again where its place went."""
        by_shard: dict[Shard, list[int]] = {}
        for index, (place, _) in enumerate(calls):
            by_shard.setdefault(place.shard(), []).append(index)
        waiting: list[tuple[int, asyncio.Future[Any]]] = []
        for shard, indexes in by_shard.items():
            futures = shard.link.enqueue([calls[index][1] for index in indexes])
            waiting += zip(indexes, futures, strict=True)
        results: list[Any] = [None] * len(calls)
        failed: BrokerError | None = None
        try:
            for index, future in waiting:
                try:
                    results[index] = await future
                except BrokerError as error:
                    if isinstance(error.__cause__, (AskError, TryAgainError)):
                        place, command = calls[index]
                        results[index] = await place.call(*command)
                    else:
                        failed = failed or error
        finally:
            # Cancelled: what is not written yet is not sent at all.
            for _, future in waiting:
                future.cancel()
        if failed is not None:
            raise failed
        return results

    async def follow(self, slot: int, error: BaseException) -> bool:
        """After a receiver's ``error``: whether to try again where the slot is now (the
        owner learned, or a refresh asked for); False for an error to raise."""
        if isinstance(error, MovedError):
            self._own(slot, (str(error.host), int(error.port)))
            self.refresh()
            return True
        if isinstance(error, (AskError, TryAgainError)):
            # Mid-migration: the receive waits at the source until the slot has moved.
            await asyncio.sleep(0.05)
            return True
        if failover(error):
            self.refresh()
            await asyncio.sleep(0.05)
            return True
        return False

    def refresh(self) -> None:
        """Ask the cluster for its topology again, in the background: requests made while
        one is pending join it, and one follows another by half a second at least."""
        if self._refreshing is None and not self._closed:
            self._refreshing = asyncio.create_task(
                self._refresh(), name="multilayer redis topology"
            )

    async def _refresh(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.sleep(self._refreshed_at + _REFRESH_EVERY - loop.time())
            await self._client.nodes_manager.initialize()
            self._learn()
        except (RedisError, RedisClusterException) as error:
            logger.debug("Redis Cluster topology refresh failed: %s", error)
        finally:
            self._refreshing = None
            self._refreshed_at = loop.time()

    async def close(self) -> None:
        """Stop refreshing and release the discovery client (the shards' links are the
        backend's to close)."""
        self._closed = True
        if self._refreshing is not None:
            self._refreshing.cancel()
            await asyncio.gather(self._refreshing, return_exceptions=True)
        await self._client.aclose()


class Bucket:
    """One bucket of a cluster: a :class:`~.shard.Place` whose keys share one hash tag."""

    def __init__(self, cluster: Cluster, tag: str) -> None:
        self._cluster = cluster
        self.tag = "{" + tag + "}"
        self.slot = _slot(tag)
        self._checked: tuple[str, int] | None = None

    async def call(self, *command: Any) -> Any:
        """Run ``command`` on the bucket's master (see :meth:`Cluster.call`)."""
        return await self._cluster.call(self.slot, *command)

    def shard(self) -> Shard:
        """The master of the bucket's slot, as last learned."""
        return self._cluster.at(self._cluster.owner(self.slot))

    async def follow(self, error: BaseException) -> bool:
        """See :meth:`Cluster.follow`."""
        return await self._cluster.follow(self.slot, error)

    def relocated(self) -> bool:
        """Whether the slot has a new master since last asked (a failover, or a slot
        moved): either may have left memberships behind."""
        current = self._cluster.owner(self.slot)
        checked, self._checked = self._checked, current
        return checked is not None and checked != current
