"""The hub of the ZeroMQ backend: normal-channel queues, groups and the process directory.

Run it with ``multilayer hub --bind tcp://127.0.0.1:5599`` or
``python -m multilayer.backends.zmqhub --bind tcp://127.0.0.1:5599``; layers then use
``zmq://127.0.0.1:5599``. ``--bind`` may be repeated or given a comma list
(``--bind ipc:///run/ml.sock,tcp://0.0.0.0:5599``). Options: ``--curve-secret-key`` (or
``--curve-secret-key-file``, or ``$MULTILAYER_HUB_SECRET_KEY``) turns on CURVE encryption,
``--curve-allow=PUBLIC_KEY`` (repeatable; write keys with ``=``, as a Z85 key may begin
with ``-``) restricts clients to those keys,
``--peer-timeout``, ``--max-queue``, ``--max-message-size`` and ``--log-level``.

One single-threaded poll loop holds all state in memory: nothing survives a restart.
Clients (DEALER sockets) talk to one ROUTER socket; every request is a multipart message
whose first frame is a msgpack list ``[command, request_id, *arguments]`` and whose
further frames are payloads. The hub forwards messages for process-specific channels to
the owning process's node over a DEALER socket of its own. A frame that does not parse is
logged and dropped; it never stops the loop. A ``batch`` request carries several requests
a client wrote in one event-loop step (each answered on its own). A ``push`` may ask for
a lease of places in the queue; messages sent on it arrive batched as one ``send``
request (no reply) whose second frame holds the payloads back to back
(:func:`split_batch`), the same format nodes take from senders holding an inbox lease.
A ``gsend`` queues the message for each normal member and puts one envelope
(:mod:`multilayer.fanout`) into each process inbox with members, forwarded to its node or
parked here, capacity checked once per inbox; it answers with the members left out and
the number of live members.
A ``gwatch`` hands a client the members of a small group (few queues, see
``_group_watch``) with a lease (``GROUP_LEASE``);
until it ends, a ``gadd``, ``gdiscard`` or ``flush`` touching the group first sends that
client a ``ginval`` and is answered only once the client's ``gack`` (or the lease's end)
says it no longer fans out from its copy.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import sys
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import msgpack
import zmq
import zmq.auth.thread

from .. import __version__, fanout
from ..names import non_local_name
from ..serialization import HEADER_SIZE, deadline_of

__all__ = [
    "DEFAULT_MAX_MESSAGE",
    "FULL",
    "LEASE",
    "OK",
    "UNKNOWN",
    "Hub",
    "Leases",
    "decode",
    "encode",
    "main",
    "split_batch",
]

logger = logging.getLogger(__name__)

#: Item statuses in replies: accepted, refused for capacity, no such inbox here.
OK, FULL, UNKNOWN = 0, 1, 2
#: Frames larger than this are refused by the sockets themselves. A frame holds one payload
#: or a batch of at most 1 MiB of them, and a payload is at most
#: ``largest_payload(max_message_size, encrypted=True)``: 3.5 MB at the default
#: max_message_size, and the ZeroMQ backend refuses a max_message_size beyond ~6 MB.
DEFAULT_MAX_MESSAGE = 8 * 1024 * 1024 + 64 * 1024
#: Longest a pop waits at the hub before answering empty; clients then ask again.
MAX_POP_WAIT = 30.0
#: Longest a process registration lives without being refreshed.
MAX_REGISTRATION_TTL = 120.0
_SWEEP_EVERY = 0.5
#: How long places leased to a sender stay reserved for it (hub queues and node inboxes).
LEASE = 0.2
#: How long a client may fan out on its own to the members of a small group it asked for
#: (``gwatch``), unless the hub invalidates that copy first (``ginval``).
GROUP_LEASE = 0.5


def encode(command: str, request_id: int, *args: Any) -> bytes:
    """The header frame of a request or reply."""
    data: bytes = msgpack.packb([command, request_id, *args], use_bin_type=True)
    return data


def decode(frame: bytes) -> tuple[str, int, list[Any]]:
    """Split a header frame; ValueError when it is not one."""
    try:
        header = msgpack.unpackb(frame, raw=False, use_list=True)
    except Exception as error:  # msgpack raises many types for garbage
        raise ValueError(f"undecodable header ({error})") from None
    if (
        not isinstance(header, list)
        or len(header) < 2
        or not isinstance(header[0], str)
        or type(header[1]) is not int
    ):
        raise ValueError("header is not [command, request_id, ...]")
    return header[0], header[1], header[2:]


class _BadRequest(ValueError):
    """A request whose arguments do not fit its command."""


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise _BadRequest(f"expected text, got {type(value).__name__}")
    return value


def _count(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise _BadRequest(f"expected a count, got {value!r:.40}")
    return value


def _number(value: Any) -> float:
    if type(value) not in (int, float):
        raise _BadRequest(f"expected a number, got {value!r:.40}")
    return float(value)


class Leases:
    """Places of one queue reserved for senders (hub queues and node inboxes alike).

    With an ok, the queue's owner leases a sender up to ``want`` places for ``LEASE``
    seconds, never more than half the free room: the sender then sends that many
    messages without waiting for answers, and another sender is never refused while
    there is space. Places leased and not used yet count as taken for everyone else.
    """

    def __init__(self) -> None:
        #: sender id -> (places left, monotonic end of the lease)
        self._leases: dict[bytes, tuple[int, float]] = {}

    def __bool__(self) -> bool:
        return bool(self._leases)

    def reserved(self, but: bytes = b"") -> int:
        """Places leased to senders other than ``but``; drops spent and expired leases."""
        current = time.monotonic()
        total = 0
        for sender, (count, until) in list(self._leases.items()):
            if count <= 0 or until <= current:
                del self._leases[sender]
            elif sender != but:
                total += count
        return total

    def grant(self, sender: bytes, free: int, want: int) -> int:
        """Lease ``sender`` up to ``want`` of ``free`` places (free of stored messages)."""
        self._leases.pop(sender, None)
        granted = max(0, min(want, (free - self.reserved()) // 2))
        if granted:
            self._leases[sender] = (granted, time.monotonic() + LEASE)
        return granted

    def use(self, sender: bytes) -> bool:
        """Use one leased place of ``sender``; False when it holds none."""
        count, until = self._leases.get(sender, (0, 0.0))
        if count <= 0 or until <= time.monotonic():
            return False
        self._leases[sender] = (count - 1, until)
        return True


def split_batch(items: Any, blob: bytes) -> list[tuple[str, str, bytes]]:
    """The messages of a batch of leased sends: ``items`` are ``[key, channel, size]``
    triples, ``blob`` the payloads back to back. ValueError, before anything is used,
    when the batch does not add up.
    """
    if not isinstance(items, list):
        raise _BadRequest("a batch needs a list of [key, channel, size]")
    messages: list[tuple[str, str, bytes]] = []
    start = 0
    for item in items:
        if not isinstance(item, list) or len(item) != 3:
            raise _BadRequest("a batch item is [key, channel, size]")
        key, channel, size = _text(item[0]), _text(item[1]), item[2]
        if type(size) is not int or size < HEADER_SIZE:
            raise _BadRequest("short payload in a batch")
        messages.append((key, channel, blob[start : start + size]))
        start += size
    if start != len(blob):
        raise _BadRequest("batch payload sizes do not add up")
    return messages


def _payload(frames: Sequence[bytes], index: int) -> bytes:
    if len(frames) <= index or len(frames[index]) < HEADER_SIZE:
        raise _BadRequest("missing or short payload frame")
    return frames[index]


@dataclass
class _Waiter:
    """A pop parked until a message arrives or ``until`` passes."""

    client: bytes
    request_id: int
    limit: int
    until: float


@dataclass
class _Owner:
    """Where a process inbox lives: its node's endpoint and CURVE public key."""

    endpoint: str
    public_key: str
    until: float


@dataclass
class _Forward:
    """Messages handed to an owner node, waiting for its per-item answer."""

    job: _Job
    endpoint: str
    items: list[tuple[str, str, int]]
    payload: bytes
    until: float


@dataclass
class _Job:
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


class Hub:
    """The hub's state and poll loop; :func:`main` builds one from the command line."""

    def __init__(
        self,
        binds: Sequence[str],
        *,
        secret_key: bytes | None = None,
        allowed_keys: Sequence[bytes] = (),
        peer_timeout: float = 2.0,
        max_queue: int = 100_000,
        max_message_size: int = DEFAULT_MAX_MESSAGE,
    ) -> None:
        self.binds = list(binds)
        self.peer_timeout = peer_timeout
        self.max_queue = max_queue
        self.max_message_size = max_message_size
        self.epoch = random.getrandbits(62)
        self.queues: dict[str, deque[tuple[str, bytes]]] = {}
        self.waiters: dict[str, deque[_Waiter]] = {}
        self.groups: dict[str, dict[str, float]] = {}
        #: Places of normal queues leased to senders, by queue key.
        self.leases: dict[str, Leases] = {}
        self.directory: dict[str, _Owner] = {}
        self._forwards: dict[int, _Forward] = {}
        #: Clients holding a copy of a group's members, by group: client -> monotonic end of
        #: their lease. A membership change waits for each to drop its copy (see _changed).
        self.watchers: dict[str, dict[bytes, float]] = {}
        #: Invalidations sent and not yet acknowledged: id -> (client, the change's job,
        #: monotonic end of that client's lease, after which no answer is needed).
        self._acks: dict[int, tuple[bytes, _Job, float]] = {}
        self._links: dict[str, zmq.Socket[bytes]] = {}
        self._next_id = 0
        self._stopping = False
        self._secret = secret_key
        self._public = zmq.curve_public(secret_key) if secret_key else None
        self._allowed = list(allowed_keys)
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._auth: zmq.auth.thread.ThreadAuthenticator | None = None
        self._router = self._context.socket(zmq.ROUTER)
        self._poller = zmq.Poller()

    # -- lifecycle -------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to end after the current step (safe from a signal handler)."""
        self._stopping = True

    def run(self) -> None:
        """Bind, serve until :meth:`stop`, then release every socket."""
        router = self._router
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.MAXMSGSIZE, self.max_message_size)
        router.setsockopt(zmq.SNDHWM, 100_000)
        router.setsockopt(zmq.RCVHWM, 100_000)
        if self._secret is not None:
            self._start_curve(router)
        try:
            for endpoint in self.binds:
                router.bind(endpoint)
                logger.info("hub listening on %s", endpoint)
            self._poller.register(router, zmq.POLLIN)
            self._loop()
        finally:
            for link in self._links.values():
                link.close(0)
            router.close(0)
            if self._auth is not None:
                self._auth.stop()
            self._context.term()
            logger.info("hub stopped")

    def _start_curve(self, router: zmq.Socket[bytes]) -> None:
        assert self._secret is not None and self._public is not None
        self._auth = zmq.auth.thread.ThreadAuthenticator(
            self._context, log=logging.getLogger(f"{__name__}.auth")
        )
        self._auth.start()
        if self._allowed:
            allowed = set(self._allowed)

            class _Allowed:
                def callback(self, domain: str, key: bytes) -> bool:
                    granted = key in allowed  # pyzmq hands the key over Z85-encoded
                    if not granted:
                        logger.warning("refused a client with an unlisted CURVE key")
                    return granted

            self._auth.configure_curve_callback(domain="*", credentials_provider=_Allowed())
        else:
            self._auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
        router.setsockopt(zmq.CURVE_SERVER, 1)
        router.setsockopt(zmq.CURVE_SECRETKEY, self._secret)
        router.setsockopt(zmq.CURVE_PUBLICKEY, self._public)
        logger.info("CURVE on; hub public key %s", self._public.decode())

    def _loop(self) -> None:
        next_sweep = time.monotonic() + _SWEEP_EVERY
        while not self._stopping:
            wait = max(0.0, min(next_sweep - time.monotonic(), 0.25))
            if self._acks:
                self._lapse_acks(time.monotonic())
                wait = min(wait, 0.01)  # a change waits for leases that end any time now
            events = dict(self._poller.poll(int(wait * 1000)))
            for sock in events:
                self._drain(sock)
            if time.monotonic() >= next_sweep:
                self._sweep(time.time())
                next_sweep = time.monotonic() + _SWEEP_EVERY

    def _drain(self, sock: zmq.Socket[bytes]) -> None:
        # A bounded batch per wake-up keeps one busy socket from starving the timers.
        for _ in range(256):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if sock is self._router:
                self._on_request(frames[0], frames[1:])
            else:
                self._on_owner_reply(frames)

    # -- requests --------------------------------------------------------------------

    def _on_request(self, client: bytes, frames: list[bytes]) -> None:
        if not frames:
            logger.warning("dropped an empty request from client %s", client.hex())
            return
        try:
            command, request_id, args = decode(frames[0])
        except ValueError as error:
            logger.warning("dropped a malformed request from client %s: %s", client.hex(), error)
            return
        if command == "batch":
            self._batch(client, args, frames)
        else:
            self._dispatch(client, command, request_id, args, frames)

    def _dispatch(
        self, client: bytes, command: str, request_id: int, args: list[Any], frames: list[bytes]
    ) -> None:
        handler = self._handlers.get(command)
        try:
            if handler is None:
                raise _BadRequest(f"unknown command {command!r:.40}")
            handler(self, client, request_id, args, frames)
        except (_BadRequest, IndexError, TypeError, ValueError) as error:
            logger.warning("refused %r from client %s: %s", command[:40], client.hex(), error)
            self._reply(client, encode("error", request_id, str(error)))

    def _batch(self, client: bytes, args: list[Any], frames: list[bytes]) -> None:
        # Requests a client wrote in one event-loop step, as one message:
        # [[command, request_id, args, payload frame count], ...] and then their payloads.
        requests = args[0] if args else None
        if not isinstance(requests, list):
            logger.warning("dropped a malformed batch from client %s", client.hex())
            return
        index = 1
        for entry in requests:
            if (
                not isinstance(entry, list)
                or len(entry) != 4
                or not isinstance(entry[0], str)
                or type(entry[1]) is not int
                or not isinstance(entry[2], list)
                or type(entry[3]) is not int
                or not 0 <= entry[3] <= len(frames) - index
                or entry[0] == "batch"
            ):
                logger.warning("dropped the rest of a malformed batch from client %s", client.hex())
                return
            command, request_id, request_args, count = entry
            self._dispatch(
                client, command, request_id, request_args, [b"", *frames[index : index + count]]
            )
            index += count

    def _reply(self, client: bytes, *frames: bytes) -> bool:
        try:
            self._router.send_multipart([client, *frames], zmq.NOBLOCK)
        except zmq.ZMQError as error:
            # EHOSTUNREACH (client gone) or EAGAIN (client not reading): nobody to tell.
            logger.debug("reply to client %s not sent: %s", client.hex(), error)
            return False
        return True

    def _ping(self, client: bytes, rid: int, args: list[Any], frames: list[bytes]) -> None:
        self._reply(client, encode("ok", rid, self.epoch, __version__))

    def _push(self, client: bytes, rid: int, args: list[Any], frames: list[bytes]) -> None:
        key, channel, capacity = _text(args[0]), _text(args[1]), _count(args[2])
        want = _count(args[3]) if len(args) > 3 else 0
        accepted = self._enqueue(key, channel, _payload(frames, 1), capacity, client)
        granted = self._lease(key, client, capacity, want) if accepted and want else 0
        self._reply(client, encode("ok", rid, OK if accepted else FULL, granted))

    def _send(self, client: bytes, rid: int, args: list[Any], frames: list[bytes]) -> None:
        # Pushes on a lease, batched, answered by nobody: the places were reserved.
        for key, channel, payload in split_batch(args[0], frames[1] if len(frames) > 1 else b""):
            leases = self.leases.get(key)
            if leases is not None:
                leases.use(client)
            self._enqueue(key, channel, payload, None)

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

    def _spush(self, client: bytes, rid: int, args: list[Any], frames: list[bytes]) -> None:
        key, channel, capacity = _text(args[0]), _text(args[1]), _count(args[2])
        payload = _payload(frames, 1)
        owner = self.directory.get(key)
        if owner is None:
            accepted = self._enqueue(key, channel, payload, capacity)
            self._reply(client, encode("ok", rid, OK if accepted else FULL, None, None))
            return
        job = _Job(client, rid, "spush", key=key)
        self._forward(job, owner, [(key, channel, capacity)], payload)

    def _pop(self, client: bytes, rid: int, args: list[Any], frames: list[bytes]) -> None:
        key, limit, wait = _text(args[0]), max(1, _count(args[1])), _number(args[2])
        taken = self._take(key, limit, time.time())
        if taken or wait <= 0:
            self._send_taken(client, rid, key, taken)
            return
        until = time.time() + min(wait, MAX_POP_WAIT)
        self.waiters.setdefault(key, deque()).append(_Waiter(client, rid, limit, until))

    def _cancel(self, client: bytes, rid: int, args: list[Any], frames: list[bytes]) -> None:
        key, pop_id = _text(args[0]), _count(args[1])
        removed = False
        waiting = self.waiters.get(key)
        if waiting:
            for waiter in list(waiting):
                if waiter.client == client and waiter.request_id == pop_id:
                    waiting.remove(waiter)
                    removed = True
            if not waiting:
                del self.waiters[key]
        self._reply(client, encode("ok", rid, removed))

    def _requeue(self, client: bytes, rid: int, args: list[Any], frames: list[bytes]) -> None:
        key, channels = _text(args[0]), args[1]
        if not isinstance(channels, list) or len(channels) != len(frames) - 1:
            raise _BadRequest("requeue needs one channel per payload frame")
        queue = self.queues.setdefault(key, deque())
        for index in range(len(channels) - 1, -1, -1):
            queue.appendleft((_text(channels[index]), _payload(frames, index + 1)))
        self._serve(key)
        self._reply(client, encode("ok", rid))

    def _group_add(self, client: bytes, rid: int, args: list[Any], frames: list[bytes]) -> None:
        group, channel, until = _text(args[0]), _text(args[1]), _number(args[2])
        self.groups.setdefault(group, {})[channel] = until
        self._changed([group], _Job(client, rid, "ok"))

    def _group_discard(self, client: bytes, rid: int, args: list[Any], frames: list[bytes]) -> None:
        group, channel = _text(args[0]), _text(args[1])
        members = self.groups.get(group)
        if members is not None:
            members.pop(channel, None)
            if not members:
                del self.groups[group]
        self._changed([group], _Job(client, rid, "ok"))

    def _group_watch(self, client: bytes, rid: int, args: list[Any], frames: list[bytes]) -> None:
        # The members of a group living in at most ``most`` queues (normal channels and
        # process inboxes: one send each) and numbering at most ``most_members``, with
        # their expiry times, and a lease: until it ends, or the client acknowledges an
        # invalidation, no change to the group is answered (see _changed), so the client
        # may fan out on its own.
        group, most, most_members = _text(args[0]), _count(args[1]), _count(args[2])
        members = self.groups.get(group, {})
        current = time.time()
        live = [(channel, until) for channel, until in members.items() if until > current]
        if len(live) > most_members or len({non_local_name(c) for c, _ in live}) > most:
            self._reply(client, encode("ok", rid, None, 0))
            return
        self.watchers.setdefault(group, {})[client] = time.monotonic() + GROUP_LEASE
        self._reply(client, encode("ok", rid, live, GROUP_LEASE))

    def _group_ack(self, client: bytes, rid: int, args: list[Any], frames: list[bytes]) -> None:
        # A client dropped its copy of a group (``rid`` is the invalidation's id); no reply.
        entry = self._acks.get(rid)
        if entry is not None and entry[0] == client:
            del self._acks[rid]
            self._release(entry[1])

    def _changed(self, groups: Iterable[str], job: _Job) -> None:
        """Answer ``job`` once every client holding a copy of ``groups`` has dropped it."""
        current = time.monotonic()
        for group in groups:
            for client, until in self.watchers.pop(group, {}).items():
                if until <= current:
                    continue
                invalidation = self._new_id()
                # Unreachable (gone) client: it cannot fan out any more either.
                if self._reply(client, encode("ginval", invalidation, group)):
                    job.waiting += 1
                    self._acks[invalidation] = (client, job, until)
        if not job.waiting:
            self._finish(job)

    def _release(self, job: _Job) -> None:
        job.waiting -= 1
        if not job.waiting:
            self._finish(job)

    def _lapse_acks(self, current: float) -> None:
        """Stop waiting for clients whose lease has ended: they no longer use their copy."""
        for invalidation in [i for i, (_, _, until) in self._acks.items() if until <= current]:
            self._release(self._acks.pop(invalidation)[1])

    def _group_members(self, client: bytes, rid: int, args: list[Any], frames: list[bytes]) -> None:
        self._reply(client, encode("ok", rid, self._members(_text(args[0]), time.time())))

    def _group_send(self, client: bytes, rid: int, args: list[Any], frames: list[bytes]) -> None:
        # Capacity overrides are keyed by queue: a normal member, or a process inbox.
        group, prefix, default = _text(args[0]), _text(args[1]), _count(args[2])
        overrides = args[3] or {}
        if not isinstance(overrides, dict):
            raise _BadRequest("capacity overrides must be a map")
        payload = _payload(frames, 1)
        job = _Job(client, rid, "gsend")
        current = time.time()
        members = self.groups.get(group, {})
        inboxes, normal = fanout.split(
            (channel, until) for channel, until in members.items() if until > current
        )
        job.live = len(normal) + sum(len(local) for local in inboxes.values())
        for member, _until in normal:
            capacity = overrides.get(member, default)
            if not self._enqueue(f"{prefix}:{member}", member, payload, capacity):
                job.full.append(member)
        # One envelope per process inbox, whatever its number of members: the inbox's
        # capacity counts it once, and the owner's layer hands it to each member.
        name = group[len(prefix) + 1 :]
        for inbox, local in inboxes.items():
            key = f"{prefix}:{inbox}"
            capacity = overrides.get(inbox, default)
            data = fanout.seal(payload, name, current, inbox, local)
            if len(data) <= DEFAULT_MAX_MESSAGE:
                channels = [inbox]
                job.named[inbox] = [member for member, _until in local]
            else:
                # Naming this many members beside a payload this large makes a frame no
                # node takes: each member gets its own copy, counted each, as before.
                channels = [member for member, _until in local]
                data = payload
            owner = self.directory.get(key)
            if owner is not None:
                self._forward(job, owner, [(key, channel, capacity) for channel in channels], data)
                continue
            for channel in channels:
                if not self._enqueue(key, channel, data, capacity):
                    job.full.append(channel)
        if not job.waiting:
            self._finish(job)

    def _flush(self, client: bytes, rid: int, args: list[Any], frames: list[bytes]) -> None:
        start = _text(args[0]) + ":"
        for key in [k for k in self.queues if k.startswith(start)]:
            del self.queues[key]
        for key in [k for k in self.groups if k.startswith(start)]:
            del self.groups[key]
        job = _Job(client, rid, "flush")
        owners = {o.endpoint: o for k, o in self.directory.items() if k.startswith(start)}
        for owner in owners.values():
            forward_id = self._new_id()
            frames = [encode("flush", forward_id, start)]
            self._send_owner(job, owner, forward_id, frames, [], b"", time.time())
        self._changed([g for g in self.watchers if g.startswith(start)], job)

    def _register(self, client: bytes, rid: int, args: list[Any], frames: list[bytes]) -> None:
        keys, endpoint, public_key = args[0], _text(args[1]), _text(args[2])
        ttl = min(_number(args[3]), MAX_REGISTRATION_TTL)
        if not isinstance(keys, list):
            raise _BadRequest("register needs a list of inboxes")
        until = time.time() + ttl
        handed: list[list[str]] = []
        payloads: list[bytes] = []
        for key in map(_text, keys):
            known = self.directory.get(key)
            if known is None or known.endpoint != endpoint:
                logger.info("inbox %s now lives at %s", key, endpoint)
            self.directory[key] = _Owner(endpoint, public_key, until)
            # Messages parked while nobody owned the inbox go to the owner with this reply.
            for channel, payload in self.queues.pop(key, ()):
                handed.append([key, channel])
                payloads.append(payload)
        self._reply(client, encode("ok", rid, handed), *payloads)

    def _stats(self, client: bytes, rid: int, args: list[Any], frames: list[bytes]) -> None:
        # Live messages per queue and members per group under a prefix; process inboxes
        # appear only while the hub parks messages for them (their owners hold the rest).
        start = _text(args[0]) + ":"
        current = time.time()
        queues = {
            key[len(start) :]: sum(
                1 for _channel, payload in queue if deadline_of(payload) > current
            )
            for key, queue in self.queues.items()
            if key.startswith(start)
        }
        groups = {
            key[len(start) :]: len(self._members(key, current))
            for key in self.groups
            if key.startswith(start)
        }
        self._reply(client, encode("ok", rid, queues, groups))

    _handlers = {
        "ping": _ping,
        "push": _push,
        "send": _send,
        "spush": _spush,
        "pop": _pop,
        "cancel": _cancel,
        "requeue": _requeue,
        "gadd": _group_add,
        "gdiscard": _group_discard,
        "gmembers": _group_members,
        "gsend": _group_send,
        "gwatch": _group_watch,
        "gack": _group_ack,
        "flush": _flush,
        "register": _register,
        "stats": _stats,
    }

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

    def _link(self, owner: _Owner) -> zmq.Socket[bytes]:
        link = self._links.get(owner.endpoint)
        if link is None:
            link = self._context.socket(zmq.DEALER)
            link.setsockopt(zmq.LINGER, 0)
            link.setsockopt(zmq.MAXMSGSIZE, self.max_message_size)
            if self._secret is not None and owner.public_key:
                assert self._public is not None
                link.setsockopt(zmq.CURVE_SERVERKEY, owner.public_key.encode())
                link.setsockopt(zmq.CURVE_SECRETKEY, self._secret)
                link.setsockopt(zmq.CURVE_PUBLICKEY, self._public)
            link.connect(owner.endpoint)
            self._poller.register(link, zmq.POLLIN)
            self._links[owner.endpoint] = link
        return link

    def _forward(
        self, job: _Job, owner: _Owner, items: list[tuple[str, str, int]], payload: bytes
    ) -> None:
        forward_id = self._new_id()
        reply_by = time.time() + self.peer_timeout
        header = encode("deliver", forward_id, [list(item) for item in items], reply_by, 0)
        self._send_owner(job, owner, forward_id, [header, payload], items, payload, reply_by)

    def _send_owner(
        self,
        job: _Job,
        owner: _Owner,
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
        self._forwards[forward_id] = _Forward(job, owner.endpoint, items, payload, until)

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
        self, endpoint: str, items: list[tuple[str, str, int]], payload: bytes, job: _Job
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

    def _finish(self, job: _Job) -> None:
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

    # -- expiry --------------------------------------------------------------------------

    def _sweep(self, current: float) -> None:
        """Drop what expired, answer pops that waited long enough, forget silent owners."""
        for key in list(self.leases):
            self._leased(key)
        for key in list(self.queues):
            queue = self.queues[key]
            while queue and deadline_of(queue[0][1]) <= current:
                queue.popleft()
            if not queue:
                del self.queues[key]
        for key in list(self.waiters):
            waiting = self.waiters[key]
            for waiter in [w for w in waiting if w.until <= current]:
                waiting.remove(waiter)
                self._reply(waiter.client, encode("ok", waiter.request_id, []))
            if not waiting:
                del self.waiters[key]
        for group in list(self.groups):
            members = self.groups[group]
            for channel in [c for c, until in members.items() if until <= current]:
                del members[channel]
            if not members:
                del self.groups[group]
        watch_now = time.monotonic()
        for group in list(self.watchers):
            watching = self.watchers[group]
            for client in [c for c, until in watching.items() if until <= watch_now]:
                del watching[client]
            if not watching:
                del self.watchers[group]
        for key in [k for k, owner in self.directory.items() if owner.until <= current]:
            logger.info("inbox %s expired: its process stopped refreshing it", key)
            del self.directory[key]
        if any(forward.until <= current for forward in self._forwards.values()):
            # Answers already waiting in the links settle their forwards first.
            for link in list(self._links.values()):
                while True:
                    try:
                        frames = link.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_owner_reply(frames)
        for forward_id in [f for f, fw in self._forwards.items() if fw.until <= current]:
            forward = self._forwards.pop(forward_id)
            logger.warning("owner %s did not answer in %gs", forward.endpoint, self.peer_timeout)
            self._owner_lost(forward.endpoint, forward.items, forward.payload, forward.job)
            forward.job.waiting -= 1
            if not forward.job.waiting:
                self._finish(forward.job)
        live = {owner.endpoint for owner in self.directory.values()}
        for endpoint in [e for e in self._links if e not in live]:
            self._poller.unregister(self._links[endpoint])
            self._links.pop(endpoint).close(0)


def _split(values: Iterable[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multilayer hub",
        description="Run the hub of the zmq:// channel layer backend.",
    )
    parser.add_argument(
        "--bind",
        action="append",
        required=True,
        metavar="ENDPOINT",
        help="ZeroMQ endpoint to listen on, e.g. tcp://127.0.0.1:5599 or ipc:///run/ml.sock "
        "(repeatable, or a comma list)",
    )
    parser.add_argument(
        "--curve-secret-key",
        metavar="Z85",
        help="hub CURVE secret key (40 Z85 characters); default $MULTILAYER_HUB_SECRET_KEY; "
        "turns on encryption",
    )
    parser.add_argument("--curve-secret-key-file", metavar="PATH", help="read the key from PATH")
    parser.add_argument(
        "--curve-allow",
        action="append",
        default=[],
        metavar="Z85",
        help="client public key allowed to connect (repeatable, or a comma list); "
        "default: any client that knows the hub's public key",
    )
    parser.add_argument(
        "--peer-timeout",
        type=float,
        default=2.0,
        help="seconds to wait for a process node before parking its messages (default 2)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=100_000,
        help="hard cap on the messages of one queue, whatever capacity clients ask (100000)",
    )
    parser.add_argument(
        "--max-message-size",
        type=int,
        default=DEFAULT_MAX_MESSAGE,
        help=f"largest frame accepted, in bytes (default {DEFAULT_MAX_MESSAGE})",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    return parser


def _secret_key(options: argparse.Namespace) -> bytes | None:
    text: str | None = options.curve_secret_key or os.environ.get("MULTILAYER_HUB_SECRET_KEY")
    if options.curve_secret_key_file:
        with open(options.curve_secret_key_file, encoding="ascii") as file:
            text = file.read().strip()
    if not text:
        return None
    if len(text) != 40:
        raise SystemExit("multilayer hub: a CURVE secret key is 40 Z85 characters")
    return text.encode("ascii")


def main(argv: list[str] | None = None) -> int:
    """Run a hub until SIGTERM or SIGINT; the exit status."""
    options = _parser().parse_args(argv)
    logging.basicConfig(
        level=options.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    secret = _secret_key(options)
    allowed = [key.encode("ascii") for key in _split(options.curve_allow)]
    if allowed and secret is None:
        raise SystemExit("multilayer hub: --curve-allow needs --curve-secret-key")
    hub = Hub(
        _split(options.bind),
        secret_key=secret,
        allowed_keys=allowed,
        peer_timeout=options.peer_timeout,
        max_queue=options.max_queue,
        max_message_size=options.max_message_size,
    )

    def on_signal(number: int, _frame: FrameType | None) -> None:
        logger.info("received %s, stopping", signal.Signals(number).name)
        hub.stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        hub.run()
    except zmq.ZMQError as error:
        logger.error("hub failed: %s", error)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
