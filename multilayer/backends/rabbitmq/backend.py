"""The backend class: options, and the Backend contract on top of the package's parts."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from functools import partial
from typing import Any, ClassVar

import pika
import pika.exceptions

from ...backend import Backend, Capabilities, Item, LayerSettings, now
from ...capacity import CapacityPolicy
from ...exceptions import BrokerError, ChannelFull, ConfigurationError
from ...memberships import Membership
from ...names import non_local_name
from ...options import Option
from ...serialization import deadline_of
from ...toolkit import check_tls, jitter, tls_options
from ...url import LayerURL
from .connection import Link
from .consumer import Consumer, Handed, handed_ids
from .credit import Credits
from .gates import GATED, Gates
from .groups import Groups
from .topology import Topology, idle_lifetime

__all__ = ["RabbitMQBackend"]

logger = logging.getLogger(__package__)

#: Most seconds a backend waits, after reconnecting, before re-asserting memberships.
_RESTORE_SPREAD = 0.5


def check_quorum_support(version: str | None, where: str) -> None:
    """Refuse ``queue_type=quorum`` on a RabbitMQ older than 3.10, whose quorum queues
    have no message TTL (expiry), rather than declare queues that never expire."""
    numbers = [int(part) for part in (version or "").split(".")[:2] if part.isdigit()]
    if len(numbers) == 2 and tuple(numbers) < (3, 10):
        raise ConfigurationError(
            f"{where}: queue_type=quorum needs RabbitMQ 3.10 or later (message TTL on quorum "
            f"queues, for expiry); this broker runs {version}"
        )


class RabbitMQBackend(Backend):
    """Channels as RabbitMQ queues, groups as bindings; see the package docstring."""

    capabilities: ClassVar[Capabilities] = Capabilities(
        multiprocess=True,
        native_expiry=True,
        native_fanout=True,
        restartable=False,
        restores_memberships=True,
    )
    extra: ClassVar[str | None] = "rabbitmq"
    options: ClassVar[Mapping[str, Option]] = {
        "heartbeat": Option(int, 60, "seconds between AMQP heartbeats (0: none)", minimum=0),
        "connection_name": Option(str, "multilayer", "connection name shown by RabbitMQ"),
        "connect_timeout": Option(
            float, 10.0, "seconds to (re)connect before an operation fails", minimum=0.1
        ),
        "answer_timeout": Option(
            float,
            30.0,
            "seconds to wait for RabbitMQ's answer to a method or a publish's confirm",
            minimum=0.1,
        ),
        "prefetch": Option(int, 64, "unacknowledged messages per inbox consumer", minimum=1),
        "queue_expiry": Option(
            float, 300.0, "seconds an unused queue lives (at least 2 x expiry)", minimum=1.0
        ),
        "queue_type": Option(
            str,
            "classic",
            "normal channels' queues: classic, or quorum (replicated; RabbitMQ 3.10 or later)",
            choices=("classic", "quorum"),
        ),
        **tls_options(
            "amqps",
            aliases={
                "ca_file": "ssl_cafile",
                "cert_file": "ssl_certfile",
                "key_file": "ssl_keyfile",
                "verify": "ssl_verify",
            },
        ),
    }

    def __init__(self, url: LayerURL, settings: LayerSettings, options: Mapping[str, Any]) -> None:
        super().__init__(url, settings, options)
        self.prefetch: int = self.config["prefetch"]
        lifetime = idle_lifetime(settings, self.config["queue_expiry"])
        #: The connection, kept.
        self.link = Link(
            url,
            self.config,
            prepare=lambda connection: self.topology.declare_topology(connection),
            restore=self._restore,
            lost=self._lost,
            reconnected=self._reconnected,
            stopping=self._stop_consumers,
            renew_every=lifetime / 2,
        )
        self.topology = Topology(
            self.link, settings, self.config["queue_expiry"], self.config["queue_type"]
        )
        self.groups = Groups(
            self.link, self.topology, lambda: self.membership_ledger, self._refused_copy
        )
        self.gates = Gates(self.link, self.topology)
        self.credits = Credits(self.topology.ready, self._resend)
        self._key = (url.hosts, self.link.vhost)
        self._consumers: dict[str, Consumer] = {}
        self._inboxes: set[str] = set()
        self._opened = False

    @classmethod
    def check_url(cls, url: LayerURL, options: Mapping[str, Any]) -> None:
        check_tls(url.sanitized(), options)

    @classmethod
    def versions(cls) -> dict[str, str]:
        return {"pika": pika.__version__}

    async def broker_version(self) -> str | None:
        properties = getattr(self.link.connection, "server_properties", None) or {}
        version = properties.get("version")
        return version.decode() if isinstance(version, bytes) else version

    # -- the connection's life ----------------------------------------------------------

    async def open(self) -> None:
        await self.link.open()
        self._opened = True
        if self.topology.quorum:
            try:
                check_quorum_support(await self.broker_version(), self.url.sanitized())
            except ConfigurationError:
                await self.close()
                raise

    async def close(self) -> None:
        await self.groups.close()
        await self.gates.close()
        await self.credits.close(self.config["connect_timeout"])
        await self.link.close()
        self.abandon()

    def abandon(self) -> None:
        handed_ids.release(self)

    async def _restore(self) -> None:
        """After a reconnection: re-make what a restarted broker lost.

        A restart always drops the connection, so every reconnection restores (a dropped
        connection alone makes this a few idempotent declares): the inboxes made here and
        the bindings of their groups (whoever made the memberships: the owner keeps the
        list), then the layer's other memberships from its ledger, with the time each
        has left.
        """
        if not self._opened:
            return  # the first connection: nothing was lost
        for name in self._inboxes:
            await self.topology.declare(self.topology.queue(name), name)
        await self.groups.rebind(self._inboxes)
        # Every process of a prefix reconnects at about the same moment after a restart:
        # spread what they re-assert for others (normal channels, other processes'
        # inboxes) over a moment rather than send it all at once.
        await asyncio.sleep(jitter(0.0, _RESTORE_SPREAD))
        await self.reassert_memberships(lambda _group, channel: not self.groups.owned_here(channel))

    async def restore_memberships(self, entries: list[Membership]) -> None:
        """Make each membership again with the time it has left (a normal channel's queue
        expires then; an inbox's owner is told its original deadline)."""
        results = await asyncio.gather(
            *(
                self.groups.add(group, channel, deadline, again=True)
                for group, channel, deadline in entries
            ),
            return_exceptions=True,
        )
        for (group, channel, _deadline), result in zip(entries, results, strict=True):
            if isinstance(result, ChannelFull):
                # Its owner's inbox is full, so the owner is alive, and it binds again
                # the groups it lists itself; only a join lost unread is missed.
                logger.warning("could not re-add %r to group %r: %s", channel, group, result)
            elif isinstance(result, BaseException):
                raise result

    def _lost(self) -> None:
        # A restarted broker has lost its transient queues and the catalog listing them.
        self.topology.forget_all()
        self.credits.reset()
        for consumer in self._consumers.values():
            consumer.reset()

    def _reconnected(self) -> None:
        self.reconnects += 1

    def _stop_consumers(self) -> None:
        for consumer in self._consumers.values():
            consumer.cancel_pause()
            # Acknowledges what was handed out, which RabbitMQ would otherwise deliver again.
            consumer.stop(closing=True)

    # -- channels -----------------------------------------------------------------------

    async def declare_inbox(self, inbox: str) -> None:
        queue = self.topology.queue(inbox)
        self.groups.members(queue)  # this process owns it
        self._inboxes.add(inbox)
        await self.topology.declare(queue, inbox)

    async def push(self, channel: str, payload: bytes, *, deadline: float, capacity: int) -> None:
        name = non_local_name(channel)
        queue = self.topology.queue(name)
        kind = channel if name != channel else None
        topology, link = self.topology, self.link
        if topology.stale(queue):
            await topology.declare(queue, name)
        if name.endswith("!"):
            # A process inbox: pipelined while it has room known to be free (credit.py).
            await self.credits.in_order()
            publisher = link.publisher
            if (
                publisher is not None
                and publisher.usable
                and self.credits.send(self._publish_now, queue, channel, payload, kind, capacity)
            ):
                return
            outcome = await self._counted(queue, name, payload, kind, None)
        else:
            gated = topology.replicated(name)
            if gated:
                await self.gates.admit(name, capacity)
                kind = GATED
            outcome = await self._deliver(queue, name, payload, kind, None)
            if outcome == "nack" and gated:
                self.gates.release(name, 1)
                if await topology.ready(queue) < capacity:
                    # Not full (by its own soft limit, group copies): on RabbitMQ 3.10 a
                    # channel that used a quorum queue while it had no leader refuses it
                    # from then on; a new channel does not.
                    link.drop_publisher()
                    raise BrokerError(
                        f"RabbitMQ at {self.url.sanitized()} refused a message for {queue!r} "
                        "(its quorum queue had no leader; a later send uses a new channel)"
                    )
        if outcome == "nack":
            raise ChannelFull(f"channel {channel!r} is full ({capacity} messages waiting)")

    async def _deliver(
        self, queue: str, name: str, payload: bytes, kind: str | None, message_id: str | None
    ) -> str:
        """Publish and wait for the verdict, making the queue again if it went away
        (idle expiry, flush, a lost node): ``"ack"`` or ``"nack"`` (full)."""
        link = self.link
        outcome = await link.publish(
            "", queue, payload, kind, mandatory=True, message_id=message_id
        )
        if outcome == "returned":
            self.topology.forget(queue)
            await self.topology.declare(queue, name)
            outcome = await link.publish(
                "", queue, payload, kind, mandatory=True, message_id=message_id
            )
        if outcome == "returned":
            raise BrokerError(f"RabbitMQ at {self.url.sanitized()} did not route to {queue!r}")
        return outcome

    async def _counted(
        self, queue: str, name: str, payload: bytes, kind: str | None, message_id: str | None
    ) -> str:
        """:meth:`_deliver` to an inbox, counted among its publishes (credit.py)."""
        room = self.credits.room(queue)
        room.published += 1
        try:
            return await self._deliver(queue, name, payload, kind, message_id)
        finally:
            room.settled += 1

    def _publish_now(
        self, queue: str, _channel: str, payload: bytes, kind: str | None, message_id: str
    ) -> asyncio.Future[str]:
        """Publish to an inbox without waiting; the future gives the verdict."""
        publisher = self.link.publisher
        assert publisher is not None  # push checked it
        try:
            future = publisher.publish(
                "", queue, payload, kind, mandatory=True, message_id=message_id
            )
        except pika.exceptions.AMQPError as error:
            raise self.link.error(f"publishing to {queue!r}", error) from error
        assert future is not None
        return future

    async def _resend(
        self, queue: str, channel: str, payload: bytes, kind: str | None, message_id: str
    ) -> None:
        """Publish again a pipelined send lost with its connection (credit.py)."""
        if await self._counted(queue, non_local_name(channel), payload, kind, message_id) == "nack":
            raise ChannelFull(f"channel {channel!r} is full")

    async def pop(self, queue: str, limit: int) -> list[Item]:
        consumer = self._consumers.get(queue)
        if consumer is None:
            consumer = self._consumers[queue] = self._consumer(queue)
        return await consumer.pop(limit)

    def _consumer(self, name: str) -> Consumer:
        queue = self.topology.queue(name)
        size = max(256, 4 * self.prefetch)
        handed = handed_ids.use((*self._key, queue), self, lambda: Handed(size))

        def normal(_routing_key: str, _kind: str | None, body: bytes) -> list[Item]:
            return [(name, body)] if deadline_of(body) > now() else []

        return Consumer(
            queue,
            name,
            link=self.link,
            topology=self.topology,
            prefetch=self.prefetch,
            handed=handed,
            open=self.groups.opener(queue, name) if name.endswith("!") else normal,
            release=partial(self.gates.release, name) if self.topology.replicated(name) else None,
            declared=partial(self.groups.rebind, {name}) if name.endswith("!") else None,
        )

    # -- groups -------------------------------------------------------------------------

    async def group_add(self, group: str, channel: str, *, deadline: float) -> None:
        await self.groups.add(group, channel, deadline)

    async def group_discard(self, group: str, channel: str) -> None:
        await self.groups.discard(group, channel)

    async def group_send(
        self, group: str, payload: bytes, *, deadline: float, capacity: CapacityPolicy
    ) -> None:
        await self.groups.send(group, payload)

    def _refused_copy(self, group: str) -> None:
        self.skip_full_members(group, 1, exact=False)

    async def flush(self) -> None:
        await self.topology.flush()
        self.groups.clear()
        for consumer in self._consumers.values():
            consumer.buffer.clear()
