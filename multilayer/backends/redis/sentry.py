"""Memberships a server lost (a restart without persistence, a failover to a replica that
missed writes) are found and made again by each layer that created them.

Each layer keeps a marker key ``P:m:TOKEN`` on every server (on a cluster, one per
bucket: ``P:m:{TAG}TOKEN``), living as long as the layer's latest membership.
:class:`MembershipSentry` checks it every ``membership_check`` seconds (jittered), soon
after a connection is lost or made again, and every second or so while a server is away:
one round trip per server when nothing was lost; else the layer's memberships there are
re-asserted with their original deadlines
(:meth:`multilayer.backend.Backend.reassert_memberships`). A layer without memberships
sends nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from ...backend import Backend, now
from ...exceptions import BrokerError
from ...names import non_local_name
from ...toolkit import jitter, within
from .scripts import CHECK_MARK, ttl_ms
from .shard import Place, Shard

__all__ = ["MembershipSentry"]

logger = logging.getLogger(__name__)


class MembershipSentry:
    """The task that keeps one backend instance's memberships on its servers."""

    def __init__(
        self,
        owner: Backend,
        places: Sequence[Place],
        place_of: Callable[[str], Place],
        interval: float,
    ) -> None:
        self._owner = owner
        self._places = places
        self._place_of = place_of
        #: Places whose server changed and whose memberships are not re-asserted yet.
        self._relocated: set[int] = set()
        self._interval = interval
        self._recheck: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    def start(self) -> None:
        """Start checking, in the running event loop."""
        self._recheck = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="multilayer redis membership check")

    async def stop(self) -> None:
        """Stop checking; returns once the task has ended."""
        # Before Python 3.12, asyncio.wait_for() drops a cancellation that arrives as what
        # it waits for completes, and the check's Redis calls run through redis-py's own:
        # should one lose this cancel, the flag still ends the loop.
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def wake(self, _shard: Shard) -> None:
        """A connection to a server was lost, or made again: check its memberships soon."""
        if self._recheck is not None:
            self._recheck.set()

    async def _run(self) -> None:
        """Check every ``interval`` seconds, soon after a connection is lost or made again,
        and every 0.5 to 1 s while a check fails (a server is away).

        A server that comes back is thus checked within about 1 s of answering, even
        when no receive is waiting to notice, and however long it was away (a Sentinel
        failover takes the master's down-after time and more). Waits are jittered so that
        processes started, or reconnected, together do not check in step.
        """
        assert self._recheck is not None
        interval = self._interval
        wait = interval * jitter(0.5, 1.5)
        while not self._stopped:
            try:
                await within(self._recheck.wait(), wait)
                # Every process that lost its connection reconnects at about the same
                # moment: spread their checks over half a second.
                await asyncio.sleep(jitter(0.0, min(0.5, interval / 2)))
            except asyncio.TimeoutError:
                pass
            if self._stopped:
                return
            self._recheck.clear()
            try:
                await self.check()
                wait = interval * jitter(0.5, 1.5)
            except BrokerError as error:
                logger.debug("membership check deferred: %s", error)
                wait = jitter(0.5, 1.0)
            except Exception:
                # A bug here must not end the checks for good, nor go unseen.
                logger.exception("membership check failed")
                wait = interval * jitter(0.5, 1.5)

    async def check(self) -> None:
        """One round trip per server when nothing was lost (the layer's marker is there and
        the master did not change); else re-assert the memberships that place holds, then
        mark it again."""
        owner = self._owner
        latest = owner.membership_ledger.latest()
        if latest is None:
            return
        token = owner.membership_ledger.token
        ttl = ttl_ms(latest, now())

        async def check(index: int, place: Place) -> None:
            marker = f"{owner.settings.prefix}:m:{place.tag}{token}"
            found = await place.call("EVALSHA", CHECK_MARK.sha, 1, marker, ttl)
            # Read after the call, which may itself have reached a new master: a replica
            # promoted may hold the marker and still have missed later memberships.
            if place.relocated():
                self._relocated.add(index)
            if found and index not in self._relocated:
                return
            await owner.reassert_memberships(
                lambda _group, channel: self._place_of(non_local_name(channel)) is place
            )
            await place.call("SET", marker, 1, "PX", ttl)
            self._relocated.discard(index)

        await asyncio.gather(*(check(index, place) for index, place in enumerate(self._places)))
