"""The Kafka backend class: ``kafka://`` and ``kafka+ssl://`` on kafka-python.

Features: every contract point across processes, on Apache Kafka or any broker speaking
its protocol (CI runs Tansu); see the package docstring for the design.

URL format: ``kafka://[user:password@]host[:port][,host[:port]...][?option=value...]``
(port 9092 by default; credentials select SASL over plaintext) and
``kafka+ssl://[user:password@]host[:port][,...]?ssl_cafile=...`` (TLS, and SASL when
credentials are given).

Options (URL query or keyword arguments), besides the core ones:

* ``partitions`` (int, 8): partitions of the log topic (and its snapshot topic) when
  this layer creates it: partition 0 is control, normal channels and process inboxes
  spread over the others. An existing topic's own count is used; one made with one
  partition keeps everything in partition 0.
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
* ``log_check`` (float, 1.0): seconds between checks that the log did not come back
  empty (one ListOffsets request, each wait 50-100 % of this); a process that finds it
  did starts over from the new log and re-asserts its memberships.
* ``snapshot_every`` (int, 100000): operations applied between snapshots of the state,
  which processes joining start from instead of the log's start (:mod:`.snapshot`).
* ``snapshot_interval`` (float, 60.0): seconds after which a snapshot is written anyway
  while operations flow.
* ``sasl_mechanism`` (str, ``PLAIN``): ``PLAIN``, ``SCRAM-SHA-256`` or ``SCRAM-SHA-512``.
* ``ssl_cafile``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_verify``, ``ssl_check_hostname``:
  the shared TLS options (:func:`multilayer.toolkit.tls_options`), ``kafka+ssl://`` only;
  ``ssl_verify=false`` turns certificate and host name checks off, for tests only.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import kafka

from ...backend import Backend, BrokerStats, Capabilities, Item, now
from ...capacity import CapacityPolicy
from ...exceptions import BrokerError, ChannelFull, ConfigurationError
from ...fanout import seal, split
from ...names import non_local_name
from ...options import Option
from ...serialization import largest_payload
from ...toolkit import check_tls, tls_context, tls_options, within
from ...url import LayerURL
from .client import broker_release, client_config, tls_problem
from .hub import HUBS, Hub
from .log import CANCEL, CLAIM, FLUSH, GROUP_ADD, GROUP_DISCARD, RENEW, SEND
from .replay import inbox_lease
from .writer import RECORD_OVERHEAD, Done, answer_from_thread, answered

__all__ = ["KafkaBackend"]

logger = logging.getLogger(__name__.rpartition(".")[0])


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be positive"


@dataclass
class _Line:
    """The operations on one key of a :class:`Turnstile` waiting to go on."""

    #: The slow first step, shared by every operation in the line.
    step: asyncio.Future[None]
    #: Settled once the last operation in the line went on.
    last: asyncio.Future[None] | None = None


class Turnstile:
    """Lets the operations on one key go on in the order they came while a slow first
    step for that key (reading a partition, learning an inbox's partition) is under way.

    An operation that came once the step was done would otherwise find nothing to wait
    for and write at once, ahead of earlier ones not yet resumed from waiting for it: one
    process's sends to one channel overtook each other (500 sends of one gather()
    arrived with the last 128 first). For one event loop.
    """

    def __init__(self) -> None:
        self._lines: dict[Hashable, _Line] = {}

    def busy(self, key: Hashable) -> bool:
        """Whether operations on ``key`` wait in line: one coming now must join them."""
        return key in self._lines

    async def through(self, key: Hashable, step: Callable[[], Awaitable[None]]) -> None:
        """Return once ``step()`` is done and every earlier caller for ``key`` went on;
        raise what the step raised.

        The first caller of a line starts ``step()``; those that come before the line
        empties share it. A caller goes on when this returns, and what it does before
        its next ``await`` (a write) comes before anything the next caller does.
        """
        line = self._lines.get(key)
        if line is None:
            line = self._lines[key] = _Line(asyncio.ensure_future(step()))
        previous = line.last
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        line.last = mine

        def went_on() -> None:
            mine.set_result(None)
            if line.last is mine:
                del self._lines[key]

        try:
            if previous is not None and not previous.done():
                await asyncio.wait([previous])
            if not line.step.done():
                await asyncio.wait([line.step])
            line.step.result()
        finally:
            if previous is None or previous.done():
                went_on()
            else:
                # Cancelled in line: those after it still wait for those before it.
                previous.add_done_callback(lambda _previous: went_on())


class KafkaBackend(Backend):
    """Channels as a replicated state machine over one partitioned Kafka topic per prefix."""

    capabilities: ClassVar[Capabilities] = Capabilities(
        multiprocess=True,
        native_expiry=False,
        native_fanout=True,
        restartable=False,
        restores_memberships=True,
        queue_depth=True,
        group_sizes=True,
    )
    extra: ClassVar[str | None] = "kafka"
    options: ClassVar[Mapping[str, Option]] = {
        "partitions": Option(
            int, 8, "partitions of the log topic when this layer creates it", minimum=1
        ),
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
        "snapshot_every": Option(
            int, 100_000, "operations between snapshots of the state", minimum=1000
        ),
        "snapshot_interval": Option(
            float, 60.0, "seconds between snapshots while operations flow", minimum=0.1
        ),
        "sasl_mechanism": Option(
            str, "PLAIN", "SASL mechanism", choices=("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
        ),
        "log_check": Option(
            float,
            1.0,
            "seconds between checks that the log did not come back empty (jittered)",
            minimum=0.1,
        ),
        **tls_options("kafka+ssl"),
    }

    #: This instance's share of the process's connection to the log (set by :meth:`open`).
    hub: Hub

    @classmethod
    def check_url(cls, url: LayerURL, options: Mapping[str, Any]) -> None:
        if not url.hosts:
            raise ConfigurationError(f"{url.sanitized()}: name at least one broker host")
        if url.path:
            raise ConfigurationError(f"{url.sanitized()}: Kafka URLs take no path")
        check_tls(url.sanitized(), options)

    @classmethod
    def versions(cls) -> dict[str, str]:
        return {"kafka-python": kafka.__version__}

    async def broker_version(self) -> str:
        """The release a KRaft broker's features tell (brokers do not name themselves);
        else the protocol version kafka-python negotiated."""
        release = await asyncio.to_thread(broker_release, client_config(self.url, self.config))
        if release is not None:
            return release
        version = self.hub.replay.consumer.config["api_version"]
        return "Kafka protocol " + ".".join(str(part) for part in version)

    def _tls_problem(self) -> str | None:
        if self.url.scheme != "kafka+ssl":
            return None
        return tls_problem(self.url, tls_context(self.config))

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
            + RECORD_OVERHEAD,
        }
        key = f"{self.url.without_query().render()}|{topic}|{sorted(options.items())}"
        hub = HUBS.use(key, self, lambda: Hub(topic, client_config(self.url, self.config), options))
        hub.backends.add(self)
        self.hub = hub
        #: Sends and receives waiting for a normal channel's partition to be read, by
        #: partition; sends to other processes' inboxes waiting for their partition.
        self._reading = Turnstile()
        self._assigning = Turnstile()
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
        for hub in self._leave():
            await asyncio.to_thread(hub.stop)

    def abandon(self) -> None:
        for hub in self._leave():
            threading.Thread(target=hub.stop, name="multilayer kafka stop", daemon=True).start()

    def _leave(self) -> list[Hub]:
        """Stop being one of the hub's backends; the hubs no other backend uses, to stop."""
        hub: Hub | None = getattr(self, "hub", None)  # None: open() did not get that far
        if hub is not None:
            hub.backends.discard(self)
        return HUBS.release(self)

    async def declare_inbox(self, inbox: str) -> None:
        """Have the control partition assign ``inbox`` a partition, and read it.

        The assignment is decided where the record lands in the control partition (the
        least-loaded partition among live inboxes), so every process agrees on it; the
        inbox is new, so reading its partition needs no history before now.
        """
        hub = self.hub
        view = hub.view
        with view.lock:
            known = inbox in view.own_inboxes
            view.own_inboxes[inbox] = self.settings.capacity.for_channel(inbox)
            entry = view.machine.inboxes.get(inbox) if view.partitions > 1 else None
        catch_up = None
        if entry is None:
            await hub.call(inbox_lease(inbox, view.token()))
        elif not known:
            # A sender assigned it before this process received: read what came since.
            catch_up = (inbox, float(entry[2]))
        await hub.subscribe(max(view.part_of(inbox), 0), catch_up)

    async def _read(self, queue: str) -> None:
        """Read the partition of the normal channel ``queue`` if not done yet: its state
        decides capacity and claims (see "Partitions" in the backend docs). Sends that
        come meanwhile keep their order (:class:`Turnstile`)."""
        view = self.hub.view
        partition = view.part_of(queue)
        if partition in view.subscribed and not self._reading.busy(partition):
            return
        await self._reading.through(partition, partial(self.hub.subscribe, partition))

    async def push(self, channel: str, payload: bytes, *, deadline: float, capacity: int) -> None:
        hub = self.hub
        view = hub.view
        queue = non_local_name(channel)
        if queue.endswith("!") and queue not in view.own_inboxes:
            await self._push_elsewhere(queue, channel, payload, capacity)
            return
        if not queue.endswith("!"):
            await self._read(queue)
        token = view.admit(queue, capacity, len(payload))
        if token is not None:
            # Room is certain as far as this process can see: the record goes out admitted
            # and the send returns without a round trip (see "Sends" in the backend docs).
            def done(error: BaseException | None) -> None:
                if error is not None:
                    view.lost(token, channel, error)

            hub.write([SEND, token, now(), channel, None, payload], done=done)
            return
        # A checked send is written at once, in its place among this process's writes
        # (hub.call waits only for the outcome): no send after it reaches the log first.
        outcome = await hub.call([SEND, view.token(), now(), channel, capacity, payload])
        if not outcome.accepted:
            raise ChannelFull(f"channel {channel!r} is full ({capacity} messages waiting)")

    async def _push_elsewhere(
        self, queue: str, channel: str, payload: bytes, capacity: int
    ) -> None:
        # Another process's inbox: only its owner replays it. Sends go without a round
        # trip while the owner has not reported it near capacity; near it, a checked send
        # waits for the owner's verdict (a refusal if none comes in VERDICT_TIMEOUT), in
        # its place in the log all the same (see push()).
        hub = self.hub
        view = hub.view
        if view.part_of(queue) < 0 or self._assigning.busy(queue):
            await self._assigning.through(queue, partial(self._assign, queue))
        with view.lock:
            admitted = view.admit_remote(queue, capacity)
        if admitted:
            answered = view.unanswered_write()

            def done(error: BaseException | None) -> None:
                answered(error)
                with view.lock:
                    view.remote_acked(queue)
                if error is not None:
                    view.lost("", channel, error)

            hub.write([SEND, None, now(), channel, None, payload], done=done)
            return
        outcome = await hub.call(
            [SEND, view.token(), now(), channel, capacity, payload], verdict=True
        )
        if not outcome.accepted:
            raise ChannelFull(f"channel {channel!r} is full (its process refused it)")

    async def _assign(self, inbox: str) -> None:
        """Learn the partition of another process's ``inbox``, or assign it one."""
        hub = self.hub
        view = hub.view
        # Its owner wrote the assignment before new_channel() returned there; if it has
        # not received yet, this assigns it (decided where the record lands).
        await hub.fence()
        if view.part_of(inbox) < 0:
            await hub.call(inbox_lease(inbox, view.token()))

    def pop_nowait(self, queue: str, limit: int) -> list[Item]:
        """Messages already in this process: held by its claims, or replayed to its inbox."""
        hub = self.hub
        view = hub.view
        if not queue.endswith("!"):
            return view.held.take(queue, limit)
        instant = now()
        with view.lock:
            taken, keys = view.take_inbox(queue, limit)
        if keys:
            hub.writer.take_later(queue, keys, instant)
        return taken

    async def pop(self, queue: str, limit: int) -> list[Item]:
        if queue.endswith("!"):
            return await self._pop_inbox(queue, limit)
        return await self._pop_shared(queue, limit)

    async def _pop_inbox(self, queue: str, limit: int) -> list[Item]:
        # Only this process receives from its inbox, so it takes messages straight from its
        # replayed state and tells the others afterwards (the take record frees capacity).
        hub = self.hub
        view = hub.view
        while True:
            instant = now()
            with view.lock:
                taken, keys = view.take_inbox(queue, limit)
                if not keys:
                    signal = view.waiters.add(queue)
            if keys:
                hub.writer.take_later(queue, keys, instant)
                if taken:
                    return taken
                continue
            try:
                await signal
            finally:
                with view.lock:
                    view.waiters.discard(queue, signal)

    async def _pop_shared(self, queue: str, limit: int) -> list[Item]:
        # A normal channel may have receivers in many processes: a claim record asks for up
        # to ``prefetch`` messages and the log order decides which ones each claim gets.
        hub = self.hub
        view = hub.view
        await self._read(queue)
        with view.lock:
            held = view.held.take(queue, limit)
            if held:
                return held
            cid = view.token()
            signal = view.waiters.add(cid)

        claim = [CLAIM, cid, now(), queue, max(limit, self._prefetch), now() + self._lease]
        with view.lock:
            view.open_claims[cid] = claim
        hub.write(claim, done=partial(view.failed, cid))
        try:
            while not signal.done():
                try:
                    await within(asyncio.shield(signal), self._lease / 3)
                except asyncio.TimeoutError:
                    with view.lock:
                        claim[2], claim[5] = now(), now() + self._lease
                    hub.write([RENEW, None, now(), queue, cid, claim[5]])
        except asyncio.CancelledError:
            with view.lock:
                del view.open_claims[cid]
                view.waiters.discard(cid, signal)
                view.hold(queue, view.claimed.pop(cid, []))
                # Whatever the log gives this claim before the cancel record lands is held
                # for the next receive here (or given back), never lost in between.
                view.abandoned.add(cid)
            hub.write([CANCEL, None, now(), queue, cid])
            raise
        with view.lock:
            del view.open_claims[cid]
            error = view.failures.pop(cid, None)
            messages = view.claimed.pop(cid, [])
            view.hold(queue, messages[limit:])
        if error is not None:
            raise BrokerError(f"kafka log {hub.topic}: claim failed: {error}") from error
        return [(m.channel, m.payload) for m in messages[:limit]]

    async def group_add(self, group: str, channel: str, *, deadline: float) -> None:
        hub = self.hub
        # Acknowledged is enough: any group send written after this record sees it.
        await hub.acked([GROUP_ADD, None, now(), group, channel, deadline])

    async def group_discard(self, group: str, channel: str) -> None:
        hub = self.hub
        await hub.acked([GROUP_DISCARD, None, now(), group, channel])

    async def group_send(
        self, group: str, payload: bytes, *, deadline: float, capacity: CapacityPolicy
    ) -> None:
        # The members come from this process's replay of the control partition, brought up
        # to the partition's end after this call: every membership any process had
        # acknowledged before is in it. The writer thread does that fence (one for all the
        # group sends waiting in its queue) and writes, in this call's place among this
        # process's writes, one checked send per normal member, in its channel's
        # partition, and one envelope per process inbox with members (multilayer.fanout),
        # in that inbox's partition: only the processes reading those decode it. A full
        # queue refuses its copy where it is replayed.
        hub = self.hub
        view = hub.view
        # The send time is the call's (envelopes carry it: a member this process discards
        # after it must not get the copy), whenever the records are written.
        instant = now()
        token = view.token()
        with view.lock:
            admitted = view.admit_group_send(token, self)
        acked, settle = answer_from_thread()

        def answer(error: BaseException | None) -> None:
            if not admitted:
                settle(error)

        def expand() -> list[tuple[list[Any], Done | None]]:
            records = self._group_records(group, payload, capacity, instant)
            if not records:
                view.group_lost(token, group, None)
                answer(None)
                return []
            left = [len(records)]
            lost = partial(view.group_lost, token, group)

            def one(error: BaseException | None, answered: Done) -> None:
                answered(error)
                lost(error)
                left[0] -= 1
                if error is not None or not left[0]:
                    answer(error)

            return [(record, partial(one, answered=view.unanswered_write())) for record in records]

        # Like a send, it returns without waiting while this process has fewer than
        # 1,000 group sends unacknowledged and no write failed lately.
        hub.writer.defer(expand)
        if admitted:
            return
        try:
            await answered(acked, f"kafka log {hub.topic}: group send not acknowledged")
        except BrokerError:
            raise
        except Exception as error:
            raise BrokerError(f"kafka log {hub.topic}: write failed: {error}") from error
        finally:
            with view.lock:
                view.group_senders.pop(token, None)

    def _group_records(
        self, group: str, payload: bytes, capacity: CapacityPolicy, instant: float
    ) -> list[list[Any]]:
        """The records of a group send made at ``instant``, once fenced (in the writer
        thread); counts and logs the members skipped as full in queues this process
        replays."""
        hub = self.hub
        view = hub.view
        with view.lock:
            members = view.machine.groups.get(group, {})
            live = [(name, until) for name, until in members.items() if until > instant]
            inboxes, normal = split(live)
            unrouted = [inbox for inbox in inboxes if view.part_of(inbox) < 0]
        for inbox in unrouted:
            # Members whose process has not received yet: their inbox gets its partition.
            hub.assign_now(inbox)
        targets = [(channel, payload, 1) for channel, _until in normal]
        skipped = 0
        for inbox, local in inboxes.items():
            if view.part_of(inbox) < 0:
                skipped += len(local)
            else:
                targets.append((inbox, seal(payload, group, instant, inbox, local), len(local)))
        records = []
        with view.lock:
            for target, data, count in targets:
                # A queue this process replays is checked here, so that its refusal is
                # counted and logged; any other is checked where it is replayed.
                limit = capacity.for_channel(target)
                if view.is_full(non_local_name(target), limit):
                    skipped += count
                else:
                    records.append([SEND, None, instant, target, limit, data])
        self.skip_full_members(group, skipped, len(live))
        return records

    async def broker_stats(self) -> BrokerStats:
        """The replayed state (the queues of the partitions this process reads, and the
        groups), once the replay has caught up with a no-op record written now in each
        of those partitions (discarding a membership of the group "", which no valid
        name reaches)."""
        hub = self.hub
        view = hub.view
        await asyncio.gather(
            *(
                hub.call([GROUP_DISCARD, view.token(), now(), "", ""], partition=partition)
                for partition in sorted(view.subscribed)
            )
        )
        instant = now()
        with view.lock:
            machine = view.machine
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
        # A marker in every partition; those this process reads are waited for.
        hub = self.hub
        view = hub.view
        await asyncio.gather(
            *(
                hub.call([FLUSH, view.token(), now()], partition=partition)
                if partition in view.subscribed
                else hub.acked([FLUSH, None, now()], partition)
                for partition in range(view.partitions)
            )
        )
