"""Receives: from this process's inboxes, or by a pop request parked at a hub."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ...backend import Item
from ...exceptions import BrokerError
from .core import ZmqCore
from .link import Link, Restarted
from .node import Inbox

__all__ = ["Receives"]

logger = logging.getLogger(__name__.rpartition(".")[0])

#: How long one pop request waits at the hub before it is renewed.
_POP_WAIT = 20.0
#: Bound on the clean-up of a cancelled pop, so that closing never hangs on a dead hub.
_ABANDON_WAIT = 2.0
#: Messages one pop of a normal channel may take when they already wait at the hub; those
#: no receive here wants go back to the hub after PREFETCH_HOLD seconds.
_PREFETCH = 100


class Receives(ZmqCore):
    """pop: from an inbox of this process, or a normal channel through its hub."""

    def pop_nowait(self, queue: str, limit: int) -> list[Item]:
        """Messages already in this process: in its inbox, or held from a normal pop."""
        node = self._node
        if node is None:
            return []
        key = self._prefix + queue
        if not queue.endswith("!"):
            return node.held.take(key, limit)
        with node.lock:
            inbox = node.inboxes.get(key)
            return inbox.take(limit) if inbox is not None else []

    async def pop(self, queue: str, limit: int) -> list[Item]:
        if queue.endswith("!"):
            return await self._pop_inbox(self._prefix + queue, limit)
        return await self._pop_hub(self._prefix + queue, queue, limit)

    async def _pop_inbox(self, key: str, limit: int) -> list[Item]:
        node = self._node
        assert node is not None
        while True:
            with node.lock:
                inbox = node.inboxes.setdefault(key, Inbox())
                taken = inbox.take(limit)
                if taken:
                    return taken
                loop = asyncio.get_running_loop()
                future = loop.create_future()
                inbox.waiters.append(future)
            node.serve_in(loop)
            try:
                await future
            finally:
                if not future.done():
                    future.cancel()
                    with node.lock:
                        if future in inbox.waiters:
                            inbox.waiters.remove(future)

    async def _pop_hub(self, key: str, name: str, limit: int) -> list[Item]:
        node = self._node
        assert node is not None
        held = node.held.take(key, limit)
        if held:
            return held
        link = self._link(name)
        while True:
            request_id, future = link.start("pop", (key, max(limit, _PREFETCH), _POP_WAIT))
            link.pops[request_id] = key
            try:
                done, _ = await asyncio.wait({future}, timeout=_POP_WAIT + self._timeout)
            except asyncio.CancelledError:
                await self._abandon(link, key, request_id, future)
                raise
            if not done:
                link.pending.pop(request_id, None)
                continue  # a lost request (hub restart): ask again; a late answer is requeued
            try:
                args, frames = future.result()
            except Restarted:
                # Keep the pop's key: should the new hub answer it after all, the reader
                # requeues what it brings.
                link.pending.pop(request_id, None)
                continue
            if args[0]:
                items = list(zip(args[0], frames, strict=True))
                node.held.hold(key, items[limit:])
                return items[:limit]

    async def _abandon(
        self, link: Link, key: str, request_id: int, future: asyncio.Future[Any]
    ) -> None:
        """Withdraw a pop; messages the hub had already sent for it go back to the queue."""
        try:
            await link.call("cancel", (key, request_id), (), _ABANDON_WAIT)
        except BrokerError as error:
            logger.warning("could not withdraw a receive from %s: %s", link.endpoint, error)
        # The hub answers in order, so the pop's own answer, if any, has arrived by now.
        link.pending.pop(request_id, None)
        link.pops.pop(request_id, None)
        if future.done() and not future.cancelled() and future.exception() is None:
            args, frames = future.result()
            if args[0]:
                self._orphan(link, key, args[0], frames)
