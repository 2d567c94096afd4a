"""An AMQP channel of pika's, awaitable: its synchronous methods return their reply,
and fail with the closing reason when the channel closes first.

No wait for RabbitMQ is unbounded: a channel that gets no answer within its connection's
``answer_timeout`` is closed and the wait fails with BrokerError. (RabbitMQ 3.10 was seen
to leave a channel that used a quorum queue while it had no leader talking to the dead
one, hearing nothing more, while a new channel works.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pika.channel
import pika.exceptions
import pika.frame
import pika.spec
from pika.adapters.asyncio_connection import AsyncioConnection

from ...exceptions import BrokerError
from ...toolkit import within
from .frames import FastConnection

__all__ = ["NOT_FOUND", "PRECONDITION_FAILED", "Channel", "fail", "reply_code", "settle"]

NOT_FOUND, PRECONDITION_FAILED = 404, 406


def settle(future: asyncio.Future[Any], value: Any) -> None:
    """Resolve ``future`` unless it is done already."""
    if not future.done():
        future.set_result(value)


def fail(future: asyncio.Future[Any], error: BaseException) -> None:
    """Fail ``future`` unless it is done already."""
    if not future.done():
        future.set_exception(error)


def reply_code(error: BaseException | None) -> int | None:
    """The AMQP reply code of a channel RabbitMQ closed, else None."""
    if isinstance(error, pika.exceptions.ChannelClosedByBroker):
        code: int = error.reply_code
        return code
    return None


class Channel:
    """A pika channel whose synchronous methods are awaitable and fail when it closes."""

    def __init__(self, channel: pika.channel.Channel) -> None:
        self.channel = channel
        self.connection: FastConnection = channel.connection
        self.number: int = channel.channel_number
        self.closed: BaseException | None = None
        self._pending: set[asyncio.Future[Any]] = set()
        self._on_close: list[Callable[[BaseException], None]] = []
        #: the basic.get waiting for its reply; get-empty is watched once one was made.
        self._getting: asyncio.Future[Any] | None = None
        self._watching_empty = False
        channel.add_on_close_callback(self._closed)

    @classmethod
    async def open(cls, connection: AsyncioConnection) -> Channel:
        """A new channel on ``connection``, once RabbitMQ opened it."""
        opened: asyncio.Future[pika.channel.Channel] = asyncio.get_running_loop().create_future()

        def closed(_channel: pika.channel.Channel, reason: BaseException) -> None:
            fail(opened, reason)

        channel = connection.channel(on_open_callback=lambda ch: settle(opened, ch))
        channel.add_on_close_callback(closed)
        try:
            return cls(await within(opened, connection.answer_timeout))
        except asyncio.TimeoutError:
            if channel.is_open or channel.is_opening:
                channel.close()
            raise BrokerError(
                f"RabbitMQ did not open a channel within {connection.answer_timeout:g}s"
            ) from None

    @property
    def usable(self) -> bool:
        """Whether the channel is open, and not closing."""
        return self.closed is None and self.channel.is_open

    def on_close(self, callback: Callable[[BaseException], None]) -> None:
        """Call ``callback(reason)`` when the channel closes."""
        self._on_close.append(callback)

    def future(self) -> asyncio.Future[Any]:
        """A future that fails with the channel's closing reason if it closes first."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.closed is not None:
            future.set_exception(self.closed)
            return future
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        return future

    async def call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a synchronous AMQP method (one taking ``callback=``) and await its reply."""
        future = self.future()
        if not future.done():
            method(*args, callback=lambda frame: settle(future, frame), **kwargs)
        return await self.answer(future, method.__name__)

    async def answer(self, future: asyncio.Future[Any], what: str) -> Any:
        """``future``'s result, or BrokerError, the channel closed, if RabbitMQ has not
        answered within the connection's ``answer_timeout``."""
        timeout = self.connection.answer_timeout
        try:
            return await within(future, timeout)
        except asyncio.TimeoutError:
            self.close()
            raise BrokerError(
                f"RabbitMQ did not answer {what} within {timeout:g}s (the channel is dropped)"
            ) from None

    async def get(self, queue: str) -> bytes | None:
        """Take the oldest message of ``queue`` (acknowledged at once); None if it is empty.
        One at a time per channel (AMQP's basic.get)."""
        future: asyncio.Future[bytes | None] = self.future()
        if future.done():
            return await future
        if not self._watching_empty:
            self.channel.add_callback(self._empty, [pika.spec.Basic.GetEmpty], one_shot=False)
            self._watching_empty = True
        self._getting = future
        try:
            self.channel.basic_get(
                queue, lambda _ch, _method, _props, body: settle(future, body), auto_ack=True
            )
            result: bytes | None = await self.answer(future, "basic_get")
            return result
        finally:
            self._getting = None

    def _empty(self, _frame: pika.frame.Method) -> None:
        if self._getting is not None:
            settle(self._getting, None)

    def close(self) -> None:
        """Close the channel (no wait)."""
        if self.closed is None and self.channel.is_open:
            self.channel.close()

    def _closed(self, _channel: pika.channel.Channel, reason: BaseException) -> None:
        self.closed = reason
        self.connection.forget_channel(self.number)
        for future in list(self._pending):
            fail(future, reason)
        for callback in self._on_close:
            callback(reason)
