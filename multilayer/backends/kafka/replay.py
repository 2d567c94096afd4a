"""Reading the log: one thread per process fetches the partitions this process uses (the
control partition, its inboxes' partitions, those of the normal channels it sends to or
receives from), applies their records to the process's :class:`~.view.View`, skipping
other processes' inbox records by their key, and notices a log that came back empty.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from queue import Empty, SimpleQueue
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaTimeoutError

from ...backend import now
from ...exceptions import BrokerError
from ...toolkit import jitter
from .log import GROUP_ADD, GROUP_DISCARD, INBOX, NEAR, decode
from .snapshot import SNAPSHOT_LIMIT, Schedule, Snapshot, Snapshots, encode_snapshot
from .view import NORMAL_KEY, View
from .writer import Writer

__all__ = ["INBOX_LEASE", "Replay", "inbox_lease"]

logger = logging.getLogger(__name__.rpartition(".")[0])

#: Longest one poll of the replay waits when no record comes (ms), while busy and idle.
_POLL_MS = 20
_IDLE_POLL_MS = 100
#: Seconds an inbox stays counted for the assignment of partitions to new inboxes without
#: its owner renewing it (every third of it; one control record per inbox).
INBOX_LEASE = 60.0
#: Seconds a write of this process may wait for its replay before the topic is made again.
_STALL = 2.0
#: Longest one check of the log's identity waits for the broker (ms).
_CHECK_TIMEOUT_MS = 1000
#: The most one fetch may return: a backlog catches up in few round trips.
_FETCH_MAX_BYTES = 52_428_800
#: Longest opening waits for the log's end offset (a new topic's leader) (s).
_OPEN_TIMEOUT = 60.0
#: Records whose digests are kept, to apply once a record met again: after a log reset,
#: or written twice by a producer retrying across a leader change (both within seconds).
#: 4,096 (seconds of traffic at the soak's ~250 records/s, records packing up to 1,024
#: operations under load) costs about 0.6 MiB; 16,384 cost 2.5 MiB of the soak's RSS.
_REMEMBERED = 4_096
#: Operations that only set state (groups, inboxes' partitions and nearness): applied
#: again when a reset wiped what they had set (see Replay._apply).
_RESTATED = frozenset({GROUP_ADD, GROUP_DISCARD, INBOX, NEAR})


def inbox_lease(inbox: str, token: str | None = None) -> list[Any]:
    """The control record that assigns ``inbox`` a partition, or renews its lease if it
    has one; ``token`` when its writer waits for its replay."""
    current = now()
    return [INBOX, token, current, inbox, current + INBOX_LEASE]


def _digest(value: bytes) -> bytes:
    return hashlib.blake2b(value, digest_size=16).digest()


@dataclass
class _Part:
    """What the replay knows of one partition it reads."""

    schedule: Schedule
    #: The offset of the next record to apply.
    next_offset: int = 0
    #: The last record applied (offset, digest): what a snapshot written now names.
    last: tuple[int, bytes] | None = None
    #: Callbacks waiting for the replay to reach an offset: (offset, callback).
    waiting: list[tuple[int, Callable[[], None]]] = field(default_factory=list)


#: A partition to read, a callback for when it caught up, and an inbox of this process to
#: catch up from a wall-clock instant (sends that came before its owner received).
_Request = tuple[int, Callable[[], None] | None, tuple[str, float] | None]


class Replay:
    """This process's consumer of one log and the thread that replays it into ``view``.

    ``create_topic`` makes the topic again if a broker lost it; ``reconnected`` is called
    when records arrive after the broker was found unreachable, or the log was reset;
    ``log_lost`` when the log lost what it held (called under the view's lock).
    """

    def __init__(
        self,
        topic: str,
        options: Mapping[str, Any],
        view: View,
        writer: Writer,
        *,
        create_topic: Callable[[], None],
        reconnected: Callable[[], None],
        log_lost: Callable[[], None],
    ) -> None:
        self.topic = topic
        self.options = options
        self.view = view
        self.writer = writer
        self._create_topic = create_topic
        self._reconnected = reconnected
        self._log_lost = log_lost
        self.consumer: Any = None
        # Snapshots, end offsets and the log's identity are asked with a consumer of their
        # own, so that the replay's assignment and positions never move for them.
        self._side: Any = None
        self.control = TopicPartition(topic, 0)
        #: The partitions read, by number.
        self.parts: dict[int, _Part] = {}
        # Partitions to start reading, and callbacks for when they have caught up.
        self._requests: SimpleQueue[_Request] = SimpleQueue()
        #: Set once the replay has reached the end the control partition had at start.
        self.caught_up = threading.Event()
        self.start_end = 0
        #: Notified whenever records were applied (fences wait on it).
        self.progress = threading.Condition()
        #: Operations decoded and applied, per partition (for tests and stats).
        self.decoded: dict[int, int] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # Whether the broker was found unreachable since records last arrived.
        self._lost = False
        # What _identity() said at the last check: a different answer means a new log.
        self._origin: tuple[int, int] | None = None
        # Until then, a record known to be in the log (partition, offset, digest): one
        # this process wrote and the broker acknowledged, or read; checked at once when
        # new. A process whose log has nothing in the control partition has only those
        # of other partitions to go by.
        self._anchor: tuple[int, int, bytes] | None = None
        self._anchor_new = False
        # The newest record this process wrote and the broker acknowledged (partition,
        # offset, value): the next anchor while the control partition stays empty, since
        # retention removes the oldest records first.
        self._latest: tuple[int, int, bytes] | None = None
        self._check_every = float(options["log_check"])
        self._check_at = 0.0
        self._renew_at = time.monotonic() + INBOX_LEASE / 3
        # Digests of the records applied last: after a reset is noticed, records of the
        # new log already applied before that are not applied (delivered) again.
        self._applied: deque[bytes] = deque(maxlen=_REMEMBERED)
        self._applied_set: set[bytes] = set()
        # The partition of each of them: a partition's snapshot carries its own only
        # (carrying all of them in each of 8 snapshots, written together, cost about
        # 0.6 MiB per round of snapshots and about 0.9 MiB of the soak's RSS).
        self._applied_in: deque[int] = deque(maxlen=_REMEMBERED)
        # Those of them applied before the last reset, whose state the reset wiped.
        self._wiped: set[bytes] = set()
        self.snapshots = Snapshots(topic, options)
        #: The snapshot this process started the control partition from, if any.
        self.started_from: int | None = None

    @property
    def next_offset(self) -> int:
        """The next record of the control partition to apply."""
        part = self.parts.get(0)
        return 0 if part is None else part.next_offset

    def _consumer(self, client_config: Mapping[str, Any]) -> Any:
        fetch_max = max(self.options["max_record"], _FETCH_MAX_BYTES)
        return KafkaConsumer(
            **client_config,
            # A topic a broker lost is made again by the layer, with its partitions; one
            # a metadata request auto-created would have the broker's default count.
            allow_auto_create_topics=False,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=self.options["fetch_wait_ms"],
            max_partition_fetch_bytes=self.options["max_record"],
            fetch_max_bytes=fetch_max,
            # kafka-python refuses any response frame over 1,000,000 bytes by default,
            # so a fetch of one large record, or of a backlog, failed and was retried.
            receive_message_max_bytes=fetch_max + SNAPSHOT_LIMIT + 1024 * 1024,
        )

    def start(self, client_config: Mapping[str, Any]) -> None:
        """Connect, read the control partition from its snapshot, and start the replay
        thread (blocking)."""
        self.consumer = self._consumer(client_config)
        self._side = self._consumer(client_config)
        self.snapshots.client_config = client_config
        partitions = self._partitions(self.topic)
        if partitions != self.options["partitions"]:
            logger.info(
                "kafka log %s has %d partition(s) (partitions=%d applies to new topics)%s",
                self.topic,
                partitions,
                self.options["partitions"],
                ": everything in partition 0" if partitions == 1 else "",
            )
        self.view.set_partitions(partitions)
        if self.snapshots.enabled:
            self.snapshots.partitions = self._partitions(self.snapshots.topic)
        self._subscribe(0)
        self.start_end = self._end_offset(self.control)
        if self.next_offset >= self.start_end:
            self.caught_up.set()
        with contextlib.suppress(Exception):  # the first check in the thread tries again
            self._origin = self._identity()
        self._check_at = time.monotonic() + self._check_every * jitter(0.5, 1.0)
        self._thread = threading.Thread(
            target=self._run, name=f"multilayer kafka {self.topic} replay", daemon=True
        )
        self._thread.start()

    def _partitions(self, topic: str) -> int:
        """How many partitions ``topic`` has (blocking, bounded like :meth:`_end_offset`)."""
        give_up = time.monotonic() + _OPEN_TIMEOUT
        while True:
            if self._stopping.is_set():
                raise BrokerError(f"kafka log {self.topic}: closed while opening")
            found = self._side.partitions_for_topic(topic)
            if found:
                return len(found)
            if time.monotonic() > give_up:
                raise BrokerError(f"kafka log {self.topic}: no partitions of {topic} found")
            self._stopping.wait(0.1)

    def subscribe(
        self,
        partition: int,
        done: Callable[[], None],
        catch_up: tuple[str, float] | None = None,
    ) -> None:
        """Read ``partition`` from now on (from its snapshot) and call ``done`` (in the
        replay thread) once the replay has reached the end it had now (any thread).

        ``catch_up`` (inbox, since): this process's inbox was assigned a partition by
        a sender at ``since`` (wall clock); its records from then on are read too."""
        self._requests.put((partition, done, catch_up))
        with contextlib.suppress(Exception):
            self.consumer._client.wakeup()

    def _end_offset(self, partition: TopicPartition) -> int:
        """The end offset of ``partition`` now, asked in bounded steps (blocking).

        kafka-python's public end_offsets() retries without end while a new topic has no
        leader yet (seconds on a cluster); a close() meanwhile must not leave this thread
        behind, so each step waits at most a second and :meth:`stop` ends the loop.
        """
        give_up = time.monotonic() + _OPEN_TIMEOUT
        while True:
            if self._stopping.is_set():
                raise BrokerError(f"kafka log {self.topic}: closed while opening")
            try:
                found = self._side._fetcher.end_offsets([partition], _CHECK_TIMEOUT_MS)
                return int(found[partition])
            except KafkaTimeoutError:
                if time.monotonic() > give_up:
                    raise

    def _subscribe(self, number: int) -> _Part:
        """Start reading partition ``number`` from its newest snapshot if it belongs to
        this log, else from its start (in the replay thread, or before it runs).

        The snapshot names the last record it applied; the log must still hold that very
        record (a log made again, or a snapshot older than the retention, does not).
        """
        part = self.parts.get(number)
        if part is not None:
            return part
        part = _Part(self.snapshots.schedule())
        partition = TopicPartition(self.topic, number)
        snapshot = None
        try:
            if self.snapshots.holds(number):
                snapshot = self.snapshots.newest(
                    self._side, number, self._end_offset, self._stopping
                )
        except (KafkaTimeoutError, BrokerError):
            raise
        except Exception as error:
            logger.warning("kafka log %s: no snapshot read (%s)", self.topic, error)
        if snapshot is not None and self._holds(partition, snapshot.anchor):
            self._install(number, part, snapshot)
        elif snapshot is not None:
            logger.info("kafka log %s: snapshot of another log; replaying it all", self.topic)
        with self.view.lock:
            self.parts[number] = part
            self.view.subscribed.add(number)
        self.consumer.assign([TopicPartition(self.topic, n) for n in self.parts])
        for n, known in self.parts.items():
            self.consumer.seek(TopicPartition(self.topic, n), known.next_offset)
        return part

    def _install(self, number: int, part: _Part, snapshot: Snapshot) -> None:
        with self.view.lock:
            machine = self.view.machine
            machine.queues.update(snapshot.machine.queues)
            if number == 0:
                machine.groups = snapshot.machine.groups
                machine.inboxes = snapshot.machine.inboxes
                machine.near = snapshot.machine.near
            for digest in snapshot.digests:
                self._remember(number, digest)
        part.last = snapshot.anchor
        part.next_offset = snapshot.resume
        if number == 0:
            self.started_from = snapshot.resume
        logger.info(
            "kafka log %s: partition %d resumed from a snapshot at %d",
            self.topic,
            number,
            snapshot.resume,
        )

    def _remember(self, partition: int, digest: bytes) -> None:
        if len(self._applied) == _REMEMBERED:
            self._applied_set.discard(self._applied[0])
        self._applied.append(digest)
        self._applied_in.append(partition)
        self._applied_set.add(digest)

    def _state(self, number: int) -> bytes | None:
        """Partition ``number``'s state as a snapshot record's value; None before any of
        its records was applied. Inboxes are left out: only their owner replays them."""
        part = self.parts[number]
        if part.last is None:
            return None
        view = self.view

        def keep(queue: str) -> bool:
            return not queue.endswith("!") and view.part_of(queue) == number

        with view.lock:
            return encode_snapshot(
                view.machine,
                part.next_offset,
                part.last,
                [d for d, n in zip(self._applied, self._applied_in, strict=True) if n == number],
                keep=keep,
                control=number == 0,
            )

    def abort_start(self) -> None:
        """End a :meth:`start`, or a wait for ``caught_up``, under way in another thread."""
        self._stopping.set()
        self.caught_up.set()

    def stop(self) -> None:
        """Stop the thread and the consumers (blocking); ends a :meth:`start` under way."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(10)
        for consumer in (self.consumer, self._side):
            if consumer is not None:
                consumer.close()
        self.snapshots.close()

    def _serve_requests(self) -> None:
        while True:
            try:
                number, done, catch_up = self._requests.get_nowait()
            except Empty:
                return
            try:
                part = self._subscribe(number)
                end = self._end_offset(TopicPartition(self.topic, number))
                if catch_up is not None:
                    self._catch_up(number, part.next_offset, *catch_up)
            except Exception as error:
                logger.warning(
                    "kafka log %s: cannot read partition %d (%s)", self.topic, number, error
                )
                self._requests.put((number, done, catch_up))
                self._stopping.wait(0.5)
                return
            if done is not None:
                part.waiting.append((end, done))
            self._settle(part)

    def _catch_up(self, number: int, upto: int, inbox: str, since: float) -> None:
        """Apply the records of ``inbox`` in partition ``number`` written from ``since``
        (wall clock, less a margin for clocks) up to offset ``upto``, where the replay
        goes on: they were skipped, or before the snapshot it started from. Side consumer."""
        partition = TopicPartition(self.topic, number)
        found = self._side._fetcher.offsets_by_times(
            {partition: max(int((since - 5.0) * 1000), 0)}, _CHECK_TIMEOUT_MS
        ).get(partition)
        if found is None or found.offset >= upto:
            return
        key = inbox.encode()
        self._side.assign([partition])
        self._side.seek(partition, found.offset)
        give_up = time.monotonic() + _OPEN_TIMEOUT
        offset = found.offset
        while offset < upto and time.monotonic() < give_up and not self._stopping.is_set():
            for records in self._side.poll(timeout_ms=200).values():
                with self.view.lock:
                    for record in records:
                        offset = record.offset + 1
                        if record.offset >= upto:
                            break
                        if record.key != key:
                            continue
                        for position, operation in decode(self.topic, record.offset, record.value):
                            self.view.apply(number, position, operation)

    @staticmethod
    def _settle(part: _Part) -> None:
        if part.waiting:
            ready = [done for offset, done in part.waiting if part.next_offset >= offset]
            part.waiting = [entry for entry in part.waiting if part.next_offset < entry[0]]
            for done in ready:
                done()

    def _run(self) -> None:
        # Tansu (and Kafka, when no new record arrives) holds a fetch for the whole
        # fetch_max_wait_ms, so the wait is short while traffic flows and long when the layer
        # is idle, which is what keeps an idle layer's CPU low. kafka-python has no public
        # setter; its fetcher reads this dict for every request (kafka-python is pinned).
        fetch_config = self.consumer._fetcher.config
        fast, slow = self.options["fetch_wait_ms"], self.options["idle_fetch_wait_ms"]
        while not self._stopping.is_set():
            self._serve_requests()
            busy = self.view.is_busy()
            fetch_config["fetch_max_wait_ms"] = fast if busy else slow
            try:
                # Short while busy: kafka-python's poll() waits its whole timeout when no
                # record comes (a wakeup() does not end it), and a partition to start
                # reading (a first send to a channel there) waits for the poll to end.
                # Long when idle, for idle CPU (2 % of a core against 5 % at 20 ms).
                batches = self.consumer.poll(timeout_ms=_POLL_MS if busy else _IDLE_POLL_MS)
            except Exception as error:
                logger.warning("kafka log %s: fetch failed (%s); retrying", self.topic, error)
                self._lost = True
                self._stopping.wait(0.5)
                continue
            for queue, items in self.view.held.release(self.options["prefetch_hold"]):
                self.writer.give_back(queue, items)
            if batches:
                if self._lost:
                    logger.info("kafka log %s: records arrive again", self.topic)
                    self._back()
                with self.view.lock:
                    for where, records in batches.items():
                        for record in records:
                            try:
                                self._apply(
                                    where.partition, record.offset, record.key, record.value
                                )
                            except Exception:
                                logger.exception(
                                    "kafka log %s: record %d:%d",
                                    self.topic,
                                    where.partition,
                                    record.offset,
                                )
                    reports, self.view.reports = self.view.reports, []
                for report in reports:
                    self.writer.write(report)
                if self.next_offset >= self.start_end:
                    self.caught_up.set()
                for part in list(self.parts.values()):
                    self._settle(part)
                with self.progress:
                    self.progress.notify_all()
            if time.monotonic() >= self._check_at or self._anchor_new:
                self._check()
            if time.monotonic() >= self._renew_at:
                self.renew_inboxes()
            if self.snapshots.enabled:
                for number, part in list(self.parts.items()):
                    if self.snapshots.holds(number) and part.schedule.due():
                        self.snapshots.write(
                            self._side, number, part.schedule, partial(self._state, number)
                        )

    def renew_inboxes(self) -> None:
        """Renew the leases of this process's inboxes in the control partition, which keep
        them counted when new inboxes are assigned partitions (any thread)."""
        self._renew_at = time.monotonic() + INBOX_LEASE / 3
        for inbox in list(self.view.own_inboxes):
            self.writer.write(inbox_lease(inbox))

    def wait_control(self, offset: int, timeout: float) -> bool:
        """Wait until the control partition is replayed up to ``offset`` (blocking)."""
        give_up = time.monotonic() + timeout
        with self.progress:
            while self.next_offset < offset:
                left = give_up - time.monotonic()
                if left <= 0 or self._stopping.is_set():
                    return False
                self.progress.wait(min(left, 0.1))
        return True

    @property
    def unreachable(self) -> bool:
        """Whether the broker was found unreachable since records last arrived."""
        return self._lost

    def _back(self) -> None:
        self._lost = False
        self._reconnected()

    def _identity(self) -> tuple[int, int] | None:
        """The offset and timestamp of the control partition's first record; None for an
        empty one.

        One ListOffsets request. A log that came back empty (an in-memory broker restarted,
        a topic deleted and made again) starts lower, or at the same offset with a record
        written later: neither Tansu nor a fetch past the end of Kafka's new log says so.
        """
        # kafka-python's public offsets_for_times() waits up to request_timeout_ms (5 min);
        # its fetcher takes a timeout (kafka-python is pinned).
        found = self._side._fetcher.offsets_by_times({self.control: 0}, _CHECK_TIMEOUT_MS)
        first = found.get(self.control)
        # Tansu answers timestamp -1 for an empty log, Kafka no offset at all.
        if first is None or first.timestamp < 0:
            return None
        return int(first.offset), int(first.timestamp)

    def _check(self) -> None:
        """Start over if the log is not the one this process knew (see :meth:`_identity`)."""
        # Drawn anew each time, so that processes which saw the broker come back together
        # spread their checks, and what follows a reset, over the interval.
        self._check_at = time.monotonic() + self._check_every * jitter(0.5, 1.0)
        try:
            identity = self._identity()
        except Exception as error:
            if not self._lost:
                logger.warning("kafka log %s: broker unreachable (%s)", self.topic, error)
            self._lost = True
            self._recreate_if_stalled()
            # Again soon: the first answer after the broker is back decides.
            self._check_at = time.monotonic() + jitter(0.1, 0.2)
            return
        origin, anchor = self._origin, self._anchor
        self._anchor_new = False
        lost: bool | None  # None: cannot tell yet
        if origin is not None:
            # Retention removes the oldest records: the log then starts later.
            lost = identity is None or (identity[0] <= origin[0] and identity != origin)
        elif anchor is None:
            lost = False  # nothing known of the log yet
        elif identity is None and anchor[0] == self.control.partition:
            # The log held a record this process wrote or read, and holds none now; with
            # acks=1 a record acknowledged on a cluster may not be readable yet.
            lost = True if self.options["acks"] == "all" else None
        else:
            held = self._holds(TopicPartition(self.topic, anchor[0]), anchor[1:])
            lost = None if held is None else not held
        if lost:
            with self.view.lock:
                self._start_over(f"lost its records ({self.next_offset} read before)")
            self._origin = self._anchor = self._latest = None
        elif lost is False:
            if identity is not None:
                self._origin, self._anchor = identity, None
            elif self._latest is not None:
                partition, offset, value = self._latest
                self._anchor = (partition, offset, _digest(value))

    def acked(self, partition: int, offset: int, value: bytes) -> None:
        """A record of this process is in ``partition`` at ``offset`` (any thread)."""
        if self._origin is not None:
            return
        self._latest = (partition, offset, value)
        if self._anchor is None:
            self._anchor, self._anchor_new = (partition, offset, _digest(value)), True

    def _holds(self, partition: TopicPartition, anchor: tuple[int, bytes]) -> bool | None:
        """Whether ``partition`` holds the record ``anchor`` names (offset, digest): not
        when it ends before that offset (a new, shorter log), unless acks=1 (a record
        acknowledged on a cluster may not be readable yet); None when the broker does not
        tell in time. Asked with the side consumer."""
        offset, digest = anchor
        found = self._records_from(partition, offset)
        if found:
            return bool(found[0].offset == offset and _digest(found[0].value) == digest)
        # Nothing from there on: the log ends before, or the broker is slow. Its end says
        # which, read back: Tansu's end offset is its last batch's first offset + 1.
        try:
            end = int(self._side._fetcher.end_offsets([partition], _CHECK_TIMEOUT_MS)[partition])
        except Exception:
            return None
        if end > 0:
            last = self._records_from(partition, end - 1)
            if not last or last[-1].offset >= offset:
                return None
        return False if self.options["acks"] == "all" else None

    def _records_from(self, partition: TopicPartition, offset: int) -> list[Any]:
        """The first records of ``partition`` from ``offset`` on; none in a second."""
        self._side.assign([partition])
        self._side.seek(partition, offset)
        deadline = time.monotonic() + _CHECK_TIMEOUT_MS / 1000
        while time.monotonic() < deadline:
            for batch in self._side.poll(timeout_ms=200, max_records=500).values():
                return list(batch)
        return []

    def _recreate_if_stalled(self) -> None:
        # An in-memory broker may come back without the topic, which producers wait for
        # but nobody recreates: the metadata of a broker that answers and does not know
        # the topic says so, or else a write of ours unreplayed for long.
        cluster = self._side._client.cluster
        missing = bool(cluster.brokers()) and self.topic not in cluster.topics()
        oldest = self.view.oldest_wait()
        if missing or (oldest is not None and time.monotonic() - oldest > _STALL):
            try:
                self._create_topic()
            except Exception as error:
                logger.warning("kafka log %s: cannot create the topic (%s)", self.topic, error)

    def _start_over(self, why: str) -> None:
        # Under the view's lock: what the old log held is gone for every process alike.
        # Every partition read is read again from its start.
        logger.warning("kafka log %s %s; state restarts from the new log", self.topic, why)
        self._wiped = set(self._applied_set)
        for number, part in self.parts.items():
            part.next_offset = 0
            part.last = None
            self.consumer.seek(TopicPartition(self.topic, number), 0)
        # The broker went away and came back: kafka-python reconnects on its own, and
        # this is the only sign of it an in-memory broker gives.
        self._back()
        # The claims of receivers still waiting here died with the old log.
        for claim in self.view.reset():
            self._claim_again(claim)
        self._log_lost()

    def _claim_again(self, claim: list[Any]) -> None:
        """Write ``claim``, of a receive waiting here, to the new log.

        A claim lost so would leave its receive waiting forever (the messages sent to its
        queue from then on would be nobody's), and the first write may fail, made while
        the broker is still making the topic again: see :meth:`_claim_written`."""
        self.writer.write(claim, done=partial(self._claim_written, claim))

    def _claim_written(self, claim: list[Any], error: BaseException | None) -> None:
        # In the writer's thread: a failed write is made again in a second, while the
        # receive still waits.
        if error is None:
            return
        with self.view.lock:
            if self.view.open_claims.get(claim[1]) is not claim:
                return
        logger.debug("kafka log %s: writing a claim again (%r)", self.topic, error)
        retry = threading.Timer(1.0, self._claim_again, (claim,))
        retry.daemon = True
        retry.start()

    def _apply(self, partition: int, offset: int, key: bytes | None, value: bytes) -> None:
        # Under the view's lock.
        part = self.parts.get(partition)
        if part is None:
            return
        if offset < part.next_offset:
            # Kafka answers a fetch past the end of a new, shorter log with
            # OFFSET_OUT_OF_RANGE, and the consumer goes back to its start.
            self._start_over(
                f"went back from offset {part.next_offset} to {offset} in partition {partition}"
            )
        part.next_offset = offset + 1
        if (
            key is not None
            and key != NORMAL_KEY
            and key.decode(errors="replace") not in self.view.own_inboxes
        ):
            return  # another process's inbox: not even decoded
        applicable = decode(self.topic, offset, value)
        # Only records with a layer's operations are remembered (they carry unique
        # tokens): junk that comes twice with the same bytes is logged twice.
        if not applicable:
            return
        digest = _digest(value)
        if self._origin is None and self._anchor is None:
            self._anchor, self._anchor_new = (partition, offset, digest), True
        restate = False
        if digest in self._applied_set:
            # Applied already: it does not deliver again. But what a record of the new
            # log applied before the reset was noticed says of groups and inboxes is
            # applied again, in log order: the reset wiped that state, which every
            # process must rebuild alike.
            restate = digest in self._wiped
            if not restate:
                return
            self._wiped.discard(digest)
        else:
            self._remember(partition, digest)
            part.last = (offset, digest)
            part.schedule.applied(len(applicable))
            self.decoded[partition] = self.decoded.get(partition, 0) + len(applicable)
        for position, operation in applicable:
            if restate and operation[0] not in _RESTATED:
                continue
            self.view.apply(partition, position, operation)
            if operation[0] == INBOX and operation[3] in self.view.own_inboxes:
                # This process's inbox got a partition (again, after a log was lost).
                assigned = self.view.part_of(operation[3])
                if assigned >= 0 and assigned not in self.parts:
                    self._requests.put((assigned, None, None))
