"""Writing to the log: one thread per process hands operations to kafka-python's producer,
packed many to a Kafka record, in the order they were written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from queue import Empty, SimpleQueue
from typing import Any

import msgpack
from kafka import KafkaProducer

from ...backend import Item, now
from ...exceptions import BrokerError
from ...toolkit import within
from .log import HOUSEKEEPING, OPERATIONS_PER_RECORD, RETURN, TAKE

__all__ = [
    "RECORD_OVERHEAD",
    "REPLAY_TIMEOUT",
    "Deferred",
    "Done",
    "Writer",
    "answer_from_thread",
    "answered",
]

logger = logging.getLogger(__name__.rpartition(".")[0])

#: Bytes a log record may add around a payload (operation, channel name, numbers).
RECORD_OVERHEAD = 4096
#: Longest a caller waits for its own record to come back through the log.
REPLAY_TIMEOUT = 60.0
#: Longest a take record waits to ride along with the next record this process writes.
#: Takes only free capacity in the other processes' view of an inbox (this process never
#: hands a message out twice), so they need not cost a Kafka record of their own each:
#: brokers pay per record batch (Tansu's in-memory storage, per batch in the topic).
_TAKE_DELAY = 0.02

#: Called once the broker answered a write: with None, or with the error.
Done = Callable[[BaseException | None], None]
#: Where a record goes: its partition and Kafka record key.
Route = tuple[int, bytes | None]
#: A packed operation waiting to be produced, and where it goes.
_Entry = tuple[bytes, Done | None, Route]
#: A group send waiting for the control fence: called in the writer thread once the
#: fence is done, it returns the records to write in its place, with their callbacks.
Deferred = Callable[[], list[tuple[list[Any], Done | None]]]


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def answer_from_thread() -> tuple[asyncio.Future[None], Done]:
    """A future of the running loop, and a callback any thread may call with None or an
    error to settle it (nothing happens once the loop closed)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()

    def done(error: BaseException | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop may have closed meanwhile
            loop.call_soon_threadsafe(_settle, future, error)

    return future, done


async def answered(future: asyncio.Future[None], late: str) -> None:
    """Wait for ``future`` up to REPLAY_TIMEOUT; BrokerError(``late`` ...) after that."""
    try:
        await within(future, REPLAY_TIMEOUT)
    except asyncio.TimeoutError:
        raise BrokerError(f"{late} within {REPLAY_TIMEOUT:g}s") from None


class Writer:
    """This process's producer for one log, and the thread that feeds it.

    ``busy`` is called for each record someone will wait for (polling speeds up);
    ``route`` tells the partition and key of a record (``View.route``).
    """

    def __init__(
        self,
        topic: str,
        options: Mapping[str, Any],
        busy: Callable[[], None],
        route: Callable[[list[Any]], Route],
    ):
        self.topic = topic
        self.options = options
        self._busy = busy
        self._route = route
        self._outbox: SimpleQueue[_Entry | Deferred | None] = SimpleQueue()
        #: Brings the control replay to the control partition's end as of the call
        #: (blocking; set by the hub): what deferred group sends wait for.
        self.fence: Callable[[], None] = lambda: None
        # Inbox keys taken here and not written yet, per queue, and the instant of the first.
        self._takes: dict[str, list[tuple[int, str]]] = {}
        self._takes_at = 0.0
        # When (monotonic) the oldest take waiting must go out even if no record comes.
        self._takes_due = 0.0
        self._takes_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.producer: Any = None
        #: Told the partition, offset and bytes of each record the broker acknowledged.
        self.on_acked: Callable[[int, int, bytes], None] = lambda _partition, _offset, _value: None

    def start(self, client_config: Mapping[str, Any]) -> None:
        """Connect the producer and start the writer thread (blocking)."""
        self.producer = KafkaProducer(
            **client_config,
            # See Replay: only the layer makes its topics, with their partitions.
            allow_auto_create_topics=False,
            acks=self.options["acks"] if self.options["acks"] == "all" else 1,
            # One request in flight keeps this process's records in the order it wrote them.
            max_in_flight_requests_per_connection=1,
            max_request_size=self.options["max_record"],
            linger_ms=self.options["linger_ms"],
        )
        self._thread = threading.Thread(
            target=self._run, name=f"multilayer kafka {self.topic} writer", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Write what waits, then stop the thread and the producer (blocking)."""
        self._outbox.put(None)
        if self._thread is not None:
            self._thread.join(10)
        if self.producer is not None:
            try:
                self.producer.close(10)
            except OSError:
                # kafka-python races with itself: its sender thread, told to stop, closes
                # the client's wake-up socket pair while close() writes to it (a broken
                # pipe, seen once in CI). The sender has stopped; a second close() ends
                # what the first left undone (joining it, closing the metrics).
                self.producer.close(10)

    def give_back(self, queue: str, items: list[Item]) -> None:
        """Return held ``items`` of ``queue`` to the head of the queue, for every process."""
        instant = now()
        chunks: list[list[list[Any]]] = [[]]
        size = 0
        for channel, payload in items:
            if size + len(payload) > self.options["max_record"] - RECORD_OVERHEAD:
                chunks.append([])
                size = 0
            chunks[-1].append([channel, payload])
            size += len(payload)
        # Each record puts its messages at the head of the queue: the newest go first.
        for chunk in reversed(chunks):
            if chunk:
                self.write([RETURN, None, instant, queue, chunk])

    def take_later(self, queue: str, keys: list[tuple[int, str]], instant: float) -> None:
        """Record that this process took inbox messages, with the next write (or within
        ``_TAKE_DELAY`` seconds), merged with the other takes waiting by then."""
        with self._takes_lock:
            if not self._takes:
                self._takes_at = instant
                self._takes_due = time.monotonic() + _TAKE_DELAY
            self._takes.setdefault(queue, []).extend(keys)

    def _pending_takes(self) -> list[_Entry]:
        with self._takes_lock:
            takes, since, self._takes = self._takes, self._takes_at, {}
        entries: list[_Entry] = []
        for queue, keys in takes.items():
            record = [TAKE, None, since, queue, keys]
            entries.append((msgpack.packb(record, use_bin_type=True), None, self._route(record)))
        return entries

    def write(
        self, record: list[Any], *, done: Done | None = None, partition: int | None = None
    ) -> None:
        """Append ``record`` to the log; ``done(error or None)`` runs once the broker answered.

        It goes to ``partition`` if given (a flush marker), else where ``route`` says. No
        I/O here: the writer thread hands the record to the producer.
        """
        if record[0] not in HOUSEKEEPING:
            self._busy()
        where = self._route(record) if partition is None else (partition, None)
        self._outbox.put((msgpack.packb(record, use_bin_type=True), done, where))

    def defer(self, expand: Deferred) -> None:
        """Write, in this place among this process's writes, the records ``expand()``
        returns once the control fence that follows this call is done (a group send)."""
        self._busy()
        self._outbox.put(expand)

    def _expand(self, batch: list[_Entry | Deferred]) -> list[_Entry]:
        """``batch`` with its deferred group sends expanded, after one fence for all: each
        was called before the fence began."""
        if all(isinstance(entry, tuple) for entry in batch):
            return batch  # type: ignore[return-value]
        self.fence()
        entries: list[_Entry] = []
        for entry in batch:
            if isinstance(entry, tuple):
                entries.append(entry)
                continue
            try:
                produced = entry()
            except Exception:
                logger.exception("kafka log %s: a group send failed", self.topic)
                continue
            for record, done in produced:
                packed = msgpack.packb(record, use_bin_type=True)
                entries.append((packed, done, self._route(record)))
        return entries

    def _run(self) -> None:
        # producer.send() blocks while the topic's metadata is unknown (after a broker
        # restart, for max_block_ms) or its buffer is full, so it never runs in an event
        # loop; one thread keeps this process's records in the order they were written.
        # Operations waiting together go out as one Kafka record (msgpack values back to
        # back): kafka-python's cost is per record, so this is what makes sends cheap.
        limit = self.options["max_record"] - RECORD_OVERHEAD
        while True:
            # Waking every _TAKE_DELAY even when idle keeps a take from waiting for a
            # write that never comes, at a cost too small to measure. A take waiting is
            # given its whole delay, counted from when it was taken, not from this wake:
            # otherwise one in four goes out alone at a 5 ms pace.
            with self._takes_lock:
                due = self._takes_due - time.monotonic() if self._takes else _TAKE_DELAY
            try:
                entry = self._outbox.get(timeout=max(due, 0.0))
            except Empty:
                if self._takes and self._takes_due <= time.monotonic():
                    self._produce_all(self._pending_takes(), limit)
                continue
            if entry is None:
                self._produce_all(self._pending_takes(), limit)
                return
            batch: list[_Entry | Deferred] = [entry]
            while len(batch) < OPERATIONS_PER_RECORD:
                try:
                    entry = self._outbox.get_nowait()
                except Empty:
                    break
                if entry is None:
                    self._produce_all(self._pending_takes() + self._expand(batch), limit)
                    return
                batch.append(entry)
            # Takes first: they name messages replayed before anything in this batch, and
            # whoever waits for a record of the batch (stats, a flush) then sees them applied.
            expanded = self._expand(batch)
            self._produce_all(self._pending_takes() + expanded, limit)

    def _produce_all(self, entries: list[_Entry], limit: int) -> None:
        """Write ``entries`` in order per partition and key, as few records of at most
        ``limit`` bytes (and ``OPERATIONS_PER_RECORD`` operations) as fit: one record has
        one key, which a process that does not own it skips without decoding."""
        routes: dict[Route, list[_Entry]] = {}
        for entry in entries:
            routes.setdefault(entry[2], []).append(entry)
        for where, routed in routes.items():
            batch: list[_Entry] = []
            size = 0
            for entry in routed:
                if batch and (size + len(entry[0]) > limit or len(batch) == OPERATIONS_PER_RECORD):
                    self._produce(batch, where)
                    batch, size = [], 0
                batch.append(entry)
                size += len(entry[0])
            if batch:
                self._produce(batch, where)

    def _produce(self, batch: list[_Entry], where: Route) -> None:
        dones = [done for _value, done, _where in batch if done is not None]

        def answer(error: BaseException | None) -> None:
            for done in dones:
                done(error)

        record = b"".join(value for value, _done, _where in batch)
        partition, key = where
        try:
            # Always an explicit partition: the layer's mapping, never the producer's.
            future = self.producer.send(self.topic, record, key=key, partition=partition)
        except Exception as error:
            logger.warning("kafka log %s: write failed: %s", self.topic, error)
            answer(error)
            return
        future.add_callback(lambda metadata: self.on_acked(partition, metadata.offset, record))
        if dones:
            future.add_callback(lambda _metadata: answer(None))
            future.add_errback(answer)

    async def acked(self, record: list[Any], partition: int | None = None) -> None:
        """Write ``record`` and wait until the broker has it (not for its replay)."""
        answer, done = answer_from_thread()
        self.write(record, done=done, partition=partition)
        try:
            await answered(answer, f"kafka log {self.topic}: no answer from the broker")
        except BrokerError:
            raise
        except Exception as error:
            raise BrokerError(f"kafka log {self.topic}: write failed: {error}") from error
