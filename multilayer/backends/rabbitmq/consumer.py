"""Receiving: a consumer per queue a backend pops from, running only while pops want
messages, acknowledging what pop hands out.

A normal channel's consumer prefetches one message and acknowledges it when the next
pop starts, so it never hands a message back after another process may have received a
later one. An inbox has no consumer but its own process's: it prefetches ``prefetch``
messages and acknowledges in batches; what RabbitMQ delivers again after a dropped
connection is recognised by its ``message_id`` (:class:`Handed`) and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import pika
import pika.channel
import pika.exceptions
import pika.frame
import pika.spec
from pika.adapters.asyncio_connection import AsyncioConnection

from ...backend import Item
from ...exceptions import BrokerError
from ...serialization import log_malformed
from ...toolkit import ProcessWide
from .channel import NOT_FOUND, Channel, reply_code, settle
from .connection import Link
from .frames import Delivery
from .gates import GATED
from .topology import Topology

__all__ = ["PAUSE_AFTER", "Consumer", "Handed", "Opener", "handed_ids"]

logger = logging.getLogger(__package__)

#: How long a consumer with no receive waiting keeps its prefetched messages: enough for
#: a receive loop that sends a reply in between to keep it, short because meanwhile the
#: consumer takes messages that max-length no longer counts (only ready ones count).
PAUSE_AFTER = 0.005

#: Seconds a watched consumer may get nothing while messages are ready (see
#: Consumer._watch).
STUCK_AFTER = 2.0
#: Seconds after a reconnection during which every consumer is watched so.
WATCH_AFTER_RECONNECT = 30.0

#: Turns a delivery (routing key, ``type``, body) into what pop returns.
Opener = Callable[[str, "str | None", bytes], list[Item]]


class Handed:
    """Ids of the messages recently handed out from one queue in this OS process.

    Consumers acknowledge after handing out (an inbox's in batches), so after a dropped
    connection RabbitMQ delivers again (flagged redelivered) messages this process already
    handed out; their ids here are how it recognises and drops them.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._order: deque[str] = deque()
        self._ids: set[str] = set()
        self._lock = threading.Lock()

    def add(self, ids: list[str]) -> None:
        """Remember ``ids``, forgetting the oldest beyond the size."""
        with self._lock:
            for message_id in ids:
                if message_id not in self._ids:
                    self._ids.add(message_id)
                    self._order.append(message_id)
            while len(self._order) > self._size:
                self._ids.discard(self._order.popleft())

    def __contains__(self, message_id: str) -> bool:
        with self._lock:
            return message_id in self._ids


#: Ids recently handed out, per (hosts, vhost, queue) consumed in this OS process, kept
#: while a backend consuming it is open.
handed_ids: ProcessWide[Handed] = ProcessWide()


class Consumer:
    """Consumes one queue while pops want messages, acknowledging what pop hands out.

    ``handed`` holds the ids this process handed out from the queue (shared by its
    consumers of it); ``open(routing_key, type, body)`` turns a message into what pop
    returns (for an inbox: an envelope for a group message, nothing for a membership
    change).
    """

    def __init__(
        self,
        queue: str,
        name: str,
        *,
        link: Link,
        topology: Topology,
        prefetch: int,
        handed: Handed,
        open: Opener,
        release: Callable[[int], None] | None = None,
        declared: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.link = link
        #: Run once the queue, declared, is consumed again: an inbox binds its groups
        #: again, as a queue that went away took its bindings with it.
        self._declared = declared
        #: The connection of this consumer's last start: a start on another one (after a
        #: reconnection) declares an inbox and binds its groups again (see :meth:`_start`).
        self._consumed_on: AsyncioConnection | None = None
        #: A quorum queue's consumer gives back the gate places of what it takes; it
        #: returns unread messages by closing its channel, as a requeue would put them
        #: behind the others there (RabbitMQ 3.10).
        self._release = release
        self.topology = topology
        self.queue = queue
        self._open = open
        self.name = name
        self.inbox = name.endswith("!")
        self.channel: Channel | None = None
        self.tag: str | None = None
        self.buffer: deque[Delivery] = deque()
        # An inbox has no other consumer than this process, which recognises what RabbitMQ
        # delivers again (see Handed): it prefetches, and acknowledges every ack_every
        # messages, saving a write per message.
        # A normal channel's consumer must never hand a message back while it may have
        # overtaken it elsewhere, or another process would receive it after a later one:
        # it prefetches one message and acknowledges it when the next pop starts (or on
        # pause), so RabbitMQ has sent nothing it has not handed out when it pauses.
        self.handed = handed
        self.prefetch = prefetch if self.inbox else 1
        self.ack_every = max(1, prefetch // 2)
        #: delivery tag of the last message handed out and not acknowledged, and how many.
        self.unacked_tag: int | None = None
        self.unacked = 0
        self.popping = 0
        self._wakeup: asyncio.Future[None] | None = None
        self._pause: asyncio.TimerHandle | None = None
        #: loop time since which no pop has been running, None while one is.
        self._idle_since: float | None = None
        self._cancel_ok: asyncio.Future[Any] | None = None

    async def pop(self, limit: int) -> list[Item]:
        self.popping += 1
        self._idle_since = None
        if not self.inbox:
            self.acknowledge()  # RabbitMQ sends the next message once this is in
        try:
            while True:
                taken = self._take(limit)
                if taken:
                    return taken
                if not self.inbox:
                    # What _take dropped (expired or malformed) was the one message
                    # RabbitMQ lets this consumer hold: acknowledge it or none follows.
                    self.acknowledge()
                if self.tag is None:
                    await self._start()
                    continue
                self._wakeup = asyncio.get_running_loop().create_future()
                try:
                    if self._release is None and not self.link.reconnected_within(
                        WATCH_AFTER_RECONNECT
                    ):
                        await self._wakeup
                    else:
                        await self._watch(self._wakeup)
                finally:
                    self._wakeup = None
        finally:
            self.popping -= 1
            if not self.popping and self.tag is not None:
                loop = asyncio.get_running_loop()
                self._idle_since = loop.time()
                # One timer for a run of pops, not one armed and cancelled per pop.
                if self._pause is None:
                    self._pause = loop.call_later(PAUSE_AFTER, self._pause_if_idle)

    async def _watch(self, wakeup: asyncio.Future[None]) -> None:
        """Wait for ``wakeup``; meanwhile, every STUCK_AFTER seconds, restart the consumer
        if it gets nothing while messages are ready.

        A quorum queue's consumer is always watched: on RabbitMQ 3.10 a channel that used
        a quorum queue while it had no leader (its node had just died) keeps talking to
        the dead one, and hears nothing more, though a new channel would. Every other
        consumer is watched for WATCH_AFTER_RECONNECT seconds after a reconnection: after
        a cluster node died, an inbox consumer was seen to get nothing more although the
        layer had reconnected and its sends went on (1 run in 7 of the node-loss test).
        Each surviving RabbitMQ node removes a dead node's queues by name, from a list
        made when it saw the node go, so it may remove an inbox made again since under
        that name, with its bindings, telling no consumer (the likeliest cause of a
        group message lost in a repeat of that test): a sender then makes it anew,
        unbound. So the consumer also starts over when its queue is gone, and an
        inbox's consumer binds its groups again at each look.
        """
        while not wakeup.done():
            await asyncio.wait([wakeup], timeout=STUCK_AFTER)
            channel = self.channel
            if wakeup.done() or self.buffer or channel is None or not channel.usable:
                continue
            try:
                ready: int | None = await self.topology.ready(self.queue)
            except pika.exceptions.AMQPError as error:
                if reply_code(error) != NOT_FOUND:
                    continue
                ready = None  # gone, though no cancel came: the queue consumed has no name
            except BrokerError:
                continue
            if ready is None or (ready and not self.buffer):
                logger.info("restarting the consumer of %s, which got nothing", self.queue)
                self.topology.forget(self.queue)  # declared and bound again at the start
                channel.close()
                return  # closed: reset() wakes the pop, which starts a new consumer
            if self._declared is not None:
                with contextlib.suppress(pika.exceptions.AMQPError, BrokerError):
                    await self._declared()

    def _pause_if_idle(self) -> None:
        self._pause = None
        if self._idle_since is None:
            return  # a pop is running; it re-arms the timer when it ends
        left = self._idle_since + PAUSE_AFTER - asyncio.get_running_loop().time()
        if left > 0:
            self._pause = asyncio.get_running_loop().call_later(left, self._pause_if_idle)
        else:
            self.stop()

    def stop(self, *, closing: bool = False) -> None:
        """Cancel the consumer and hand its unread messages back to RabbitMQ."""
        self._idle_since = None
        if self.channel is None or not self.channel.channel.is_open:
            return
        channel = self.channel.channel
        # (Without a consumer tag, the consumer is cancelled already; an acknowledgement
        # may still be due.)
        if self.tag is not None and closing:
            channel.basic_cancel(self.tag)
        elif self.tag is not None:
            cancel_ok = self._cancel_ok = self.channel.future()
            channel.basic_cancel(self.tag, callback=lambda frame: settle(cancel_ok, frame))
        self.tag = None
        # After the cancel: acknowledging first could let RabbitMQ send one more message.
        self.acknowledge()
        if self.buffer:
            self._return_unread(self.buffer[-1][0], multiple=True)
            self.buffer.clear()

    def _return_unread(self, delivery_tag: int, *, multiple: bool) -> None:
        assert self.channel is not None
        if self._release is None:
            self.channel.channel.basic_nack(delivery_tag, multiple=multiple, requeue=True)
        else:
            self.channel.close()  # everything unacknowledged goes back in its place

    def cancel_pause(self) -> None:
        self._idle_since = None
        if self._pause is not None:
            self._pause.cancel()
            self._pause = None

    def reset(self) -> None:
        """Forget the consumer after its channel or connection closed (RabbitMQ requeues)."""
        self.channel = None
        self.tag = None
        self._cancel_ok = None
        self.unacked_tag, self.unacked = None, 0
        self.buffer.clear()
        self._wake()

    async def _start(self) -> None:
        try:
            connection = await self.link.connected(forever=True)
            if self.channel is None or not self.channel.usable:
                channel = await Channel.open(connection)
                channel.on_close(lambda reason: self._closed(channel, reason))
                channel.channel.add_on_cancel_callback(self._cancelled_by_broker)
                await channel.call(channel.channel.basic_qos, prefetch_count=self.prefetch)
                self.channel = channel
            # After a reconnection an inbox is declared and bound once more, even if
            # declared since, and so at each start for WATCH_AFTER_RECONNECT seconds: in a
            # cluster, RabbitMQ may delete a dead node's queue after the reconnection's
            # restore declared and bound it, and a sender then makes it again, without
            # the bindings (see _watch()).
            again = self._declared is not None and (
                self._consumed_on not in (None, connection)
                or self.link.reconnected_within(WATCH_AFTER_RECONNECT)
            )
            declared = again or self.topology.stale(self.queue)
            if declared:
                await self.topology.declare(self.queue, self.name, channel=self.channel)
            if self._cancel_ok is not None:
                # Deliveries to the cancelled consumer may still be on their way back to the
                # queue; consuming again before its cancel-ok would overtake them.
                await self._cancel_ok
                self._cancel_ok = None
            self.channel.connection.deliveries[self.channel.number] = self._delivered
            if declared and self._declared is not None:
                await self._consume_and_bind(self.channel, self._declared)
            else:
                self.tag = self.channel.channel.basic_consume(self.queue, self._delivered_by_pika)
            self._consumed_on = connection
        except (pika.exceptions.AMQPError, BrokerError) as error:
            if reply_code(error) == NOT_FOUND and self.tag is None:
                return  # gone since its declare: _closed() forgot it, the next start declares
            if isinstance(error, pika.exceptions.ChannelClosedByBroker):
                raise self.link.error(f"consuming {self.queue!r}", error) from error
            if isinstance(error.__cause__, pika.exceptions.ChannelClosedByBroker):
                raise  # a refused declare, already explained
            # The connection went down meanwhile; connected() waits for the next one.
            logger.debug("restarting the consumer of %s: %r", self.queue, error)
            self.reset()
            await asyncio.sleep(0.05)

    async def _consume_and_bind(
        self, channel: Channel, bind: Callable[[], Awaitable[None]]
    ) -> None:
        """Consume the inbox, then bind its groups: to the very queue it consumes.

        Bound before the consume, the groups could go with a queue RabbitMQ deletes in
        between (a dead cluster node's, or an idle one's), and the consume then reach the
        queue a sender made again, without them. Bound after it, they are on the queue
        consumed, or that queue is gone, and its deletion cancels the consumer, whose
        next start declares and binds again.
        """
        consumed = channel.future()
        self.tag = channel.channel.basic_consume(
            self.queue, self._delivered_by_pika, callback=lambda frame: settle(consumed, frame)
        )
        try:
            await channel.answer(consumed, "basic_consume")
            await bind()
        except BaseException:
            # Consuming with groups perhaps unbound: start over, declaring again.
            self.topology.forget(self.queue)
            if self.channel is channel:
                channel.close()
                self.reset()
            raise

    def _closed(self, channel: Channel, reason: BaseException) -> None:
        if self.channel is not channel:
            return
        if reply_code(reason) == NOT_FOUND:
            # Consumed without a declare (declared recently), but flush() deleted it since.
            self.topology.forget(self.queue)
        self.reset()

    def _delivered_by_pika(
        self,
        _channel: pika.channel.Channel,
        method: pika.spec.Basic.Deliver,
        properties: pika.BasicProperties,
        body: bytes,
    ) -> None:
        self._delivered(
            method.consumer_tag,
            (
                method.delivery_tag,
                method.redelivered,
                method.routing_key,
                properties.type,
                properties.message_id,
                body,
            ),
        )

    def _delivered(self, consumer_tag: str, delivery: Delivery) -> None:
        if consumer_tag != self.tag:
            # Sent before RabbitMQ processed our cancel: back to the queue, unread.
            if self.channel is not None and self.channel.channel.is_open:
                self._return_unread(delivery[0], multiple=False)
            return
        self.buffer.append(delivery)
        self._wake()

    def _cancelled_by_broker(self, _frame: pika.frame.Method) -> None:
        # The queue was deleted (flush() somewhere); the next start re-creates it.
        self.topology.forget(self.queue)
        self.tag = None
        self.buffer.clear()
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None:
            settle(self._wakeup, None)

    def _take(self, limit: int) -> list[Item]:
        taken: list[Item] = []
        handed, ids = self.handed, []
        buffer = self.buffer
        gated = 0
        while buffer and len(taken) < limit:
            tag, _redelivered, routing_key, kind, message_id, body = buffer.popleft()
            self.unacked_tag = tag
            self.unacked += 1
            if message_id is not None:
                if message_id in handed:
                    # Handed out here before the connection dropped: delivered again
                    # (redelivered), or published again by a sender (credit.py).
                    continue
                ids.append(message_id)
            if kind == GATED:
                gated += 1
            # A group message comes back as one envelope for the core to hand to members.
            try:
                taken.extend(self._open(routing_key, kind, body))
            except Exception as error:  # another client's garbage must not stop the queue
                log_malformed(self.queue, len(body), f"bad envelope ({type(error).__name__})")
        if ids:
            handed.add(ids)
        if gated and self._release is not None:
            self._release(gated)
        # Acknowledged no earlier than the return: the caller has these messages before
        # anything else can run, and a cancelled pop loses nothing (an unacknowledged
        # message goes back to the queue with its channel).
        if self.inbox and self.unacked >= self.ack_every:
            self.acknowledge()
        return taken

    def acknowledge(self) -> None:
        """Acknowledge every message handed out so far."""
        channel, tag = self.channel, self.unacked_tag
        self.unacked_tag, self.unacked = None, 0
        if tag is not None and channel is not None and channel.channel.is_open:
            channel.connection.ack(channel.number, tag, multiple=True)
