"""What a prefix is made of on RabbitMQ, and its declarations.

* a queue per normal channel and per process inbox, ``<prefix>:<name>``, with its
  expiry, capacity and idle lifetime as queue arguments;
* the groups exchange ``<prefix>::groups`` (direct, auto-deleted), where a group is the
  routing key of its members' bindings;
* a membership queue ``<prefix>::member:<group>:<channel>`` per normal-channel member,
  which passes every copy straight on (``x-message-ttl=0``) to the channel's queue by
  dead-lettering and expires after ``group_expiry`` unless renewed;
* the catalog queue ``<prefix>::catalog``, where every layer lists each queue it
  creates (AMQP cannot list queues), so that ``flush()`` finds them. It is bound to the
  exchange, which it keeps alive, and expires once no connected backend renews it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Any

import pika.exceptions
from pika.adapters.asyncio_connection import AsyncioConnection

from ...backend import LayerSettings
from ...exceptions import BrokerError
from .channel import NOT_FOUND, PRECONDITION_FAILED, Channel, reply_code
from .connection import Link

__all__ = ["Topology", "idle_lifetime"]

#: Routing key of the catalog's binding to the groups exchange, which keeps the
#: (auto-deleted) exchange alive while the catalog lives; no group name contains "!".
_ANCHOR = "!catalog"


def idle_lifetime(settings: LayerSettings, queue_expiry: float) -> float:
    """Seconds an unused queue lives: ``queue_expiry``, and at least twice ``expiry``."""
    return max(queue_expiry, 2 * settings.expiry)


class Topology:
    """The queues, exchange and catalog of one prefix, as one backend declares them.

    It remembers which queues this backend declared lately, so that a queue is declared
    again (renewing its ``x-expires``) only every half of its idle lifetime.
    """

    def __init__(
        self, link: Link, settings: LayerSettings, queue_expiry: float, queue_type: str
    ) -> None:
        self.link = link
        self.settings = settings
        #: Normal channels' queues are quorum queues (replicated, durable): inboxes and
        #: membership queues stay classic.
        self.quorum = queue_type == "quorum"
        prefix = settings.prefix
        self.prefix = prefix + ":"
        self.exchange = f"{prefix}::groups"
        self.catalog = f"{prefix}::catalog"
        expires = round(idle_lifetime(settings, queue_expiry) * 1000)
        self._queue_args: dict[str, Any] = {
            "x-message-ttl": max(1, round(settings.expiry * 1000)),
            "x-overflow": "reject-publish",
            "x-expires": expires,
        }
        #: Seconds after which a declare is renewed: half a queue's idle lifetime.
        self.renew_after = expires / 2000
        # Twice a queue's idle lifetime: renewed by every connected backend, the catalog
        # outlives each queue it lists, and expires once the prefix is unused.
        self._catalog_args = {"x-expires": 2 * expires}
        #: queue -> loop time of this backend's last declare (renews x-expires).
        self._declared: dict[str, float] = {}
        #: queues this backend has listed in the catalog since they last went missing.
        self._cataloged: set[str] = set()

    def queue(self, name: str) -> str:
        """The queue of normal channel or inbox ``name``."""
        return self.prefix + name

    def member_queue(self, group: str, channel: str) -> str:
        """The membership queue of normal ``channel`` in ``group``."""
        return f"{self.prefix}:member:{group}:{channel}"

    def gate(self, name: str) -> str:
        """The gate queue of normal channel ``name`` when it is a quorum queue."""
        return f"{self.prefix}:gate:{name}"

    def arguments(self, name: str) -> dict[str, Any]:
        """The queue arguments of normal channel or inbox ``name``."""
        arguments = {**self._queue_args, "x-max-length": self.settings.capacity.for_channel(name)}
        if self.replicated(name):
            arguments["x-queue-type"] = "quorum"
        return arguments

    def replicated(self, name: str) -> bool:
        """Whether the queue of ``name`` is a quorum queue (durable by rule), which has a
        gate: an inbox stays classic, as it dies with its process anyway."""
        return self.quorum and not name.endswith("!")

    async def declare(self, queue: str, name: str, *, channel: Channel | None = None) -> None:
        """Declare the queue of channel or inbox ``name`` and list it in the catalog."""
        channel = channel or await self.link.channel()
        replicated = self.replicated(name)
        try:
            await channel.call(
                channel.channel.queue_declare,
                queue,
                durable=replicated,
                arguments=self.arguments(name),
            )
            if replicated:
                # The classic queue whose tokens count the quorum queue's messages (its
                # own x-max-length is a soft limit): same capacity, expiry and lifetime.
                gate_arguments = {
                    **self._queue_args,
                    "x-max-length": self.settings.capacity.for_channel(name),
                }
                await channel.call(
                    channel.channel.queue_declare, self.gate(name), arguments=gate_arguments
                )
        except pika.exceptions.AMQPError as error:
            if reply_code(error) == PRECONDITION_FAILED:
                raise BrokerError(
                    f"queue {queue!r} on {self.link.url.sanitized()} exists with other "
                    "arguments (every layer sharing a prefix needs the same expiry, capacity, "
                    f"queue_expiry and queue_type): {error}"
                ) from error
            raise self.link.error(f"declaring queue {queue!r}", error) from error
        self._declared[queue] = asyncio.get_running_loop().time()
        await self._list(queue)
        if replicated:
            await self._list(self.gate(name))

    async def ready(self, queue: str) -> int:
        """How many messages wait in ``queue``, not handed to a consumer (a passive declare)."""
        channel = await self.link.channel()
        frame = await channel.call(channel.channel.queue_declare, queue, passive=True)
        count: int = frame.method.message_count
        return count

    async def _list(self, queue: str) -> None:
        """List ``queue`` in the catalog, unless this backend did since it last went missing."""
        if queue not in self._cataloged:
            publisher = await self.link.publishing()
            publisher.publish("", self.catalog, queue.encode(), None, mandatory=False, wait=False)
            self._cataloged.add(queue)

    def stale(self, queue: str) -> bool:
        """True when this backend has not declared ``queue`` for half its idle lifetime."""
        declared = self._declared.get(queue)
        return declared is None or asyncio.get_running_loop().time() - declared > self.renew_after

    def forget(self, queue: str) -> None:
        """Note that ``queue`` disappeared, so that its next declare catalogs it again."""
        self._declared.pop(queue, None)
        self._cataloged.discard(queue)

    def forget_all(self) -> None:
        """Note that every queue may have gone (a lost connection: perhaps a restart)."""
        self._declared.clear()
        self._cataloged.clear()

    async def declare_topology(self, connection: AsyncioConnection) -> None:
        """Declare the groups exchange and the catalog, the catalog bound to the exchange.

        Neither outlives the prefix's use: the catalog expires when no backend has
        renewed it for twice a queue's idle lifetime, and the exchange is auto-deleted
        with its last binding, the catalog's own once every group's is gone.
        """
        declares: list[Callable[[Channel], Awaitable[Any]]] = [
            lambda ch: ch.call(
                ch.channel.exchange_declare, self.exchange, exchange_type="direct", auto_delete=True
            ),
            lambda ch: ch.call(
                ch.channel.queue_declare, self.catalog, arguments=self._catalog_args
            ),
        ]
        channel = await Channel.open(connection)
        try:
            for declare in declares:
                try:
                    await declare(channel)
                except pika.exceptions.AMQPError as error:
                    if reply_code(error) != PRECONDITION_FAILED:
                        raise
                    # Made by an earlier version without these arguments: it works as it
                    # is, and the next flush() replaces it.
                    channel = await Channel.open(connection)
            await channel.call(
                channel.channel.queue_bind, self.catalog, self.exchange, routing_key=_ANCHOR
            )
        finally:
            channel.close()

    async def declare_again(self) -> None:
        """:meth:`declare_topology` on the current connection: the exchange was found gone."""
        await self.declare_topology(await self.link.connected())

    async def bind(self, queue: str, group: str) -> None:
        """Route ``group``'s messages to ``queue``, declaring the exchange again if it went.

        The exchange goes with its last binding: in a cluster, a node's death takes the
        catalog and every queue it held, and with them their bindings, at a moment of
        RabbitMQ's choosing, which may follow this layer's reconnection and re-declares.
        """
        channel = await self.link.channel()
        try:
            await channel.call(channel.channel.queue_bind, queue, self.exchange, routing_key=group)
        except pika.exceptions.AMQPError as error:
            if reply_code(error) != NOT_FOUND:
                raise
            # The queue may be the one missing: then the second bind raises NOT_FOUND too.
            await self.declare_again()
            channel = await self.link.channel()
            await channel.call(channel.channel.queue_bind, queue, self.exchange, routing_key=group)

    async def unbind(self, queue: str, group: str) -> None:
        """Stop routing ``group``'s messages to ``queue``."""
        channel = await self.link.channel()
        await channel.call(channel.channel.queue_unbind, queue, self.exchange, routing_key=group)

    async def add_member_queue(
        self, group: str, channel: str, *, lifetime: float | None = None
    ) -> None:
        """Make normal ``channel`` a member: its queue must exist to receive dead letters.

        The membership lasts ``group_expiry`` unless renewed; with ``lifetime`` (a
        membership made again after a restart), only what it had left, and one that
        exists already (made again elsewhere meanwhile) is kept as it is.
        """
        await self.declare(self.queue(channel), channel)
        member = self.member_queue(group, channel)
        admin = await self.link.channel()
        expires = self.settings.group_expiry if lifetime is None else lifetime
        arguments = {
            "x-expires": max(1, math.ceil(expires * 1000)),
            "x-message-ttl": 0,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": self.queue(channel),
        }
        try:
            await admin.call(admin.channel.queue_declare, member, arguments=arguments)
        except pika.exceptions.AMQPError as error:
            if reply_code(error) != PRECONDITION_FAILED:
                raise
            admin = await self.link.channel()
            if lifetime is None:
                # Made by a layer with another group_expiry, or made again after a restart
                # with what it had left: it holds no message, so replace it.
                await admin.call(admin.channel.queue_delete, member)
                await admin.call(admin.channel.queue_declare, member, arguments=arguments)
        # Listed so that flush() deletes it rather than leave it for group_expiry.
        await self._list(member)
        await self.bind(member, group)

    async def delete_member_queue(self, group: str, channel: str) -> None:
        """End normal ``channel``'s membership of ``group``."""
        admin = await self.link.channel()
        member = self.member_queue(group, channel)
        await admin.call(admin.channel.queue_delete, member)
        self._cataloged.discard(member)

    async def flush(self) -> None:
        """Delete every queue the catalog lists, then the exchange (and with it every
        binding) and the catalog, and declare both again for the layers still open."""
        connection = await self.link.connected()
        channel = await Channel.open(connection)
        try:
            try:
                listed = await self._drain_catalog(channel)
            except pika.exceptions.AMQPError as error:
                if reply_code(error) != NOT_FOUND:
                    raise
                # The catalog went with the cluster node that held it (or was deleted):
                # the queues this backend declared are the ones it can still name.
                channel.close()
                channel = await Channel.open(connection)
                listed = set(self._declared)
            for queue in listed:
                await channel.call(channel.channel.queue_delete, queue)
                self.forget(queue)
            # Deleting the exchange drops every binding of the prefix; both go so that
            # ones an earlier version made (never expiring) are replaced.
            await channel.call(channel.channel.exchange_delete, self.exchange)
            await channel.call(channel.channel.queue_delete, self.catalog)
            # Layers of this prefix in other processes may still be open and publish to
            # them: declared again, both disappear by themselves once the prefix is unused.
            await self.declare_topology(connection)
        except pika.exceptions.AMQPError as error:
            raise self.link.error("flushing", error) from error
        finally:
            channel.close()
        self.forget_all()

    async def _drain_catalog(self, channel: Channel) -> set[str]:
        """Every queue name in the catalog, emptying it."""
        queues: set[str] = set()
        while (body := await channel.get(self.catalog)) is not None:
            queues.add(body.decode())
        return queues
