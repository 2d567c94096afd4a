"""What layers count in this process, cheap enough for the send and receive paths.

Each :class:`~multilayer.layer.ChannelLayer` adds to one :class:`Tally` (plain integers:
no lock, no client library) and is tracked here while it lives, so that
:func:`process_counters` can sum every layer of the process by scheme and prefix without
asking a broker. :mod:`multilayer.metrics` exports that sum to Prometheus. A layer that is
garbage-collected leaves its counts behind, so the sums never go down while the process
lives (Prometheus reads a counter that goes down as a restart).

Send durations are only timed while :data:`timing` is on (``multilayer.metrics`` turns it
on when imported): two clock reads per send that nobody reads otherwise.
"""

from __future__ import annotations

import bisect
import threading
import weakref
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .backend import Backend
    from .layer import ChannelLayer

__all__ = [
    "SEND_BUCKETS",
    "SEND_SAMPLE",
    "Counters",
    "Tally",
    "process_counters",
    "timing",
    "track",
]

#: Upper bounds, in seconds, of the send-duration histogram's buckets (then +Inf): from an
#: in-process send (tens of microseconds) to a broker that stalls.
SEND_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)


class _Switch:
    """Whether sends are timed; read on every send, so a plain attribute."""

    on = False


#: One send in this many is timed (the first, then every eighth): a latency distribution
#: needs no more, and timing every send cost about 5 % of a ``memory://`` send.
SEND_SAMPLE = 8

#: ``timing.on = True`` times sends (one in :data:`SEND_SAMPLE`) of every layer in the process.
timing = _Switch()


@dataclass(frozen=True)
class Counters:
    """A layer's counters (see :class:`~multilayer.layer.LayerStats`), or a sum of them.

    ``send_buckets`` holds how many sends took at most each bound of
    :data:`SEND_BUCKETS` and more than the previous one (the last entry: more than
    2.5 s); ``send_seconds`` is their total duration. Only timed sends are there.
    """

    sent: int = 0
    group_sent: int = 0
    received: int = 0
    expired: int = 0
    dropped_full: int = 0
    reconnects: int = 0
    send_buckets: tuple[int, ...] = (0,) * (len(SEND_BUCKETS) + 1)
    send_seconds: float = 0.0

    def __add__(self, other: Counters) -> Counters:
        return Counters(
            self.sent + other.sent,
            self.group_sent + other.group_sent,
            self.received + other.received,
            self.expired + other.expired,
            self.dropped_full + other.dropped_full,
            self.reconnects + other.reconnects,
            tuple(a + b for a, b in zip(self.send_buckets, other.send_buckets, strict=True)),
            self.send_seconds + other.send_seconds,
        )


class _LoopState(Protocol):
    backend: Backend


class Tally:
    """The running counts of one layer object, added to by its send and receive paths.

    ``states`` is the layer's own map of per-event-loop states: what their backends
    count (full group members skipped, reconnects) is read from there, and added to
    ``gone_skipped`` / ``gone_reconnects`` by the layer when a state goes away. A tally
    holds no reference to its layer, so it can outlive it.
    """

    __slots__ = (
        "expired",
        "full",
        "gone_reconnects",
        "gone_skipped",
        "group_sent",
        "received",
        "send_buckets",
        "send_seconds",
        "sent",
        "states",
    )

    def __init__(self, states: Mapping[Any, _LoopState]) -> None:
        self.states = states
        self.sent = self.group_sent = self.received = self.expired = self.full = 0
        self.gone_skipped = self.gone_reconnects = 0
        self.send_buckets = [0] * (len(SEND_BUCKETS) + 1)
        self.send_seconds = 0.0

    def timed_send(self, seconds: float) -> None:
        """Count one send that took ``seconds``."""
        self.send_buckets[bisect.bisect_left(SEND_BUCKETS, seconds)] += 1
        self.send_seconds += seconds

    def retire(self, backend: Backend) -> None:
        """Keep the counts of ``backend``, whose event-loop state is going away."""
        self.gone_skipped += backend.skipped_full
        self.gone_reconnects += backend.reconnects

    def snapshot(self) -> Counters:
        """The counts so far; never blocks, never asks a broker."""
        backends = [state.backend for state in list(self.states.values())]
        return Counters(
            sent=self.sent,
            group_sent=self.group_sent,
            received=self.received,
            expired=self.expired,
            dropped_full=self.full + self.gone_skipped + sum(b.skipped_full for b in backends),
            reconnects=self.gone_reconnects + sum(b.reconnects for b in backends),
            send_buckets=tuple(self.send_buckets),
            send_seconds=self.send_seconds,
        )


@dataclass
class _Process:
    """Every layer of the process, and the counts of those already collected."""

    live: weakref.WeakSet[ChannelLayer] = field(default_factory=weakref.WeakSet)
    # Appended to by finalizers, which run wherever the garbage collector does, even in a
    # thread holding the lock: a deque's append needs none.
    gone: deque[tuple[tuple[str, str], Tally]] = field(default_factory=deque)
    retired: dict[tuple[str, str], Counters] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


_process = _Process()


def track(layer: ChannelLayer, tally: Tally) -> None:
    """Count ``layer`` (whose counts are in ``tally``) in :func:`process_counters`."""
    with _process.lock:
        _process.live.add(layer)
    weakref.finalize(layer, _process.gone.append, (_key(layer), tally))


def _key(layer: ChannelLayer) -> tuple[str, str]:
    return layer.url.scheme, layer.prefix


def process_counters() -> dict[tuple[str, str], tuple[Counters, int]]:
    """The counters of every layer of this process, and messages buffered, summed by
    (scheme, prefix) and sorted; layers collected since contribute their last counts."""
    with _process.lock:
        while _process.gone:
            key, tally = _process.gone.popleft()
            _process.retired[key] = _process.retired.get(key, Counters()) + tally.snapshot()
        sums = {key: (counters, 0) for key, counters in _process.retired.items()}
        # Under the lock: a layer made in another thread meanwhile would break the iteration.
        live = list(_process.live)
    for layer in live:
        key = _key(layer)
        counters, buffered = sums.get(key, (Counters(), 0))
        sums[key] = (
            counters + layer.counters(),
            buffered + sum(layer.buffered().values()),
        )
    return dict(sorted(sums.items()))
