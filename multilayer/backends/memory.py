"""In-process backend: ``memory://`` (the embedded default).

Features: every contract point within one process; layers built from the same URL share
channels and groups, across event loops and threads. No broker, no persistence, no
multiprocess delivery.

URL format: ``memory://`` or ``memory://NAME`` (NAME selects a separate store; layers with
different names never see each other).

Options: only the core ones.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from typing import ClassVar

from ..backend import Backend, BrokerStats, Capabilities, Item, now
from ..capacity import CapacityPolicy
from ..exceptions import ChannelFull
from ..fanout import seal, split
from ..names import non_local_name
from ..serialization import deadline_of
from ..toolkit import ProcessWide, Waiters

__all__ = ["MemoryBackend"]


class _Store:
    """Queues, groups and waiting pops shared by every memory layer of one name."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.queues: dict[str, deque[Item]] = {}
        self.groups: dict[str, dict[str, float]] = {}
        self.waiters = Waiters()

    def pop_locked(self, key: str, limit: int) -> list[Item]:
        queue = self.queues.get(key)
        if not queue:
            return []
        taken: list[Item] = []
        current = now()
        while queue and len(taken) < limit:
            item = queue.popleft()
            if deadline_of(item[1]) > current:
                taken.append(item)
        if not queue:
            del self.queues[key]
        return taken

    def push_locked(self, key: str, item: Item, capacity: int) -> bool:
        queue = self.queues.get(key)
        if queue is None:
            queue = self.queues[key] = deque()
        elif len(queue) >= capacity:
            current = now()
            kept = [entry for entry in queue if deadline_of(entry[1]) > current]
            if len(kept) >= capacity:
                return False
            queue.clear()
            queue.extend(kept)
        queue.append(item)
        self.waiters.wake_one(key)
        return True


#: Stores by name; kept when no layer uses them, as a broker keeps its queues.
_stores: ProcessWide[_Store] = ProcessWide(keep=True)


class MemoryBackend(Backend):
    """Queues in this process's memory, shared by every layer with the same URL path."""

    capabilities: ClassVar[Capabilities] = Capabilities(
        multiprocess=False,
        native_expiry=True,
        native_fanout=True,
        restartable=False,
        queue_depth=True,
        group_sizes=True,
    )

    async def open(self) -> None:
        name = self.url.host or self.url.path or ""
        self._store = _stores.use(name, self, _Store)
        self._prefix = self.settings.prefix + ":"

    async def close(self) -> None:
        """The store outlives layers, like a broker."""

    async def broker_version(self) -> str:
        return "in-process"

    async def declare_inbox(self, inbox: str) -> None:
        """Queues exist implicitly."""

    async def push(self, channel: str, payload: bytes, *, deadline: float, capacity: int) -> None:
        key = self._prefix + (non_local_name(channel) if "!" in channel else channel)
        store = self._store
        with store.lock:
            accepted = store.push_locked(key, (channel, payload), capacity)
        if not accepted:
            raise ChannelFull(f"channel {channel!r} is full ({capacity} messages waiting)")

    def pop_nowait(self, queue: str, limit: int) -> list[Item]:
        store = self._store
        with store.lock:
            return store.pop_locked(self._prefix + queue, limit)

    async def pop(self, queue: str, limit: int) -> list[Item]:
        store = self._store
        key = self._prefix + queue
        while True:
            with store.lock:
                taken = store.pop_locked(key, limit)
                if taken:
                    return taken
                future = store.waiters.add(key)
            try:
                await future
            finally:
                # A cancelled receive must not stay listed (and count) as waiting.
                with store.lock:
                    store.waiters.discard(key, future)

    async def group_add(self, group: str, channel: str, *, deadline: float) -> None:
        with self._store.lock:
            self._store.groups.setdefault(self._prefix + group, {})[channel] = deadline

    async def group_discard(self, group: str, channel: str) -> None:
        with self._store.lock:
            members = self._store.groups.get(self._prefix + group)
            if members is not None:
                members.pop(channel, None)
                if not members:
                    del self._store.groups[self._prefix + group]

    async def group_members(self, group: str) -> Iterable[str]:
        current = now()
        with self._store.lock:
            members = self._store.groups.get(self._prefix + group, {})
            return [channel for channel, until in members.items() if until > current]

    async def group_send(
        self, group: str, payload: bytes, *, deadline: float, capacity: CapacityPolicy
    ) -> None:
        store = self._store
        current = now()
        full = live = 0
        with store.lock:
            members = store.groups.get(self._prefix + group)
            if not members:
                return
            for channel, until in list(members.items()):
                if until <= current:
                    del members[channel]
            inboxes, normal = split(members.items())
            live = len(members)
            for channel, _until in normal:
                if not store.push_locked(
                    self._prefix + channel, (channel, payload), capacity.for_channel(channel)
                ):
                    full += 1
            for inbox, local in inboxes.items():
                envelope = seal(payload, group, current, inbox, local)
                if not store.push_locked(
                    self._prefix + inbox, (inbox, envelope), capacity.for_channel(inbox)
                ):
                    full += len(local)
        self.skip_full_members(group, full, live)

    async def broker_stats(self) -> BrokerStats:
        store, prefix, current = self._store, self._prefix, now()
        start = len(prefix)
        with store.lock:
            queues = {
                key[start:]: sum(1 for _channel, payload in queue if deadline_of(payload) > current)
                for key, queue in store.queues.items()
                if key.startswith(prefix)
            }
            groups = {
                key[start:]: sum(1 for until in members.values() if until > current)
                for key, members in store.groups.items()
                if key.startswith(prefix)
            }
        return BrokerStats(queues=queues, groups=groups)

    async def flush(self) -> None:
        store = self._store
        with store.lock:
            for table in (store.queues, store.groups):
                for key in [k for k in table if k.startswith(self._prefix)]:
                    del table[key]
