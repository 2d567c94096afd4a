"""Reading the log: one thread per process fetches every record of the log and applies it
to the process's :class:`~.view.View`, and notices a log that came back empty.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaTimeoutError

from ...exceptions import BrokerError
from ...toolkit import jitter
from .log import decode
from .snapshot import SNAPSHOT_LIMIT, Snapshot, Snapshots, encode_snapshot
from .view import View
from .writer import Writer

__all__ = ["Replay"]

logger = logging.getLogger(__name__.rpartition(".")[0])

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


def _digest(value: bytes) -> bytes:
    return hashlib.blake2b(value, digest_size=16).digest()


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
        self.partition = TopicPartition(topic, 0)
        #: The offset of the next record to apply.
        self.next_offset = 0
        #: Set once the replay has reached the end the log had at start.
        self.caught_up = threading.Event()
        self.start_end = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # Whether the broker was found unreachable since records last arrived.
        self._lost = False
        # What _identity() said at the last check: a different answer means a new log.
        self._origin: tuple[int, int] | None = None
        # Until then, a record known to be in the log (offset, digest): one this process
        # wrote and the broker acknowledged, or read.
        self._anchor: tuple[int, bytes] | None = None
        self._check_every = float(options["log_check"])
        self._check_at = 0.0
        # Digests of the records applied last: after a reset is noticed, records of the
        # new log already applied before that are not applied (delivered) again.
        self._applied: deque[bytes] = deque(maxlen=_REMEMBERED)
        self._applied_set: set[bytes] = set()
        # The last record applied (offset, digest): what a snapshot written now names.
        self._last: tuple[int, bytes] | None = None
        self.snapshots = Snapshots(topic, options)
        #: The snapshot this process started from, if any (for tests and logs).
        self.started_from: int | None = None

    def start(self, client_config: Mapping[str, Any]) -> None:
        """Connect the consumer at the log's start and start the replay thread (blocking)."""
        fetch_max = max(self.options["max_record"], _FETCH_MAX_BYTES)
        self.consumer = KafkaConsumer(
            **client_config,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=self.options["fetch_wait_ms"],
            max_partition_fetch_bytes=self.options["max_record"],
            fetch_max_bytes=fetch_max,
            # kafka-python refuses any response frame over 1,000,000 bytes by default,
            # so a fetch of one large record, or of a backlog, failed and was retried.
            receive_message_max_bytes=fetch_max + SNAPSHOT_LIMIT + 1024 * 1024,
        )
        self.snapshots.client_config = client_config
        self._resume()
        self.start_end = self._end_offset(self.partition)
        if self.next_offset >= self.start_end:
            self.caught_up.set()
        with contextlib.suppress(Exception):  # the first check in the thread tries again
            self._origin = self._identity()
        self._check_at = time.monotonic() + self._check_every * jitter(0.5, 1.0)
        self._thread = threading.Thread(
            target=self._run, name=f"multilayer kafka {self.topic} replay", daemon=True
        )
        self._thread.start()

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
                found = self.consumer._fetcher.end_offsets([partition], _CHECK_TIMEOUT_MS)
                return int(found[partition])
            except KafkaTimeoutError:
                if time.monotonic() > give_up:
                    raise

    def _resume(self) -> None:
        """Start from the newest snapshot if it belongs to this log, else from the start.

        The snapshot names the last record it applied; the log must still hold that very
        record (a log made again, or a snapshot older than the retention, does not).
        """
        snapshot = None
        try:
            if self.snapshots.enabled:
                snapshot = self.snapshots.newest(self.consumer, self._end_offset, self._stopping)
        except (KafkaTimeoutError, BrokerError):
            raise
        except Exception as error:
            logger.warning("kafka log %s: no snapshot read (%s)", self.topic, error)
        self.consumer.assign([self.partition])
        if snapshot is not None:
            self.next_offset = snapshot.resume
            if self._holds(snapshot.anchor):
                self._install(snapshot)
                return
            logger.info("kafka log %s: snapshot of another log; replaying it all", self.topic)
        self.next_offset = 0
        self.consumer.seek_to_beginning(self.partition)

    def _install(self, snapshot: Snapshot) -> None:
        with self.view.lock:
            self.view.machine = snapshot.machine
            for digest in snapshot.digests:
                self._remember(digest)
        self._last = snapshot.anchor
        self.started_from = snapshot.resume
        self.consumer.seek(self.partition, snapshot.resume)
        logger.info("kafka log %s: resumed from a snapshot at %d", self.topic, snapshot.resume)

    def _remember(self, digest: bytes) -> None:
        if len(self._applied) == _REMEMBERED:
            self._applied_set.discard(self._applied[0])
        self._applied.append(digest)
        self._applied_set.add(digest)

    def _state(self) -> bytes | None:
        """The state as a snapshot record's value; None before any record was applied."""
        if self._last is None:
            return None
        with self.view.lock:
            return encode_snapshot(self.view.machine, self.next_offset, self._last, self._applied)

    def abort_start(self) -> None:
        """End a :meth:`start`, or a wait for ``caught_up``, under way in another thread."""
        self._stopping.set()
        self.caught_up.set()

    def stop(self) -> None:
        """Stop the thread and the consumer (blocking); ends a :meth:`start` under way."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(10)
        if self.consumer is not None:
            self.consumer.close()
        self.snapshots.close()

    def _run(self) -> None:
        # Tansu (and Kafka, when no new record arrives) holds a fetch for the whole
        # fetch_max_wait_ms, so the wait is short while traffic flows and long when the layer
        # is idle, which is what keeps an idle layer's CPU low. kafka-python has no public
        # setter; its fetcher reads this dict for every request (kafka-python is pinned).
        fetch_config = self.consumer._fetcher.config
        fast, slow = self.options["fetch_wait_ms"], self.options["idle_fetch_wait_ms"]
        while not self._stopping.is_set():
            fetch_config["fetch_max_wait_ms"] = fast if self.view.is_busy() else slow
            try:
                batches = self.consumer.poll(timeout_ms=100)
            except Exception as error:
                logger.warning("kafka log %s: fetch failed (%s); retrying", self.topic, error)
                self._lost = True
                self._stopping.wait(0.5)
                continue
            records = [record for batch in batches.values() for record in batch]
            for queue, items in self.view.held.release(self.options["prefetch_hold"]):
                self.writer.give_back(queue, items)
            if records:
                if self._lost:
                    logger.info("kafka log %s: records arrive again", self.topic)
                    self._back()
                with self.view.lock:
                    for record in records:
                        try:
                            self._apply(record.offset, record.value)
                        except Exception:
                            logger.exception("kafka log %s: record %d", self.topic, record.offset)
                if self.next_offset >= self.start_end:
                    self.caught_up.set()
            if time.monotonic() >= self._check_at or self._anchor is not None:
                self._check()
            if self.snapshots.enabled and self.snapshots.schedule.due():
                self.snapshots.write(self.consumer, self._state)

    def _back(self) -> None:
        self._lost = False
        self._reconnected()

    def _identity(self) -> tuple[int, int] | None:
        """The offset and timestamp of the log's first record; None for an empty log.

        One ListOffsets request. A log that came back empty (an in-memory broker restarted,
        a topic deleted and made again) starts lower, or at the same offset with a record
        written later: neither Tansu nor a fetch past the end of Kafka's new log says so.
        """
        # kafka-python's public offsets_for_times() waits up to request_timeout_ms (5 min);
        # its fetcher takes a timeout (kafka-python is pinned).
        found = self.consumer._fetcher.offsets_by_times({self.partition: 0}, _CHECK_TIMEOUT_MS)
        first = found.get(self.partition)
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
        lost: bool | None  # None: cannot tell yet
        if origin is not None:
            # Retention removes the oldest records: the log then starts later.
            lost = identity is None or (identity[0] <= origin[0] and identity != origin)
        elif anchor is None:
            lost = False  # nothing known of the log yet
        elif identity is None:
            # The log held a record this process wrote or read, and holds none now; with
            # acks=1 a record acknowledged on a cluster may not be readable yet.
            lost = True if self.options["acks"] == "all" else None
        else:
            held = self._holds(anchor)
            lost = None if held is None else not held
        if lost:
            with self.view.lock:
                self._start_over(f"lost its records ({self.next_offset} read before)")
                self.next_offset = 0
            self.consumer.seek_to_beginning(self.partition)
            self._origin = self._anchor = None
        elif lost is False:
            self._origin, self._anchor = identity, None

    def acked(self, offset: int, value: bytes) -> None:
        """A record of this process is in the log at ``offset`` (any thread)."""
        if self._origin is None and self._anchor is None:
            self._anchor = (offset, _digest(value))

    def _holds(self, anchor: tuple[int, bytes]) -> bool | None:
        """Whether the log holds the record ``anchor`` names (offset, digest); None when
        the broker does not tell in time. Leaves the consumer where it was."""
        offset, digest = anchor
        self.consumer.seek(self.partition, offset)
        try:
            deadline = time.monotonic() + _CHECK_TIMEOUT_MS / 1000
            while time.monotonic() < deadline:
                for batch in self.consumer.poll(timeout_ms=200, max_records=1).values():
                    return bool(batch[0].offset == offset and _digest(batch[0].value) == digest)
            return None
        finally:
            self.consumer.seek(self.partition, self.next_offset)

    def _recreate_if_stalled(self) -> None:
        # An in-memory broker may come back without the topic, which producers wait for
        # but nobody recreates: a write of ours unreplayed for long says so.
        oldest = self.view.oldest_wait()
        if oldest is not None and time.monotonic() - oldest > _STALL:
            try:
                self._create_topic()
            except Exception as error:
                logger.warning("kafka log %s: cannot create the topic (%s)", self.topic, error)

    def _start_over(self, why: str) -> None:
        # Under the view's lock: what the old log held is gone for every process alike.
        logger.warning("kafka log %s %s; state restarts from the new log", self.topic, why)
        self._last = None
        # The broker went away and came back: kafka-python reconnects on its own, and
        # this is the only sign of it an in-memory broker gives.
        self._back()
        # The claims of receivers still waiting here died with the old log.
        for claim in self.view.reset():
            self.writer.write(claim)
        self._log_lost()

    def _apply(self, offset: int, value: bytes) -> None:
        # Under the view's lock.
        if offset < self.next_offset:
            # Kafka answers a fetch past the end of a new, shorter log with
            # OFFSET_OUT_OF_RANGE, and the consumer goes back to its start.
            self._start_over(f"went back from offset {self.next_offset} to {offset}")
        self.next_offset = offset + 1
        applicable = decode(self.topic, offset, value)
        # Only records with a layer's operations are remembered (they carry unique
        # tokens): junk that comes twice with the same bytes is logged twice.
        if not applicable:
            return
        digest = _digest(value)
        if self._origin is None and self._anchor is None:
            self._anchor = (offset, digest)
        if digest in self._applied_set:
            return
        self._remember(digest)
        self._last = (offset, digest)
        self.snapshots.schedule.applied(len(applicable))
        for position, operation in applicable:
            self.view.apply(position, operation)
