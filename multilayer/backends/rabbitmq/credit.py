"""Pipelined sends to process inboxes: a send returns once published, without waiting for
its publisher confirm, while this process knows the inbox has room for it.

RabbitMQ reports a full queue only through a negative confirm, so a send that waits for
its confirm costs a round trip (measured: the (b) bench ran 3,594 msgs/s so, 15,213
without the wait). For each inbox, :class:`Credits` keeps a *room*: the capacity, less
the messages a passive declare found ready, less every publish of this process to the
inbox that the count may have missed (those unconfirmed when the declare went out, and
those since). Receivers only free places, so for one sender the room is a lower bound,
and a send that spends one place cannot be refused: ChannelFull stays exact, raised by
the broker's confirm on the slow path once the room is spent. With several senders,
another one may fill the inbox between two counts; the refusal then arrives after the
send returned, is logged, and this process waits for confirms until its next count.

A pipelined publish whose connection dropped before its confirm is published again,
with its ``message_id``, once the connection is back, before any later send (so one
sender's messages stay in order); the receiving process drops the copy of one it
already handed out (:class:`~.consumer.Handed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import deque
from collections.abc import Awaitable, Callable

from ...exceptions import BrokerError, ChannelFull
from ...toolkit import within

__all__ = ["WINDOW", "Credits"]

logger = logging.getLogger(__package__)

#: Most pipelined sends unconfirmed per backend. Also bounds how far behind its original
#: a resent copy arrives, within the receiver's memory of handed-out ids (at least 256).
WINDOW = 64
#: Inboxes remembered at most; idle ones are forgotten beyond it.
_REMEMBERED = 1024

#: Publishes ``(queue, channel, body, kind, message_id)`` and returns the broker's
#: verdict, ``"ack"``, ``"nack"`` or ``"returned"``, without waiting for it.
Publish = Callable[[str, str, bytes, "str | None", str], "asyncio.Future[str]"]
#: Sends again, waiting for the verdict, declaring the queue if it went away.
Resend = Callable[[str, str, bytes, "str | None", str], Awaitable[None]]


class _Room:
    """What this process knows of one inbox."""

    __slots__ = ("counting", "left", "measured", "published", "settled")

    def __init__(self) -> None:
        #: places this process may still fill without a confirm; None: not counted yet
        self.left: int | None = None
        #: ``left`` when last counted, to count again once half of it is spent
        self.measured = 0
        #: publishes to the inbox, and how many of them have their verdict
        self.published = self.settled = 0
        self.counting = False


class Credits:
    """The rooms of the inboxes this backend sends to, its unconfirmed pipelined sends,
    and those to publish again after a reconnection (see the module docstring)."""

    def __init__(self, count: Callable[[str], Awaitable[int]], resend: Resend) -> None:
        self._count, self._resend = count, resend
        self._rooms: dict[str, _Room] = {}
        self._unconfirmed: set[asyncio.Future[str]] = set()
        self._lost: deque[tuple[str, str, bytes, str | None, str]] = deque()
        self._resending: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._id_prefix = "p" + secrets.token_hex(8) + "."
        self._ids = 0

    def room(self, queue: str) -> _Room:
        """The room of ``queue``, made (unknown) on first use."""
        room = self._rooms.get(queue)
        if room is None:
            if len(self._rooms) >= _REMEMBERED:
                self._forget_idle()
            room = self._rooms[queue] = _Room()
        return room

    async def in_order(self) -> None:
        """Return once the sends lost with a connection are published again."""
        while self._resending is not None:
            await asyncio.shield(self._resending)

    def send(
        self, publish: Publish, queue: str, channel: str, body: bytes, kind: str | None,
        capacity: int,
    ) -> bool:  # fmt: skip
        """Publish without waiting if ``queue`` has room known to be free; False (nothing
        done) when the send must wait for its confirm instead."""
        room = self.room(queue)
        if room.left is None or room.left * 2 < room.measured or room.left == 0:
            self._recount(queue, capacity, room)
        if not room.left or self._resending is not None or len(self._unconfirmed) >= WINDOW:
            return False
        self._ids += 1
        message_id = self._id_prefix + str(self._ids)
        confirm = publish(queue, channel, body, kind, message_id)
        room.left -= 1
        room.published += 1
        self._unconfirmed.add(confirm)
        confirm.add_done_callback(
            lambda done: self._verdict(done, room, (queue, channel, body, kind, message_id))
        )
        return True

    def _verdict(
        self, confirm: asyncio.Future[str], room: _Room,
        send: tuple[str, str, bytes, str | None, str],
    ) -> None:  # fmt: skip
        self._unconfirmed.discard(confirm)
        room.settled += 1
        outcome = None if confirm.cancelled() else confirm.exception() or confirm.result()
        if outcome == "ack":
            return
        room.left = None
        if outcome == "nack":
            # Only another sender can have filled it since the count (module docstring).
            logger.warning(
                "a message to %r was refused as full after its send returned: another "
                "process filled the inbox; sends to it wait for their confirms until "
                "it is counted again",
                send[1],
            )
            return
        # Lost with the connection, or the inbox went away: publish it again, in order.
        self._lost.append(send)
        if self._resending is None:
            self._resending = asyncio.ensure_future(self._resend_lost())

    async def _resend_lost(self) -> None:
        try:
            while self._lost:
                queue, channel, body, kind, message_id = self._lost.popleft()
                try:
                    await self._resend(queue, channel, body, kind, message_id)
                except (BrokerError, ChannelFull) as error:
                    logger.error("a message to %r sent earlier was lost: %s", channel, error)
        finally:
            self._resending = None

    def _recount(self, queue: str, capacity: int, room: _Room) -> None:
        if room.counting:
            return
        room.counting = True
        task = asyncio.ensure_future(self._count_room(queue, capacity, room))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _count_room(self, queue: str, capacity: int, room: _Room) -> None:
        # Publishes the count may have missed: unconfirmed now, or made from now on.
        unsure, before = room.published - room.settled, room.published
        try:
            ready = await self._count(queue)
        except Exception as error:  # the inbox is missing, the connection dropped...
            logger.debug("counting %r: %r", queue, error)
            room.left = None
        else:
            left = capacity - ready - unsure - (room.published - before)
            room.left = room.measured = max(0, left)
        finally:
            room.counting = False

    def reset(self) -> None:
        """Forget every count (the connection dropped: the inboxes may be gone)."""
        for room in self._rooms.values():
            room.left = None

    def _forget_idle(self) -> None:
        for queue, room in list(self._rooms.items()):
            if room.published == room.settled and not room.counting:
                del self._rooms[queue]

    async def close(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) for the confirms and resends outstanding."""
        with contextlib.suppress(asyncio.TimeoutError):
            await within(self._drain(), timeout)
        tasks = [*self._tasks, *([self._resending] if self._resending else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _drain(self) -> None:
        while self._unconfirmed or self._resending is not None:
            if self._unconfirmed:
                await asyncio.wait(list(self._unconfirmed))
            await self.in_order()
