"""Snapshots of the replayed state, so that a process joining does not replay history.

Every process computes the same :class:`~.log.Machine` at every log position, so any of
them may write it down: a snapshot is one record in the compacted topic
``multilayer-state.<prefix>`` (one key, so compaction keeps only the newest) holding the
state after the log's records up to a position, the position to resume from, the digest
of the last record it applied (to recognise the log it belongs to) and the digests of
recent records (so a record the producer wrote twice is applied once, as by a process
that replayed it). A process joining reads the newest snapshot, checks that the log
still holds its last record, and replays only what came after: start-up costs the
state's size plus the operations since the snapshot, whatever the retained history.

Who writes: a process that applied ``snapshot_every`` operations, or some operations and
``snapshot_interval`` seconds, since the last snapshot it knows of, waits a random
fraction of a second and writes one unless another process wrote one meanwhile (one
ListOffsets request tells). Processes replaying alike therefore mostly share the work.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import msgpack
from kafka import KafkaProducer, TopicPartition

from ...toolkit import jitter
from .log import Claim, Machine, Message, Queue

__all__ = [
    "SNAPSHOT_KEY",
    "SNAPSHOT_LIMIT",
    "Schedule",
    "Snapshot",
    "Snapshots",
    "decode_snapshot",
    "encode_snapshot",
    "state_topic",
]

logger = logging.getLogger(__name__.rpartition(".")[0])

#: The one key of the snapshot topic: compaction keeps its newest record.
SNAPSHOT_KEY = b"state"
#: The largest snapshot record written (bytes); a larger state is not snapshotted (logged)
#: and joining processes replay the log from the last snapshot that fitted.
SNAPSHOT_LIMIT = 64 * 1024 * 1024
#: Longest one request about snapshots waits for the broker (ms); reading the newest
#: snapshot at start waits at most _READ_TIMEOUT (s).
_REQUEST_TIMEOUT_MS = 1000
_READ_TIMEOUT = 60.0
#: The snapshot record layout's version; others are ignored (and replaced). 2: one
#: snapshot per log partition, in the same partition of the snapshot topic, with inbox
#: assignments and near-capacity reports.
_VERSION = 2
#: Longest a trigger waits before writing, so that processes triggered together let the
#: first writer's snapshot stand for all (s).
_JITTER = 1.0


def state_topic(log_topic: str) -> str:
    """The snapshot topic of the log ``log_topic`` (``multilayer.<prefix>``):
    ``multilayer-state.<prefix>``, which no prefix's log topic can be."""
    return "multilayer-state." + log_topic.removeprefix("multilayer.")


class Snapshot:
    """A decoded snapshot: the state, where to resume, and what identifies its log."""

    def __init__(
        self, machine: Machine, resume: int, anchor: tuple[int, bytes], digests: list[bytes]
    ) -> None:
        self.machine = machine
        #: The offset of the first log record the state does not include.
        self.resume = resume
        #: The last record applied (offset, digest): the log must still hold it.
        self.anchor = anchor
        #: Digests of the records applied last, oldest first.
        self.digests = digests


def encode_snapshot(
    machine: Machine,
    resume: int,
    anchor: tuple[int, bytes],
    digests: Iterable[bytes],
    *,
    keep: Callable[[str], bool] | None = None,
    control: bool = True,
) -> bytes:
    """The snapshot record's value for ``machine`` as of offset ``resume`` of one
    partition: the queues ``keep`` picks (all by default) and, for the control partition,
    the groups, inbox assignments and near-capacity reports."""
    queues = {
        name: [
            [[m.offset, m.channel, m.payload, m.deadline] for m in state.pending],
            [[c.cid, c.count, c.lease] for c in state.claims],
        ]
        for name, state in machine.queues.items()
        if keep is None or keep(name)
    }
    groups, inboxes, near = (
        (machine.groups, machine.inboxes, sorted(machine.near)) if control else ({}, {}, [])
    )
    body = [_VERSION, resume, list(anchor), list(digests), queues, groups, inboxes, near]
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


def decode_snapshot(value: bytes) -> Snapshot | None:
    """The snapshot in ``value``; None for another version or a malformed record."""
    try:
        body = msgpack.unpackb(value, raw=False, strict_map_key=False)
        if body[0] != _VERSION:
            return None
        _version, resume, anchor, digests, queues, groups, inboxes, near = body
        machine = Machine()
        for name, (pending, claims) in queues.items():
            machine.queues[name] = Queue(
                deque(Message(*message) for message in pending),
                deque(Claim(*claim) for claim in claims),
            )
        machine.groups = {group: dict(members) for group, members in groups.items()}
        machine.inboxes = {inbox: list(entry) for inbox, entry in inboxes.items()}
        machine.near = set(near)
        return Snapshot(machine, int(resume), (int(anchor[0]), bytes(anchor[1])), list(digests))
    except (ValueError, TypeError, msgpack.UnpackException):
        logger.warning("kafka: a snapshot record could not be read; replaying the log instead")
        return None


class Schedule:
    """When this process should write a snapshot (see the module docstring)."""

    def __init__(self, every: int, interval: float) -> None:
        self.every = every
        self.interval = interval
        self._operations = 0
        self._since = time.monotonic()
        # When (monotonic) a triggered write is due, and the wall clock of the trigger.
        self._due: float | None = None
        self.triggered_at = 0.0

    def applied(self, operations: int) -> None:
        """Count operations applied since the last snapshot."""
        self._operations += operations

    def due(self) -> bool:
        """Whether a snapshot should be written now (after the jitter of its trigger)."""
        instant = time.monotonic()
        if self._due is None:
            many = self._operations >= self.every
            stale = self._operations and instant - self._since >= self.interval
            if many or stale:
                self._due = instant + jitter(0, _JITTER)
                self.triggered_at = time.time()
            return False
        return instant >= self._due

    def done(self) -> None:
        """A snapshot was written, here or by another process: start counting again."""
        self._operations = 0
        self._since = time.monotonic()
        self._due = None


class Snapshots:
    """One log's snapshot topic, read through the replay thread's side consumer and
    written with a producer of its own (a snapshot may be far larger than any log record,
    and must not wait behind the log's writes). The snapshot of log partition ``p`` is
    the newest record of snapshot partition ``p``."""

    def __init__(self, log_topic: str, options: Mapping[str, Any]) -> None:
        self.topic = state_topic(log_topic)
        self.every = options["snapshot_every"]
        self.interval = options["snapshot_interval"]
        self.acks = options["acks"]
        #: False when the snapshot topic could not be made: no snapshot is read or written.
        self.enabled = True
        #: Partitions of the snapshot topic (one made by an older layer has one).
        self.partitions = 1
        #: kafka-python settings for the producer, made on the first write.
        self.client_config: Mapping[str, Any] = {}
        self._producer: Any = None

    def schedule(self) -> Schedule:
        """A new schedule for one log partition."""
        return Schedule(self.every, self.interval)

    def holds(self, partition: int) -> bool:
        """Whether log partition ``partition`` has a snapshot partition."""
        return self.enabled and partition < self.partitions

    def newest(
        self,
        consumer: Any,
        partition: int,
        end_offset: Callable[[TopicPartition], int],
        stopping: threading.Event,
    ) -> Snapshot | None:
        """The newest snapshot of log partition ``partition``, read with ``consumer``
        (left assigned to that snapshot partition); ``end_offset`` asks a partition's end
        offset (blocking, bounded)."""
        where = TopicPartition(self.topic, partition)
        consumer.assign([where])
        end = end_offset(where)
        if end == 0:
            return None
        # Compaction leaves gaps: the newest record is the first at or after end - 1.
        consumer.seek(where, end - 1)
        give_up = time.monotonic() + _READ_TIMEOUT
        while time.monotonic() < give_up and not stopping.is_set():
            for batch in consumer.poll(timeout_ms=200, max_records=1).values():
                return decode_snapshot(batch[-1].value)
        return None

    def write(
        self,
        consumer: Any,
        partition: int,
        schedule: Schedule,
        state: Callable[[], bytes | None],
    ) -> None:
        """Write ``state()`` as the newest snapshot of log partition ``partition``, unless
        another process wrote one since ``schedule``'s trigger (one ListOffsets request
        with ``consumer``)."""
        where = TopicPartition(self.topic, partition)
        since = int(schedule.triggered_at * 1000)
        try:
            found = consumer._fetcher.offsets_by_times({where: since}, _REQUEST_TIMEOUT_MS)
        except Exception as error:
            logger.warning("kafka: cannot look for snapshots in %s (%s)", self.topic, error)
            schedule.done()
            return
        value = None if found.get(where) is not None else state()
        schedule.done()
        if value is None:
            return
        if len(value) > SNAPSHOT_LIMIT:
            logger.warning(
                "kafka: state of %d bytes too large to snapshot in %s", len(value), self.topic
            )
            return
        try:
            if self._producer is None:
                self._producer = KafkaProducer(
                    **self.client_config,
                    allow_auto_create_topics=False,
                    acks=self.acks if self.acks == "all" else 1,
                    max_request_size=SNAPSHOT_LIMIT + 1024,
                )
            self._producer.send(self.topic, value, key=SNAPSHOT_KEY, partition=partition)
        except Exception as error:
            logger.warning("kafka: snapshot not written to %s (%s)", self.topic, error)

    def close(self) -> None:
        """Close the producer, if one was made (blocking)."""
        if self._producer is not None:
            self._producer.close(5)
