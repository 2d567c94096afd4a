"""This process's view of the log: the replayed :class:`~.log.Machine` and what only this
process knows around it (who waits for which record, messages its claims hold, sends it
wrote and has not seen replayed yet).

Every layer instance of the process, in any event loop, and the replay thread reach it
under :attr:`View.lock`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from ...backend import Backend, Item, log_full_members, now
from ...local import HeldMessages
from ...names import non_local_name
from ...toolkit import Waiters
from .log import (
    CANCEL,
    GROUP_ADD,
    GROUP_DISCARD,
    GROUP_SEND,
    HOUSEKEEPING,
    INBOX,
    NEAR,
    SEND,
    TAKE,
    VERDICT,
    Machine,
    Message,
    Outcome,
    queue_partition,
)
from .writer import Route

__all__ = ["View"]

logger = logging.getLogger(__name__.rpartition(".")[0])

#: Sends in flight without waiting for their replay, per process, and their bytes; beyond
#: either, a send waits for its record's replay, which paces a sender to the broker.
_MAX_UNREPLAYED = 10_000
_MAX_UNREPLAYED_BYTES = 32 * 1024 * 1024
#: Group sends in flight without waiting for the broker, per process; beyond, a group
#: send waits for its acknowledgement, which paces a sender to the broker.
_MAX_UNREPLAYED_GROUP_SENDS = 1_000
#: Seconds after a failed write during which every send waits for its replay, so that a
#: broker outage surfaces as BrokerError instead of sends lost after returning.
_DISTRUST = 5.0
#: Longest a checked send to another process's inbox waits for its owner's verdict (s);
#: then it raises ChannelFull. The owner refuses a checked send it replays more than half
#: of this after its stamp, so a send it accepted was answered in time (clocks in sync).
VERDICT_TIMEOUT = 10.0
#: Records going to the control partition (every process replays it).
_CONTROL = frozenset({GROUP_ADD, GROUP_DISCARD, INBOX, NEAR, VERDICT})
#: The Kafka record key of normal channels' records; an inbox's records carry its name.
NORMAL_KEY = b"q"


class View:
    """The replayed state of one prefix's log in this process, and its waiters."""

    def __init__(self, topic: str, idle_after: float) -> None:
        self.topic = topic
        self.lock = threading.Lock()
        #: Partitions of the log topic (known once the hub opened it).
        self.partitions = 1
        self.machine = self._new_machine()
        #: This process's inboxes -> their capacity (for near-capacity reports).
        self.own_inboxes: dict[str, int] = {}
        # Own inboxes reported near capacity in the control partition.
        self._reported: set[str] = set()
        #: Partitions the replay reads (control, and those of queues used here).
        self.subscribed: set[int] = {0}
        #: Control records the replay writes after applying a batch (reports, verdicts).
        self.reports: list[list[Any]] = []
        # Admitted sends to queues this process does not replay, per queue, until acked.
        self.unacked_per_queue: Counter[str] = Counter()
        # Writes whose broker answer nobody awaits and no replay here will show (sends
        # to other processes' inboxes, group sends) -> when written (monotonic): a
        # topic a broker lost is made again when one waits too long.
        self.unanswered: dict[int, float] = {}
        self._writes = itertools.count()
        #: Keyed by a record's token (its writer waits for its outcome), a claim id, or an
        #: inbox (a receive waits for messages).
        self.waiters = Waiters()
        # Tokens of records whose writer waits for their outcome -> when it began waiting.
        self.calls: dict[str, float] = {}
        self.results: dict[str, Outcome] = {}
        self.failures: dict[str, BaseException] = {}
        # Claim ids of this process -> messages the log gave them but no pop took yet.
        self.claimed: dict[str, list[Message]] = {}
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
        self.token_prefix = secrets.token_hex(6) + ":"
        self._tokens = itertools.count()
        self._idle_after = idle_after
        self._busy_until = 0.0

    def _new_machine(self) -> Machine:
        machine = Machine(self.partitions)
        if self.partitions > 1:
            machine.partition_of = self.part_of
        return machine

    def set_partitions(self, partitions: int) -> None:
        """The log topic has ``partitions`` (before the replay starts)."""
        self.partitions = partitions
        self.machine = self._new_machine()

    def part_of(self, queue: str) -> int:
        """The partition of ``queue``; -1 for an inbox no control record assigned."""
        if self.partitions <= 1:
            return 0
        if queue.endswith("!"):
            entry = self.machine.inboxes.get(queue)
            return -1 if entry is None else int(entry[0])
        return queue_partition(queue, self.partitions)

    def route(self, record: list[Any]) -> Route:
        """The partition and key of ``record`` (any thread)."""
        op = record[0]
        if op in _CONTROL:
            return 0, None
        queue = non_local_name(record[3]) if op == SEND else record[3]
        if queue.endswith("!"):
            return max(self.part_of(queue), 0), queue.encode()
        return self.part_of(queue), NORMAL_KEY

    def replays(self, queue: str) -> bool:
        """Whether this process replays ``queue`` (its own inbox, or a normal channel of a
        partition it reads); else only its owner knows its depth."""
        if queue.endswith("!"):
            return queue in self.own_inboxes
        return self.part_of(queue) in self.subscribed

    def is_full(self, queue: str, capacity: int) -> bool:
        """Whether ``queue``, which this process replays, holds ``capacity`` messages with
        its sends not replayed yet (under ``lock``); False for a queue it does not replay."""
        if not self.replays(queue):
            return False
        state = self.machine.queues.get(queue)
        waiting = len(state.pending) if state is not None else 0
        return waiting + self.unreplayed_per_queue[queue] >= capacity

    def admit_remote(self, queue: str, capacity: int) -> bool:
        """Whether a send to another process's inbox may go without a verdict: its owner
        has not reported it near capacity, and this process's sends to it not yet acked
        leave room (under ``lock``). Counted until :meth:`remote_acked`."""
        if (
            time.monotonic() < self.distrust_until
            or queue in self.machine.near
            or self.unacked_per_queue[queue] >= capacity
        ):
            return False
        self.unacked_per_queue[queue] += 1
        return True

    def remote_acked(self, queue: str) -> None:
        """A send counted by :meth:`admit_remote` was answered (under ``lock``)."""
        self.unacked_per_queue[queue] -= 1
        if self.unacked_per_queue[queue] <= 0:
            del self.unacked_per_queue[queue]

    def token(self) -> str:
        """A token unique to this process: names a record whose writer waits for it."""
        return f"{self.token_prefix}{next(self._tokens)}"

    def busy(self) -> None:
        """Poll fast for a while: traffic flows or this process waits for the log."""
        self._busy_until = time.monotonic() + self._idle_after

    def is_busy(self) -> bool:
        """Whether traffic flowed, or this process waited for the log, lately."""
        return time.monotonic() < self._busy_until

    def unanswered_write(self) -> Callable[[BaseException | None], None]:
        """Count a write as unanswered until the callback returned is called (its done)."""
        number = next(self._writes)
        with self.lock:
            self.unanswered[number] = time.monotonic()

        def answered(_error: BaseException | None) -> None:
            with self.lock:
                self.unanswered.pop(number, None)

        return answered

    def oldest_wait(self) -> float | None:
        """Since when (monotonic) the longest-waiting write of this process waits for its
        replay or answer; None when none waits."""
        with self.lock:
            oldest = min([*self.calls.values(), *self.unanswered.values()], default=None)
            if self.unreplayed:
                # Admitted sends are written in order: the first one is the oldest.
                since = next(iter(self.unreplayed.values()))[2]
                oldest = since if oldest is None else min(oldest, since)
        return oldest

    def wait_for(self, token: str) -> asyncio.Future[None]:
        """A future of the running loop woken when the record ``token`` is applied or its
        write failed (under ``lock``)."""
        self.calls[token] = time.monotonic()
        return self.waiters.add(token)

    def failed(self, token: str, error: BaseException | None) -> None:
        """The write of a record someone waits for got its answer: wake them on an error."""
        if error is not None:
            with self.lock:
                self.failures[token] = error
                self.waiters.wake(token)

    def hold(self, queue: str, messages: list[Message]) -> None:
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

    def admit_group_send(self, token: str, sender: Backend) -> bool:
        """Count a group send of ``sender`` as unreplayed (under ``lock``); whether it may
        skip waiting for the broker's acknowledgement (see :meth:`admit`)."""
        self.group_senders[token] = sender
        return (
            time.monotonic() >= self.distrust_until
            and len(self.group_senders) <= _MAX_UNREPLAYED_GROUP_SENDS
        )

    def group_lost(self, token: str, group: str, error: BaseException | None) -> None:
        """The broker answered a record of an admitted group send: forget the group send
        (it counts as unacknowledged until then); on ``error`` say so, and make the next
        sends wait."""
        if error is None:
            with self.lock:
                self.group_senders.pop(token, None)
            return
        logger.warning(
            "kafka log %s: a group send to %r was lost after it returned: %s",
            self.topic,
            group,
            error,
        )
        with self.lock:
            self.group_senders.pop(token, None)
            self.distrust_until = time.monotonic() + _DISTRUST

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

    def reset(self) -> list[list[Any]]:
        """Start over from an empty log (under ``lock``); the claim records of receives
        still waiting here, which died with the old log and must be written again."""
        self.machine = self._new_machine()
        self._reported.clear()
        self.handed_out.clear()
        # Sends and group sends written before the reset are in the new log or nowhere.
        for pending in list(self.unreplayed):
            self.replayed(pending)
        self.group_senders.clear()
        for claim in self.open_claims.values():
            claim[2] = now()
        return list(self.open_claims.values())

    def apply(self, partition: int, position: int, record: list[Any]) -> None:
        """Apply one operation of ``partition`` and wake whoever waits on it (under ``lock``)."""
        token = record[1]
        if record[0] == VERDICT:
            if token in self.calls:
                del self.calls[token]
                self.results[token] = Outcome(accepted=record[3])
                self.waiters.wake(token)
            return
        verdict = (
            record[0] == SEND
            and record[4] is not None
            and token is not None
            and not token.startswith(self.token_prefix)
            and non_local_name(record[3]) in self.own_inboxes
        )
        if verdict and now() - record[2] > VERDICT_TIMEOUT / 2:
            # Its sender gives up at VERDICT_TIMEOUT and raises ChannelFull: refuse it.
            outcome = Outcome(accepted=False)
        else:
            outcome = self.machine.apply(position, record, partition)
        if verdict:
            self.reports.append([VERDICT, token, now(), outcome.accepted])
        if record[0] in (SEND, TAKE, GROUP_SEND) or outcome.flushed:
            self._report_depths(outcome)
        if record[0] not in HOUSEKEEPING:
            self.busy()
        if token in self.unreplayed:
            self.replayed(token)
        for cid, messages in outcome.delivered:
            if cid in self.abandoned:
                self.hold(non_local_name(messages[0].channel), messages)
            else:
                self.claimed.setdefault(cid, []).extend(messages)
                self.waiters.wake(cid)
        for queue in outcome.appended:
            self.waiters.wake(queue)
        if record[0] == GROUP_SEND:
            sender = self.group_senders.pop(token, None)
            full, live = len(outcome.full_members), outcome.live_members
            if sender is not None:
                sender.skip_full_members(record[3], full, live)
            elif full and str(token).startswith(self.token_prefix):
                log_full_members(record[3], full, live)
        if record[0] == CANCEL:
            self.abandoned.discard(record[4])
        elif record[0] == TAKE:
            self.handed_out.difference_update((offset, channel) for offset, channel in record[4])
        if outcome.flushed:
            self.held.discard()
            self.handed_out.clear()
        if token in self.calls:
            del self.calls[token]
            self.results[token] = outcome
            self.waiters.wake(token)

    def _report_depths(self, outcome: Outcome) -> None:
        # The owner of an inbox tells the other processes, which do not replay it, when it
        # gets near capacity (above half) and when it is well below again (a quarter).
        for inbox, capacity in self.own_inboxes.items():
            state = self.machine.queues.get(inbox)
            depth = len(state.pending) if state is not None else 0
            if inbox not in self._reported and depth > capacity // 2:
                self._reported.add(inbox)
                self.reports.append([NEAR, None, now(), inbox, True])
            elif inbox in self._reported and depth < max(capacity // 4, 1):
                self._reported.discard(inbox)
                self.reports.append([NEAR, None, now(), inbox, False])
