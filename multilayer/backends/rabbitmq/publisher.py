"""Publishing: the confirm-mode channel every publish goes through, and the window of
group publishes whose confirms nobody waits for.

A send waits for its publisher confirm, because a negative confirm is how RabbitMQ
reports a full queue (``x-overflow=reject-publish``); a publish that finds no queue
(``mandatory``) is returned before its confirm. ``group_send`` does not wait: a full
member is logged, never reported to its caller. A confirm that does not come within the
confirm timeout drops the channel (see :meth:`Publisher._overdue`).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import deque
from collections.abc import Callable

import pika
import pika.channel
import pika.exceptions
import pika.frame
import pika.spec
from pika.adapters.asyncio_connection import AsyncioConnection

from ...exceptions import BrokerError
from .channel import Channel, fail, settle

__all__ = ["ConfirmWindow", "Publisher"]


class _Confirm:
    """A publish waiting for RabbitMQ's confirm."""

    __slots__ = ("at", "exchange", "future", "returned", "routing_key")

    def __init__(
        self, future: asyncio.Future[str] | None, exchange: str, routing_key: str, at: float
    ):
        self.future = future
        self.exchange = exchange
        self.routing_key = routing_key
        self.returned = False
        #: event-loop time of the publish
        self.at = at


class Publisher:
    """The confirm-mode channel every publish goes through, in publish order.

    Every publish carries a ``message_id`` unique to this publisher, by which a consumer
    recognises a redelivery of a message it handed out already. A confirm that does not
    come within the connection's ``answer_timeout`` drops the channel (:meth:`_overdue`).
    """

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self._sent = 0
        #: in publish order, so the first is the oldest
        self._waiting: dict[int, _Confirm] = {}
        self._id_prefix = secrets.token_hex(8) + "."
        self._confirm_timeout: float = channel.connection.answer_timeout
        self._watch: asyncio.TimerHandle | None = None
        channel.on_close(self._closed)

    @classmethod
    async def open(cls, connection: AsyncioConnection) -> Publisher:
        """A publisher on a new channel of ``connection``, in confirm mode."""
        channel = await Channel.open(connection)
        publisher = cls(channel)
        channel.channel.add_on_return_callback(publisher._returned)
        await channel.call(channel.channel.confirm_delivery, publisher._confirmed)
        channel.connection.confirms[channel.number] = publisher._confirm
        return publisher

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        kind: str | None,
        *,
        mandatory: bool,
        wait: bool = True,
        message_id: str | None = None,
    ) -> asyncio.Future[str] | None:
        """Publish with ``type`` = ``kind``; the future gives ``"ack"``, ``"nack"`` or
        ``"returned"`` (unroutable). Without ``wait``, no future. ``message_id`` (a
        message published again keeps its own) defaults to a new one."""
        channel = self.channel
        if channel.closed is not None:
            raise channel.closed
        if not channel.channel.is_open:
            raise pika.exceptions.ChannelWrongStateError("the publishing channel is closing")
        # Failed by _closed() if the channel closes first.
        loop = asyncio.get_running_loop()
        future = loop.create_future() if wait else None
        sequence = self._sent + 1
        channel.connection.publish(
            channel.number,
            exchange,
            routing_key,
            body,
            kind,
            message_id or self._id_prefix + str(sequence),
            mandatory=mandatory,
        )
        self._sent = sequence
        self._waiting[sequence] = _Confirm(future, exchange, routing_key, loop.time())
        if self._watch is None:
            self._watch = loop.call_later(self._confirm_timeout, self._overdue)
        return future

    @property
    def usable(self) -> bool:
        """Whether the channel is open, and not closing."""
        return self.channel.usable

    def _overdue(self) -> None:
        """Drop the channel if its oldest publish has waited ``answer_timeout`` seconds
        for its confirm, failing every publish waiting on it; else look again then (see
        :mod:`.channel`: a send would otherwise wait forever on a channel RabbitMQ left
        talking to a dead quorum leader)."""
        self._watch = None
        if not self._waiting:
            return
        oldest = next(iter(self._waiting.values()))
        loop = asyncio.get_running_loop()
        left = oldest.at + self._confirm_timeout - loop.time()
        if left > 0:
            self._watch = loop.call_later(left, self._overdue)
            return
        self._fail(
            BrokerError(
                f"RabbitMQ sent no confirm within {self._confirm_timeout:g}s for a message "
                f"to {oldest.routing_key or oldest.exchange!r}: the publishing channel is "
                "dropped (a later send uses a new one), failing the sends that waited on it; "
                "each may have been stored"
            )
        )
        self.channel.close()

    def _returned(
        self,
        _channel: pika.channel.Channel,
        method: pika.spec.Basic.Return,
        _properties: pika.BasicProperties,
        _body: bytes,
    ) -> None:
        # RabbitMQ sends a message's return before its confirm, and both in publish
        # order, so the oldest unmatched publish to that destination is the one returned.
        for confirm in self._waiting.values():
            if (
                not confirm.returned
                and confirm.exchange == method.exchange
                and confirm.routing_key == method.routing_key
            ):
                confirm.returned = True
                return

    def _confirmed(self, frame: pika.frame.Method) -> None:
        method = frame.method
        self._confirm(isinstance(method, pika.spec.Basic.Ack), method.delivery_tag, method.multiple)

    def _confirm(self, positive: bool, delivery_tag: int, multiple: bool) -> None:
        tags = [delivery_tag]
        if multiple:
            tags = [tag for tag in self._waiting if tag <= delivery_tag]
        for tag in tags:
            confirm = self._waiting.pop(tag, None)
            if confirm is not None and confirm.future is not None:
                outcome = "returned" if confirm.returned else "ack" if positive else "nack"
                settle(confirm.future, outcome)

    def _closed(self, reason: BaseException) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self._fail(reason)

    def _fail(self, reason: BaseException) -> None:
        for confirm in self._waiting.values():
            if confirm.future is not None:
                fail(confirm.future, reason)
        self._waiting.clear()


class ConfirmWindow:
    """Confirms of publishes nobody waits for, at most ``size`` outstanding.

    ``on_confirm(confirm)`` runs as each arrives; :meth:`add` waits for the oldest once
    the window is full (backpressure), raising what it failed with.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._confirms: deque[asyncio.Future[str]] = deque()

    async def add(
        self, confirm: asyncio.Future[str], on_confirm: Callable[[asyncio.Future[str]], None]
    ) -> None:
        """Track ``confirm``; returns once at most ``size`` are outstanding."""
        confirm.add_done_callback(lambda done: self._done(done, on_confirm))
        window = self._confirms
        window.append(confirm)
        while len(window) > self._size:
            await window.popleft()

    def _done(
        self, confirm: asyncio.Future[str], on_confirm: Callable[[asyncio.Future[str]], None]
    ) -> None:
        with contextlib.suppress(ValueError):
            self._confirms.remove(confirm)
        if not confirm.cancelled():
            on_confirm(confirm)
