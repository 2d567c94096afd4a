"""The operation log's records and the state machine every process replays them through.

A Kafka record carries one or more operations, msgpack lists back to back; this module
decodes them, refuses malformed ones, and applies them to :class:`Machine`, whose
decisions depend only on the records and their order.
"""

from __future__ import annotations

import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from ...fanout import seal, split
from ...names import non_local_name
from ...serialization import HEADER_SIZE, deadline_of, log_malformed

__all__ = [
    "CANCEL",
    "CLAIM",
    "FLUSH",
    "GROUP_ADD",
    "GROUP_DISCARD",
    "GROUP_SEND",
    "HOUSEKEEPING",
    "INBOX",
    "NEAR",
    "OPERATIONS_PER_RECORD",
    "RENEW",
    "RETURN",
    "SEND",
    "TAKE",
    "VERDICT",
    "Claim",
    "Machine",
    "Message",
    "Outcome",
    "Queue",
    "decode",
    "queue_partition",
    "well_formed",
]

#: Operations one Kafka record may carry; an operation's position in the log, which
#: identifies a message, is ``record offset * this + index in the record``.
OPERATIONS_PER_RECORD = 1024

# Operation codes of log records. Every record is a msgpack list
# ``[op, token, sent_at, ...]``: ``token`` names the waiter in the writing process (or is
# None) and ``sent_at`` is the writer's wall clock, which expiry decisions use so that every
# replaying process decides the same.
SEND = "S"  # channel, capacity (None: admitted by the writer), payload
RETURN = "R"  # queue, [[channel, payload], ...] taken by a claim, given back
GROUP_SEND = "G"  # group, payload, default capacity, {queue: capacity} (see _group_send)
CLAIM = "C"  # queue, count, lease deadline (the token is the claim id)
RENEW = "K"  # queue, claim id, lease deadline
CANCEL = "X"  # queue, claim id
TAKE = "T"  # queue, [[offset, channel], ...]
GROUP_ADD = "A"  # group, channel, membership deadline
GROUP_DISCARD = "D"  # group, channel
FLUSH = "F"
# Control records (partition 0 of a partitioned log; see queue_partition):
INBOX = "I"  # inbox, lease deadline: assigns the inbox a partition, or renews its lease
NEAR = "N"  # inbox, near: the owner says its inbox is (no longer) near capacity
VERDICT = "V"  # accepted: an inbox owner's answer to a checked send (the token names it)
#: Records nobody waits for promptly: writing or reading them keeps polling slow, so a
#: receive that waits (renewing its claim) does not keep an idle layer busy.
HOUSEKEEPING = frozenset({RENEW, CANCEL, TAKE, RETURN})


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
    SEND: lambda a: (
        (len(a) == 3 and type(a[0]) is str and (a[1] is None or type(a[1]) is int))
        and type(a[2]) is bytes
    ),
    RETURN: lambda a: len(a) == 2 and type(a[0]) is str and _is_pairs(a[1], str, bytes),
    # A group send's payload is sealed into envelopes, which need its deadline header.
    GROUP_SEND: lambda a: (
        (len(a) == 4 and type(a[0]) is str and type(a[1]) is bytes and type(a[2]) is int)
        and len(a[1]) >= HEADER_SIZE
        and isinstance(a[3], dict)
        and all(type(k) is str and type(v) is int for k, v in a[3].items())
    ),
    CLAIM: lambda a: len(a) == 3 and type(a[0]) is str and type(a[1]) is int and _is_number(a[2]),
    RENEW: lambda a: len(a) == 3 and type(a[0]) is str and type(a[1]) is str and _is_number(a[2]),
    CANCEL: lambda a: len(a) == 2 and type(a[0]) is str and type(a[1]) is str,
    TAKE: lambda a: len(a) == 2 and type(a[0]) is str and _is_pairs(a[1], int, str),
    GROUP_ADD: lambda a: (
        len(a) == 3 and type(a[0]) is str and type(a[1]) is str and _is_number(a[2])
    ),
    GROUP_DISCARD: lambda a: len(a) == 2 and type(a[0]) is str and type(a[1]) is str,
    FLUSH: lambda a: not a,
    INBOX: lambda a: len(a) == 2 and type(a[0]) is str and _is_number(a[1]),
    NEAR: lambda a: len(a) == 2 and type(a[0]) is str and type(a[1]) is bool,
    VERDICT: lambda a: len(a) == 1 and type(a[0]) is bool,
}

#: Seconds an inbox assignment outlives its lease before it is forgotten.
_FORGET_INBOX = 3600.0


def queue_partition(queue: str, partitions: int) -> int:
    """The partition of the normal channel (queue) ``queue`` in a log of ``partitions``.

    Partition 0 is the control partition; normal channels are spread over the others by
    CRC-32 of the name, which every process (and any other client) computes alike and
    which never changes while the partition count does not. A log of one partition keeps
    everything in it.
    """
    if partitions <= 1:
        return 0
    return 1 + zlib.crc32(queue.encode()) % (partitions - 1)


def well_formed(operation: Any) -> bool:
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


def decode(topic: str, offset: int, value: bytes) -> list[tuple[int, list[Any]]]:
    """The well-formed operations of the record at ``offset``, with their positions.

    Anything else (another client's garbage) is logged and left out: it must neither stop
    the replay nor leave state that breaks later operations.
    """
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(value))
    unpacker.feed(value)
    try:
        operations = list(unpacker)
    except (ValueError, msgpack.UnpackException):
        log_malformed(topic, len(value), f"undecodable record at offset {offset}")
        return []
    applicable = []
    for index, operation in enumerate(operations):
        if well_formed(operation):
            applicable.append((offset * OPERATIONS_PER_RECORD + index, operation))
        else:
            log_malformed(topic, len(value), f"bad operation at offset {offset}")
    return applicable


@dataclass
class Message:
    """A message waiting in a queue: where the log put it, its channel and payload."""

    offset: int
    channel: str
    payload: bytes
    deadline: float

    @property
    def key(self) -> tuple[int, str]:
        """Unique in the log: a group send puts one record's payload in several channels."""
        return self.offset, self.channel


@dataclass
class Claim:
    """A waiting receive's request for up to ``count`` messages, alive until ``lease``."""

    cid: str
    count: int
    lease: float


@dataclass
class Queue:
    """One queue's waiting messages, oldest first, and the open claims on it."""

    pending: deque[Message] = field(default_factory=deque)
    claims: deque[Claim] = field(default_factory=deque)

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

    def take(self, count: int, instant: float) -> list[Message]:
        """Up to ``count`` messages from the head that are alive at ``instant``."""
        taken: list[Message] = []
        while self.pending and len(taken) < count:
            message = self.pending.popleft()
            if message.deadline > instant:
                taken.append(message)
        return taken


@dataclass
class Outcome:
    """What applying one record decided, for the process that waits on it."""

    accepted: bool = True
    #: Group members skipped as full; an inbox refused skips every member it would carry.
    full_members: list[str] = field(default_factory=list)
    live_members: int = 0
    delivered: list[tuple[str, list[Message]]] = field(default_factory=list)
    appended: set[str] = field(default_factory=set)
    flushed: bool = False


class Machine:
    """The layer's state as of one log offset; every process computes the same one.

    Decisions depend only on the records and their order, never on the replaying
    process's clock, so two processes never disagree about who got a message.
    """

    def __init__(self, partitions: int = 1) -> None:
        self.queues: dict[str, Queue] = {}
        self.groups: dict[str, dict[str, float]] = {}
        #: The partitions of the log (control records assign inboxes among them).
        self.partitions = partitions
        #: Inbox -> [its partition, its lease deadline, when it was assigned] (control
        #: records; a sender may assign the inbox of a process that has not received yet).
        self.inboxes: dict[str, list[Any]] = {}
        #: Inboxes their owners reported near capacity (control records).
        self.near: set[str] = set()
        #: The partition of a queue, for flush markers, which empty only their partition's
        #: queues; None empties every queue (a log of one partition).
        self.partition_of: Callable[[str], int] | None = None

    def apply(self, offset: int, record: list[Any], partition: int = 0) -> Outcome:
        """Apply the well-formed operation ``record`` found at position ``offset`` of
        ``partition``."""
        op, _token, sent_at = record[0], record[1], record[2]
        outcome = Outcome()
        if op == SEND:
            channel, capacity, payload = record[3], record[4], record[5]
            outcome.accepted = self._append(offset, channel, payload, capacity, sent_at, outcome)
        elif op == GROUP_SEND:
            self._group_send(offset, record, outcome)
        elif op == RETURN:
            self._give_back(offset, record[3], record[4], sent_at, outcome)
        elif op == CLAIM:
            cid, queue, count, lease = record[1], record[3], record[4], record[5]
            state = self.queues.setdefault(queue, Queue())
            state.purge(sent_at)
            taken = state.take(count, sent_at)
            if taken:
                outcome.delivered.append((cid, taken))
            else:
                state.claims.append(Claim(cid, count, lease))
            self._tidy(queue)
        elif op == RENEW:
            for claim in self._queue(record[3]).claims:
                if claim.cid == record[4]:
                    claim.lease = record[5]
        elif op == CANCEL:
            state = self._queue(record[3])
            state.claims = deque(c for c in state.claims if c.cid != record[4])
            self._tidy(record[3])
        elif op == TAKE:
            gone = {(offset, channel) for offset, channel in record[4]}
            state = self._queue(record[3])
            state.pending = deque(m for m in state.pending if m.key not in gone)
            self._tidy(record[3])
        elif op == GROUP_ADD:
            self.groups.setdefault(record[3], {})[record[4]] = record[5]
        elif op == GROUP_DISCARD:
            current = self.groups.get(record[3])
            if current is not None:
                current.pop(record[4], None)
                if not current:
                    del self.groups[record[3]]
        elif op == FLUSH:
            # Waiting receivers keep their claims: a flush empties queues, not receivers.
            # A flush writes a marker in every partition; each empties its own queues.
            part_of = self.partition_of
            for name, state in self.queues.items():
                if part_of is None or part_of(name) == partition:
                    state.pending.clear()
            if partition == 0:
                self.groups.clear()
                self.near.clear()
            outcome.flushed = True
        elif op == INBOX:
            self._assign(record[3], record[4], sent_at)
        elif op == NEAR:
            if record[4]:
                self.near.add(record[3])
            else:
                self.near.discard(record[3])
        return outcome

    def _assign(self, inbox: str, lease: float, sent_at: float) -> None:
        # The least-loaded partition among the live inboxes at this record's position, so
        # every process agrees on it; a known inbox keeps its partition and renews its lease.
        known = self.inboxes.get(inbox)
        if known is not None:
            known[1] = max(known[1], lease)
            return
        for name, (_partition, until, _since) in list(self.inboxes.items()):
            if until + _FORGET_INBOX <= sent_at:
                del self.inboxes[name]
        if self.partitions <= 1:
            self.inboxes[inbox] = [0, lease, sent_at]
            return
        load = dict.fromkeys(range(1, self.partitions), 0)
        for partition, until, _since in self.inboxes.values():
            if until > sent_at and partition in load:
                load[partition] += 1
        chosen = min(load, key=lambda partition: (load[partition], partition))
        self.inboxes[inbox] = [chosen, lease, sent_at]

    def _queue(self, name: str) -> Queue:
        return self.queues.get(name) or Queue()

    def _group_send(self, offset: int, record: list[Any], outcome: Outcome) -> None:
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
        self, offset: int, queue: str, items: list[Any], sent_at: float, outcome: Outcome
    ) -> None:
        # Messages a claim took and no receive wanted: they are older than anything still
        # waiting, so they go to open claims first and otherwise back to the head.
        state = self.queues.setdefault(queue, Queue())
        state.purge(sent_at)
        back: list[Message] = []
        for channel, payload in items:
            # Keys only tell inbox messages apart (take records); these are normal ones.
            message = Message(offset, channel, payload, deadline_of(payload))
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
        outcome: Outcome,
    ) -> bool:
        queue = non_local_name(channel)
        state = self.queues.setdefault(queue, Queue())
        state.purge(sent_at)
        message = Message(offset, channel, payload, deadline_of(payload))
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
