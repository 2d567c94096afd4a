"""The channel layer: the Django Channels contract on top of any backend."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .backend import Backend, LayerSettings
from .capacity import CapacityPolicy
from .counters import SEND_SAMPLE, Counters, Tally, timing, track
from .exceptions import ChannelFull, ForeignChannel, LayerClosed
from .fanout import Departures
from .local import LocalQueue
from .memberships import Memberships
from .names import check_channel_name, check_group_name, check_message, non_local_name
from .options import Option, resolve_options
from .plugins import load_backend
from .serialization import DEFAULT_MAX_MESSAGE_SIZE, Codec, check_encryption_keys, deadline_of
from .url import LayerURL

__all__ = ["ENV_URL", "LAYER_OPTIONS", "ChannelLayer", "LayerStats", "from_url"]

logger = logging.getLogger(__name__)

#: The environment variable read when no URL is given.
ENV_URL = "MULTILAYER_URL"
DEFAULT_URL = "memory://"


def _check_prefix(value: str) -> str | None:
    try:
        check_group_name(value)
    except TypeError:
        return f"must be made of ASCII letters, digits, '-', '_' or '.', not {value!r}"
    return None


#: Options every layer accepts, whatever the backend.
LAYER_OPTIONS: Mapping[str, Option] = {
    "prefix": Option(str, "asgi", "namespace of every key, queue and topic", check=_check_prefix),
    "expiry": Option(float, 60.0, "seconds an undelivered message lives", minimum=0.001),
    "group_expiry": Option(float, 86400.0, "seconds a group membership lives", minimum=0.001),
    "capacity": Option(int, 100, "messages that may wait in one channel", minimum=1),
    "channel_capacity": Option(
        object, None, "{glob or regex: capacity} overriding capacity", in_url=False
    ),
    "max_message_size": Option(
        int,
        DEFAULT_MAX_MESSAGE_SIZE,
        "largest message in bytes of msgpack, before encryption",
        minimum=64,
    ),
    "symmetric_encryption_keys": Option(
        object,
        None,
        "Fernet keys: encrypt with the first, decrypt with any (comma-separated in the URL)",
        secret=True,
        convert=check_encryption_keys,
    ),
}


@dataclass(frozen=True)
class LayerStats:
    """A snapshot of one layer, from :meth:`ChannelLayer.stats`.

    ``queues`` and ``groups`` come from the broker and cover every process using the
    prefix: messages waiting per queue (a normal channel, or a process inbox named like
    ``"specific.3f2a9c!"``) and live members per group, each None when the backend's
    broker cannot tell (``unknown`` then says why). ``buffered`` counts, per channel, the
    messages this layer object has taken from the broker for receives in this process
    and not handed out yet (a process inbox's pop takes what waits for all its channels).

    The counters cover this layer object in this process since it was made: ``sent``
    messages accepted by ``send()``, ``group_sent`` calls of ``group_send()``,
    ``received`` messages returned by ``receive()``, ``expired`` messages that reached a
    receive here past their expiry and were dropped, ``dropped_full`` sends refused with
    ChannelFull plus group copies the broker refused because their member was full, and
    ``reconnects`` the times a broker connection was lost and made again.
    """

    url: str
    prefix: str
    queues: Mapping[str, int] | None
    groups: Mapping[str, int] | None
    unknown: str | None
    buffered: Mapping[str, int]
    sent: int
    group_sent: int
    received: int
    expired: int
    dropped_full: int
    reconnects: int


def _abandon(backends: Iterable[Backend]) -> None:
    """Have each backend of an ended event loop let go of what outlives its loop."""
    for backend in backends:
        try:
            backend.abandon()
        except Exception:
            logger.exception("abandoning the backend of an ended event loop failed")


class _LoopState:
    """What the layer holds for one event loop: a backend and its local queues."""

    def __init__(self, backend: Backend, departures: Departures) -> None:
        self.backend = backend
        self.departures = departures
        self.queues: dict[str, LocalQueue] = {}
        self.inboxes: set[str] = set()
        self._opened: asyncio.Future[None] | None = None
        self.is_open = False
        #: Backends of loops that ended without close(), abandoned once this one is open:
        #: before, the process-wide state they share with it would be dropped and remade.
        self.abandoned: list[Backend] = []

    async def ready(self) -> Backend:
        if self.is_open:
            return self.backend
        if self._opened is None:
            self._opened = asyncio.ensure_future(self.backend.open())
        opened = self._opened
        # A failed open is retried by the next call rather than cached forever.
        try:
            await asyncio.shield(opened)
        except asyncio.CancelledError:
            # close() cancels an open under way: whoever waited for it learns why, as a
            # receive already waiting would, instead of looking cancelled itself.
            if opened.cancelled():
                raise LayerClosed("the channel layer was closed") from None
            raise
        except Exception:
            if self._opened is not None and self._opened.done():
                self._opened = None
            raise
        if not self.is_open:
            self.is_open = True
            backend = self.backend
            logger.debug(
                "backend open url=%s prefix=%s backend=%s",
                backend.url.sanitized(),
                backend.settings.prefix,
                type(backend).__name__,
            )
            self._abandon_others()
        return self.backend

    def queue(self, name: str) -> LocalQueue:
        queue = self.queues.get(name)
        if queue is None:
            queue = self.queues[name] = LocalQueue(self.backend, name, self.departures)
        return queue

    async def close(self) -> None:
        for queue in self.queues.values():
            await queue.stop(LayerClosed("the channel layer was closed"))
        # First, so that this backend's close() is the last user's, which it awaits.
        self._abandon_others()
        if self.is_open:
            self.is_open = False
            await self.backend.close()
            logger.debug("backend closed url=%s", self.backend.url.sanitized())
        elif self._opened is not None:
            self._opened.cancel()
        self._opened = None

    def ended(self) -> list[Backend]:
        """Its loop ended without close(): the backends to abandon, its own (once its open
        started) and those it had not abandoned yet."""
        ended, self.abandoned = self.abandoned, []
        if self.is_open or self._opened is not None:
            ended.append(self.backend)
            self.is_open, self._opened = False, None
        return ended

    def _abandon_others(self) -> None:
        abandoned, self.abandoned = self.abandoned, []
        _abandon(abandoned)

    def wake(self, channels: Iterable[str]) -> None:
        """Have receives waiting here for ``channels`` look for kept payloads."""
        for channel in channels:
            queue = self.queues.get(non_local_name(channel))
            if queue is not None:
                queue.wake(channel)


class ChannelLayer:
    """A Django Channels layer on the broker named by ``url``.

    ``url`` picks the backend by scheme (``memory://``, ``redis://``, ``amqp://``,
    ``kafka://``, ``zmq://``, ...); with ``url=None`` the ``MULTILAYER_URL`` environment
    variable is read, else ``memory://``. Query parameters of the URL set options;
    keyword arguments override them. Core options and their defaults: ``prefix="asgi"``,
    ``expiry=60`` seconds, ``group_expiry=86400`` seconds, ``capacity=100``,
    ``channel_capacity=None``, ``max_message_size=2.5 MiB``, ``symmetric_encryption_keys=None``
    (Fernet keys; message bodies are encrypted with the first, decrypted with any); each
    backend documents its own. ``max_message_size`` counts the bytes of a message as msgpack,
    what the application sent, before encryption and the layer's own framing; the default
    admits every message of up to 1 MiB as JSON, as the Channels spec asks, and every
    backend's broker limits are sized to carry it encrypted.
    An unknown option raises :class:`~multilayer.exceptions.ConfigurationError` listing
    the valid ones.

    One layer object may be used from several event loops in turn; each loop gets its
    own broker connections.

    This class is longer than the house's ~300 lines on purpose: it is the whole Channels
    contract (eleven methods with their documented edge cases) in the one place
    applications read; what is not contract lives in ``local``, ``fanout``,
    ``memberships``, ``counters`` and the backends.
    """

    extensions = ["groups", "flush"]

    def __init__(
        self,
        url: str | LayerURL | None = None,
        *,
        prefix: str | None = None,
        expiry: float | None = None,
        group_expiry: float | None = None,
        capacity: int | None = None,
        channel_capacity: Mapping[Any, int] | None = None,
        **backend_options: Any,
    ) -> None:
        if url is None:
            url = os.environ.get(ENV_URL) or DEFAULT_URL
        self.url = url if isinstance(url, LayerURL) else LayerURL.parse(url)
        self.backend_class = load_backend(self.url.scheme)
        given = {
            name: value
            for name, value in {
                "prefix": prefix,
                "expiry": expiry,
                "group_expiry": group_expiry,
                "capacity": capacity,
                "channel_capacity": channel_capacity,
                **backend_options,
            }.items()
            if value is not None
        }
        specs = {**LAYER_OPTIONS, **self.backend_class.options}
        values = resolve_options(
            specs, self.url.query, given, where=self.url.sanitized(), scheme=self.url.scheme
        )
        self.prefix: str = values["prefix"]
        self.expiry: float = values["expiry"]
        self.group_expiry: float = values["group_expiry"]
        self.capacity: int = values["capacity"]
        self.channel_capacity: Mapping[Any, int] = values["channel_capacity"] or {}
        self.settings = LayerSettings(
            prefix=self.prefix,
            expiry=self.expiry,
            group_expiry=self.group_expiry,
            capacity=CapacityPolicy(self.capacity, self.channel_capacity),
            max_message_size=values["max_message_size"],
        )
        self.backend_options = {
            name: values[name]
            for name, spec in self.backend_class.options.items()
            if spec.alias_of is None
        }
        self.backend_class.check_url(self.url, self.backend_options)
        # Random bytes from the OS: unique across processes and immune to random.seed().
        self.process_name = secrets.token_hex(8)
        self._own_suffix = f".{self.process_name}!"
        self._capacity_for = self.settings.capacity.for_channel
        self._codec = Codec(
            max_size=self.settings.max_message_size,
            keys=values["symmetric_encryption_keys"] or (),
        )
        self._states: dict[asyncio.AbstractEventLoop, _LoopState] = {}
        # Group copies in flight when this layer discarded a membership are not delivered.
        self._departures = Departures(keep_for=self.expiry)
        # What group_add made, for the backends of every loop to re-assert after their
        # broker lost it (multilayer.memberships).
        self._memberships = Memberships()
        self._states_lock = threading.Lock()
        # Payloads a closed or finished loop state had fetched but not handed out, by
        # channel, for the next receive of that channel in any loop (under _states_lock).
        self._kept: dict[str, deque[bytes]] = {}
        self._tally = Tally(self._states)
        track(self, self._tally)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url.sanitized()} prefix={self.prefix!r}>"

    # -- per-event-loop state -------------------------------------------------------

    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        try:
            return self._states[loop]
        except KeyError:
            pass
        with self._states_lock:
            state = self._states.get(loop)
            if state is not None:
                return state
            backend = self.backend_class(self.url, self.settings, self.backend_options)
            backend.membership_ledger = self._memberships
            state = self._states[loop] = _LoopState(backend, self._departures)
            dead = [self._states.pop(old) for old in list(self._states) if old.is_closed()]
        for gone in dead:
            # Its loop ended without close(): nothing runs there any more.
            self._retire(gone)
            self._keep(gone)
            state.abandoned += gone.ended()
        return state

    def _keep(self, gone: _LoopState) -> None:
        """Keep what a loop state that no loop runs any more had fetched and not handed
        out, for the next receive of each channel in any event loop.

        Called from the thread of the state's loop after its fetch tasks stopped, or for
        a state whose loop is closed or idle, so nothing changes its buffers meanwhile.
        """
        current = time.time()
        with self._states_lock:
            kept = self._kept
            for queue in gone.queues.values():
                for channel, payloads in queue.buffers.items():
                    kept.setdefault(channel, deque()).extend(payloads)
                queue.buffers.clear()
            if not kept:
                return
            # Drop the expired, so that channels nobody receives again do not pile up.
            for channel in list(kept):
                payloads = deque(p for p in kept[channel] if deadline_of(p) > current)
                if payloads:
                    kept[channel] = payloads
                else:
                    del kept[channel]
            channels = list(kept)
            live = list(self._states.items())
        # A receive that waits in another loop since before these were kept looks again.
        for loop, state in live:
            with contextlib.suppress(RuntimeError):  # that loop closed meanwhile
                loop.call_soon_threadsafe(state.wake, channels)

    def _reclaim(self, queue: LocalQueue, channel: str) -> None:
        """Move the kept payloads of ``channel`` into this loop's ``queue``."""
        with self._states_lock:
            payloads = self._kept.pop(channel, None)
        if payloads:
            queue.restore(channel, payloads)

    async def _backend(self) -> Backend:
        return await self._state().ready()

    # -- the Channels contract -------------------------------------------------------

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        """Send ``message`` to ``channel``; ChannelFull if the channel is at capacity.

        MessageTooLarge, before anything is sent, when ``message`` as msgpack exceeds
        ``max_message_size`` bytes.
        """
        check_channel_name(channel)
        check_message(message)
        deadline = time.time() + self.expiry
        payload = self._codec.encode(message, deadline)
        state = self._state()
        # One send in SEND_SAMPLE is timed: timing them all cost 5 % of a memory:// send.
        started = time.perf_counter() if timing.on and not self._tally.sent % SEND_SAMPLE else 0.0
        backend = state.backend if state.is_open else await state.ready()
        try:
            await backend.push(
                channel, payload, deadline=deadline, capacity=self._capacity_for(channel)
            )
        except ChannelFull:
            self._tally.full += 1
            raise
        self._tally.sent += 1
        if started:
            self._tally.timed_send(time.perf_counter() - started)

    async def receive(self, channel: str) -> dict[str, Any]:
        """The next message on ``channel``, waiting as long as it takes.

        Safe to cancel at any moment: a message fetched for a cancelled receive is kept
        for the next receive of the same channel in this process.
        """
        check_channel_name(channel)
        queue_name = non_local_name(channel)
        specific = queue_name != channel
        if specific and not queue_name.endswith(self._own_suffix):
            raise ForeignChannel(
                f"cannot receive from {channel!r}: process-specific channels are received "
                "only through the layer whose new_channel() made them"
            )
        state = self._state()
        backend = state.backend if state.is_open else await state.ready()
        if specific and queue_name not in state.inboxes:
            await backend.declare_inbox(queue_name)
            state.inboxes.add(queue_name)
        queue = state.queue(queue_name)
        while True:
            if self._kept:
                self._reclaim(queue, channel)
            payload = queue.take(channel)
            if payload is None:
                await queue.wait(channel)
            elif deadline_of(payload) > time.time():
                # Broker content is untrusted: what does not decode is logged and dropped.
                message = self._codec.decode(payload, channel)
                if message is not None:
                    self._tally.received += 1
                    return message
            else:
                self._tally.expired += 1

    async def new_channel(self, prefix: str = "specific") -> str:
        """A new process-specific channel name, receivable only through this layer.

        Its process queue exists on the broker before this returns, so messages sent to
        it right away wait for the first receive.
        """
        check_group_name(prefix)
        inbox = f"{prefix}.{self.process_name}!"
        state = self._state()
        if inbox not in state.inboxes:
            await (await state.ready()).declare_inbox(inbox)
            state.inboxes.add(inbox)
        return inbox + secrets.token_hex(6)

    async def group_add(self, group: str, channel: str) -> None:
        """Add ``channel`` to ``group`` for ``group_expiry`` seconds."""
        check_group_name(group)
        check_channel_name(channel)
        backend = await self._backend()
        deadline = time.time() + self.group_expiry
        await backend.group_add(group, channel, deadline=deadline)
        self._memberships.add(group, channel, deadline)
        self._departures.join(group, channel)

    async def group_discard(self, group: str, channel: str) -> None:
        """Remove ``channel`` from ``group``; nothing happens if it was not a member.

        Group messages sent before the discard and not yet received are not delivered to
        ``channel`` either when this layer receives it (the usual case: a consumer leaving
        its own groups). A discard made through another layer object applies to messages
        sent after it.
        """
        check_group_name(group)
        check_channel_name(channel)
        backend = await self._backend()
        self._departures.leave(group, channel)
        # Forgotten first: a re-assertion running meanwhile must not bring it back.
        self._memberships.discard(group, channel)
        await backend.group_discard(group, channel)

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        """Send one copy of ``message`` to every member of ``group``.

        A member at capacity is skipped and logged; this never raises ChannelFull. A message
        over ``max_message_size`` raises MessageTooLarge, as :meth:`send` does. The
        process-specific members of one process get one copy between them, counted once
        against that process's capacity; the process hands it to each member.
        """
        check_group_name(group)
        check_message(message)
        deadline = time.time() + self.expiry
        payload = self._codec.encode(message, deadline)
        backend = await self._backend()
        await backend.group_send(group, payload, deadline=deadline, capacity=self.settings.capacity)
        self._tally.group_sent += 1

    async def stats(self) -> LayerStats:
        """Queue depths and group sizes under this layer's prefix, and this layer's counters.

        Asks the broker (connecting in this event loop if needed); see
        :class:`LayerStats` for what each figure covers.
        """
        backend = await self._backend()
        broker = await backend.broker_stats()
        missing = [
            what
            for what, known in (("queue depths", broker.queues), ("group sizes", broker.groups))
            if known is None
        ]
        unknown = f"{self.url.scheme}:// cannot report {' or '.join(missing)}" if missing else None
        counters = self.counters()
        return LayerStats(
            url=self.url.sanitized(),
            prefix=self.prefix,
            queues=dict(sorted(broker.queues.items())) if broker.queues is not None else None,
            groups=dict(sorted(broker.groups.items())) if broker.groups is not None else None,
            unknown=unknown,
            buffered=self.buffered(),
            sent=counters.sent,
            group_sent=counters.group_sent,
            received=counters.received,
            expired=counters.expired,
            dropped_full=counters.dropped_full,
            reconnects=counters.reconnects,
        )

    def counters(self) -> Counters:
        """This layer object's counters, as in :meth:`stats`, without asking the broker."""
        return self._tally.snapshot()

    def buffered(self) -> dict[str, int]:
        """Messages this process fetched and did not hand out yet, by channel, as in
        :meth:`stats`, without asking the broker."""
        with self._states_lock:
            states = list(self._states.values())
            buffered = {channel: len(payloads) for channel, payloads in self._kept.items()}
        for state in states:
            # Copies: other event loops, in other threads, may change theirs meanwhile.
            for queue in list(state.queues.values()):
                for channel, payloads in list(queue.buffers.items()):
                    if payloads:
                        buffered[channel] = buffered.get(channel, 0) + len(payloads)
        return dict(sorted(buffered.items()))

    def _retire(self, state: _LoopState) -> None:
        """Keep the counts of a loop state that is going away."""
        self._tally.retire(state.backend)

    async def flush(self) -> None:
        """Delete every message, channel and group under this layer's prefix."""
        state = self._state()
        backend = await state.ready()
        self._memberships.clear()
        await backend.flush()
        for queue in state.queues.values():
            queue.buffers.clear()
        with self._states_lock:
            self._kept.clear()
        self._departures.clear()

    async def close(self) -> None:
        """Close the connections of the current event loop; safe to call again, or never used.

        The layer may be used again afterwards: it reconnects on demand. What a loop had
        fetched from a process inbox and not handed out yet is kept in the layer for the
        next receive of its channel, from any event loop.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._states_lock:
            state = self._states.pop(loop, None) if loop is not None else None
            others = list(self._states.items())
            self._states.clear()
        for gone in [state, *(other for _loop, other in others)]:
            if gone is not None:
                self._retire(gone)
        for other_loop, other in others:
            if not other_loop.is_closed() and other_loop.is_running() and other_loop is not loop:
                asyncio.run_coroutine_threadsafe(self._close_state(other), other_loop)
            else:
                self._keep(other)
                _abandon(other.ended())
        if state is not None:
            await self._close_state(state)

    async def _close_state(self, state: _LoopState) -> None:
        """Close ``state`` in its own event loop, keeping what it had fetched."""
        try:
            await state.close()
        finally:
            self._keep(state)


def from_url(url: str, **options: Any) -> ChannelLayer:
    """The layer for ``url``; the same as ``ChannelLayer(url, **options)``."""
    return ChannelLayer(url, **options)
