"""Local buffers: one broker queue feeding per-channel buffers in one event loop.

A receive never pops from the broker itself. It registers as a waiter and one fetch
task per queue pops on behalf of all waiters, appending what arrives to per-channel
buffers. A receive cancelled at any moment therefore loses nothing (what was fetched
for it stays buffered for the next receive of that channel) and duplicates nothing
(each buffered payload is handed out once). For a backend that pops on arm
(:attr:`~multilayer.backend.Backend.pops_on_arm`) that task keeps one pop pending for
good, and the receive that starts waiting arms it.

A process inbox's buffers are bounded: each channel keeps at most its capacity of
messages that no receive took yet, so a member that never receives cannot grow the
process. A group envelope (:mod:`multilayer.fanout`) is opened here, into one copy per
listed member whose membership still holds.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from .backend import Backend, Item, now
from .fanout import Departures, is_envelope, open_envelope
from .serialization import deadline_of, log_malformed

__all__ = ["INBOX_BATCH", "HeldMessages", "LocalQueue"]

logger = logging.getLogger(__name__)

#: Messages one pop may take from a process inbox. Only this process can receive them, so
#: taking several at once is free; a normal channel's pop takes no more than there are
#: waiting receivers, so that a message never waits here while another process is idle
#: (unless the backend's channels live in this process alone).
INBOX_BATCH = 100


class LocalQueue:
    """Buffers and waiters for one broker queue (a normal channel or a process inbox)."""

    def __init__(self, backend: Backend, queue: str, departures: Departures | None = None) -> None:
        self.backend = backend
        self.queue = queue
        self.buffers: dict[str, deque[bytes]] = {}
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {}
        self._hungry = 0
        self._fetcher: asyncio.Task[None] | None = None
        inbox = queue.endswith("!")
        shared = backend.capabilities.multiprocess and not inbox
        self._batch = 1 if shared else INBOX_BATCH
        self._armed = backend.pops_on_arm
        #: Whether the pending pop was armed since it last returned: one arm per pop (a
        #: command in flight is not doubled), not one per receive that starts waiting.
        self._asked = False
        self._departures = departures
        # A normal channel buffers only what its waiting receives asked for; an inbox
        # buffers whatever arrives for any of its channels, so it needs a bound.
        self._limit = backend.settings.capacity.for_channel(queue) if inbox else None

    def take(self, channel: str) -> bytes | None:
        """A buffered payload for ``channel``, fetching without I/O if the backend can."""
        if channel in self.buffers:
            return self._unbuffer(channel)
        if self._fetcher is None:
            # No more than a pop would take: what a shared normal channel's pop leaves
            # behind stays where other processes' receives (or a give-back) can reach it.
            items = self.backend.pop_nowait(self.queue, self._batch)
            if items:
                self._buffer(items)
                if channel in self.buffers:
                    return self._unbuffer(channel)
        return None

    def _unbuffer(self, channel: str) -> bytes:
        buffer = self.buffers[channel]
        payload = buffer.popleft()
        if not buffer:
            # Process-specific channels come and go: an empty entry would stay forever.
            del self.buffers[channel]
        return payload

    def _buffer(self, items: list[tuple[str, bytes]]) -> list[str]:
        """Buffer ``items``; the channels that got a payload, in order."""
        filled: list[str] = []
        full = 0
        for channel, payload in items:
            if type(channel) is not str or type(payload) is not bytes:
                # Junk another client put where this queue's messages wait.
                size = len(payload) if isinstance(payload, bytes) else 0
                log_malformed(self.queue, size, "not a channel name and bytes")
            elif channel == self.queue and is_envelope(payload):
                filled += self._open(payload)
            elif self._append(channel, payload):
                filled.append(channel)
            else:
                full += 1
        if full:
            self.backend.skipped_full += full
            logger.warning(
                "dropped %d message(s) for channels of %r whose backlog in this process is "
                "full (capacity %d)",
                full,
                self.queue,
                self._limit,
            )
        return filled

    def _append(self, channel: str, payload: bytes) -> bool:
        """Buffer ``payload`` for ``channel``; False when its backlog here is full."""
        buffer = self.buffers.get(channel)
        if buffer is None:
            buffer = self.buffers[channel] = deque()
        elif self._limit is not None and len(buffer) >= self._limit:
            return False
        buffer.append(payload)
        return True

    def _open(self, data: bytes) -> list[str]:
        """Hand an envelope's payload to each member whose membership still holds."""
        try:
            envelope = open_envelope(self.queue, data)
        except ValueError as error:
            log_malformed(self.queue, len(data), error)
            return []
        current = now()
        departures = self._departures
        filled: list[str] = []
        full = 0
        for member, until in envelope.members:
            if until <= current or (
                departures and departures.left_after(envelope.group, member, envelope.sent_at)
            ):
                continue
            if self._append(member, envelope.payload):
                filled.append(member)
            else:
                full += 1
        if full:
            self.backend.skipped_full += full
            logger.warning(
                "group_send to %r: %d of %d members in this process skipped: their backlog "
                "here is full (capacity %d)",
                envelope.group,
                full,
                len(envelope.members),
                self._limit,
            )
        return filled

    async def wait(self, channel: str) -> None:
        """Wait until a payload for ``channel`` may be buffered."""
        future = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(channel, deque())
        waiters.append(future)
        self._hungry += 1
        if self._fetcher is None:
            self._fetcher = asyncio.create_task(
                self._fetch(), name=f"multilayer fetch {self.queue}"
            )
        if self._armed:
            self._arm()
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                # Woken and cancelled in the same step: pass the wake-up on.
                self.wake(channel)
            raise
        finally:
            if not future.done():
                future.cancel()
            if future in waiters:
                waiters.remove(future)
                self._hungry -= 1
            if not waiters and self._waiters.get(channel) is waiters:
                del self._waiters[channel]

    def wake(self, channel: str) -> bool:
        """Wake one receive waiting for ``channel``, if any, to look (again); whether one
        was woken."""
        waiters = self._waiters.get(channel)
        while waiters:
            future = waiters.popleft()
            self._hungry -= 1
            if not future.done():
                future.set_result(None)
                return True
        return False

    async def _fetch(self) -> None:
        """Pop for the waiting receives while there are some. For a backend that pops on
        arm (:attr:`Backend.pops_on_arm`) the pop stays pending, taking nothing until a
        receive arms it, so the task outlives its waiters rather than being made again
        for the next receive."""
        armed = self._armed
        try:
            while armed or self._hungry > 0:
                limit = 0 if armed else max(self._hungry, self._batch)
                items = await self.backend.pop(self.queue, limit)
                woken = 0
                for channel in self._buffer(items):
                    woken += self.wake(channel)
                if armed:
                    await self._arm_again(woken)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self.fail(error)
        finally:
            self._fetcher = None
            self._asked = False

    async def _arm_again(self, woken: int) -> None:
        """After an armed pop: arm the next one if receives still wait."""
        if woken > 1:
            # Several receives woken (a batch, a group's copies): they run first, without
            # arming, and more messages gather for the next batch. Three turns, as a
            # fetch task made per receive took before its next pop (made, first step, a
            # yield): fewer split a fan-out's stream into batches of one (a group of 100
            # in one process: 20 % fewer copies/s).
            for _ in range(3):
                await asyncio.sleep(0)
        self._asked = False
        if self._hungry > 0:
            self._arm()

    def _arm(self) -> None:
        """Arm the pending pop for the receives waiting, unless armed since it returned."""
        if not self._asked:
            self._asked = True
            self.backend.arm(self.queue, max(self._hungry, self._batch))

    def fail(self, error: BaseException) -> None:
        """End every waiter with ``error``."""
        for waiters in self._waiters.values():
            while waiters:
                future = waiters.popleft()
                self._hungry -= 1
                if not future.done():
                    future.set_exception(error)
        self._waiters.clear()

    async def stop(self, error: BaseException) -> None:
        """Cancel the fetch task and end waiters with ``error``."""
        fetcher = self._fetcher
        if fetcher is not None:
            fetcher.cancel()
            await asyncio.gather(fetcher, return_exceptions=True)
        self.fail(error)

    def restore(self, channel: str, payloads: Iterable[bytes]) -> None:
        """Put ``payloads`` for ``channel``, fetched before anything buffered here, first
        in line, and wake a receive waiting for them.
        """
        buffer = self.buffers.setdefault(channel, deque())
        buffer.extendleft(reversed(list(payloads)))
        if not buffer:
            del self.buffers[channel]
            return
        self.wake(channel)


class HeldMessages:
    """Messages a backend took from shared normal channels beyond what its receives wanted.

    Backends whose pops take a backlog at once (a claim, a prefetching pop) keep the
    surplus here, process-wide, for the next receives of the same queue, and give back
    to the broker whatever waited longer than a hold time, so that a process that stops
    receiving strands nothing. Safe to use from any thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, deque[tuple[float, Item]]] = {}

    def __bool__(self) -> bool:
        return bool(self._held)

    def hold(self, queue: str, items: Iterable[Item]) -> None:
        """Keep ``items`` of ``queue``, oldest first, from now."""
        since = time.monotonic()
        with self._lock:
            held = self._held.setdefault(queue, deque())
            held.extend((since, item) for item in items)
            if not held:
                del self._held[queue]

    def take(self, queue: str, limit: int) -> list[Item]:
        """Up to ``limit`` unexpired held messages of ``queue``, oldest first."""
        taken: list[Item] = []
        with self._lock:
            held = self._held.get(queue)
            if held is None:
                return taken
            current = now()
            while held and len(taken) < limit:
                item = held.popleft()[1]
                if deadline_of(item[1]) > current:
                    taken.append(item)
            if not held:
                del self._held[queue]
        return taken

    def release(self, held_for: float) -> list[tuple[str, list[Item]]]:
        """Remove and return, by queue, the unexpired messages held ``held_for`` seconds or
        more (all of them when it is 0): what the backend must give back to the broker.
        """
        cutoff = time.monotonic() - held_for
        current = now()
        released: list[tuple[str, list[Item]]] = []
        with self._lock:
            for queue, held in list(self._held.items()):
                items: list[Item] = []
                while held and (held_for <= 0 or held[0][0] <= cutoff):
                    item = held.popleft()[1]
                    if deadline_of(item[1]) > current:
                        items.append(item)
                if not held:
                    del self._held[queue]
                if items:
                    released.append((queue, items))
        return released

    def discard(self, keep: Callable[[str], bool] = lambda queue: False) -> None:
        """Forget the held messages of every queue ``keep`` refuses (all by default)."""
        with self._lock:
            for queue in [queue for queue in self._held if not keep(queue)]:
                del self._held[queue]
