"""One process's connection to one prefix's log, shared by every layer instance of the
process: the :class:`~.view.View`, the :class:`~.writer.Writer` and the
:class:`~.replay.Replay` put together, started once and stopped with the last user.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Mapping
from functools import partial
from typing import Any

import msgpack
from kafka import KafkaConsumer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

from ...backend import Backend
from ...exceptions import BrokerError
from ...toolkit import ProcessWide, within
from .log import Outcome
from .replay import Replay, inbox_lease
from .snapshot import SNAPSHOT_LIMIT, state_topic
from .view import VERDICT_TIMEOUT, View
from .writer import REPLAY_TIMEOUT, Done, Writer, answer_from_thread, answered

__all__ = ["HUBS", "Hub"]

logger = logging.getLogger(__name__.rpartition(".")[0])


class Hub:
    """One process's connection to one prefix's log.

    kafka-python is threaded, so one producer and one replay thread serve every event
    loop of the process; instances reach the shared state under ``view.lock``.
    """

    def __init__(self, topic: str, client_config: dict[str, Any], options: Mapping[str, Any]):
        self.topic = topic
        self.client_config = client_config
        self.options = options
        self.view = View(topic, options["idle_after"])
        self.writer = Writer(topic, options, self.view.busy, self.view.route)
        self.replay = Replay(
            topic,
            options,
            self.view,
            self.writer,
            create_topic=self.create_topic,
            reconnected=self._reconnected,
            log_lost=self._log_lost,
        )
        self.writer.on_acked = self.replay.acked
        self.writer.fence = self._fence_now
        #: The backends reading through this hub, told of each reconnection.
        self.backends: weakref.WeakSet[Backend] = weakref.WeakSet()
        self._start_lock = threading.Lock()
        self._started = False
        self._stopped = False
        self._fence: _Fence | None = None

    def ensure_started(self) -> None:
        """Create the log topic if needed, connect, and replay what the log holds (once).

        Returning only once the replay has reached the end the log had at start means a
        new layer's view (capacity, groups) is the present, not a past state. Blocking.
        """
        with self._start_lock:
            if self._stopped:
                raise BrokerError(f"kafka log {self.topic}: closed while opening")
            if not self._started:
                self.create_topic()
                self.writer.start(self.client_config)
                self.replay.start(self.client_config)
                self._started = True
        if not self.replay.caught_up.wait(REPLAY_TIMEOUT):
            logger.warning(
                "kafka log %s: replay did not reach offset %d in %gs; going on",
                self.topic,
                self.replay.start_end,
                REPLAY_TIMEOUT,
            )
        if self._stopped:
            raise BrokerError(f"kafka log {self.topic}: closed while opening")

    def create_topic(self) -> None:
        """Create the log topic and its snapshot topic unless they exist (first use of a
        prefix, broker restart)."""
        retention = str(int(self.options["retention_hours"] * 3_600_000))
        partitions = self.options["partitions"]
        log = NewTopic(
            self.topic,
            num_partitions=partitions,
            replication_factor=-1,
            topic_configs={
                "cleanup.policy": "delete",
                "retention.ms": retention,
                "max.message.bytes": str(self.options["max_record"]),
            },
        )
        snapshots = NewTopic(
            state_topic(self.topic),
            # Snapshot partition p holds the snapshots of log partition p.
            num_partitions=partitions,
            replication_factor=-1,
            topic_configs={
                # Compaction keeps the newest snapshot; retention drops one older than the
                # log could still hold, which no process could use.
                "cleanup.policy": "compact,delete",
                "retention.ms": retention,
                "max.message.bytes": str(SNAPSHOT_LIMIT + 1024),
                # Segments roll often so that compaction, which skips the active segment,
                # keeps the topic at a few snapshots.
                "segment.ms": "600000",
            },
        )
        admin = KafkaAdminClient(**self.client_config)
        try:
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics([log])
            try:
                admin.create_topics([snapshots])
            except TopicAlreadyExistsError:
                pass
            except Exception as error:
                # A principal allowed only the log's topics (ACLs from before snapshots)
                # still gets a working layer; its processes replay the whole log.
                logger.warning(
                    "kafka: no snapshot topic %s (%s); joining processes replay the log",
                    snapshots.name,
                    error,
                )
                self.replay.snapshots.enabled = False
        finally:
            admin.close()

    def stop(self) -> None:
        """Give back held messages, then stop both threads and the clients (blocking).

        A start under way (another thread in :meth:`ensure_started`) is told to end and
        waited for, so that no client or thread outlives the hub.
        """
        self._stopped = True
        self.replay.abort_start()
        with self._start_lock:
            pass
        if self._fence is not None:
            self._fence.stop()
        self.replay.stop()
        for queue, items in self.view.held.release(0):
            self.writer.give_back(queue, items)
        self.writer.stop()

    def _reconnected(self) -> None:
        for backend in list(self.backends):
            backend.reconnects += 1

    def _log_lost(self) -> None:
        # This process's inboxes get a partition again (the control records that gave
        # them one are gone); the replay reads it from its start once assigned.
        self.replay.renew_inboxes()
        # Each layer adds again the memberships it made (its ledger is shared by its
        # backends in every event loop, so one of them does it), from a thread of its own:
        # the replay thread must go on, to replay the records that re-assert them.
        chosen: dict[int, Backend] = {}
        for backend in list(self.backends):
            if len(backend.membership_ledger):
                chosen.setdefault(id(backend.membership_ledger), backend)
        for backend in chosen.values():
            threading.Thread(
                target=_reassert, args=(backend,), name="multilayer kafka re-assert", daemon=True
            ).start()

    def write(self, record: list[Any], *, done: Done | None = None) -> None:
        """Append ``record`` to the log (see :meth:`Writer.write`)."""
        self.writer.write(record, done=done)

    async def acked(self, record: list[Any], partition: int | None = None) -> None:
        """Write ``record`` and wait until the broker has it (not for its replay)."""
        await self.writer.acked(record, partition)

    async def subscribe(self, partition: int, catch_up: tuple[str, float] | None = None) -> None:
        """Read ``partition`` from now on; returns once its replay reached the end it had
        when this was called (at once when it is read already and caught up)."""
        ready, done = answer_from_thread()
        self.replay.subscribe(partition, partial(done, None), catch_up)
        await answered(ready, f"kafka log {self.topic}: partition {partition} not replayed")

    def _the_fence(self) -> _Fence:
        with self._start_lock:
            if self._fence is None:
                self._fence = _Fence(self)
            return self._fence

    def _fence_now(self) -> None:
        self._the_fence().now()

    def assign_now(self, inbox: str) -> None:
        """Write an assignment of ``inbox`` (of a process that has not received yet) and
        wait until control's replay applied it (blocking; from the writer thread, whose
        own queue it cannot wait on)."""
        value = msgpack.packb(inbox_lease(inbox), use_bin_type=True)
        future = self.writer.producer.send(self.topic, value, partition=0)
        metadata = future.get(timeout=REPLAY_TIMEOUT)
        self.replay.wait_control(metadata.offset + 1, REPLAY_TIMEOUT)

    async def fence(self) -> None:
        """Return once the control partition is replayed up to its end as of this call:
        every group change any process had acknowledged before is then applied here.
        Concurrent callers share one end-offset request."""
        await self._the_fence().wait()

    async def call(
        self, record: list[Any], *, partition: int | None = None, verdict: bool = False
    ) -> Outcome:
        """Write ``record`` and wait until the replay has applied it; its outcome.

        With ``verdict``, the record is a checked send to another process's inbox: its
        outcome is the owner's verdict, and a refusal after ``VERDICT_TIMEOUT``."""
        view, token = self.view, record[1]
        with view.lock:
            signal = view.wait_for(token)
        try:
            self.writer.write(record, done=partial(view.failed, token), partition=partition)
            await within(asyncio.shield(signal), VERDICT_TIMEOUT if verdict else REPLAY_TIMEOUT)
        except asyncio.TimeoutError:
            if verdict:
                return Outcome(accepted=False)
            raise BrokerError(
                f"kafka log {self.topic}: record not replayed within {REPLAY_TIMEOUT:g}s"
            ) from None
        finally:
            with view.lock:
                view.calls.pop(token, None)
                view.waiters.discard(token, signal)
                error = view.failures.pop(token, None)
                outcome = view.results.pop(token, None)
        if outcome is not None:
            return outcome
        raise BrokerError(f"kafka log {self.topic}: write failed: {error}") from error


#: Seconds a group send's fence asks for the control partition's end before it goes on
#: without (a broker outage); none while the replay knows the broker unreachable.
_FENCE_PATIENCE = 1.0


class _Fence:
    """The thread that answers :meth:`Hub.fence`: it asks the control partition's end
    offset (one ListOffsets request, with a consumer of its own) for every caller that
    arrived before the request, and answers them once the replay got there."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        self._lock = threading.Lock()
        self._waiting: list[Done] = []
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._consumer: Any = None
        # The consumer serves this thread and the writer's (:meth:`now`).
        self._consumer_lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._run, name=f"multilayer kafka {hub.topic} fence", daemon=True
        )
        self._thread.start()

    async def wait(self) -> None:
        answer, done = answer_from_thread()
        with self._lock:
            self._waiting.append(done)
        self._wake.set()
        await answered(answer, f"kafka log {self._hub.topic}: control partition not replayed")

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(10)
        if self._consumer is not None:
            self._consumer.close()

    def now(self) -> None:
        """Bring the control replay to the partition's end as of this call (blocking)."""
        with self._consumer_lock:
            end = self._end_offset()
        if end is not None and not self._hub.replay.wait_control(end, REPLAY_TIMEOUT):
            raise BrokerError(f"kafka log {self._hub.topic}: control replay stalled")

    def _end_offset(self) -> int | None:
        """The control partition's end offset now, asked again for up to _FENCE_PATIENCE
        seconds; None when the broker does not answer (an outage: the callers then go on
        with this process's replay as it is, logged)."""
        control = self._hub.replay.control
        give_up = time.monotonic() + _FENCE_PATIENCE
        while True:
            try:
                if self._consumer is None:
                    self._consumer = KafkaConsumer(
                        **self._hub.client_config, allow_auto_create_topics=False
                    )
                return int(self._consumer._fetcher.end_offsets([control], 500)[control])
            except Exception as error:
                if (
                    time.monotonic() > give_up
                    or self._stopping.is_set()
                    or self._hub.replay.unreachable
                ):
                    logger.warning(
                        "kafka log %s: control end offset unknown (%s); a group send goes "
                        "by this process's replay as it is",
                        self._hub.topic,
                        error,
                    )
                    return None
                self._stopping.wait(0.05)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            with self._lock:
                batch, self._waiting = self._waiting, []
            if not batch:
                continue
            error: BaseException | None = None
            try:
                self.now()
            except BrokerError as failure:
                error = failure
            for done in batch:
                done(error)


def _reassert(backend: Backend) -> None:
    try:
        asyncio.run(asyncio.wait_for(backend.reassert_memberships(), REPLAY_TIMEOUT))
    except Exception as error:
        logger.warning("kafka: memberships not re-asserted after the log was lost: %s", error)


#: The hubs of this process, by broker, topic and options.
HUBS: ProcessWide[Hub] = ProcessWide()
