"""What the hub holds, and how it queues messages and forwards them to owner nodes."""

from __future__ import annotations

import logging
import secrets
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import zmq

from ....serialization import HEADER_SIZE, deadline_of
from ..protocol import DEFAULT_MAX_MESSAGE, FULL, OK, UNKNOWN, BadRequest, Leases, decode, encode
from ..security import Gate
from .listeners import Listeners

__all__ = ["HubState"]

logger = logging.getLogger(__name__.rpartition(".")[0])


def payload_frame(frames: Sequence[bytes], index: int) -> bytes:
    """Frame ``index`` of a request, a message payload; BadRequest when missing or short."""
    if len(frames) <= index or len(frames[index]) < HEADER_SIZE:
        raise BadRequest("missing or short payload frame")
    return frames[index]


@dataclass
class Waiter:
    """A pop parked until a message arrives or ``until`` passes."""

    client: bytes
    request_id: int
    limit: int
    until: float


@dataclass
class Owner:
    """Where a process inbox lives: its node's endpoint and CURVE public key."""

    endpoint: str
    public_key: str
    until: float


@dataclass
class Forward:
    """Messages handed to an owner node, waiting for its per-item answer."""

    job: Job
    endpoint: str
    items: list[tuple[str, str, int]]
    payload: bytes
    until: float


@dataclass
class Job:
    """A client request that waits for owner nodes before the hub answers it."""

    client: bytes
    request_id: int
    reply: str
    waiting: int = 0
    full: list[str] = field(default_factory=list)
    key: str = ""
    #: The members a group envelope names, by its process inbox: reported full together.
    named: dict[str, list[str]] = field(default_factory=dict)
    #: The live members a group send reached for, for the sender's log line.
    live: int = 0


class HubState:
    """What the hub holds (queues, groups, the directory of inboxes) and its links to owner
    nodes; the commands and the poll loop are in the subclasses (see the package doc).
    """

    def __init__(
        self,
        binds: Sequence[str],
        *,
        secret_key: bytes | None = None,
        next_binds: Sequence[str] = (),
        next_secret_key: bytes | None = None,
        allowed_keys: Sequence[bytes] | None = None,
        peer_timeout: float = 2.0,
        max_queue: int = 100_000,
        max_message_size: int = DEFAULT_MAX_MESSAGE,
    ) -> None:
        self.binds = list(binds)
        self._next_binds = list(next_binds)
        self.peer_timeout = peer_timeout
        self.max_queue = max_queue
        self.max_message_size = max_message_size
        self.epoch = secrets.randbits(62)
        self.queues: dict[str, deque[tuple[str, bytes]]] = {}
        self.waiters: dict[str, deque[Waiter]] = {}
        self.groups: dict[str, dict[str, float]] = {}
        #: Places of normal queues leased to senders, by queue key.
        self.leases: dict[str, Leases] = {}
        self.directory: dict[str, Owner] = {}
        self._forwards: dict[int, Forward] = {}
        #: Clients holding a copy of a group's members, by group: client -> monotonic end of
        #: their lease. A membership change waits for each to drop its copy (see _changed).
        self.watchers: dict[str, dict[bytes, float]] = {}
        #: Invalidations sent and not yet acknowledged: id -> (client, the change's job,
        #: monotonic end of that client's lease, after which no answer is needed).
        self._acks: dict[int, tuple[bytes, Job, float]] = {}
        self._links: dict[str, zmq.Socket[bytes]] = {}
        self._next_id = 0
        self._stopping = False
        #: The CURVE secret keys of slots 0 (``binds``) and 1 (``next_binds``) at start.
        self._secrets = (secret_key, next_secret_key)
        #: Keys to give the slots between two polls (see ``Hub.rekey``).
        self._next_secrets: dict[int, bytes | None] = {}
        #: The client keys allowed (Z85); None: any CURVE client.
        self._allowed = None if allowed_keys is None else list(allowed_keys)
        #: An allow list to apply between two polls (see ``Hub.allow``).
        self._next_allowed: list[bytes] | None = None
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._gate: Gate | None = None
        self._poller = zmq.Poller()
        self._listeners = Listeners(
            self._context, self._poller, [self.binds, self._next_binds], max_message_size
        )

    def _reply(self, client: bytes, *frames: bytes) -> bool:
        try:
            self._listeners.send(client, frames)
        except zmq.ZMQError as error:
            # EHOSTUNREACH (client gone) or EAGAIN (client not reading): nobody to tell.
            logger.debug("reply to client %s not sent: %s", client.hex(), error)
            return False
        return True

    def _lease(self, key: str, client: bytes, capacity: int, want: int) -> int:
        """Reserve up to ``want`` places of ``key`` for ``client`` (see :class:`Leases`)."""
        leases = self.leases.setdefault(key, Leases())
        free = min(capacity, self.max_queue) - len(self.queues.get(key, ()))
        granted = leases.grant(client, free, want)
        if not leases:
            del self.leases[key]
        return granted

    def _leased(self, key: str, but: bytes = b"") -> int:
        """Places of ``key`` leased to clients other than ``but``; drops spent leases."""
        leases = self.leases.get(key)
        if leases is None:
            return 0
        total = leases.reserved(but)
        if not leases:
            del self.leases[key]
        return total

    # -- queues ------------------------------------------------------------------------

    def _enqueue(
        self, key: str, channel: str, payload: bytes, capacity: int | None, client: bytes = b""
    ) -> bool:
        """Queue a message unless ``key`` is full; ``capacity`` None: sent on a lease, bound
        only by ``--max-queue``. Places leased to others than ``client`` count as taken.
        """
        current = time.time()
        if deadline_of(payload) <= current:
            return True  # already expired: accepted and dropped at once, as a broker TTL would
        queue = self.queues.get(key)
        if queue is None:
            queue = self.queues[key] = deque()
        if capacity is None:
            limit, reserved = self.max_queue, 0
        else:
            limit, reserved = min(capacity, self.max_queue), self._leased(key, client)
        if len(queue) + reserved >= limit:
            kept = [item for item in queue if deadline_of(item[1]) > current]
            if len(kept) + reserved >= limit:
                if capacity is None:
                    logger.warning("queue %s is at --max-queue: dropped a leased message", key)
                return False
            queue.clear()
            queue.extend(kept)
        queue.append((channel, payload))
        self._serve(key)
        return True

    def _take(self, key: str, limit: int, current: float) -> list[tuple[str, bytes]]:
        queue = self.queues.get(key)
        taken: list[tuple[str, bytes]] = []
        while queue and len(taken) < limit:
            item = queue.popleft()
            if deadline_of(item[1]) > current:
                taken.append(item)
        if queue is not None and not queue:
            del self.queues[key]
        return taken

    def _send_taken(
        self, client: bytes, rid: int, key: str, taken: list[tuple[str, bytes]]
    ) -> bool:
        header = encode("ok", rid, [channel for channel, _ in taken])
        if self._reply(client, header, *(payload for _, payload in taken)):
            return True
        queue = self.queues.setdefault(key, deque())
        queue.extendleft(reversed(taken))
        return False

    def _serve(self, key: str) -> None:
        """Hand waiting messages of ``key`` to parked pops, oldest pop first."""
        waiting = self.waiters.get(key)
        current = time.time()
        while waiting and self.queues.get(key):
            waiter = waiting.popleft()
            taken = self._take(key, waiter.limit, current)
            if taken:
                self._send_taken(waiter.client, waiter.request_id, key, taken)
        if waiting is not None and not waiting:
            del self.waiters[key]

    def _members(self, group: str, current: float) -> list[str]:
        members = self.groups.get(group)
        if not members:
            return []
        return [channel for channel, until in members.items() if until > current]

    # -- owner nodes ---------------------------------------------------------------------

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _link(self, owner: Owner) -> zmq.Socket[bytes]:
        link = self._links.get(owner.endpoint)
        if link is None:
            link = self._context.socket(zmq.DEALER)
            link.setsockopt(zmq.LINGER, 0)
            link.setsockopt(zmq.MAXMSGSIZE, self.max_message_size)
            secret = self._listeners.link_key
            if secret is not None and owner.public_key:
                link.setsockopt(zmq.CURVE_SERVERKEY, owner.public_key.encode())
                link.setsockopt(zmq.CURVE_SECRETKEY, secret)
                link.setsockopt(zmq.CURVE_PUBLICKEY, zmq.curve_public(secret))
            link.connect(owner.endpoint)
            self._poller.register(link, zmq.POLLIN)
            self._links[owner.endpoint] = link
        return link

    def _forward(
        self, job: Job, owner: Owner, items: list[tuple[str, str, int]], payload: bytes
    ) -> None:
        forward_id = self._new_id()
        reply_by = time.time() + self.peer_timeout
        header = encode("deliver", forward_id, [list(item) for item in items], reply_by, 0)
        self._send_owner(job, owner, forward_id, [header, payload], items, payload, reply_by)

    def _send_owner(
        self,
        job: Job,
        owner: Owner,
        forward_id: int,
        frames: list[bytes],
        items: list[tuple[str, str, int]],
        payload: bytes,
        reply_by: float,
    ) -> None:
        try:
            self._link(owner).send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError as error:
            logger.warning("owner %s unreachable: %s", owner.endpoint, error)
            self._owner_lost(owner.endpoint, items, payload, job)
            return
        job.waiting += 1
        # The owner refuses the delivery after reply_by; the hub gives up only a whole
        # peer_timeout later, so an answer sent in time is not mistaken for silence (and
        # the messages parked again, to be delivered twice) because either side was slow.
        until = reply_by + self.peer_timeout
        self._forwards[forward_id] = Forward(job, owner.endpoint, items, payload, until)

    def _on_owner_reply(self, frames: list[bytes]) -> None:
        try:
            _, forward_id, args = decode(frames[0])
        except ValueError as error:
            logger.warning("dropped a malformed reply from an owner node: %s", error)
            return
        forward = self._forwards.pop(forward_id, None)
        if forward is None:
            return  # answered after its timeout: the items were parked already
        statuses = args[0] if args and isinstance(args[0], list) else []
        job = forward.job
        for (key, channel, capacity), status in zip(forward.items, statuses, strict=False):
            if status == FULL:
                job.full.append(channel)
            elif status == UNKNOWN:
                # The directory was stale: park the message until the owner registers.
                self.directory.pop(key, None)
                if not self._enqueue(key, channel, forward.payload, capacity):
                    job.full.append(channel)
        job.waiting -= 1
        if not job.waiting:
            self._finish(job)

    def _owner_lost(
        self, endpoint: str, items: list[tuple[str, str, int]], payload: bytes, job: Job
    ) -> None:
        for key, owner in list(self.directory.items()):
            if owner.endpoint == endpoint:
                del self.directory[key]
        link = self._links.pop(endpoint, None)
        if link is not None:
            self._poller.unregister(link)
            link.close(0)
        for key, channel, capacity in items:
            if not self._enqueue(key, channel, payload, capacity):
                job.full.append(channel)

    def _finish(self, job: Job) -> None:
        if job.reply == "spush":
            # Tell the sender where the owner lives, unless the directory just dropped it.
            owner = self.directory.get(job.key)
            status = FULL if job.full else OK
            endpoint, public_key = (owner.endpoint, owner.public_key) if owner else (None, None)
            self._reply(job.client, encode("ok", job.request_id, status, endpoint, public_key))
        elif job.reply == "gsend":
            full = [member for name in job.full for member in job.named.get(name, (name,))]
            self._reply(job.client, encode("ok", job.request_id, full, job.live))
        else:
            self._reply(job.client, encode("ok", job.request_id))
