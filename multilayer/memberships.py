"""The group memberships one layer made, kept so that they can be made again.

A broker without persistence loses every membership when it restarts (Redis, the ZeroMQ
hub, a Kafka log that comes back empty); the websocket clients in those groups stay
connected and would never hear from their rooms again. So the layer records what each
successful ``group_add`` created, with its deadline, and forgets it on ``group_discard``,
on ``flush`` and once the deadline has passed. A backend that notices its broker lost
that state calls ``Backend.reassert_memberships()``,
which adds them again with their ORIGINAL deadlines: a restart never extends
``group_expiry``.

Each layer restores what it created itself, whoever owns the channel: a membership that
another process made for this process's channel is that process's to restore.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable

__all__ = ["Membership", "Memberships"]

#: One membership: group, channel and its deadline (wall-clock seconds).
Membership = tuple[str, str, float]


class Memberships:
    """The live memberships one layer created, shared by all its event loops and threads.

    Bounded by time rather than count: an entry goes once its deadline has passed, so
    the ledger holds at most what the broker holds for this layer.
    """

    def __init__(self) -> None:
        #: Names this ledger on the broker where a backend keeps a marker of it.
        self.token = secrets.token_hex(8)
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], float] = {}
        # Expired entries are swept when the ledger has doubled since the last sweep, so
        # that adding stays O(1) amortised however many memberships come and go.
        self._swept_at = 0

    def add(self, group: str, channel: str, deadline: float) -> None:
        """Record a membership the broker accepted, until ``deadline``."""
        with self._lock:
            self._entries[group, channel] = deadline
            if len(self._entries) > 2 * self._swept_at + 64:
                self._sweep(time.time())

    def discard(self, group: str, channel: str) -> None:
        """Forget a membership (``group_discard``); nothing happens if it is not recorded."""
        with self._lock:
            self._entries.pop((group, channel), None)

    def clear(self) -> None:
        """Forget every membership (``flush`` deleted them on the broker)."""
        with self._lock:
            self._entries.clear()
            self._swept_at = 0

    def deadline(self, group: str, channel: str) -> float | None:
        """The recorded deadline of a membership, or None if it is not recorded."""
        with self._lock:
            return self._entries.get((group, channel))

    def live(self, where: Callable[[str, str], bool] | None = None) -> list[Membership]:
        """The memberships whose deadline is still ahead, optionally those ``where`` picks."""
        with self._lock:
            self._sweep(time.time())
            entries = list(self._entries.items())
        return [
            (group, channel, deadline)
            for (group, channel), deadline in entries
            if where is None or where(group, channel)
        ]

    def latest(self) -> float | None:
        """The latest deadline of a live membership; None when there is none."""
        with self._lock:
            self._sweep(time.time())
            return max(self._entries.values(), default=None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _sweep(self, current: float) -> None:
        # Under self._lock.
        for key in [key for key, deadline in self._entries.items() if deadline <= current]:
            del self._entries[key]
        self._swept_at = len(self._entries)
