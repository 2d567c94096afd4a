"""The contract between the layer core and a broker backend.

A backend is one class, registered under one or more URL schemes in the
``multilayer.backends`` entry-point namespace. The core does everything that does not
depend on the broker: validation, serialization, expiry deadlines, process-specific
channel names, per-channel local buffers, cancellation safety and event-loop handling.
A backend moves opaque payloads between named queues. It knows nothing of Django.

Queues. Every message waits in a *queue*:

* a normal channel's queue is named like the channel (``"chat.worker"``);
* all process-specific channels of one process share an *inbox* queue named by the
  non-local part of their names (``"specific.3f2a9c!"``); the backend stores each
  message with its full channel name and :meth:`Backend.pop` returns it.

Payloads begin with the 8-byte expiry deadline (:func:`multilayer.serialization.deadline_of`);
the core drops expired payloads on receive, so a backend without native expiry stays
correct, but it should still drop them to bound memory.

Event loops. The core makes one backend instance per event loop that uses the layer
(``async_to_sync`` runs each call in a loop of its own) and calls :meth:`Backend.open`
in it before anything else. Several instances for one URL and prefix must see the same
queues and groups, whether in one process or many.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .capacity import CapacityPolicy
from .exceptions import ChannelFull
from .fanout import seal, split
from .memberships import Membership, Memberships
from .options import Option
from .url import LayerURL

__all__ = ["Backend", "BrokerStats", "Capabilities", "Item", "LayerSettings"]

logger = logging.getLogger(__name__)

#: One message taken from a queue: its full channel name and its payload.
Item = tuple[str, bytes]

#: Most memberships :meth:`Backend.restore_memberships` re-adds at once by default.
_RESTORE_CONCURRENCY = 64


@dataclass(frozen=True)
class Capabilities:
    """What a backend's broker does itself; the conformance suite reads these.

    ``multiprocess``: separate OS processes share channels through it.
    ``native_expiry``: the broker discards expired messages itself.
    ``native_fanout``: ``group_send`` is one broker operation whatever the member count.
    ``restartable``: state outlives a broker restart (queues and groups are kept).
    ``restores_memberships``: after its broker lost the group memberships (a restart
    without persistence, a failover to a replica that missed writes), each layer adds
    again the memberships it made, with their original deadlines, within a bounded time
    (see :meth:`Backend.reassert_memberships`).
    ``queue_depth``: :meth:`Backend.broker_stats` reports how many messages wait in each
    queue under the prefix.
    ``group_sizes``: :meth:`Backend.broker_stats` reports the live member count of each
    group under the prefix.
    """

    multiprocess: bool = True
    native_expiry: bool = True
    native_fanout: bool = True
    restartable: bool = False
    restores_memberships: bool = False
    queue_depth: bool = False
    group_sizes: bool = False

    def as_dict(self) -> dict[str, bool]:
        """The capabilities as plain data (for records and reports)."""
        return {
            "multiprocess": self.multiprocess,
            "native_expiry": self.native_expiry,
            "native_fanout": self.native_fanout,
            "restartable": self.restartable,
            "restores_memberships": self.restores_memberships,
            "queue_depth": self.queue_depth,
            "group_sizes": self.group_sizes,
        }


@dataclass(frozen=True)
class LayerSettings:
    """The core options, validated, as a backend sees them."""

    prefix: str
    expiry: float
    group_expiry: float
    capacity: CapacityPolicy
    max_message_size: int


@dataclass(frozen=True)
class BrokerStats:
    """What only the broker knows about a prefix, for :meth:`ChannelLayer.stats`.

    ``queues`` maps each queue name (a normal channel, or a process inbox such as
    ``"specific.3f2a9c!"``) to the messages waiting in it; ``groups`` maps each group to
    its live member count. Either is None when the broker cannot tell (see
    :attr:`Capabilities.queue_depth` and :attr:`Capabilities.group_sizes`).
    """

    queues: Mapping[str, int] | None = None
    groups: Mapping[str, int] | None = None


class Backend(abc.ABC):
    """One connection set to a broker, used from one event loop.

    Subclasses set :attr:`capabilities`, :attr:`extra` and :attr:`options`, and
    implement the abstract coroutines. Broker client errors should surface as
    :class:`multilayer.exceptions.BrokerError` with the original as ``__cause__``;
    transient connection loss should be retried inside the backend so that a waiting
    :meth:`pop` resumes after the broker comes back.
    """

    #: What the broker does natively.
    capabilities: ClassVar[Capabilities] = Capabilities()
    #: The ``pip install multilayer[extra]`` that installs this backend's client library.
    extra: ClassVar[str | None] = None
    #: Whether :meth:`pop` takes only what :meth:`arm` asked for: the core then keeps one
    #: pop pending per queue for good, and arms it from the step of each receive that
    #: starts waiting, so that the broker command leaves without a turn of the event loop.
    pops_on_arm: ClassVar[bool] = False
    #: Backend-specific options (URL query parameters or keyword arguments).
    options: ClassVar[Mapping[str, Option]] = {}

    def __init__(self, url: LayerURL, settings: LayerSettings, options: Mapping[str, Any]):
        self.url = url
        self.settings = settings
        self.config = dict(options)
        #: Times this instance got its broker connection back after losing it.
        self.reconnects = 0
        #: Group copies this instance's broker refused because a member was full.
        self.skipped_full = 0
        #: The memberships the layer made: the layer replaces this ledger with its own,
        #: shared by the backends of all its event loops, right after making the backend.
        self.membership_ledger = Memberships()
        #: Memberships this instance added again after its broker had lost them.
        self.reasserted = 0

    @classmethod
    def check_url(cls, url: LayerURL, options: Mapping[str, Any]) -> None:
        """Reject a URL this backend cannot use, without any I/O (ConfigurationError)."""

    @classmethod
    def versions(cls) -> dict[str, str]:
        """Client library versions, for conformance records."""
        return {}

    async def broker_version(self) -> str | None:
        """The broker's version, if it tells (called after :meth:`open`)."""
        return None

    async def broker_stats(self) -> BrokerStats:
        """Queue depths and group sizes under this layer's prefix, as far as the broker tells.

        The default tells nothing; a backend overriding this sets the matching
        :class:`Capabilities` flags.
        """
        return BrokerStats()

    def skip_full_members(
        self, group: str, skipped: int, members: int | None = None, *, exact: bool = True
    ) -> None:
        """Count the copies of one ``group_send`` refused because their member was full,
        and log them in one line (see :func:`log_full_members`).
        """
        if skipped:
            self.skipped_full += skipped
            log_full_members(group, skipped, members, exact=exact)

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect. Called once, in this instance's event loop, before anything else."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release every connection and task. Called at most once, after :meth:`open`."""

    def abandon(self) -> None:
        """This instance's event loop ended without :meth:`close` (``async_to_sync`` runs
        each call in a new loop): let go, without awaiting, of what outlives the loop
        (process-wide state, threads). Its connections went with the loop.

        Called at most once, from another thread or event loop, after :meth:`open`
        started (it may not have finished); never after :meth:`close`. By default nothing
        outlives the loop.
        """

    @abc.abstractmethod
    async def declare_inbox(self, inbox: str) -> None:
        """Make the process queue ``inbox`` exist, so that messages sent to it wait.

        Called by ``new_channel()`` before it returns, and again (idempotently) by the
        first receive of a process-specific channel in another event loop.
        """

    @abc.abstractmethod
    async def push(self, channel: str, payload: bytes, *, deadline: float, capacity: int) -> None:
        """Append ``payload`` to ``channel``'s queue, or raise ChannelFull.

        For a process-specific channel the queue is the inbox ``non_local_name(channel)``,
        and ``capacity`` counts every message waiting in that inbox. The check and the
        append are one atomic step on the broker: two processes must not both fit into
        the last free place.
        """

    @abc.abstractmethod
    async def pop(self, queue: str, limit: int) -> list[Item]:
        """Take between 1 and ``limit`` messages from ``queue``, oldest first, waiting for one.

        Returns ``(channel, payload)`` pairs; one broker message fanned out to several
        channels of an inbox (a group message) may be returned whole, beyond ``limit``.
        Each message goes to exactly one caller, whichever process it is in. The core
        calls this from one task per queue and does not cancel it when a receiver gives
        up (it buffers what arrives); it is cancelled when the layer closes or the event
        loop ends, and should not lose a message then.
        """

    def arm(self, queue: str, limit: int) -> None:
        """Only with :attr:`pops_on_arm`: receives wait on ``queue``; have the pending (or
        next) ``pop(queue, 0)`` take up to ``limit`` messages. Called without awaiting,
        each time a receive starts waiting and after each pop while some still wait; a
        command already in flight is not doubled. ``pop(queue, 0)`` returns what the armed
        command took, possibly nothing (an idle wait that timed out), and waits meanwhile;
        ``pop(queue, limit)`` arms itself.
        """
        raise NotImplementedError(f"{type(self).__name__} does not arm its pops")

    def pop_nowait(self, queue: str, limit: int) -> list[Item]:
        """Take up to ``limit`` waiting messages without I/O; [] when there are none.

        Backends holding messages in this process override this (memory; Kafka, whose
        replay keeps every waiting message in memory).
        """
        return []

    @abc.abstractmethod
    async def group_add(self, group: str, channel: str, *, deadline: float) -> None:
        """Add ``channel`` to ``group`` until ``deadline`` (renewing an earlier membership)."""

    @abc.abstractmethod
    async def group_discard(self, group: str, channel: str) -> None:
        """Remove ``channel`` from ``group``; no error if it was not a member."""

    async def group_members(self, group: str) -> Iterable[str]:
        """The live (unexpired) members of ``group``; used by the default :meth:`group_send`."""
        raise NotImplementedError(
            f"{type(self).__name__} implements neither group_send nor group_members"
        )

    async def group_send(
        self, group: str, payload: bytes, *, deadline: float, capacity: CapacityPolicy
    ) -> None:
        """Deliver ``payload`` to each live member of ``group``, skipping full ones (logged).

        Never raises ChannelFull. The process-specific members of one inbox share one
        envelope (:mod:`multilayer.fanout`), counted once against the inbox's capacity.
        The default pushes to each normal member and each inbox concurrently; a broker
        that fans out natively overrides this.
        """
        inboxes, normal = split((member, math.inf) for member in await self.group_members(group))
        sent_at = now()
        targets = [(channel, payload, [channel]) for channel, _until in normal] + [
            (inbox, seal(payload, group, sent_at, inbox, local), [name for name, _ in local])
            for inbox, local in inboxes.items()
        ]
        results = await asyncio.gather(
            *(
                self.push(target, data, deadline=deadline, capacity=capacity.for_channel(target))
                for target, data, _members in targets
            ),
            return_exceptions=True,
        )
        skipped = 0
        for (_target, _data, members), result in zip(targets, results, strict=True):
            if isinstance(result, ChannelFull):
                skipped += len(members)
            elif isinstance(result, BaseException):
                raise result
        self.skip_full_members(group, skipped, sum(len(members) for *_, members in targets))

    async def reassert_memberships(self, where: Callable[[str, str], bool] | None = None) -> int:
        """Add again the layer's live memberships (those ``where`` picks), with their
        original deadlines; returns how many. For a backend that noticed its broker lost them.

        A ``group_discard`` or renewal that ran meanwhile wins: a membership discarded
        while it was being re-added is discarded again, one renewed is renewed again.
        """
        entries = self.membership_ledger.live(where)
        if not entries:
            return 0
        await self.restore_memberships(entries)
        for group, channel, deadline in entries:
            recorded = self.membership_ledger.deadline(group, channel)
            if recorded is None:
                await self.group_discard(group, channel)
            elif recorded != deadline:
                await self.restore_memberships([(group, channel, recorded)])
        self.reasserted += len(entries)
        logger.info(
            "re-asserted %d group membership(s) the broker had lost for prefix %s",
            len(entries),
            self.settings.prefix,
        )
        return len(entries)

    async def restore_memberships(self, entries: list[Membership]) -> None:
        """Make each membership of ``entries`` exist until its deadline.

        The default calls :meth:`group_add` for each, a bounded number at a time; a backend
        that can do better (one round trip, or never shortening a deadline another process
        renewed) overrides it.
        """
        for start in range(0, len(entries), _RESTORE_CONCURRENCY):
            await asyncio.gather(
                *(
                    self.group_add(group, channel, deadline=deadline)
                    for group, channel, deadline in entries[start : start + _RESTORE_CONCURRENCY]
                )
            )

    @abc.abstractmethod
    async def flush(self) -> None:
        """Delete every queue, message and group under this layer's prefix, and only those."""


def log_full_members(
    group: str, skipped: int, members: int | None = None, *, exact: bool = True
) -> None:
    """Log that one ``group_send`` skipped ``skipped`` full members (one place, one wording).

    One line per group_send rather than per member, which would flood the log for a big
    group. ``members`` is the number of live members the group_send reached for, when the
    backend knows it; ``exact`` is False when the broker only says that some copy was
    refused (so ``skipped`` is a lower bound).
    """
    if members is not None:
        logger.warning(
            "group_send to %r skipped %d of %d members: channel full", group, skipped, members
        )
    else:
        count = f"{skipped}" if exact else f"at least {skipped}"
        noun = "member" if skipped == 1 else "members"
        logger.warning("group_send to %r skipped %s %s: channel full", group, count, noun)


def now() -> float:
    """Wall-clock seconds, the clock that deadlines use across processes."""
    return time.time()
