"""Kafka backend: ``kafka://`` and ``kafka+ssl://`` on kafka-python.

Features: every contract point across processes, on Apache Kafka or any broker speaking
its protocol (CI runs Tansu). Each layer prefix owns one single-partition topic, the
*operation log* ``multilayer.<prefix>``; every send, receive claim, group change and flush
is a record in it, and every process replays the log through the same deterministic state
machine, so the log order decides capacity, which receiver gets a message of a normal
channel, group membership and flush, with no consumer groups and no rebalances. Only the
owning process takes messages from its inbox; ``group_send`` is one record, fanned out by
the replay into one copy per normal member and one envelope per process inbox with members
(:mod:`multilayer.fanout`), each counted once against capacity. No topic is created or
deleted while the layer runs, only when a prefix is first used. See
``docs/backends/kafka.md`` for the design and its costs.

URL format: ``kafka://[user:password@]host[:port][,host[:port]...][?option=value...]``
(port 9092 by default; credentials select SASL over plaintext) and
``kafka+ssl://[user:password@]host[:port][,...]?ssl_cafile=...`` (TLS, and SASL when
credentials are given).

Options (URL query or keyword arguments), besides the core ones:

* ``fetch_wait_ms`` (int, 5): how long the broker may hold a fetch while this layer is
  busy; bounds delivery latency.
* ``idle_fetch_wait_ms`` (int, 100): the same after ``idle_after`` seconds without traffic;
  bounds the CPU an idle layer burns on polling.
* ``idle_after`` (float, 2.0): seconds without traffic before polling slows down.
* ``claim_lease`` (float, 10.0): seconds a waiting receive's claim lives unless renewed; a
  crashed receiver's claim stops taking messages after this.
* ``prefetch`` (int, 500): messages one receive claim on a normal channel may take when
  they are already waiting; those no receive here wants yet go back to the channel after
  ``prefetch_hold`` seconds.
* ``prefetch_hold`` (float, 1.0): see ``prefetch``.
* ``retention_hours`` (float, ``group_expiry`` + 1 h): ``retention.ms`` of the operation log
  topic when this layer creates it; at least ``group_expiry``.
* ``acks`` (str, ``all``): producer acknowledgements (``all`` or ``1``).
* ``linger_ms`` (int, 0): how long kafka-python may hold a write so that later ones share
  its record batch; adds up to that much latency and caps the batches a process writes
  at 1000/``linger_ms`` a second, for brokers that pay per stored batch (Tansu).
* ``sasl_mechanism`` (str, ``PLAIN``): ``PLAIN``, ``SCRAM-SHA-256`` or ``SCRAM-SHA-512``.
* ``ssl_cafile``, ``ssl_certfile``, ``ssl_keyfile`` (str): PEM files for ``kafka+ssl://``.
* ``ssl_check_hostname`` (bool, true): verify the broker's certificate host name.
* ``ssl_verify`` (bool, true): verify the broker's certificate (against ``ssl_cafile``, else
  the system's CAs); ``false`` turns certificate and host name checks off, for tests only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import secrets
import socket
import ssl
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from queue import Empty, SimpleQueue
from typing import Any, ClassVar

import kafka
import msgpack
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

from ..backend import Backend, BrokerStats, Capabilities, Item, log_full_members, now
from ..capacity import CapacityPolicy
from ..exceptions import BrokerError, ChannelFull, ConfigurationError
from ..fanout import seal, split
from ..local import HeldMessages
from ..names import non_local_name
from ..options import Option
from ..serialization import deadline_of, largest_payload, log_malformed
from ..url import LayerURL

__all__ = ["KafkaBackend"]

logger = logging.getLogger(__name__)


#: Bytes a log record may add around a payload (operation, channel name, numbers).
_RECORD_OVERHEAD = 4096
#: Longest a caller waits for its own record to come back through the log.
_REPLAY_TIMEOUT = 60.0
#: Operations one Kafka record may carry; an operation's position in the log, which
#: identifies a message, is ``record offset * this + index in the record``.
_OPERATIONS_PER_RECORD = 1024
#: Seconds of waiting writes without any record arriving before the topic is checked.
_STALL = 2.0
#: records whose digests are kept to skip re-reading them after a log reset (~1 MiB)
_REMEMBERED = 16_384
#: Sends in flight without waiting for their replay, per process, and their bytes; beyond
#: either, a send waits for its record's replay, which paces a sender to the broker.
_MAX_UNREPLAYED = 10_000
_MAX_UNREPLAYED_BYTES = 32 * 1024 * 1024
#: Longest a take record waits to ride along with the next record this process writes.
#: Takes only free capacity in the other processes' view of an inbox (this process never
#: hands a message out twice), so they need not cost a Kafka record of their own each:
#: brokers pay per record batch (Tansu's in-memory storage, per batch in the topic).
_TAKE_DELAY = 0.02
#: Seconds after a failed write during which every send waits for its replay, so that a
#: broker outage surfaces as BrokerError instead of sends lost after returning.
_DISTRUST = 5.0

# Operation codes of log records. Every record is a msgpack list
# ``[op, token, sent_at, ...]``: ``token`` names the waiter in the writing process (or is
# None) and ``sent_at`` is the writer's wall clock, which expiry decisions use so that every
# replaying process decides the same.
_SEND = "S"  # channel, capacity (None: admitted by the writer), payload
_RETURN = "R"  # queue, [[channel, payload], ...] taken by a claim, given back
_GROUP_SEND = "G"  # group, payload, default capacity, {queue: capacity} (see _group_send)
_CLAIM = "C"  # queue, count, lease deadline (the token is the claim id)
_RENEW = "K"  # queue, claim id, lease deadline
_CANCEL = "X"  # queue, claim id
_TAKE = "T"  # queue, [[offset, channel], ...]
_GROUP_ADD = "A"  # group, channel, membership deadline
_GROUP_DISCARD = "D"  # group, channel
_FLUSH = "F"
#: Records nobody waits for promptly: writing or reading them keeps polling slow, so a
#: receive that waits (renewing its claim) does not keep an idle layer busy.
_HOUSEKEEPING = frozenset({_RENEW, _CANCEL, _TAKE, _RETURN})


class _MaskSecrets(logging.Filter):
    """Masks known passwords in a library's log records (kafka-python's admin client logs
    its whole configuration, SASL password included, at DEBUG).
    """

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = message
        for secret in self.secrets:
            masked = masked.replace(secret, "***")
        if masked != message:
            record.msg, record.args = masked, ()
        return True


_MASK = _MaskSecrets()
logging.getLogger("kafka.admin.client").addFilter(_MASK)


def _is_number(value: Any) -> bool:
    return type(value) in (int, float)


def _is_pairs(value: Any, first: type, second: type) -> bool:
    return isinstance(value, list) and all(
        isinstance(pair, list)
        and len(pair) == 2
        and type(pair[0]) is first
        and type(pair[1]) is second
        for pair in value
    )


#: The argument types of each operation after ``[op, token, sent_at]``.
_SHAPES: dict[str, Callable[[list[Any]], bool]] = {
    _SEND: lambda a: (
        (len(a) == 3 and type(a[0]) is str and (a[1] is None or type(a[1]) is int))
        and type(a[2]) is bytes
    ),
    _RETURN: lambda a: len(a) == 2 and type(a[0]) is str and _is_pairs(a[1], str, bytes),
    _GROUP_SEND: lambda a: (
        (len(a) == 4 and type(a[0]) is str and type(a[1]) is bytes and type(a[2]) is int)
        and isinstance(a[3], dict)
        and all(type(k) is str and type(v) is int for k, v in a[3].items())
    ),
    _CLAIM: lambda a: len(a) == 3 and type(a[0]) is str and type(a[1]) is int and _is_number(a[2]),
    _RENEW: lambda a: len(a) == 3 and type(a[0]) is str and type(a[1]) is str and _is_number(a[2]),
    _CANCEL: lambda a: len(a) == 2 and type(a[0]) is str and type(a[1]) is str,
    _TAKE: lambda a: len(a) == 2 and type(a[0]) is str and _is_pairs(a[1], int, str),
    _GROUP_ADD: lambda a: (
        len(a) == 3 and type(a[0]) is str and type(a[1]) is str and _is_number(a[2])
    ),
    _GROUP_DISCARD: lambda a: len(a) == 2 and type(a[0]) is str and type(a[1]) is str,
    _FLUSH: lambda a: not a,
}


def _well_formed(operation: Any) -> bool:
    """Whether ``operation`` is one this backend writes: another client's garbage in the
    topic must neither stop the replay nor leave state that breaks later operations.
    """
    if not isinstance(operation, list) or len(operation) < 3:
        return False
    shape = _SHAPES.get(operation[0]) if type(operation[0]) is str else None
    token = operation[1]
    return (
        shape is not None
        and (token is None or type(token) is str)
        and _is_number(operation[2])
        and shape(operation[3:])
    )


@dataclass
class _Message:
    offset: int
    channel: str
    payload: bytes
    deadline: float

    @property
    def key(self) -> tuple[int, str]:
        """Unique in the log: a group send puts one record's payload in several channels."""
        return self.offset, self.channel


@dataclass
class _Claim:
    cid: str
    count: int
    lease: float


@dataclass
class _Queue:
    pending: deque[_Message] = field(default_factory=deque)
    claims: deque[_Claim] = field(default_factory=deque)

    def purge(self, instant: float) -> None:
        """Forget claims, and messages at the head, whose time ran out before ``instant``."""
        while self.pending and self.pending[0].deadline <= instant:
            self.pending.popleft()
        if self.claims:
            self.claims = deque(c for c in self.claims if c.lease > instant)

    def count(self, instant: float) -> int:
        """Messages still alive at ``instant`` (senders may use different expiries)."""
        self.pending = deque(m for m in self.pending if m.deadline > instant)
        return len(self.pending)

    def take(self, count: int, instant: float) -> list[_Message]:
        """Up to ``count`` messages from the head that are alive at ``instant``."""
        taken: list[_Message] = []
        while self.pending and len(taken) < count:
            message = self.pending.popleft()
            if message.deadline > instant:
                taken.append(message)
        return taken


@dataclass
class _Outcome:
    """What applying one record decided, for the process that waits on it."""

    accepted: bool = True
    #: Group members skipped as full; an inbox refused skips every member it would carry.
    full_members: list[str] = field(default_factory=list)
    live_members: int = 0
    delivered: list[tuple[str, list[_Message]]] = field(default_factory=list)
    appended: set[str] = field(default_factory=set)
    flushed: bool = False


class _Machine:
    """The layer's state as of one log offset; every process computes the same one.

    Decisions depend only on the records and their order, never on the replaying
    process's clock, so two processes never disagree about who got a message.
    """

    def __init__(self) -> None:
        self.queues: dict[str, _Queue] = {}
        self.groups: dict[str, dict[str, float]] = {}

    def apply(self, offset: int, record: list[Any]) -> _Outcome:
        op, _token, sent_at = record[0], record[1], record[2]
        outcome = _Outcome()
        if op == _SEND:
            channel, capacity, payload = record[3], record[4], record[5]
            outcome.accepted = self._append(offset, channel, payload, capacity, sent_at, outcome)
        elif op == _GROUP_SEND:
            self._group_send(offset, record, outcome)
        elif op == _RETURN:
            self._give_back(offset, record[3], record[4], sent_at, outcome)
        elif op == _CLAIM:
            cid, queue, count, lease = record[1], record[3], record[4], record[5]
            state = self.queues.setdefault(queue, _Queue())
            state.purge(sent_at)
            taken = state.take(count, sent_at)
            if taken:
                outcome.delivered.append((cid, taken))
            else:
                state.claims.append(_Claim(cid, count, lease))
            self._tidy(queue)
        elif op == _RENEW:
            for claim in self._queue(record[3]).claims:
                if claim.cid == record[4]:
                    claim.lease = record[5]
        elif op == _CANCEL:
            state = self._queue(record[3])
            state.claims = deque(c for c in state.claims if c.cid != record[4])
            self._tidy(record[3])
        elif op == _TAKE:
            gone = {(offset, channel) for offset, channel in record[4]}
            state = self._queue(record[3])
            state.pending = deque(m for m in state.pending if m.key not in gone)
            self._tidy(record[3])
        elif op == _GROUP_ADD:
            self.groups.setdefault(record[3], {})[record[4]] = record[5]
        elif op == _GROUP_DISCARD:
            current = self.groups.get(record[3])
            if current is not None:
                current.pop(record[4], None)
                if not current:
                    del self.groups[record[3]]
        elif op == _FLUSH:
            # Waiting receivers keep their claims: a flush empties queues, not receivers.
            for state in self.queues.values():
                state.pending.clear()
            self.groups.clear()
            outcome.flushed = True
        return outcome

    def _queue(self, name: str) -> _Queue:
        return self.queues.get(name) or _Queue()

    def _group_send(self, offset: int, record: list[Any], outcome: _Outcome) -> None:
        # Each normal member gets its own copy; the members living in one process share
        # one envelope in its inbox (multilayer.fanout), checked once against the inbox's
        # capacity, which that process opens into one copy per member. The envelope is
        # the only message this record puts in an inbox, so its key (position, inbox
        # name) is unique like every other.
        sent_at, group, payload, default, capacities = record[2], *record[3:7]
        members = self.groups.get(group)
        if members is None:
            return
        for channel, until in list(members.items()):
            if until <= sent_at:
                del members[channel]
        if not members:
            del self.groups[group]
            return
        outcome.live_members = len(members)
        inboxes, normal = split(members.items())
        for channel, _until in normal:
            if not self._append(
                offset, channel, payload, capacities.get(channel, default), sent_at, outcome
            ):
                outcome.full_members.append(channel)
        for inbox, local in inboxes.items():
            # Records this layer writes key an inbox's capacity by its name; an older
            # layer's name its members, whose capacity is their inbox's.
            capacity = capacities.get(inbox)
            if capacity is None:
                capacity = next(
                    (capacities[name] for name, _until in local if name in capacities), default
                )
            envelope = seal(payload, group, sent_at, inbox, local)
            if not self._append(offset, inbox, envelope, capacity, sent_at, outcome):
                outcome.full_members.extend(name for name, _until in local)

    def _give_back(
        self, offset: int, queue: str, items: list[Any], sent_at: float, outcome: _Outcome
    ) -> None:
        # Messages a claim took and no receive wanted: they are older than anything still
        # waiting, so they go to open claims first and otherwise back to the head.
        state = self.queues.setdefault(queue, _Queue())
        state.purge(sent_at)
        back: list[_Message] = []
        for channel, payload in items:
            # Keys only tell inbox messages apart (take records); these are normal ones.
            message = _Message(offset, channel, payload, deadline_of(payload))
            if message.deadline <= sent_at:
                continue
            if state.claims:
                outcome.delivered.append((state.claims.popleft().cid, [message]))
            else:
                back.append(message)
        if back:
            state.pending.extendleft(reversed(back))
            outcome.appended.add(queue)
        self._tidy(queue)

    def _tidy(self, name: str) -> None:
        state = self.queues.get(name)
        if state is not None and not state.pending and not state.claims:
            del self.queues[name]

    def _append(
        self,
        offset: int,
        channel: str,
        payload: bytes,
        capacity: int | None,
        sent_at: float,
        outcome: _Outcome,
    ) -> bool:
        queue = non_local_name(channel)
        state = self.queues.setdefault(queue, _Queue())
        state.purge(sent_at)
        message = _Message(offset, channel, payload, deadline_of(payload))
        try:
            if state.claims:
                claim = state.claims.popleft()
                outcome.delivered.append((claim.cid, [message]))
                return True
            if (
                capacity is not None
                and len(state.pending) >= capacity
                and state.count(sent_at) >= capacity
            ):
                return False
            state.pending.append(message)
            outcome.appended.add(queue)
            return True
        finally:
            self._tidy(queue)


_Done = Callable[[BaseException | None], None]


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _set_if_pending(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Waker:
    """Futures of any event loop, woken from the replay thread."""

    def __init__(self) -> None:
        self._futures: dict[str, list[asyncio.Future[None]]] = {}

    def add(self, key: str) -> asyncio.Future[None]:
        future = asyncio.get_running_loop().create_future()
        self._futures.setdefault(key, []).append(future)
        return future

    def discard(self, key: str, future: asyncio.Future[None]) -> None:
        futures = self._futures.get(key)
        if futures and future in futures:
            futures.remove(future)
            if not futures:
                del self._futures[key]

    def wake(self, key: str) -> None:
        for future in self._futures.pop(key, ()):
            loop = future.get_loop()
            if not loop.is_closed():
                # A loop may close between the check and the call; nothing then waits.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_set_if_pending, future)


class _Hub:
    """One process's connection to one prefix's log, shared by every layer instance.

    kafka-python is threaded, so one producer and one replay thread serve every event
    loop of the process; instances reach the shared state under ``lock``.
    """

    def __init__(
        self, key: str, topic: str, client_config: dict[str, Any], options: Mapping[str, Any]
    ):
        self.key = key
        self.topic = topic
        self.client_config = client_config
        self.options = options
        self.users = 0
        self.lock = threading.Lock()
        self.machine = _Machine()
        self.waker = _Waker()
        # Tokens of records whose writer waits for their outcome -> when it began waiting.
        self.calls: dict[str, float] = {}
        self.results: dict[str, _Outcome] = {}
        self.failures: dict[str, BaseException] = {}
        # Claim ids of this process -> messages the log gave them but no pop took yet.
        self.claimed: dict[str, list[_Message]] = {}
        self.abandoned: set[str] = set()
        # Claim records of receives still waiting in this process, by claim id.
        self.open_claims: dict[str, list[Any]] = {}
        # Messages this process's claims took beyond what its receives wanted (prefetch, or
        # a receive cancelled while its claim was served).
        self.held = HeldMessages()
        # Sends written without waiting for their replay: token -> (queue, size, written at).
        self.unreplayed: dict[str, tuple[str, int, float]] = {}
        self.unreplayed_per_queue: Counter[str] = Counter()
        self.unreplayed_bytes = 0
        self.distrust_until = 0.0
        # Inbox messages handed to a receiver whose take record is not replayed yet.
        self.handed_out: set[tuple[int, str]] = set()
        # Group sends of this process not replayed yet -> the backend that counts their
        # refused copies.
        self.group_senders: dict[str, Backend] = {}
        # The backends reading through this hub, told of each reconnection; and whether
        # the broker was found unreachable since records last arrived.
        self.backends: weakref.WeakSet[Backend] = weakref.WeakSet()
        self._lost = False
        self.token_prefix = secrets.token_hex(6) + ":"
        self._tokens = itertools.count()
        self._busy_until = 0.0
        self._checked = 0.0
        # The first record read (offset, value): a different one there means a new log.
        self._first: tuple[int, bytes] | None = None
        # Digests of the records applied last: after a reset is noticed, records of the
        # new log already applied before that are not applied (delivered) again.
        self._applied: deque[bytes] = deque(maxlen=_REMEMBERED)
        self._applied_set: set[bytes] = set()
        self._stopping = threading.Event()
        self._start_lock = threading.Lock()
        self._started = False
        self._caught_up = threading.Event()
        self._start_end = 0
        self._threads: list[threading.Thread] = []
        self._outbox: SimpleQueue[tuple[bytes, _Done | None] | None]
        self._outbox = SimpleQueue()
        # Inbox keys taken here and not written yet, per queue, and the instant of the first.
        self._takes: dict[str, list[tuple[int, str]]] = {}
        self._takes_at = 0.0
        self._takes_lock = threading.Lock()
        self.producer: Any = None
        self.consumer: Any = None
        self.partition: Any = None
        self.next_offset = 0

    # -- lifecycle (blocking; run in a worker thread) ----------------------------------

    def ensure_started(self) -> None:
        """Create the log topic if needed, connect, and replay what the log holds (once).

        Returning only once the replay has reached the end the log had at start means a
        new layer's view (capacity, groups) is the present, not a past state.
        """
        with self._start_lock:
            if not self._started:
                self._start()
                self._started = True
        if not self._caught_up.wait(_REPLAY_TIMEOUT):
            logger.warning(
                "kafka log %s: replay did not reach offset %d in %gs; going on",
                self.topic,
                self._start_end,
                _REPLAY_TIMEOUT,
            )

    def create_topic(self) -> None:
        """Create the log topic unless it exists (first use of a prefix, broker restart)."""
        topic = NewTopic(
            self.topic,
            num_partitions=1,
            replication_factor=-1,
            topic_configs={
                "cleanup.policy": "delete",
                "retention.ms": str(int(self.options["retention_hours"] * 3_600_000)),
                "max.message.bytes": str(self.options["max_record"]),
            },
        )
        admin = KafkaAdminClient(**self.client_config)
        try:
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics([topic])
        finally:
            admin.close()

    def _start(self) -> None:
        self.create_topic()
        self.producer = KafkaProducer(
            **self.client_config,
            acks=self.options["acks"] if self.options["acks"] == "all" else 1,
            # One request in flight keeps this process's records in the order it wrote them.
            max_in_flight_requests_per_connection=1,
            max_request_size=self.options["max_record"],
            linger_ms=self.options["linger_ms"],
        )
        self.consumer = KafkaConsumer(
            **self.client_config,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=self.options["fetch_wait_ms"],
            max_partition_fetch_bytes=self.options["max_record"],
            fetch_max_bytes=max(self.options["max_record"], 52_428_800),
        )
        self.partition = TopicPartition(self.topic, 0)
        self.consumer.assign([self.partition])
        self.consumer.seek_to_beginning(self.partition)
        self._start_end = self.consumer.end_offsets([self.partition])[self.partition]
        if self._start_end == 0:
            self._caught_up.set()
        for target in (self._replay, self._write):
            thread = threading.Thread(
                target=target, name=f"multilayer kafka {self.topic}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stopping.set()
        for queue, items in self.held.release(0):
            self.give_back(queue, items)
        self._outbox.put(None)
        for thread in self._threads:
            thread.join(10)
        if self.producer is not None:
            self.producer.close(10)
        if self.consumer is not None:
            self.consumer.close()

    # -- the replay thread ---------------------------------------------------------------

    def _replay(self) -> None:
        # Tansu (and Kafka, when no new record arrives) holds a fetch for the whole
        # fetch_max_wait_ms, so the wait is short while traffic flows and long when the layer
        # is idle, which is what keeps an idle layer's CPU low. kafka-python has no public
        # setter; its fetcher reads this dict for every request (kafka-python is pinned).
        fetch_config = self.consumer._fetcher.config
        fast, slow = self.options["fetch_wait_ms"], self.options["idle_fetch_wait_ms"]
        while not self._stopping.is_set():
            fetch_config["fetch_max_wait_ms"] = (
                fast if time.monotonic() < self._busy_until else slow
            )
            try:
                batches = self.consumer.poll(timeout_ms=100)
            except Exception as error:
                logger.warning("kafka log %s: fetch failed (%s); retrying", self.topic, error)
                self._lost = True
                self._stopping.wait(0.5)
                continue
            records = [record for batch in batches.values() for record in batch]
            if self._stalled():
                self._recover()
                continue  # _recover moved the consumer: these records come again, or not

            for queue, items in self.held.release(self.options["prefetch_hold"]):
                self.give_back(queue, items)
            if records:
                if self._lost:
                    logger.info("kafka log %s: records arrive again", self.topic)
                    self._reconnected()
                with self.lock:
                    for record in records:
                        try:
                            self._apply(record.offset, record.value)
                        except Exception:
                            logger.exception("kafka log %s: record %d", self.topic, record.offset)
                if self.next_offset >= self._start_end:
                    self._caught_up.set()

    def _reconnected(self) -> None:
        self._lost = False
        for backend in list(self.backends):
            backend.reconnects += 1

    def _stalled(self) -> bool:
        # A write of ours not replayed for a while, whether or not newer records arrive:
        # after an in-memory broker restarts, records written before this process reads
        # the new log can land below the offset it reads from, and are never seen.
        if time.monotonic() - self._checked < _STALL:
            return False
        with self.lock:
            oldest = min(self.calls.values(), default=None)
            if self.unreplayed:
                # Admitted sends are written in order: the first one is the oldest.
                since = next(iter(self.unreplayed.values()))[2]
                oldest = since if oldest is None else min(oldest, since)
        return oldest is not None and time.monotonic() - oldest > _STALL

    def _recover(self) -> None:
        """Check the log after writes stopped showing up in it; always leaves the consumer
        at the next record to apply (of this log, or of a new one)."""
        # An in-memory broker may have restarted without the topic, which producers wait
        # for but nobody recreates, or with a new log already longer than the old one,
        # which only the records in it tell apart.
        self._checked = time.monotonic()
        start = self.next_offset
        try:
            self.create_topic()
            end = self.consumer.end_offsets([self.partition])[self.partition]
            if end < self.next_offset or not self._same_log():
                start = 0  # a new log: read it from its start (_apply then starts over)
        except Exception as error:
            logger.warning("kafka log %s: broker unreachable (%s)", self.topic, error)
            self._lost = True
        finally:
            self.consumer.seek(self.partition, start)

    def _same_log(self) -> bool:
        """Whether the log still holds, at its offset, the first record this process read
        (a restarted in-memory broker holds another one there; a broker that deleted it
        for retention holds none, and the log is taken to be the same)."""
        if self._first is None:
            return True
        offset, value = self._first
        self.consumer.seek(self.partition, offset)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            for batch in self.consumer.poll(timeout_ms=200, max_records=1).values():
                return bool(batch[0].offset != offset or batch[0].value == value)
        return True  # no answer: keep reading where we were

    def give_back(self, queue: str, items: list[Item]) -> None:
        """Return held ``items`` of ``queue`` to the head of the queue, for every process."""
        instant = now()
        chunks: list[list[list[Any]]] = [[]]
        size = 0
        for channel, payload in items:
            if size + len(payload) > self.options["max_record"] - _RECORD_OVERHEAD:
                chunks.append([])
                size = 0
            chunks[-1].append([channel, payload])
            size += len(payload)
        # Each record puts its messages at the head of the queue: the newest go first.
        for chunk in reversed(chunks):
            if chunk:
                self.write([_RETURN, None, instant, queue, chunk])

    def hold(self, queue: str, messages: list[_Message]) -> None:
        """Keep messages a claim took for later receives here."""
        if messages:
            self.held.hold(queue, [(m.channel, m.payload) for m in messages])

    def take_inbox(self, queue: str, limit: int) -> tuple[list[Item], list[tuple[int, str]]]:
        """Live messages of this process's inbox not handed out yet, and every key it
        looked at (expired ones included), which a take record must name (under ``lock``).
        """
        taken: list[Item] = []
        keys: list[tuple[int, str]] = []
        state = self.machine.queues.get(queue)
        if state is None:
            return taken, keys
        instant = now()
        for message in state.pending:
            if message.key in self.handed_out:
                continue
            self.handed_out.add(message.key)
            keys.append(message.key)
            if message.deadline > instant:
                taken.append((message.channel, message.payload))
                if len(taken) >= limit:
                    break
        return taken, keys

    def admit(self, queue: str, capacity: int, size: int) -> str | None:
        """A token for a send that may skip waiting for its replay, or None.

        It may when this process's view of ``queue`` (replayed messages plus its own
        unreplayed sends) leaves room: then the record is written as admitted and every
        replay appends it. Near capacity the send waits for the log to decide instead.
        """
        with self.lock:
            if (
                time.monotonic() < self.distrust_until
                or len(self.unreplayed) >= _MAX_UNREPLAYED
                or self.unreplayed_bytes + size > _MAX_UNREPLAYED_BYTES
            ):
                return None
            state = self.machine.queues.get(queue)
            waiting = len(state.pending) if state is not None else 0
            if waiting + self.unreplayed_per_queue[queue] >= capacity:
                return None
            token = self.token()
            self.unreplayed[token] = (queue, size, time.monotonic())
            self.unreplayed_per_queue[queue] += 1
            self.unreplayed_bytes += size
            return token

    def replayed(self, token: str) -> None:
        """Forget an admitted send: replayed, or lost (under ``lock``)."""
        entry = self.unreplayed.pop(token, None)
        if entry is not None:
            queue, size, _since = entry
            self.unreplayed_per_queue[queue] -= 1
            if not self.unreplayed_per_queue[queue]:
                del self.unreplayed_per_queue[queue]
            self.unreplayed_bytes -= size

    def lost(self, token: str, channel: str, error: BaseException) -> None:
        """An admitted send's write failed: say so, and make the next sends wait."""
        logger.warning(
            "kafka log %s: a send to %r was lost after it returned: %s", self.topic, channel, error
        )
        with self.lock:
            self.replayed(token)
            self.distrust_until = time.monotonic() + _DISTRUST

    def _apply(self, offset: int, value: bytes) -> None:
        if offset < self.next_offset:
            # The log restarted from scratch (an in-memory broker came back empty):
            # what it held is gone for every process, so start over from this record.
            logger.warning(
                "kafka log %s was reset; state restarts at offset %d", self.topic, offset
            )
            # The broker went away and came back: kafka-python reconnects on its own, and
            # this is the only sign of it an in-memory broker gives.
            self._reconnected()
            self.machine = _Machine()
            self.handed_out.clear()
            # Sends written before the reset are in the new log or nowhere.
            for pending in list(self.unreplayed):
                self.replayed(pending)
            # The claims of receivers still waiting here died with the old log.
            for claim in self.open_claims.values():
                claim[2] = now()
                self.write(claim)
        if self._first is None or offset < self.next_offset:
            self._first = (offset, value)
        self.next_offset = offset + 1
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(value))
        unpacker.feed(value)
        try:
            operations = list(unpacker)
        except (ValueError, msgpack.UnpackException):
            log_malformed(self.topic, len(value), f"undecodable record at offset {offset}")
            return
        applicable = []
        for index, operation in enumerate(operations):
            if _well_formed(operation):
                applicable.append((offset * _OPERATIONS_PER_RECORD + index, operation))
            else:
                log_malformed(self.topic, len(value), f"bad operation at offset {offset}")
        # Only records with a layer's operations are remembered (they carry unique
        # tokens): junk that comes twice with the same bytes is logged twice.
        if not applicable:
            return
        digest = hashlib.blake2b(value, digest_size=16).digest()
        if digest in self._applied_set:
            return
        if len(self._applied) == _REMEMBERED:
            self._applied_set.discard(self._applied[0])
        self._applied.append(digest)
        self._applied_set.add(digest)
        for position, operation in applicable:
            self._apply_operation(position, operation)

    def _apply_operation(self, position: int, record: list[Any]) -> None:
        outcome = self.machine.apply(position, record)
        token = record[1]
        if record[0] not in _HOUSEKEEPING:
            self.busy()
        if token in self.unreplayed:
            self.replayed(token)
        for cid, messages in outcome.delivered:
            if cid in self.abandoned:
                self.hold(non_local_name(messages[0].channel), messages)
            else:
                self.claimed.setdefault(cid, []).extend(messages)
                self.waker.wake(cid)
        for queue in outcome.appended:
            self.waker.wake(queue)
        if record[0] == _GROUP_SEND:
            sender = self.group_senders.pop(token, None)
            full, live = len(outcome.full_members), outcome.live_members
            if sender is not None:
                sender.skip_full_members(record[3], full, live)
            elif full and str(token).startswith(self.token_prefix):
                log_full_members(record[3], full, live)
        if record[0] == _CANCEL:
            self.abandoned.discard(record[4])
        elif record[0] == _TAKE:
            self.handed_out.difference_update((offset, channel) for offset, channel in record[4])
        if outcome.flushed:
            self.held.discard()
            self.handed_out.clear()
        if token in self.calls:
            del self.calls[token]
            self.results[token] = outcome
            self.waker.wake(token)

    def busy(self) -> None:
        """Poll fast for a while: traffic flows or this process waits for the log."""
        self._busy_until = time.monotonic() + self.options["idle_after"]

    # -- writing -------------------------------------------------------------------------

    def token(self) -> str:
        return f"{self.token_prefix}{next(self._tokens)}"

    def take_later(self, queue: str, keys: list[tuple[int, str]], instant: float) -> None:
        """Record that this process took inbox messages, with the next write (or within
        ``_TAKE_DELAY`` seconds), merged with the other takes waiting by then."""
        with self._takes_lock:
            if not self._takes:
                self._takes_at = instant
            self._takes.setdefault(queue, []).extend(keys)

    def _pending_takes(self) -> list[tuple[bytes, _Done | None]]:
        with self._takes_lock:
            takes, since, self._takes = self._takes, self._takes_at, {}
        return [
            (msgpack.packb([_TAKE, None, since, queue, keys], use_bin_type=True), None)
            for queue, keys in takes.items()
        ]

    def write(self, record: list[Any], *, done: _Done | None = None) -> None:
        """Append ``record`` to the log; ``done(error or None)`` runs once the broker answered.

        No I/O here: the writer thread hands the record to the producer.
        """
        if record[0] not in _HOUSEKEEPING:
            self.busy()
        self._outbox.put((msgpack.packb(record, use_bin_type=True), done))

    def _write(self) -> None:
        # producer.send() blocks while the topic's metadata is unknown (after a broker
        # restart, for max_block_ms) or its buffer is full, so it never runs in an event
        # loop; one thread keeps this process's records in the order they were written.
        # Operations waiting together go out as one Kafka record (msgpack values back to
        # back): kafka-python's cost is per record, so this is what makes sends cheap.
        limit = self.options["max_record"] - _RECORD_OVERHEAD
        while True:
            try:
                # Waking every _TAKE_DELAY even when idle keeps a take from waiting for a
                # write that never comes, at a cost too small to measure.
                entry = self._outbox.get(timeout=_TAKE_DELAY)
            except Empty:
                if self._takes:
                    self._produce_all(self._pending_takes(), limit)
                continue
            if entry is None:
                self._produce_all(self._pending_takes(), limit)
                return
            batch = [entry]
            while len(batch) < _OPERATIONS_PER_RECORD:
                try:
                    entry = self._outbox.get_nowait()
                except Empty:
                    break
                if entry is None:
                    self._produce_all(self._pending_takes() + batch, limit)
                    return
                batch.append(entry)
            # Takes first: they name messages replayed before anything in this batch, and
            # whoever waits for a record of the batch (stats, a flush) then sees them applied.
            self._produce_all(self._pending_takes() + batch, limit)

    def _produce_all(self, entries: list[tuple[bytes, _Done | None]], limit: int) -> None:
        """Write ``entries`` in order, as few records of at most ``limit`` bytes (and
        ``_OPERATIONS_PER_RECORD`` operations) as fit."""
        batch: list[tuple[bytes, _Done | None]] = []
        size = 0
        for entry in entries:
            if batch and (size + len(entry[0]) > limit or len(batch) == _OPERATIONS_PER_RECORD):
                self._produce(batch)
                batch, size = [], 0
            batch.append(entry)
            size += len(entry[0])
        if batch:
            self._produce(batch)

    def _produce(self, batch: list[tuple[bytes, _Done | None]]) -> None:
        dones = [done for _value, done in batch if done is not None]

        def answer(error: BaseException | None) -> None:
            for done in dones:
                done(error)

        try:
            # Always partition 0: a topic auto-created by a broker (after a restart wiped
            # it) may have more, and only partition 0 is replayed.
            future = self.producer.send(
                self.topic, b"".join(value for value, _done in batch), partition=0
            )
        except Exception as error:
            logger.warning("kafka log %s: write failed: %s", self.topic, error)
            answer(error)
            return
        if dones:
            future.add_callback(lambda _metadata: answer(None))
            future.add_errback(answer)

    async def acked(self, record: list[Any]) -> None:
        """Write ``record`` and wait until the broker has it (not for its replay)."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[None] = loop.create_future()

        def done(error: BaseException | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop may have closed meanwhile
                loop.call_soon_threadsafe(_settle, answer, error)

        self.write(record, done=done)
        try:
            await asyncio.wait_for(answer, _REPLAY_TIMEOUT)
        except asyncio.TimeoutError:
            raise BrokerError(
                f"kafka log {self.topic}: no answer from the broker in {_REPLAY_TIMEOUT:g}s"
            ) from None
        except Exception as error:
            raise BrokerError(f"kafka log {self.topic}: write failed: {error}") from error

    async def call(self, record: list[Any]) -> _Outcome:
        """Write ``record`` and wait until the replay has applied it; its outcome."""
        token = record[1]
        with self.lock:
            self.calls[token] = time.monotonic()
            signal = self.waker.add(token)

        def failed(error: BaseException | None) -> None:
            if error is not None:
                with self.lock:
                    self.failures[token] = error
                    self.waker.wake(token)

        try:
            self.write(record, done=failed)
            await asyncio.wait_for(asyncio.shield(signal), _REPLAY_TIMEOUT)
        except asyncio.TimeoutError:
            raise BrokerError(
                f"kafka log {self.topic}: record not replayed within {_REPLAY_TIMEOUT:g}s"
            ) from None
        finally:
            with self.lock:
                self.calls.pop(token, None)
                self.waker.discard(token, signal)
                error = self.failures.pop(token, None)
                outcome = self.results.pop(token, None)
        if outcome is not None:
            return outcome
        raise BrokerError(f"kafka log {self.topic}: write failed: {error}") from error


_hubs: dict[str, _Hub] = {}
_hubs_lock = threading.Lock()


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be positive"


class KafkaBackend(Backend):
    """Channels as a replicated state machine over one Kafka topic per prefix."""

    capabilities: ClassVar[Capabilities] = Capabilities(
        multiprocess=True,
        native_expiry=False,
        native_fanout=True,
        restartable=False,
        queue_depth=True,
        group_sizes=True,
    )
    extra: ClassVar[str | None] = "kafka"
    options: ClassVar[Mapping[str, Option]] = {
        "fetch_wait_ms": Option(int, 5, "broker fetch wait while busy (ms)", minimum=0),
        "idle_fetch_wait_ms": Option(int, 100, "broker fetch wait when idle (ms)", minimum=1),
        "idle_after": Option(float, 2.0, "seconds without traffic before slow polling", minimum=0),
        "claim_lease": Option(float, 10.0, "seconds a receive claim lives unrenewed", minimum=0.5),
        "prefetch": Option(int, 500, "messages one claim may take at once", minimum=1),
        "prefetch_hold": Option(
            float, 1.0, "seconds prefetched messages wait here before going back", minimum=0
        ),
        "retention_hours": Option(
            float, None, "retention of the log topic (default: group_expiry + 1 h)", check=_positive
        ),
        "acks": Option(str, "all", "producer acknowledgements", choices=("all", "1")),
        "linger_ms": Option(
            int, 0, "how long a write may wait to share a record batch (ms)", minimum=0
        ),
        "sasl_mechanism": Option(
            str, "PLAIN", "SASL mechanism", choices=("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
        ),
        "ssl_cafile": Option(str, None, "CA bundle (PEM) for kafka+ssl"),
        "ssl_certfile": Option(str, None, "client certificate (PEM) for kafka+ssl"),
        "ssl_keyfile": Option(str, None, "client key (PEM) for kafka+ssl"),
        "ssl_check_hostname": Option(bool, True, "verify the broker certificate's host name"),
        "ssl_verify": Option(bool, True, "verify the broker certificate (false: tests only)"),
    }

    @classmethod
    def check_url(cls, url: LayerURL, options: Mapping[str, Any]) -> None:
        if not url.hosts:
            raise ConfigurationError(f"{url.sanitized()}: name at least one broker host")
        if url.path:
            raise ConfigurationError(f"{url.sanitized()}: Kafka URLs take no path")
        if url.scheme == "kafka":
            for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_verify"):
                # ssl_verify is true by default: only turning it off is out of place.
                if options.get(name) if name != "ssl_verify" else options[name] is False:
                    raise ConfigurationError(
                        f"{url.sanitized()}: option {name!r} needs the kafka+ssl:// scheme"
                    )

    @classmethod
    def versions(cls) -> dict[str, str]:
        return {"kafka-python": kafka.__version__}

    async def broker_version(self) -> str:
        """The protocol version kafka-python negotiated (brokers do not name themselves)."""
        version = self._hub.consumer.config["api_version"]
        return "Kafka protocol " + ".".join(str(part) for part in version)

    def _client_config(self) -> dict[str, Any]:
        url = self.url
        config: dict[str, Any] = {
            "bootstrap_servers": [f"{host}:{port or 9092}" for host, port in url.hosts],
            "client_id": "multilayer",
        }
        tls = url.scheme == "kafka+ssl"
        if url.username is not None:
            config["security_protocol"] = "SASL_SSL" if tls else "SASL_PLAINTEXT"
            config["sasl_mechanism"] = self.config["sasl_mechanism"]
            config["sasl_plain_username"] = url.username
            config["sasl_plain_password"] = url.password or ""
            if url.password:
                _MASK.secrets.add(url.password)
        elif tls:
            config["security_protocol"] = "SSL"
        if tls:
            # Our own context, always: the one kafka-python builds itself uses
            # ssl.PROTOCOL_TLS, deprecated (a DeprecationWarning on every connection).
            verify = self.config["ssl_verify"]
            context = ssl.create_default_context(cafile=self.config["ssl_cafile"])
            context.check_hostname = verify and self.config["ssl_check_hostname"]
            if not verify:
                context.verify_mode = ssl.CERT_NONE
            if self.config["ssl_certfile"]:
                context.load_cert_chain(self.config["ssl_certfile"], self.config["ssl_keyfile"])
            config["ssl_context"] = context
            config["ssl_check_hostname"] = context.check_hostname
        return config

    def _tls_problem(self) -> str | None:
        """Why a TLS handshake with the first broker fails, if it does: kafka-python only
        logs it and then reports the broker as unreachable."""
        if self.url.scheme != "kafka+ssl":
            return None
        context: ssl.SSLContext = self._client_config()["ssl_context"]
        host, port = self.url.hosts[0]
        try:
            with (
                socket.create_connection((host, port or 9092), timeout=5) as raw,
                context.wrap_socket(raw, server_hostname=host) as tls,
            ):
                # With TLS 1.3 a server checks the client's certificate after the client
                # has finished its handshake, and answers a missing or untrusted one with
                # an alert or by hanging up. A Kafka broker otherwise sends nothing before
                # a request.
                tls.settimeout(0.5)
                if tls.recv(1) == b"":
                    return (
                        f"{host}:{port or 9092} closed the connection right after the TLS "
                        "handshake, as a broker requiring a client certificate does when it "
                        "gets none or one it does not trust (ssl_certfile, ssl_keyfile)"
                    )
        except ssl.SSLError as error:
            return f"TLS handshake with {host}:{port or 9092} failed: {error}"
        except OSError:
            return None
        return None

    async def open(self) -> None:
        topic = f"multilayer.{self.settings.prefix}"
        retention = self.config["retention_hours"]
        least = self.settings.group_expiry / 3600
        if retention is None:
            retention = least + 1
        elif retention < least:
            raise ConfigurationError(
                f"{self.url.sanitized()}: retention_hours={retention:g} is shorter than "
                f"group_expiry ({least:g} h): memberships would vanish from the log"
            )
        options = {
            **self.config,
            "retention_hours": retention,
            # The topic, the producer and the fetches all take the largest record this
            # layer can write: an encrypted payload at max_message_size, whether or not this
            # process encrypts, since the topic is shared and made by whoever comes first.
            "max_record": largest_payload(self.settings.max_message_size, encrypted=True)
            + _RECORD_OVERHEAD,
        }
        key = f"{self.url.without_query().render()}|{topic}|{sorted(options.items())}"
        with _hubs_lock:
            hub = _hubs.get(key)
            if hub is None:
                hub = _hubs[key] = _Hub(key, topic, self._client_config(), options)
            hub.users += 1
            hub.backends.add(self)
        self._hub = hub
        self._lease = float(self.config["claim_lease"])
        self._prefetch = int(self.config["prefetch"])
        try:
            await asyncio.to_thread(hub.ensure_started)
        except BaseException as error:
            await self.close()
            if isinstance(error, Exception):
                reason = await asyncio.to_thread(self._tls_problem) or error
                raise BrokerError(f"cannot open {self.url.sanitized()}: {reason}") from error
            raise

    async def close(self) -> None:
        hub = self._hub
        with _hubs_lock:
            hub.users -= 1
            hub.backends.discard(self)
            last = hub.users == 0
            if last and _hubs.get(hub.key) is hub:
                del _hubs[hub.key]
        if last:
            await asyncio.to_thread(hub.stop)

    async def declare_inbox(self, inbox: str) -> None:
        """Nothing to create: the hub replays the log from its start, so no record is missed.

        Every queue, inbox or not, lives in the one log topic created by :meth:`open`.
        """

    async def push(self, channel: str, payload: bytes, *, deadline: float, capacity: int) -> None:
        hub = self._hub
        token = hub.admit(non_local_name(channel), capacity, len(payload))
        if token is not None:
            # Room is certain as far as this process can see: the record goes out admitted
            # and the send returns without a round trip (see "Sends" in the backend docs).
            def done(error: BaseException | None) -> None:
                if error is not None:
                    hub.lost(token, channel, error)

            hub.write([_SEND, token, now(), channel, None, payload], done=done)
            return
        outcome = await hub.call([_SEND, hub.token(), now(), channel, capacity, payload])
        if not outcome.accepted:
            raise ChannelFull(f"channel {channel!r} is full ({capacity} messages waiting)")

    def pop_nowait(self, queue: str, limit: int) -> list[Item]:
        """Messages already in this process: held by its claims, or replayed to its inbox."""
        hub = self._hub
        if not queue.endswith("!"):
            return hub.held.take(queue, limit)
        instant = now()
        with hub.lock:
            taken, keys = hub.take_inbox(queue, limit)
        if keys:
            hub.take_later(queue, keys, instant)
        return taken

    async def pop(self, queue: str, limit: int) -> list[Item]:
        if queue.endswith("!"):
            return await self._pop_inbox(queue, limit)
        return await self._pop_shared(queue, limit)

    async def _pop_inbox(self, queue: str, limit: int) -> list[Item]:
        # Only this process receives from its inbox, so it takes messages straight from its
        # replayed state and tells the others afterwards (the take record frees capacity).
        hub = self._hub
        while True:
            instant = now()
            with hub.lock:
                taken, keys = hub.take_inbox(queue, limit)
                if not keys:
                    signal = hub.waker.add(queue)
            if keys:
                hub.take_later(queue, keys, instant)
                if taken:
                    return taken
                continue
            try:
                await signal
            finally:
                with hub.lock:
                    hub.waker.discard(queue, signal)

    async def _pop_shared(self, queue: str, limit: int) -> list[Item]:
        # A normal channel may have receivers in many processes: a claim record asks for up
        # to ``prefetch`` messages and the log order decides which ones each claim gets.
        hub = self._hub
        with hub.lock:
            held = hub.held.take(queue, limit)
            if held:
                return held
            cid = hub.token()
            signal = hub.waker.add(cid)

        def failed(error: BaseException | None) -> None:
            if error is not None:
                with hub.lock:
                    hub.failures[cid] = error
                    hub.waker.wake(cid)

        claim = [_CLAIM, cid, now(), queue, max(limit, self._prefetch), now() + self._lease]
        with hub.lock:
            hub.open_claims[cid] = claim
        hub.write(claim, done=failed)
        try:
            while not signal.done():
                try:
                    await asyncio.wait_for(asyncio.shield(signal), self._lease / 3)
                except asyncio.TimeoutError:
                    with hub.lock:
                        claim[2], claim[5] = now(), now() + self._lease
                    hub.write([_RENEW, None, now(), queue, cid, claim[5]])
        except asyncio.CancelledError:
            with hub.lock:
                del hub.open_claims[cid]
                hub.waker.discard(cid, signal)
                hub.hold(queue, hub.claimed.pop(cid, []))
                # Whatever the log gives this claim before the cancel record lands is held
                # for the next receive here (or given back), never lost in between.
                hub.abandoned.add(cid)
            hub.write([_CANCEL, None, now(), queue, cid])
            raise
        with hub.lock:
            del hub.open_claims[cid]
            error = hub.failures.pop(cid, None)
            messages = hub.claimed.pop(cid, [])
            hub.hold(queue, messages[limit:])
        if error is not None:
            raise BrokerError(f"kafka log {hub.topic}: claim failed: {error}") from error
        return [(m.channel, m.payload) for m in messages[:limit]]

    async def group_add(self, group: str, channel: str, *, deadline: float) -> None:
        hub = self._hub
        # Acknowledged is enough: any group send written after this record sees it.
        await hub.acked([_GROUP_ADD, None, now(), group, channel, deadline])

    async def group_discard(self, group: str, channel: str) -> None:
        hub = self._hub
        await hub.acked([_GROUP_DISCARD, None, now(), group, channel])

    async def group_send(
        self, group: str, payload: bytes, *, deadline: float, capacity: CapacityPolicy
    ) -> None:
        hub = self._hub
        capacities: dict[str, int] = {}
        if not capacity.uniform:
            # Members this process has not seen yet get the default capacity.
            with hub.lock:
                known = list(hub.machine.groups.get(group, ()))
            # Keyed by queue: the members of one process share one envelope in its inbox.
            capacities = {non_local_name(member): capacity.for_channel(member) for member in known}
        # The record decides the fan-out for every process; waiting for its replay here
        # would only delay the warnings about full members, which the replay thread logs.
        token = hub.token()
        with hub.lock:
            hub.group_senders[token] = self
        try:
            await hub.acked(
                [_GROUP_SEND, token, now(), group, payload, capacity.default, capacities]
            )
        except BaseException:
            with hub.lock:
                hub.group_senders.pop(token, None)
            raise

    async def broker_stats(self) -> BrokerStats:
        """The replayed state, once the replay has caught up with a no-op record written now
        (discarding a membership of the group "", which no valid name reaches)."""
        hub = self._hub
        await hub.call([_GROUP_DISCARD, hub.token(), now(), "", ""])
        instant = now()
        with hub.lock:
            machine = hub.machine
            # Counted without touching the state, which only log records may change.
            queues = {
                name: sum(1 for message in state.pending if message.deadline > instant)
                for name, state in machine.queues.items()
            }
            groups = {
                name: sum(1 for until in members.values() if until > instant)
                for name, members in machine.groups.items()
            }
        return BrokerStats(
            queues={name: count for name, count in queues.items() if count},
            groups={name: count for name, count in groups.items() if count},
        )

    async def flush(self) -> None:
        hub = self._hub
        await hub.call([_FLUSH, hub.token(), now()])
