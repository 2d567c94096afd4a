"""Groups: bindings on the prefix's groups exchange, so RabbitMQ does the fan-out.

* A process inbox is bound once per group; the process hands each group message to the
  core as one envelope naming its live member channels (:mod:`multilayer.fanout`).
  Those memberships live in the owning process (:class:`InboxMembers`): a ``group_add``
  made there records them directly, one made in another process reaches the owner as a
  control message in the inbox, ordered before any later group message. The owner skips
  members past their deadline and unbinds a group left with none.
* A normal channel joins through its membership queue (see :mod:`.topology`), whose
  ``x-expires`` is ``group_expiry``: RabbitMQ itself ends a membership not renewed.
* ``group_send`` is one publish, confirmed in the background (a full member is logged,
  never reported to the caller).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import msgpack
import pika.exceptions

from ...backend import Item, now
from ...exceptions import ChannelFull
from ...fanout import seal
from ...names import non_local_name
from ...serialization import HEADER_SIZE, deadline_of
from ...toolkit import ProcessWide
from .channel import NOT_FOUND, reply_code
from .connection import Link
from .publisher import ConfirmWindow
from .topology import Topology

__all__ = ["Groups", "InboxMembers", "inbox_members"]

logger = logging.getLogger(__package__)

#: Most group_send publishes waiting for their confirm at once.
_GROUP_WINDOW = 64
#: ``type`` of the control messages that tell an inbox's owner of a membership change.
_JOIN, _LEAVE = "+", "-"


class InboxMembers:
    """Group memberships of the channels of one process inbox.

    Kept as long as the layer that owns the inbox, and shared by its backends (one per
    event loop), because any of them may be the one receiving from the inbox: a view
    that calls ``async_to_sync(layer.group_send)`` runs each call in a loop of its own.
    """

    def __init__(self) -> None:
        self._groups: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()

    def join(self, group: str, channel: str, deadline: float) -> None:
        """Make ``channel`` a member of ``group`` until ``deadline``."""
        with self._lock:
            self._groups.setdefault(group, {})[channel] = deadline

    def leave(self, group: str, channel: str) -> bool:
        """Remove a membership; True when the group has no member left here."""
        with self._lock:
            members = self._groups.get(group)
            if members is None:
                return True
            members.pop(channel, None)
            if members:
                return False
            del self._groups[group]
            return True

    def live(self, group: str) -> list[tuple[str, float]]:
        """The unexpired members of ``group`` with their deadlines, forgetting the expired."""
        current = now()
        with self._lock:
            members = self._groups.get(group)
            if members is None:
                return []
            for channel in [c for c, deadline in members.items() if deadline <= current]:
                del members[channel]
            if not members:
                del self._groups[group]
            return list(members.items())

    def groups(self) -> list[str]:
        """The groups with a member here."""
        with self._lock:
            return list(self._groups)

    def clear(self) -> None:
        """Forget every membership (flush)."""
        with self._lock:
            self._groups.clear()


#: Memberships of the inboxes owned by this OS process, per (hosts, vhost, queue), each
#: kept while the owning layer's membership ledger lives.
inbox_members: ProcessWide[InboxMembers] = ProcessWide()


class Groups:
    """group_add, group_discard and group_send of one backend.

    ``layer()`` is what lives as long as the backend's layer (its membership ledger),
    which keeps the memberships of the layer's inboxes in :data:`inbox_members`;
    ``on_full(group)`` counts a group message some member's queue refused.
    """

    def __init__(
        self,
        link: Link,
        topology: Topology,
        layer: Callable[[], object],
        on_full: Callable[[str], None],
    ) -> None:
        self.link = link
        self.topology = topology
        self._layer = layer
        self._on_full = on_full
        self._key = (link.url.hosts, link.vhost)
        self._window = ConfirmWindow(_GROUP_WINDOW)
        self._background: set[asyncio.Task[Any]] = set()

    def members(self, queue: str) -> InboxMembers:
        """The memberships of inbox ``queue``, owned by this process."""
        return inbox_members.use_while((*self._key, queue), self._layer(), InboxMembers)

    def _owner_here(self, queue: str) -> InboxMembers | None:
        return inbox_members.get((*self._key, queue))

    def owned_here(self, channel: str) -> bool:
        """Whether ``channel`` is process-specific and its inbox is owned by this process."""
        name = non_local_name(channel)
        return name != channel and self._owner_here(self.topology.queue(name)) is not None

    # -- the owner's side ---------------------------------------------------------------

    def opener(self, queue: str, name: str) -> Callable[[str, str | None, bytes], list[Item]]:
        """What inbox ``queue`` (of inbox ``name``) hands to the core for each message."""

        def open_message(routing_key: str, kind: str | None, body: bytes) -> list[Item]:
            if kind in (_JOIN, _LEAVE):
                self._changed(queue, kind, body)
                return []
            if deadline_of(body) <= now():
                return []
            if kind:
                return [(kind, body)]
            if routing_key == queue:
                # Group messages come through the groups exchange, routed by group name;
                # this was published straight into the inbox without a channel name, by
                # something that is not a layer.
                raise ValueError("no channel name")
            if len(body) < HEADER_SIZE:
                # Not a payload a layer sends (they open with the deadline): sealed into an
                # envelope it would pass for a message to the inbox itself, and go unseen.
                raise ValueError("shorter than the deadline header")
            group = routing_key
            members = self.members(queue).live(group)
            if not members:
                self._unbind_later(queue, group)
                return []
            # The process's own membership state is already current (a discard here, or
            # one made elsewhere and told here, arrived before this message), so the time
            # it is opened stands for the send time: the core's departure check drops no
            # one more.
            return [(name, seal(body, group, now(), name, members))]

        return open_message

    def _changed(self, queue: str, kind: str, body: bytes) -> None:
        group, channel, deadline = msgpack.unpackb(body)
        named = isinstance(group, str) and isinstance(channel, str)
        if not named or type(deadline) not in (int, float):
            raise ValueError("a membership is [group, channel, deadline]")
        members = self.members(queue)
        if kind == _JOIN:
            members.join(group, channel, deadline)
        elif members.leave(group, channel):
            self._unbind_later(queue, group)

    def _unbind_later(self, queue: str, group: str) -> None:
        """Stop routing ``group`` to an inbox that has no member of it left."""

        async def unbind() -> None:
            await self.topology.unbind(queue, group)
            # A member that joined from another process meanwhile needs the binding back;
            # its join message (sent before its own bind) is in the inbox by now or never.
            if self.members(queue).live(group):
                await self.topology.bind(queue, group)

        self._spawn(unbind())

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("RabbitMQ background operation failed: %r", task.exception())

    # -- the operations -----------------------------------------------------------------

    async def add(self, group: str, channel: str, deadline: float, *, again: bool = False) -> None:
        """``group_add``; ``again`` re-makes a membership a broker lost (never extending it)."""
        name = non_local_name(channel)
        queue = self.topology.queue(name)
        try:
            if name == channel:
                lifetime = deadline - now() if again else None
                await self.topology.add_member_queue(group, channel, lifetime=lifetime)
                return
            members = self._owner_here(queue)
            if members is not None:
                members.join(group, channel, deadline)
            else:
                # Its process may not have received yet, nor made its inbox: declared
                # here, the inbox holds the join and the group's messages for it, as it
                # holds a send's.
                if self.topology.stale(queue):
                    await self.topology.declare(queue, name)
                await self._tell_owner(queue, channel, _JOIN, [group, channel, deadline])
            await self.topology.bind(queue, group)
        except pika.exceptions.AMQPError as error:
            if reply_code(error) == NOT_FOUND and name != channel:
                return  # the inbox is gone, and with it its process: nothing to join
            raise self.link.error(f"adding {channel!r} to group {group!r}", error) from error

    async def discard(self, group: str, channel: str) -> None:
        """``group_discard``."""
        name = non_local_name(channel)
        queue = self.topology.queue(name)
        if name == channel:
            try:
                await self.topology.delete_member_queue(group, channel)
            except pika.exceptions.AMQPError as error:
                raise self.link.error(f"removing {channel!r} from {group!r}", error) from error
            return
        members = self._owner_here(queue)
        if members is None:
            await self._tell_owner(queue, channel, _LEAVE, [group, channel, 0.0])
        elif members.leave(group, channel):
            self._unbind_later(queue, group)

    async def _tell_owner(self, queue: str, channel: str, kind: str, body: list[Any]) -> None:
        """Queue a membership change for the process that owns inbox ``queue``."""
        body_bytes = msgpack.packb(body)
        outcome = await self.link.publish("", queue, body_bytes, kind, mandatory=True)
        if outcome == "returned" and kind == _JOIN:
            # The inbox went away since this backend declared it (flush, idle expiry).
            self.topology.forget(queue)
            await self.topology.declare(queue, non_local_name(channel))
            outcome = await self.link.publish("", queue, body_bytes, kind, mandatory=True)
        if outcome == "nack":
            raise ChannelFull(f"cannot change the groups of {channel!r}: its process inbox is full")

    async def send(self, group: str, payload: bytes) -> None:
        """``group_send``: one publish; up to _GROUP_WINDOW in flight, the oldest awaited
        beyond that (backpressure), and a negative confirm logged when it arrives."""
        try:
            publisher = await self.link.publishing()
            confirm = publisher.publish(
                self.topology.exchange, group, payload, None, mandatory=False
            )
            assert confirm is not None
            await self._window.add(confirm, lambda done: self._confirmed(group, done))
        except pika.exceptions.AMQPError as error:
            raise self.link.error(f"publishing to group {group!r}", error) from error

    def _confirmed(self, group: str, confirm: asyncio.Future[str]) -> None:
        error = confirm.exception()
        if error is not None and self.link.closing:
            # Closed here, after the publish: RabbitMQ routes it before the close, only
            # its confirm goes unheard. A view calling async_to_sync(group_send) ends its
            # event loop right after each call, so this is no news.
            logger.debug("group_send to %r unconfirmed at close: %r", group, error)
        elif error is not None:
            logger.warning("group_send to %r may be lost: %r", group, error)
            if reply_code(error) == NOT_FOUND:
                # The exchange went with its last binding (no member was bound): declared
                # again, the next group_send does not close the publishing channel too.
                self._spawn(self.topology.declare_again())
        elif confirm.result() == "nack":
            # RabbitMQ confirms negatively when any bound queue refused its copy, and does
            # not say which nor how many; the other members have theirs.
            self._on_full(group)

    # -- after a reconnect, flush and close ---------------------------------------------

    async def rebind(self, inboxes: set[str]) -> None:
        """Bind again the groups with a live member in ``inboxes`` (owned here, whoever
        made the membership: a restarted broker lost the bindings, not the owner's list)."""
        for name in inboxes:
            queue = self.topology.queue(name)
            members = self.members(queue)
            try:
                for group in members.groups():
                    if members.live(group):
                        await self.topology.bind(queue, group)
            except pika.exceptions.AMQPError as error:
                if reply_code(error) != NOT_FOUND:
                    raise
                # Declared, then gone: RabbitMQ removed a dead node's queue of that name
                # after the declare. Its consumer, cancelled by the deletion or not yet
                # started, declares it again and binds again once it consumes.
                self.topology.forget(queue)

    def clear(self) -> None:
        """Forget every inbox membership of the prefix known here (flush)."""
        for members in inbox_members.under(self._key):
            members.clear()

    async def close(self) -> None:
        """Stop the background unbinds."""
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
