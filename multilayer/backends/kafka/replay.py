"""Reading the log: one thread per process fetches every record of the log and applies it
to the process's :class:`~.view.View`, and notices a log that came back empty.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from .log import decode
from .view import View
from .writer import Writer

__all__ = ["Replay"]

logger = logging.getLogger(__name__.rpartition(".")[0])

#: Seconds of waiting writes without any record arriving before the topic is checked.
_STALL = 2.0
#: records whose digests are kept to skip re-reading them after a log reset (~1 MiB)
_REMEMBERED = 16_384


class Replay:
    """This process's consumer of one log and the thread that replays it into ``view``.

    ``create_topic`` makes the topic again if a broker lost it; ``reconnected`` is called
    when records arrive after the broker was found unreachable, or the log was reset.
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
    ) -> None:
        self.topic = topic
        self.options = options
        self.view = view
        self.writer = writer
        self._create_topic = create_topic
        self._reconnected = reconnected
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
        self._checked = 0.0
        # The first record read (offset, value): a different one there means a new log.
        self._first: tuple[int, bytes] | None = None
        # Digests of the records applied last: after a reset is noticed, records of the
        # new log already applied before that are not applied (delivered) again.
        self._applied: deque[bytes] = deque(maxlen=_REMEMBERED)
        self._applied_set: set[bytes] = set()

    def start(self, client_config: Mapping[str, Any]) -> None:
        """Connect the consumer at the log's start and start the replay thread (blocking)."""
        self.consumer = KafkaConsumer(
            **client_config,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=self.options["fetch_wait_ms"],
            max_partition_fetch_bytes=self.options["max_record"],
            fetch_max_bytes=max(self.options["max_record"], 52_428_800),
        )
        self.consumer.assign([self.partition])
        self.consumer.seek_to_beginning(self.partition)
        self.start_end = self.consumer.end_offsets([self.partition])[self.partition]
        if self.start_end == 0:
            self.caught_up.set()
        self._thread = threading.Thread(
            target=self._run, name=f"multilayer kafka {self.topic} replay", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and the consumer (blocking)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(10)
        if self.consumer is not None:
            self.consumer.close()

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
            if self._stalled():
                self._recover()
                continue  # _recover moved the consumer: these records come again, or not

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

    def _back(self) -> None:
        self._lost = False
        self._reconnected()

    def _stalled(self) -> bool:
        # A write of ours not replayed for a while, whether or not newer records arrive:
        # after an in-memory broker restarts, records written before this process reads
        # the new log can land below the offset it reads from, and are never seen.
        if time.monotonic() - self._checked < _STALL:
            return False
        oldest = self.view.oldest_wait()
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
            self._create_topic()
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

    def _apply(self, offset: int, value: bytes) -> None:
        # Under the view's lock.
        if offset < self.next_offset:
            # The log restarted from scratch (an in-memory broker came back empty):
            # what it held is gone for every process, so start over from this record.
            logger.warning(
                "kafka log %s was reset; state restarts at offset %d", self.topic, offset
            )
            # The broker went away and came back: kafka-python reconnects on its own, and
            # this is the only sign of it an in-memory broker gives.
            self._back()
            # The claims of receivers still waiting here died with the old log.
            for claim in self.view.reset():
                self.writer.write(claim)
        if self._first is None or offset < self.next_offset:
            self._first = (offset, value)
        self.next_offset = offset + 1
        applicable = decode(self.topic, offset, value)
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
            self.view.apply(position, operation)
