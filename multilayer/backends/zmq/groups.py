"""Groups: memberships at the hub; group_send from a copy of a small group, or by the hub."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from ...backend import LayerSettings
from ...capacity import CapacityPolicy
from ...exceptions import BrokerError, ChannelFull
from ...fanout import seal, split
from ...names import non_local_name
from ...url import LayerURL
from .protocol import DEFAULT_MAX_MESSAGE
from .sends import Sends

__all__ = ["STREAMING", "GroupSends"]

logger = logging.getLogger(__name__.rpartition(".")[0])

#: Group sends in flight (sent, not yet answered by the hub) before group_send waits.
_GROUP_SENDS_IN_FLIGHT = 256
#: Groups whose members live in at most this many queues (a normal channel or a process
#: inbox: one send each) are fanned out by the sender itself, straight to the members'
#: nodes and queues, from a copy of the members the hub leases it and keeps valid (one
#: send per queue costs more than one request to the hub beyond a few).
_DIRECT_FANOUT = 2
#: ... if they are at most this many: the copy travels again with every lease, and the
#: envelope's header names each member.
_DIRECT_MEMBERS = 1000
#: Group sends in flight through the hub from which on group_send asks for a copy of the
#: members (a stream of group sends: sparse ones cost the hub no extra request).
STREAMING = 8
#: How long a group found too large to fan out here is not asked about again (s).
_LARGE_GROUP_HINT = 5.0


class GroupSends(Sends):
    """Group memberships and group_send (see the package documentation)."""

    def __init__(self, url: LayerURL, settings: LayerSettings, options: Mapping[str, Any]):
        super().__init__(url, settings, options)
        #: group sends waiting for fewer than _GROUP_SENDS_IN_FLIGHT to be in flight, in
        #: order: each answer wakes one (waiting on the whole in-flight set woke them all).
        self._room_waiters: deque[asyncio.Future[None]] = deque()
        #: Group -> (its members and their expiry times, None if too many to fan out here;
        #: monotonic end of use), kept valid by the hub: it answers no change to the group
        #: before we drop the copy.
        self._group_copies: dict[str, tuple[list[tuple[str, float]] | None, float]] = {}
        #: Copies asked for and not answered yet, by group: (answer, monotonic time asked,
        #: invalidations received when asked).
        self._asking: dict[str, tuple[asyncio.Future[Any], float, int]] = {}
        #: Invalidations received, so that a copy fetched meanwhile is not kept.
        self._invalidations = 0

    def _invalidate(self, group: str | None) -> None:
        self._invalidations += 1
        if group is None:
            self._group_copies.clear()
        else:
            self._group_copies.pop(group.removeprefix(self._prefix), None)

    async def group_add(self, group: str, channel: str, *, deadline: float) -> None:
        await self._link(group).call(
            "gadd", (self._prefix + group, channel, deadline), (), self._timeout
        )

    async def group_discard(self, group: str, channel: str) -> None:
        await self._link(group).call("gdiscard", (self._prefix + group, channel), (), self._timeout)

    async def group_members(self, group: str) -> Iterable[str]:
        reply = await self._link(group).call("gmembers", (self._prefix + group,), (), self._timeout)
        members: list[str] = reply[0]
        return members

    def _ask_copy(self, group: str) -> None:
        """Ask the hub, now, for the members of ``group`` if it is small (see group_send)."""
        link = self._links[0]
        asked, invalidations = time.monotonic(), self._invalidations
        args = (self._prefix + group, _DIRECT_FANOUT, _DIRECT_MEMBERS)
        _, future = link.start("gwatch", args, ahead=True)
        self._asking[group] = (future, asked, invalidations)
        future.add_done_callback(lambda _: self._copy_answered(group))

    def _copy_answered(self, group: str) -> None:
        """Keep the copy the hub answered for ``group``, if it has answered."""
        asking = self._asking.get(group)
        if asking is None or not asking[0].done():
            return
        del self._asking[group]
        future, asked, invalidations = asking
        if future.cancelled() or future.exception() is not None:
            return
        members, lease = future.result()[0]
        if invalidations != self._invalidations:
            return  # the group may have changed since the hub answered
        if len(self._group_copies) >= 1000:
            current = time.monotonic()
            for name in [n for n, (_, end) in self._group_copies.items() if end <= current]:
                del self._group_copies[name]
        if members is None:  # too large: the hub fans out; ask again after a while
            self._group_copies[group] = (None, asked + _LARGE_GROUP_HINT)
        else:  # used for half the lease, counted from before asking: never beyond it
            copy = [(channel, until) for channel, until in members]
            self._group_copies[group] = (copy, asked + lease / 2)

    async def group_send(
        self, group: str, payload: bytes, *, deadline: float, capacity: CapacityPolicy
    ) -> None:
        if len(self._links) > 1:
            # Members' queues live on other hubs: fetch the members, push to each hub.
            await super().group_send(group, payload, deadline=deadline, capacity=capacity)
            return
        copy = self._group_copies.get(group)
        if (copy is None or time.monotonic() >= copy[1]) and len(self._group_sends) >= STREAMING:
            asking = self._asking.get(group)
            if asking is None or time.monotonic() - asking[1] > self._timeout:
                self._ask_copy(group)  # answered while this and the next sends go to the hub
            else:
                # Pick the answer up now if it has come, not when this task next yields:
                # fewer sends queue at the hub meanwhile.
                self._links[0].take_answers()
                self._copy_answered(group)
            copy = self._group_copies.get(group)
        if copy is not None and copy[0] is not None and time.monotonic() < copy[1]:
            # Straight to each member's node or queue, on leases when held (no round trip):
            # a normal member gets its own copy, a process inbox one envelope for all of
            # its members there.
            current = time.time()
            inboxes, normal = split(member for member in copy[0] if member[1] > current)
            targets = [(channel, payload, 1) for channel, _until in normal] + [
                (inbox, seal(payload, group, current, inbox, local), len(local))
                for inbox, local in inboxes.items()
            ]
            # An envelope larger than a node takes in one frame (a payload near the size
            # limit, many members) goes through the hub, which copies it per member.
            if all(len(data) <= DEFAULT_MAX_MESSAGE for _target, data, _members in targets):
                full = 0
                for target, data, members in targets:
                    limit = capacity.for_channel(target)
                    try:
                        await self.push(target, data, deadline=deadline, capacity=limit)
                    except ChannelFull:
                        full += members
                self.skip_full_members(group, full, sum(members for *_, members in targets))
                return
        await self._settle()
        overrides: dict[str, int] = {}
        if not capacity.uniform:
            # By queue, as the hub counts capacity: a normal member, or a process inbox.
            queues = {non_local_name(m) for m in await self.group_members(group)}
            overrides = {queue: capacity.for_channel(queue) for queue in queues}
        while len(self._group_sends) >= _GROUP_SENDS_IN_FLIGHT:
            room = asyncio.get_running_loop().create_future()
            self._room_waiters.append(room)
            try:
                await room
            except asyncio.CancelledError:
                if room.done() and not room.cancelled():
                    self._make_room()  # the room this task was given goes to the next
                raise
        # The hub fans out on its own; waiting for its answer (which comes once the members'
        # nodes have the message) would only delay the log lines about full members.
        link = self._links[0]
        # The send time goes with the request: this call returns before the hub seals the
        # envelopes, and a discard made after it returns must drop this message's copies.
        request_id, future = link.start_batched(
            "gsend",
            (self._prefix + group, self.settings.prefix, capacity.default, overrides, time.time()),
            (payload,),
        )
        timer = asyncio.get_running_loop().call_later(
            self._timeout + self._peer_timeout, time_out, future, "group_send", link.endpoint
        )
        self._group_sends.add(future)

        def answered(future: asyncio.Future[Any]) -> None:
            self._group_sends.discard(future)
            self._make_room()
            link.pending.pop(request_id, None)
            timer.cancel()
            if future.cancelled():
                return
            error = future.exception()
            if error is not None:
                logger.warning("group_send to %r may not have reached everyone: %s", group, error)
                return
            # The hub answers with the full members and, since it sends envelopes, the
            # number of live members it reached for (older hubs: the full ones only).
            reply = future.result()[0]
            self.skip_full_members(group, len(reply[0]), reply[1] if len(reply) > 1 else None)

        future.add_done_callback(answered)

    def _make_room(self) -> None:
        while self._room_waiters:
            waiter = self._room_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


def time_out(future: asyncio.Future[Any], command: str, endpoint: str) -> None:
    if not future.done():
        future.set_exception(BrokerError(f"no answer from {endpoint} to {command!r} in time"))
