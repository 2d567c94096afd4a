"""Sends: to a hub queue, or straight to the node of the process that owns an inbox."""

from __future__ import annotations

import asyncio
import logging
import time

from ...exceptions import BrokerError, ChannelFull
from ...names import non_local_name
from .core import ZmqCore
from .link import Link
from .protocol import FULL, LEASE, OK, UNKNOWN, WANT

__all__ = ["Sends"]

logger = logging.getLogger(__name__.rpartition(".")[0])

#: Inbox key -> (node endpoint, node public key), shared by every backend of the process.
_directory: dict[str, tuple[str, str]] = {}


class Sends(ZmqCore):
    """push: a normal channel through its hub, an inbox straight to its node when known."""

    async def push(self, channel: str, payload: bytes, *, deadline: float, capacity: int) -> None:
        name = non_local_name(channel)
        key = self._prefix + name
        # A name ending in "!" is a process inbox itself (a group envelope is pushed to
        # it): like its channels, it lives on the owner's node, not in a hub queue.
        if "!" not in channel:
            status = await self._push_normal(key, name, channel, payload, capacity)
        else:
            status = await self._push_specific(key, name, channel, payload, capacity)
        if status == FULL:
            raise ChannelFull(f"channel {channel!r} is full ({capacity} messages waiting)")

    async def _push_normal(
        self, key: str, name: str, channel: str, payload: bytes, capacity: int
    ) -> int:
        # The hub leases places like a node does (see _push_specific): sends on a lease
        # cost no round trip, and ChannelFull stays exact for one sender.
        link = self._link(name)
        if await self._use_credit(key):
            link.send_leased(key, channel, payload)
            return OK
        granted = 0
        self._ask_lease(key)
        try:
            reply = await link.call(
                "push", (key, channel, capacity, WANT), (payload,), self._timeout
            )
            granted = reply[1] if len(reply) > 1 else 0
        finally:
            self._store_credit(key, granted)
        status: int = reply[0]
        return status

    async def _use_credit(self, key: str) -> bool:
        """Take one place of a lease held on ``key``; False when none is usable.

        The push asking for a lease (:meth:`_ask_lease`) is waited for first: its answer
        replaces the lease held, so a place taken before it would be counted twice, and
        sends on a lease are stored whatever the capacity.
        """
        while (asking := self._asking_lease.get(key)) is not None:
            await asyncio.wait((asking,))
        credit = self._credits.get(key)
        if credit is None or credit[0] <= 0 or time.monotonic() >= credit[1]:
            return False
        credit[0] -= 1
        return True

    def _ask_lease(self, key: str) -> None:
        """A push asks for a lease on ``key``: the others to it wait for its answer."""
        self._asking_lease[key] = asyncio.get_running_loop().create_future()

    def _store_credit(self, key: str, granted: int) -> None:
        """Remember a lease of ``granted`` places on ``key`` (0: none, or no answer), and
        let the pushes waiting for it go on."""
        if granted:
            # Use the lease for half its life, so it cannot lapse in transit.
            self._credits[key] = [granted, time.monotonic() + LEASE / 2]
        else:
            self._credits.pop(key, None)
        asking = self._asking_lease.pop(key, None)
        if asking is not None:
            asking.set_result(None)

    async def _push_specific(
        self, key: str, name: str, channel: str, payload: bytes, capacity: int
    ) -> int:
        known = _directory.get(key)
        if known is not None:
            if self._group_sends:
                # A group send forwarded by the hub must reach the node before this does.
                await asyncio.wait(set(self._group_sends))
            peer = self._peer(*known)
            if await self._use_credit(key):
                peer.send_leased(key, channel, payload)
                return OK
            peer.unsettled = False  # the node answers in order: this answer settles all
            reply_by = time.time() + self._peer_timeout
            granted = 0
            self._ask_lease(key)
            try:
                reply = await peer.call(
                    "deliver",
                    ([[key, channel, capacity]], reply_by, WANT),
                    (payload,),
                    self._peer_timeout,
                )
            except BrokerError:
                logger.info("process node %s did not answer; asking the hub", peer.endpoint)
                self._forget(key, peer)
            else:
                status: int = reply[0][0]
                if status != UNKNOWN:
                    granted = reply[1]
                    return status
                self._forget(key, peer)
            finally:
                self._store_credit(key, granted)
        await self._settle()
        reply = await self._link(name).call(
            "spush", (key, channel, capacity), (payload,), self._timeout + self._peer_timeout
        )
        if reply[1]:
            _directory[key] = (reply[1], reply[2] or "")
        status = reply[0]
        return status

    async def _settle(self) -> None:
        """Wait until nodes have stored what we sent them on leases.

        A message routed through the hub must not overtake, on its way to a node, an
        earlier message this backend sent straight to that node.
        """
        unsettled = [peer for peer in self._peers.values() if peer.unsettled]
        if not unsettled:
            return
        reply_by = time.time() + self._peer_timeout
        results = await asyncio.gather(
            *(
                peer.call("deliver", ([], reply_by, 0), (b"",), self._peer_timeout)
                for peer in unsettled
            ),
            return_exceptions=True,
        )
        for peer, result in zip(unsettled, results, strict=True):
            if not isinstance(result, BaseException):
                peer.unsettled = False

    def _peer(self, endpoint: str, public_key: str) -> Link:
        link = self._peers.get(endpoint)
        if link is None:
            server = public_key.encode() if public_key else None
            link = self._peers[endpoint] = Link(
                self._owned, endpoint, self._curve, server, self._orphan
            )
        return link

    def _forget(self, key: str, peer: Link) -> None:
        _directory.pop(key, None)
        self._credits.pop(key, None)
        if self._peers.get(peer.endpoint) is peer:
            del self._peers[peer.endpoint]
            peer.close()
