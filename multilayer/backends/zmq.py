"""ZeroMQ backend: ``zmq://`` and ``zmq+ipc://`` on pyzmq, with a hub and direct paths.

Features: every contract point, across processes and hosts. A hub process
(:mod:`multilayer.backends.zmqhub`, ``multilayer hub --bind tcp://127.0.0.1:5599``)
holds normal-channel queues with capacity and expiry, group memberships with expiry, and
the directory of live process inboxes. Each process runs one *node*: a ROUTER socket on
an ephemeral port, served by a background thread (or, while an event loop waits on an
inbox, by that loop, so a message wakes its receive with no thread hop), holding the
inboxes of that process's layers. Process-specific messages go straight from sender to
node once the sender has learnt the node's endpoint (the first message travels through
the hub, which answers with the endpoint); the node checks capacity and answers ok/full,
and with an ok leases the sender a few places (at most half the free room, for 0.2 s)
that it fills without waiting for answers. Normal-channel sends get the same leases from
the hub, and a pop takes up to 100 waiting messages, the ones no receive wanted going
back to the hub after 1 s. ``group_send`` is one request to the hub, which queues a copy
for each normal member and forwards to each process inbox with members one envelope
(:mod:`multilayer.fanout`) naming them, counted once against the inbox's capacity; the
receiving layer hands it to each member. To a group whose members live in at most two
queues (normal channels or inboxes) the sender sends itself, the same copies and
envelopes, from a copy of the members the hub leases it for 0.5 s and invalidates before
it answers any change to the group. Several hubs shard queues, groups and inboxes by
rendezvous hashing of the name.
Optional CURVE encryption and authentication.

Faults. The hub keeps everything in memory: a hub restart loses the queued normal-channel
messages, group memberships and parked messages; nodes re-register their inboxes within
one ``heartbeat``, and waiting receives re-issue their request to the new hub. A send to a
process that died is parked at the hub once the directory forgets the process (at most
``peer_timeout`` seconds on the direct path plus the hub's own peer timeout), and expires
there: it is accepted, never delivered (messages sent on a lease to a node that has
just died are lost the same way). A hub that does not answer within ``timeout``
seconds makes the call raise :class:`~multilayer.exceptions.BrokerError`.

URL format: ``zmq://HOST:PORT[,HOST:PORT...][?option=value...]`` (TCP hubs) or
``zmq+ipc:///path/to/hub.sock`` (one hub on this host, over a Unix socket).

Options:

* ``timeout`` (float, 10): seconds to wait for a hub's answer before BrokerError.
* ``peer_timeout`` (float, 2): seconds to wait for another process's node before the
  message is routed through the hub instead.
* ``heartbeat`` (float, 1): seconds between hub pings and inbox re-registrations; the hub
  forgets a process silent for five heartbeats.
* ``advertise`` (str): the address other processes reach this process's node at (TCP
  only); default: the local address that routes to the first hub.
* ``curve_serverkey`` (str): the hub's CURVE public key (Z85); turns on CURVE.
* ``curve_secretkey`` (str, secret): this process's CURVE secret key (Z85), for hubs that
  allow only listed clients; default: a fresh key pair per process.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import hashlib
import ipaddress
import itertools
import logging
import os
import random
import secrets
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import zmq
import zmq.asyncio

from ..backend import Backend, BrokerStats, Capabilities, Item, LayerSettings, now
from ..capacity import CapacityPolicy
from ..exceptions import BrokerError, ChannelFull, ConfigurationError
from ..fanout import seal, split
from ..local import HeldMessages
from ..names import non_local_name
from ..options import Option
from ..serialization import HEADER_SIZE, deadline_of, largest_payload
from ..url import LayerURL
from .zmqhub import (
    DEFAULT_MAX_MESSAGE,
    FULL,
    LEASE,
    OK,
    UNKNOWN,
    Leases,
    decode,
    encode,
    split_batch,
)

__all__ = ["ZmqBackend"]

logger = logging.getLogger(__name__)


#: How long one pop request waits at the hub before it is renewed.
_POP_WAIT = 20.0
#: Bound on the clean-up of a cancelled pop, so that closing never hangs on a dead hub.
_ABANDON_WAIT = 2.0
#: Places a sender asks an inbox to lease it, and for how long a lease holds them.
_WANT = 256
#: Messages one pop of a normal channel may take when they already wait at the hub; those
#: no receive here wants go back to the hub after PREFETCH_HOLD seconds.
_PREFETCH = 100
_PREFETCH_HOLD = 1.0
#: How long a stopping node waits for its last give-back to reach the hub (ms).
_GIVE_BACK_LINGER_MS = 2000
#: Bytes of payloads one batch of leased sends holds before it is written: a batch is one
#: frame, and every frame must stay within the sockets' DEFAULT_MAX_MESSAGE (a frame of
#: one payload alone may be larger, up to largest_payload(max_message_size)).
_BATCH_BYTES = 1024 * 1024
#: A leased send this long after the previous write goes out at once, unbatched.
_SPARSE = 0.001
#: Group sends in flight (sent, not yet answered by the hub) before group_send waits.
_GROUP_SENDS_IN_FLIGHT = 256
#: How often the node thread checks that the event loop it lent its socket still runs (s),
#: and how long that loop may go without running a callback before the thread takes the
#: socket back (the loop is blocked).
_OWNER_CHECK = 0.05
_OWNER_STALL = 0.5
#: Groups whose members live in at most this many queues (a normal channel or a process
#: inbox: one send each) are fanned out by the sender itself, straight to the members'
#: nodes and queues, from a copy of the members the hub leases it and keeps valid (one
#: send per queue costs more than one request to the hub beyond a few).
_DIRECT_FANOUT = 2
#: ... if they are at most this many: the copy travels again with every lease, and the
#: envelope's header names each member.
_DIRECT_MEMBERS = 1000
#: Group sends in flight through the hub from which on group_send asks for a copy of the
#: members (a stream of group sends: sparse ones cost the hub no extra request).
_STREAMING = 8
#: How long a group found too large to fan out here is not asked about again (s).
_LARGE_GROUP_HINT = 5.0


def _check_key(value: str) -> str | None:
    if not value:
        return None
    try:
        valid = len(value) == 40 and len(zmq.utils.z85.decode(value)) == 32
    except (ValueError, KeyError, UnicodeEncodeError):
        valid = False
    # Z85 uses '&', '+', '#', '%', '?' and '/': in a URL they must be percent-encoded.
    return None if valid else "a CURVE key is 40 Z85 characters (percent-encode it in a URL)"


class _Restarted(Exception):
    """The hub restarted: a pop parked at the old hub will never be answered."""


@dataclass(frozen=True)
class _Curve:
    """CURVE keys of this process: the hub's public key and our own key pair."""

    server_key: bytes
    public_key: bytes
    secret_key: bytes

    def client(self, sock: zmq.Socket[Any], server_key: bytes) -> None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public_key)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret_key)


def _shard(name: str, hubs: Sequence[str]) -> int:
    """Rendezvous hashing: the hub a name lives on, stable whatever the order of ``hubs``."""
    if len(hubs) == 1:
        return 0
    scores = [hashlib.blake2b(f"{hub}\0{name}".encode(), digest_size=8).digest() for hub in hubs]
    return scores.index(max(scores))


# -- the node: this process's inboxes, served by one thread ------------------------------


class _Inbox:
    """Messages of one process inbox and the event-loop futures waiting for them."""

    def __init__(self) -> None:
        self.items: deque[Item] = deque()
        self.waiters: list[asyncio.Future[None]] = []
        self.leases = Leases()

    def put(
        self,
        item: Item,
        capacity: int | None,
        sender: bytes = b"",
        here: asyncio.AbstractEventLoop | None = None,
    ) -> bool:
        if capacity is not None and len(self.items) + self.leases.reserved(sender) >= capacity:
            current = now()
            kept = [entry for entry in self.items if deadline_of(entry[1]) > current]
            if len(kept) + self.leases.reserved(sender) >= capacity:
                return False
            self.items = deque(kept)
        self.items.append(item)
        waiters, self.waiters = self.waiters, []
        for future in waiters:
            _wake(future, here)
        return True

    def take(self, limit: int) -> list[Item]:
        taken: list[Item] = []
        current = now()
        while self.items and len(taken) < limit:
            item = self.items.popleft()
            if deadline_of(item[1]) > current:
                taken.append(item)
        return taken


def _wake(future: asyncio.Future[None], here: asyncio.AbstractEventLoop | None) -> None:
    """Wake a receive; ``here`` is the event loop running in this thread, if any."""
    loop = future.get_loop()
    if loop is here:
        _set_if_pending(future)  # no self-pipe write and no second wake-up of the loop
        return
    # A loop that has ended raises RuntimeError; the message stays for the next receive.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(_set_if_pending, future)


def _set_if_pending(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


@dataclass(frozen=True)
class _NodeConfig:
    hubs: tuple[str, ...]
    names: tuple[str, ...]
    bind: str
    heartbeat: float
    curve: _Curve | None


class _Node:
    """One per process and hub set: a ROUTER socket and the inboxes behind it.

    A thread serves the socket so that inboxes outlive any one event loop (``async_to_sync``
    runs each call in a fresh loop) and the hub hears from the process between calls.
    While an event loop waits on an inbox, the thread lends it the ROUTER socket: the loop
    reads it like any asyncio socket and a message for a receive in that loop wakes it
    directly, without a hop through this thread. The thread takes the socket back when
    the loop's backend closes, or the loop stops running or is blocked. ZeroMQ sockets
    may move between threads behind a lock; only the current owner touches it.
    """

    #: The running nodes, by configuration without the bound address.
    nodes: ClassVar[dict[_NodeConfig, _Node]] = {}
    nodes_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, config: _NodeConfig) -> None:
        self.config = config
        self.lock = threading.Lock()
        self.inboxes: dict[str, _Inbox] = {}
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._router = self._context.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.MAXMSGSIZE, DEFAULT_MAX_MESSAGE)
        self._router.setsockopt(zmq.RCVHWM, 100_000)
        self._router.setsockopt(zmq.SNDHWM, 100_000)
        public = b""
        if config.curve is not None:
            self._router.setsockopt(zmq.CURVE_SERVER, 1)
            self._router.setsockopt(zmq.CURVE_SECRETKEY, config.curve.secret_key)
            public = config.curve.public_key
        self._router.bind(config.bind)
        self.endpoint: str = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.public_key = public.decode()
        self._hubs: list[zmq.Socket[bytes]] = []
        for endpoint in config.hubs:
            dealer = self._context.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            if config.curve is not None:
                config.curve.client(dealer, config.curve.server_key)
            dealer.connect(endpoint)
            self._hubs.append(dealer)
        self._wake_recv, self._wake_send = socket.socketpair()
        self._wake_recv.setblocking(False)
        self._commands: deque[tuple[str, concurrent.futures.Future[None]]] = deque()
        self._keys: set[str] = set()
        #: Normal-channel messages a pop took beyond what its receive wanted, by queue key,
        #: the thread gives back those held too long.
        self.held = HeldMessages()
        self._give_back_ids: set[int] = set()
        self._waiting: dict[str, list[concurrent.futures.Future[None]]] = {}
        self._requests: dict[int, list[str]] = {}
        self._ids = itertools.count(1)
        self._stopping = False
        #: The event loop serving the ROUTER socket (None: this thread), guarded by
        #: _owner_lock; only the thread hands it to a loop, between two of its polls.
        self._owner: asyncio.AbstractEventLoop | None = None
        #: A loop that asked to serve the socket.
        self._adopter: asyncio.AbstractEventLoop | None = None
        self._owner_lock = threading.Lock()
        self._router_fd = int(self._router.get(zmq.FD))
        self._router_polled = False
        #: When the lending loop last ran a callback the thread sent it, and when it sent one.
        self._owner_seen = self._owner_asked = 0.0
        self.thread = threading.Thread(target=self._run, name="multilayer zmq node", daemon=True)
        self.thread.start()
        atexit.register(self.stop)
        logger.debug("node of process %d listens on %s", os.getpid(), self.endpoint)

    def register(self, key: str) -> concurrent.futures.Future[None]:
        """Make inbox ``key`` exist here and be known to its hub; the future ends when it is."""
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self.lock:
            self.inboxes.setdefault(key, _Inbox())
        self._commands.append((key, future))
        self._wake_send.send(b"\0")
        return future

    def flush(self, start: str) -> None:
        """Empty the inboxes, and the held messages, whose key begins with ``start``."""
        with self.lock:
            for key, inbox in self.inboxes.items():
                if key.startswith(start):
                    inbox.items.clear()
        self.held.discard(keep=lambda key: not key.startswith(start))

    def serve_in(self, loop: asyncio.AbstractEventLoop) -> None:
        """Ask for the ROUTER socket to be served by ``loop`` (running in this thread)."""
        if self._owner is not None or self._adopter is loop:
            return
        self._adopter = loop
        with contextlib.suppress(OSError):
            self._wake_send.send(b"\0")

    def release(self, loop: asyncio.AbstractEventLoop) -> None:
        """Give the ROUTER socket back to the thread if ``loop`` (this thread's) serves it."""
        with self._owner_lock:
            if self._adopter is loop:
                self._adopter = None
            if self._owner is not loop:
                return
            self._owner = None
            loop.remove_reader(self._router_fd)
        with contextlib.suppress(OSError):
            self._wake_send.send(b"\0")

    def _owner_ran(self) -> None:
        self._owner_seen = time.monotonic()

    def _start_serving(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._owner_lock:
            if self._owner is not loop:
                return
            loop.add_reader(self._router_fd, self._on_readable, loop)
        self._on_readable(loop)

    def _on_readable(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._owner_lock:
            if self._owner is not loop:
                loop.remove_reader(self._router_fd)  # the thread took the socket back
                return
            self._serve(loop)
            # The descriptor signals changes only: look again while messages are left.
            if int(self._router.get(zmq.EVENTS)) & zmq.POLLIN:
                loop.call_soon(self._on_readable, loop)

    def _hand_over(self, poller: zmq.Poller) -> None:
        """Between polls: lend the ROUTER socket to a loop, or take it back."""
        current = time.monotonic()
        with self._owner_lock:
            owner = self._owner
            if owner is not None and (
                owner.is_closed()
                or not owner.is_running()
                or current - self._owner_seen > _OWNER_STALL
            ):
                # Its loop ended without closing the backend (async_to_sync does that), or
                # is blocked: the other loops of the process must not wait for it.
                self._owner = owner = None
            adopter, self._adopter = self._adopter, None
            if owner is None and adopter is not None and adopter.is_running():
                try:
                    adopter.call_soon_threadsafe(self._start_serving, adopter)
                except RuntimeError:
                    pass  # closed in the meantime
                else:
                    self._owner = owner = adopter
                    self._owner_seen = self._owner_asked = current
        if owner is not None and current - self._owner_asked >= _OWNER_CHECK:
            self._owner_asked = current
            with contextlib.suppress(RuntimeError):
                owner.call_soon_threadsafe(self._owner_ran)
        if owner is None and not self._router_polled:
            poller.register(self._router, zmq.POLLIN)
        elif owner is not None and self._router_polled:
            poller.unregister(self._router)
        self._router_polled = owner is None

    def stop(self) -> None:
        """End the thread and close the sockets (at interpreter exit)."""
        self._stopping = True
        try:
            self._wake_send.send(b"\0")
        except OSError:
            return
        self.thread.join(5)

    # -- the thread ------------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._wake_recv, zmq.POLLIN)
        for dealer in self._hubs:
            poller.register(dealer, zmq.POLLIN)
        next_refresh = time.monotonic() + self.config.heartbeat
        try:
            while not self._stopping:
                self._hand_over(poller)
                wait = max(0.0, next_refresh - time.monotonic())
                if self.held:
                    wait = min(wait, _PREFETCH_HOLD / 4)
                if not self._router_polled:
                    wait = min(wait, _OWNER_CHECK)  # notice soon a loop that stopped
                for sock, _ in poller.poll(int(wait * 1000) + 1):
                    if sock is self._router:
                        self._serve()
                    elif isinstance(sock, zmq.Socket):
                        self._registered(sock)
                    else:
                        self._take_commands()  # the wake-up socket, reported by descriptor
                if time.monotonic() >= next_refresh:
                    self._send_registrations(self._keys)
                    next_refresh = time.monotonic() + self.config.heartbeat
                if self.held:
                    self._give_back(_PREFETCH_HOLD)
        except Exception:
            logger.exception("the zmq node thread failed; process inboxes are unreachable")
        finally:
            with self._owner_lock:
                self._owner = None  # a loop still lending the socket leaves it alone now
            with contextlib.suppress(Exception):
                self._give_back(0)
            for dealer in self._hubs:
                # Long enough for the held messages just given back to leave the process.
                dealer.close(linger=_GIVE_BACK_LINGER_MS)
            self._router.close(0)
            self._wake_recv.close()
            self._wake_send.close()
            self._context.term()

    def _give_back(self, held_for: float) -> None:
        """Return messages held ``held_for`` seconds or more (0: all) to their hub queue."""
        for key, items in self.held.release(held_for):
            request_id = next(self._ids)
            header = encode("requeue", request_id, key, [channel for channel, _ in items])
            hub = self._hubs[_shard(key.partition(":")[2], self.config.names)]
            try:
                hub.send_multipart([header, *(payload for _, payload in items)], zmq.NOBLOCK)
            except zmq.ZMQError as error:
                logger.error("lost %d held message(s) of %s: %s", len(items), key, error)
                continue
            self._give_back_ids.add(request_id)

    def _take_commands(self) -> None:
        try:
            while self._wake_recv.recv(4096):
                pass
        except BlockingIOError:
            pass
        fresh: set[str] = set()
        while self._commands:
            key, future = self._commands.popleft()
            self._waiting.setdefault(key, []).append(future)
            self._keys.add(key)
            fresh.add(key)
        self._send_registrations(fresh)

    def _send_registrations(self, keys: Iterable[str]) -> None:
        by_hub: dict[int, list[str]] = {}
        for key in keys:
            by_hub.setdefault(_shard(key.partition(":")[2], self.config.names), []).append(key)
        ttl = self.config.heartbeat * 5
        for index, batch in by_hub.items():
            request_id = next(self._ids)
            header = encode("register", request_id, batch, self.endpoint, self.public_key, ttl)
            try:
                self._hubs[index].send(header, zmq.NOBLOCK)
            except zmq.Again:
                continue  # the hub is unreachable; the next heartbeat tries again
            self._requests[request_id] = batch

    def _registered(self, dealer: zmq.Socket[bytes]) -> None:
        while True:
            try:
                frames = dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                command, request_id, args = decode(frames[0])
                if request_id in self._give_back_ids:
                    self._give_back_ids.discard(request_id)
                    continue
                handed = args[0] if command == "ok" else []
            except (ValueError, IndexError):
                logger.warning("ignored a malformed answer from a hub")
                continue
            with self.lock:
                for (key, channel), payload in zip(handed, frames[1:], strict=False):
                    self.inboxes.setdefault(key, _Inbox()).put((channel, payload), None)
            for key in self._requests.pop(request_id, ()):
                for future in self._waiting.pop(key, ()):
                    if not future.done():
                        future.set_result(None)

    def _serve(self, here: asyncio.AbstractEventLoop | None = None) -> None:
        """Answer up to 256 requests; ``here``: the event loop serving, None: the thread."""
        for _ in range(256):
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                command, request_id, args = decode(frames[1])
                if command == "deliver":
                    reply = self._deliver(frames[0], args, frames[2], here)
                elif command == "send":
                    self._leased(frames[0], args[0], frames[2], here)
                    continue  # sent on a lease: the sender waits for no answer
                elif command == "flush":
                    self.flush(args[0])
                    reply = []
                else:
                    raise ValueError(f"unknown command {command!r:.40}")
            except (ValueError, IndexError, TypeError) as error:
                logger.warning("node dropped a malformed request: %s", error)
                continue
            if reply is not None:
                # A sender that is gone treats the silence as a timeout.
                with contextlib.suppress(zmq.ZMQError):
                    self._router.send_multipart(
                        [frames[0], encode("ok", request_id, *reply)], zmq.NOBLOCK
                    )

    def _deliver(
        self,
        sender: bytes,
        args: list[Any],
        payload: bytes,
        here: asyncio.AbstractEventLoop | None,
    ) -> list[Any] | None:
        items, reply_by, want = args[0], args[1], args[2]
        if items and len(payload) < HEADER_SIZE:
            raise ValueError("short payload")
        if time.time() > reply_by:
            # The sender has given up on this message: accepting it now would deliver a
            # message the sender was told failed (it may be resent through the hub).
            return None
        statuses = []
        granted = 0
        with self.lock:
            for key, channel, capacity in items:
                inbox = self.inboxes.get(key)
                if inbox is None:
                    statuses.append(UNKNOWN)
                elif inbox.put((channel, payload), capacity, sender, here):
                    statuses.append(OK)
                    if want and len(items) == 1:
                        granted = inbox.leases.grant(sender, capacity - len(inbox.items), want)
                else:
                    statuses.append(FULL)
        return [statuses, granted]

    def _leased(
        self,
        sender: bytes,
        items: list[Any],
        payloads: bytes,
        here: asyncio.AbstractEventLoop | None,
    ) -> None:
        # Messages sent on leases arrive batched: one frame holds the payloads back to
        # back, ``items`` their inbox keys, channels and sizes.
        messages = split_batch(items, payloads)
        with self.lock:
            for key, channel, payload in messages:
                inbox = self.inboxes.get(key)
                if inbox is None:
                    logger.warning("dropped a message for unknown inbox %s", key)
                    continue
                if not inbox.leases.use(sender):
                    # A lease that ran out in transit: the sender counted the message as
                    # accepted, so it is kept even if that overfills the inbox a little.
                    logger.debug("inbox %s: message past its sender's lease", key)
                inbox.put((channel, payload), None, here=here)


# -- event-loop side: request/reply links ------------------------------------------------


class _Link:
    """A DEALER socket in one event loop, matching replies to requests by id."""

    def __init__(
        self,
        owned: list[zmq.Socket[bytes]],
        endpoint: str,
        curve: _Curve | None,
        server_key: bytes | None,
        orphan: Any,
        invalidate: Callable[[str], None] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._invalidate = invalidate
        raw: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        # The backend owns the raw socket and closes it even if its event loop just ends
        # (async_to_sync); the asyncio view is a shadow that never warns on collection.
        owned.append(raw)
        raw.setsockopt(zmq.LINGER, 0)
        raw.setsockopt(zmq.MAXMSGSIZE, DEFAULT_MAX_MESSAGE)
        raw.setsockopt(zmq.SNDHWM, 100_000)
        raw.setsockopt(zmq.RCVHWM, 100_000)
        if curve is not None and server_key is not None:
            curve.client(raw, server_key)
        raw.connect(endpoint)
        self.raw = raw
        self.sock = zmq.asyncio.Socket.from_socket(raw)
        self.pending: dict[int, asyncio.Future[tuple[list[Any], list[bytes]]]] = {}
        self.pops: dict[int, str] = {}
        #: Messages were sent on a lease since the node last answered.
        self.unsettled = False
        #: Messages sent on leases, not yet written: ([key, channel, size], payload) pairs.
        self._leased: list[tuple[list[Any], bytes]] = []
        self._leased_bytes = 0
        #: Requests batched by start_batched, not yet written.
        self._requests: list[tuple[str, int, list[Any], list[bytes]]] = []
        self._last_write = 0.0
        self._orphan = orphan
        self._ids = itertools.count(1)
        self._reader = asyncio.ensure_future(self._read())

    def start(
        self,
        command: str,
        args: Sequence[Any],
        payloads: Sequence[bytes] = (),
        *,
        ahead: bool = False,
    ) -> tuple[int, asyncio.Future[tuple[list[Any], list[bytes]]]]:
        """Send a request now; its id and the future of its reply. ``ahead``: before the
        messages and requests batched in this loop step (for a request whose order does
        not matter), which then still go out together at the end of the step.
        """
        if not ahead:
            self.write_leased()
            self.write_requests()
        request_id = next(self._ids)
        future: asyncio.Future[tuple[list[Any], list[bytes]]] = (
            asyncio.get_running_loop().create_future()
        )
        try:
            self._write([encode(command, request_id, *args), *payloads])
        except zmq.ZMQError as error:
            raise BrokerError(f"cannot send to {self.endpoint}: {error}") from error
        self.pending[request_id] = future
        return request_id, future

    async def call(
        self, command: str, args: Sequence[Any], payloads: Sequence[bytes], timeout: float
    ) -> list[Any]:
        """Send a request and wait up to ``timeout`` seconds for its reply arguments."""
        request_id, future = self.start(command, args, payloads)
        try:
            # Not wait_for: on Python 3.11 it can swallow a cancellation that arrives as the
            # reply fails, and a heartbeat loop would then outlive its event loop.
            done, _ = await asyncio.wait({future}, timeout=timeout)
        finally:
            self.pending.pop(request_id, None)
        if not done:
            future.cancel()
            raise BrokerError(f"no answer from {self.endpoint} to {command!r} within {timeout:g}s")
        reply, _ = future.result()
        return reply

    def start_batched(
        self, command: str, args: Sequence[Any], payloads: Sequence[bytes]
    ) -> tuple[int, asyncio.Future[tuple[list[Any], list[bytes]]]]:
        """Like :meth:`start`, but written with the other requests of this loop step as
        one ZeroMQ message (at the end of the step, or before anything else on the link).
        """
        self.write_leased()
        request_id = next(self._ids)
        future: asyncio.Future[tuple[list[Any], list[bytes]]] = (
            asyncio.get_running_loop().create_future()
        )
        self.pending[request_id] = future
        self._requests.append((command, request_id, list(args), list(payloads)))
        if len(self._requests) >= _WANT:
            self.write_requests()
        elif len(self._requests) == 1:
            asyncio.get_running_loop().call_soon(self.write_requests)
        return request_id, future

    def _write(self, frames: list[bytes]) -> None:
        """Write ``frames`` now or raise zmq.ZMQError, as a plain socket would.

        The asyncio socket reports a send that would block (no hub connected, or its
        queue full) through the future it returns, not by raising: that future is
        settled here, so no failure goes unseen.
        """
        sent: Any = self.sock.send_multipart(frames, zmq.NOBLOCK)
        if sent.done():
            error = sent.exception()
            if error is not None:
                raise error
        else:  # not expected with NOBLOCK; still, never leave an error unretrieved
            sent.add_done_callback(_log_send_failure)

    def write_requests(self) -> None:
        """Write the batched requests now."""
        if not self._requests:
            return
        batch, self._requests = self._requests, []
        header = encode("batch", 0, [[c, rid, args, len(p)] for c, rid, args, p in batch])
        try:
            self._write([header, *(frame for *_, payloads in batch for frame in payloads)])
        except zmq.ZMQError as error:
            failed = BrokerError(f"cannot send to {self.endpoint}: {error}")
            for _command, request_id, _args, _payloads in batch:
                future = self.pending.pop(request_id, None)
                if future is not None and not future.done():
                    future.set_exception(failed)

    def send_leased(self, key: str, channel: str, payload: bytes) -> None:
        """Send a message on a lease (no reply), batched with the others of this loop step.

        Batching is what makes leased sends cheap: one ZeroMQ message, not one per send.
        Any request on this link writes the batch first, so order is kept.
        """
        self.write_requests()
        if self._leased and self._leased_bytes + len(payload) > _BATCH_BYTES:
            self.write_leased()
        self._leased.append(([key, channel, len(payload)], payload))
        self._leased_bytes += len(payload)
        self.unsettled = True
        if len(self._leased) >= _WANT or (
            len(self._leased) == 1 and time.monotonic() - self._last_write > _SPARSE
        ):
            # Sparse traffic (ping-pong) has no batch to wait for: write at once.
            self.write_leased()
        elif len(self._leased) == 1:
            asyncio.get_running_loop().call_soon(self.write_leased)

    def write_leased(self) -> None:
        """Write the batch of leased messages now."""
        if not self._leased:
            return
        batch, self._leased = self._leased, []
        self._leased_bytes = 0
        self._last_write = time.monotonic()
        header = encode("send", 0, [item for item, _ in batch])
        try:
            self._write([header, b"".join(payload for _, payload in batch)])
        except zmq.ZMQError as error:
            # The senders were told "sent"; like a node that dies after taking them.
            logger.error("lost %d message(s) sent to %s: %s", len(batch), self.endpoint, error)

    def fail_pops(self) -> None:
        for request_id in self.pops:
            future = self.pending.get(request_id)
            if future is not None and not future.done():
                future.set_exception(_Restarted())

    async def _read(self) -> None:
        while True:
            self._handle(await self.sock.recv_multipart())

    def take_answers(self) -> None:
        """Handle the messages already arrived now, without waiting for the reader's turn."""
        while True:
            try:
                # Non-blocking, as pyzmq's asyncio socket itself reads when it can.
                if not int(self.raw.get(zmq.EVENTS)) & zmq.POLLIN:
                    return
                frames = self.raw.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:
                return
            self._handle(frames)

    def _handle(self, frames: list[bytes]) -> None:
        try:
            command, request_id, args = decode(frames[0])
        except ValueError:
            logger.warning("ignored a malformed answer from %s", self.endpoint)
            return
        if command == "ginval":
            # The hub is changing a group we hold the members of: drop them, then say so
            # (the change is answered once we have).
            if self._invalidate is not None and args and isinstance(args[0], str):
                self._invalidate(args[0])
            with contextlib.suppress(zmq.ZMQError):
                self._write([encode("gack", request_id)])
            return
        future = self.pending.pop(request_id, None)
        key = self.pops.pop(request_id, None)
        if command == "error":
            error = BrokerError(f"{self.endpoint} refused the request: {args[0]}")
            if future is not None and not future.done():
                future.set_exception(error)
            return
        if future is not None and not future.done():
            future.set_result((args, frames[1:]))
        elif key is not None and args and args[0]:
            # A pop answered after its caller gave up: put the messages back.
            self._orphan(self, key, args[0], frames[1:])

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):  # no running loop: nothing can be written
            self.write_leased()
            self.write_requests()
        self._reader.cancel()
        # Closing the asyncio view first unregisters its file descriptor from the loop:
        # a stale registration would steal the wake-ups of a later socket reusing the fd.
        self.sock.close(0)
        self.raw.close(0)
        closed = BrokerError(f"the connection to {self.endpoint} was closed")
        for future in self.pending.values():
            if not future.done():
                # An error, not a cancellation: a send sharing this link must not look
                # cancelled to its caller; it falls back to the hub instead.
                future.set_exception(closed)
                future.exception()  # marks it retrieved when nobody awaits it any more
        self.pending.clear()


#: Inbox key -> (node endpoint, node public key), shared by every backend of the process.
_directory: dict[str, tuple[str, str]] = {}


class ZmqBackend(Backend):
    """Channel layer backend on ZeroMQ: see the module documentation."""

    capabilities: ClassVar[Capabilities] = Capabilities(
        multiprocess=True,
        native_expiry=True,
        native_fanout=True,
        restartable=False,
        restores_memberships=True,
        queue_depth=True,
        group_sizes=True,
    )
    extra: ClassVar[str | None] = "zmq"
    options: ClassVar[Mapping[str, Option]] = {
        "timeout": Option(float, 10.0, "seconds to wait for a hub's answer", minimum=0.01),
        "peer_timeout": Option(
            float, 2.0, "seconds to wait for another process before using the hub", minimum=0.01
        ),
        "heartbeat": Option(
            float, 1.0, "seconds between hub pings and inbox re-registrations", minimum=0.05
        ),
        "advertise": Option(str, "", "address other processes reach this process's node at"),
        "curve_serverkey": Option(str, "", "the hub's CURVE public key (Z85)", check=_check_key),
        "curve_secretkey": Option(
            str, "", "this process's CURVE secret key (Z85)", secret=True, check=_check_key
        ),
    }

    @classmethod
    def check_url(cls, url: LayerURL, options: Mapping[str, Any]) -> None:
        if url.scheme == "zmq+ipc":
            if url.hosts or not url.path:
                raise ConfigurationError(
                    f"{url.sanitized()}: write a ZeroMQ IPC hub as zmq+ipc:///path/to/hub.sock"
                )
        elif not url.hosts or any(port is None for _, port in url.hosts):
            raise ConfigurationError(
                f"{url.sanitized()}: write ZeroMQ hubs as zmq://HOST:PORT[,HOST:PORT...]"
            )
        if options.get("curve_secretkey") and not options.get("curve_serverkey"):
            raise ConfigurationError(
                f"{url.sanitized()}: curve_secretkey needs curve_serverkey (the hub's public key)"
            )

    @classmethod
    def versions(cls) -> dict[str, str]:
        return {"pyzmq": zmq.__version__, "libzmq": zmq.zmq_version()}

    def __init__(self, url: LayerURL, settings: LayerSettings, options: Mapping[str, Any]):
        super().__init__(url, settings, options)
        largest = largest_payload(settings.max_message_size, encrypted=True)
        if largest > DEFAULT_MAX_MESSAGE:
            # Nodes and hubs refuse frames beyond this (a hub's --max-message-size may be
            # larger, but nodes would still drop such messages from other processes).
            raise ConfigurationError(
                f"{url.sanitized()}: max_message_size={settings.max_message_size} makes "
                f"payloads of up to {largest} bytes encrypted, more than the "
                f"{DEFAULT_MAX_MESSAGE} bytes ZeroMQ nodes and hubs accept in one frame"
            )
        if url.scheme == "zmq+ipc":
            self._hubs: tuple[str, ...] = (f"ipc:///{url.path.lstrip('/')}",)
            self._hub_names: tuple[str, ...] = self._hubs
        else:
            self._hubs = tuple(
                f"tcp://{f'[{host}]' if ':' in host else host}:{port}" for host, port in url.hosts
            )
            self._hub_names = tuple(f"{host}:{port}" for host, port in url.hosts)
        self._prefix = settings.prefix + ":"
        self._timeout: float = self.config["timeout"]
        self._peer_timeout: float = self.config["peer_timeout"]
        self._heartbeat: float = self.config["heartbeat"]
        self._curve = self._curve_keys()
        self._links: list[_Link] = []
        self._peers: dict[str, _Link] = {}
        #: Inbox key -> [places leased to us, monotonic time to stop using them].
        self._credits: dict[str, list[Any]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        #: Group sends the hub has not answered yet (it answers once members have them).
        self._group_sends: set[asyncio.Future[Any]] = set()
        #: group sends waiting for fewer than _GROUP_SENDS_IN_FLIGHT to be in flight, in
        #: order: each answer wakes one (waiting on the whole in-flight set woke them all).
        self._room_waiters: deque[asyncio.Future[None]] = deque()
        #: Group -> (its members and their expiry times, None if too many to fan out here;
        #: monotonic end of use), kept valid by the hub: it answers no change to the group
        #: before we drop the copy.
        self._group_copies: dict[str, tuple[list[tuple[str, float]] | None, float]] = {}
        #: Copies asked for and not answered yet, by group: (answer, monotonic time asked,
        #: invalidations received when asked).
        self._asking: dict[str, tuple[asyncio.Future[Any], float, int]] = {}
        #: Invalidations received, so that a copy fetched meanwhile is not kept.
        self._invalidations = 0
        self._node: _Node | None = None
        self._owned: list[zmq.Socket[bytes]] = []
        weakref.finalize(self, _close_all, self._owned)

    def _curve_keys(self) -> _Curve | None:
        server = self.config["curve_serverkey"]
        if not server:
            return None
        secret = self.config["curve_secretkey"]
        if secret:
            public = zmq.curve_public(secret.encode())
            return _Curve(server.encode(), public, secret.encode())
        public, generated = _process_keys()
        return _Curve(server.encode(), public, generated)

    def _node_bind(self) -> str:
        if self.url.scheme == "zmq+ipc":
            return f"{self._hubs[0]}.{os.getpid()}.{secrets.token_hex(4)}"
        host = self.config["advertise"] or _route_to(self.url.hosts[0][0], self.url.hosts[0][1])
        return f"tcp://{host}:*"

    async def open(self) -> None:
        self._node = _start_node(
            _NodeConfig(self._hubs, self._hub_names, "", self._heartbeat, self._curve),
            self._node_bind,
        )
        server = self._curve.server_key if self._curve else None
        self._links = [
            _Link(self._owned, endpoint, self._curve, server, self._orphan, self._invalidate)
            for endpoint in self._hubs
        ]
        self._tasks = [asyncio.ensure_future(self._watch(link)) for link in self._links]

    async def close(self) -> None:
        if self._group_sends:
            await asyncio.wait(set(self._group_sends), timeout=self._timeout)
        if self._node is not None:
            self._node.release(asyncio.get_running_loop())
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        links = (*self._links, *self._peers.values())
        for link in links:
            link.close()
        # Their readers were cancelled: let them end inside close(), not after it.
        await asyncio.gather(*(link._reader for link in links), return_exceptions=True)
        self._links, self._peers, self._tasks = [], {}, []
        _close_all(self._owned)

    async def broker_version(self) -> str:
        reply = await self._links[0].call("ping", (), (), self._timeout)
        return f"multilayer hub {reply[1]}"

    def _link(self, name: str) -> _Link:
        return self._links[_shard(name, self._hub_names)]

    async def _watch(self, link: _Link) -> None:
        """Ping the hub; when it comes back as a new process, re-issue parked pops."""
        epoch = None
        lost = False
        # Memberships this layer made that the restarted hub holds no more; kept until
        # re-asserted, so that a hub lost again meanwhile is retried on the next ping.
        restore = False
        while True:
            try:
                reply = await link.call("ping", (), (), self._heartbeat * 3)
            except BrokerError:
                lost = True
                await asyncio.sleep(self._heartbeat)
                continue
            restarted = epoch is not None and reply[0] != epoch
            if restarted:
                logger.warning("hub %s restarted; its queues and groups are gone", link.endpoint)
                link.fail_pops()
                self._group_copies.clear()
                restore = True
            if lost or restarted:
                self.reconnects += 1
                lost = False
            epoch = reply[0]
            if restore:
                restore = not await self._reassert_on(link)
            await asyncio.sleep(self._heartbeat)

    async def _reassert_on(self, link: _Link) -> bool:
        """Re-add the memberships of the groups ``link``'s hub holds; False if it failed."""
        # Every process notices a restarted hub within one heartbeat: spread their
        # re-assertions over that heartbeat rather than sending them all at once.
        await asyncio.sleep(random.uniform(0.0, min(self._heartbeat, 0.5)))
        try:
            await self.reassert_memberships(lambda group, _channel: self._link(group) is link)
        except BrokerError as error:
            logger.warning("hub %s: re-asserting memberships failed: %s", link.endpoint, error)
            return False
        return True

    # -- inboxes -----------------------------------------------------------------------

    async def declare_inbox(self, inbox: str) -> None:
        assert self._node is not None
        future = self._node.register(self._prefix + inbox)
        try:
            await asyncio.wait_for(asyncio.wrap_future(future), self._timeout)
        except asyncio.TimeoutError:
            raise BrokerError(
                f"hub {self.url.sanitized()} did not register inbox {inbox!r} "
                f"within {self._timeout:g}s"
            ) from None

    # -- messages ----------------------------------------------------------------------

    async def push(self, channel: str, payload: bytes, *, deadline: float, capacity: int) -> None:
        name = non_local_name(channel)
        key = self._prefix + name
        # A name ending in "!" is a process inbox itself (a group envelope is pushed to
        # it): like its channels, it lives on the owner's node, not in a hub queue.
        if "!" not in channel:
            status = await self._push_normal(key, name, channel, payload, capacity)
        else:
            status = await self._push_specific(key, name, channel, payload, capacity)
        if status == FULL:
            raise ChannelFull(f"channel {channel!r} is full ({capacity} messages waiting)")

    async def _push_normal(
        self, key: str, name: str, channel: str, payload: bytes, capacity: int
    ) -> int:
        # The hub leases places like a node does (see _push_specific): sends on a lease
        # cost no round trip, and ChannelFull stays exact for one sender.
        link = self._link(name)
        if self._use_credit(key):
            link.send_leased(key, channel, payload)
            return OK
        reply = await link.call("push", (key, channel, capacity, _WANT), (payload,), self._timeout)
        self._store_credit(key, reply[1] if len(reply) > 1 else 0)
        status: int = reply[0]
        return status

    def _use_credit(self, key: str) -> bool:
        """Take one place of a lease held on ``key``; False when none is usable."""
        credit = self._credits.get(key)
        if credit is None or credit[0] <= 0 or time.monotonic() >= credit[1]:
            return False
        credit[0] -= 1
        return True

    def _store_credit(self, key: str, granted: int) -> None:
        """Remember a lease of ``granted`` places on ``key`` (0: none)."""
        if granted:
            # Use the lease for half its life, so it cannot lapse in transit.
            self._credits[key] = [granted, time.monotonic() + LEASE / 2]
        else:
            self._credits.pop(key, None)

    async def _push_specific(
        self, key: str, name: str, channel: str, payload: bytes, capacity: int
    ) -> int:
        known = _directory.get(key)
        if known is not None:
            if self._group_sends:
                # A group send forwarded by the hub must reach the node before this does.
                await asyncio.wait(set(self._group_sends))
            peer = self._peer(*known)
            if self._use_credit(key):
                peer.send_leased(key, channel, payload)
                return OK
            peer.unsettled = False  # the node answers in order: this answer settles all
            reply_by = time.time() + self._peer_timeout
            try:
                reply = await peer.call(
                    "deliver",
                    ([[key, channel, capacity]], reply_by, _WANT),
                    (payload,),
                    self._peer_timeout,
                )
            except BrokerError:
                logger.info("process node %s did not answer; asking the hub", peer.endpoint)
                self._forget(key, peer)
            else:
                status: int = reply[0][0]
                if status != UNKNOWN:
                    self._store_credit(key, reply[1])
                    return status
                self._forget(key, peer)
        await self._settle()
        reply = await self._link(name).call(
            "spush", (key, channel, capacity), (payload,), self._timeout + self._peer_timeout
        )
        if reply[1]:
            _directory[key] = (reply[1], reply[2] or "")
        status = reply[0]
        return status

    async def _settle(self) -> None:
        """Wait until nodes have stored what we sent them on leases.

        A message routed through the hub must not overtake, on its way to a node, an
        earlier message this backend sent straight to that node.
        """
        unsettled = [peer for peer in self._peers.values() if peer.unsettled]
        if not unsettled:
            return
        reply_by = time.time() + self._peer_timeout
        results = await asyncio.gather(
            *(
                peer.call("deliver", ([], reply_by, 0), (b"",), self._peer_timeout)
                for peer in unsettled
            ),
            return_exceptions=True,
        )
        for peer, result in zip(unsettled, results, strict=True):
            if not isinstance(result, BaseException):
                peer.unsettled = False

    def _peer(self, endpoint: str, public_key: str) -> _Link:
        link = self._peers.get(endpoint)
        if link is None:
            server = public_key.encode() if public_key else None
            link = self._peers[endpoint] = _Link(
                self._owned, endpoint, self._curve, server, self._orphan
            )
        return link

    def _forget(self, key: str, peer: _Link) -> None:
        _directory.pop(key, None)
        self._credits.pop(key, None)
        if self._peers.get(peer.endpoint) is peer:
            del self._peers[peer.endpoint]
            peer.close()

    def pop_nowait(self, queue: str, limit: int) -> list[Item]:
        """Messages already in this process: in its inbox, or held from a normal pop."""
        node = self._node
        if node is None:
            return []
        key = self._prefix + queue
        if not queue.endswith("!"):
            return node.held.take(key, limit)
        with node.lock:
            inbox = node.inboxes.get(key)
            return inbox.take(limit) if inbox is not None else []

    async def pop(self, queue: str, limit: int) -> list[Item]:
        if queue.endswith("!"):
            return await self._pop_inbox(self._prefix + queue, limit)
        return await self._pop_hub(self._prefix + queue, queue, limit)

    async def _pop_inbox(self, key: str, limit: int) -> list[Item]:
        node = self._node
        assert node is not None
        while True:
            with node.lock:
                inbox = node.inboxes.setdefault(key, _Inbox())
                taken = inbox.take(limit)
                if taken:
                    return taken
                loop = asyncio.get_running_loop()
                future = loop.create_future()
                inbox.waiters.append(future)
            node.serve_in(loop)
            try:
                await future
            finally:
                if not future.done():
                    future.cancel()
                    with node.lock:
                        if future in inbox.waiters:
                            inbox.waiters.remove(future)

    async def _pop_hub(self, key: str, name: str, limit: int) -> list[Item]:
        node = self._node
        assert node is not None
        held = node.held.take(key, limit)
        if held:
            return held
        link = self._link(name)
        while True:
            request_id, future = link.start("pop", (key, max(limit, _PREFETCH), _POP_WAIT))
            link.pops[request_id] = key
            try:
                done, _ = await asyncio.wait({future}, timeout=_POP_WAIT + self._timeout)
            except asyncio.CancelledError:
                await self._abandon(link, key, request_id, future)
                raise
            if not done:
                link.pending.pop(request_id, None)
                continue  # a lost request (hub restart): ask again; a late answer is requeued
            try:
                args, frames = future.result()
            except _Restarted:
                # Keep the pop's key: should the new hub answer it after all, the reader
                # requeues what it brings.
                link.pending.pop(request_id, None)
                continue
            if args[0]:
                items = list(zip(args[0], frames, strict=True))
                node.held.hold(key, items[limit:])
                return items[:limit]

    async def _abandon(
        self, link: _Link, key: str, request_id: int, future: asyncio.Future[Any]
    ) -> None:
        """Withdraw a pop; messages the hub had already sent for it go back to the queue."""
        try:
            await link.call("cancel", (key, request_id), (), _ABANDON_WAIT)
        except BrokerError as error:
            logger.warning("could not withdraw a receive from %s: %s", link.endpoint, error)
        # The hub answers in order, so the pop's own answer, if any, has arrived by now.
        link.pending.pop(request_id, None)
        link.pops.pop(request_id, None)
        if future.done() and not future.cancelled() and future.exception() is None:
            args, frames = future.result()
            if args[0]:
                self._orphan(link, key, args[0], frames)

    def _orphan(self, link: _Link, key: str, channels: list[str], frames: list[bytes]) -> None:
        try:
            link.start("requeue", (key, channels), frames)
        except BrokerError as error:
            logger.error("lost %d message(s) of %s: %s", len(channels), key, error)

    # -- groups ------------------------------------------------------------------------

    async def group_add(self, group: str, channel: str, *, deadline: float) -> None:
        await self._link(group).call(
            "gadd", (self._prefix + group, channel, deadline), (), self._timeout
        )

    async def group_discard(self, group: str, channel: str) -> None:
        await self._link(group).call("gdiscard", (self._prefix + group, channel), (), self._timeout)

    async def group_members(self, group: str) -> Iterable[str]:
        reply = await self._link(group).call("gmembers", (self._prefix + group,), (), self._timeout)
        members: list[str] = reply[0]
        return members

    def _invalidate(self, group: str) -> None:
        self._invalidations += 1
        self._group_copies.pop(group.removeprefix(self._prefix), None)

    def _ask_copy(self, group: str) -> None:
        """Ask the hub, now, for the members of ``group`` if it is small (see group_send)."""
        link = self._links[0]
        asked, invalidations = time.monotonic(), self._invalidations
        args = (self._prefix + group, _DIRECT_FANOUT, _DIRECT_MEMBERS)
        _, future = link.start("gwatch", args, ahead=True)
        self._asking[group] = (future, asked, invalidations)
        future.add_done_callback(lambda _: self._copy_answered(group))

    def _copy_answered(self, group: str) -> None:
        """Keep the copy the hub answered for ``group``, if it has answered."""
        asking = self._asking.get(group)
        if asking is None or not asking[0].done():
            return
        del self._asking[group]
        future, asked, invalidations = asking
        if future.cancelled() or future.exception() is not None:
            return
        members, lease = future.result()[0]
        if invalidations != self._invalidations:
            return  # the group may have changed since the hub answered
        if len(self._group_copies) >= 1000:
            current = time.monotonic()
            for name in [n for n, (_, end) in self._group_copies.items() if end <= current]:
                del self._group_copies[name]
        if members is None:  # too large: the hub fans out; ask again after a while
            self._group_copies[group] = (None, asked + _LARGE_GROUP_HINT)
        else:  # used for half the lease, counted from before asking: never beyond it
            copy = [(channel, until) for channel, until in members]
            self._group_copies[group] = (copy, asked + lease / 2)

    async def group_send(
        self, group: str, payload: bytes, *, deadline: float, capacity: CapacityPolicy
    ) -> None:
        if len(self._links) > 1:
            # Members' queues live on other hubs: fetch the members, push to each hub.
            await super().group_send(group, payload, deadline=deadline, capacity=capacity)
            return
        copy = self._group_copies.get(group)
        if (copy is None or time.monotonic() >= copy[1]) and len(self._group_sends) >= _STREAMING:
            asking = self._asking.get(group)
            if asking is None or time.monotonic() - asking[1] > self._timeout:
                self._ask_copy(group)  # answered while this and the next sends go to the hub
            else:
                # Pick the answer up now if it has come, not when this task next yields:
                # fewer sends queue at the hub meanwhile.
                self._links[0].take_answers()
                self._copy_answered(group)
            copy = self._group_copies.get(group)
        if copy is not None and copy[0] is not None and time.monotonic() < copy[1]:
            # Straight to each member's node or queue, on leases when held (no round trip):
            # a normal member gets its own copy, a process inbox one envelope for all of
            # its members there.
            current = time.time()
            inboxes, normal = split(member for member in copy[0] if member[1] > current)
            targets = [(channel, payload, 1) for channel, _until in normal] + [
                (inbox, seal(payload, group, current, inbox, local), len(local))
                for inbox, local in inboxes.items()
            ]
            # An envelope larger than a node takes in one frame (a payload near the size
            # limit, many members) goes through the hub, which copies it per member.
            if all(len(data) <= DEFAULT_MAX_MESSAGE for _target, data, _members in targets):
                full = 0
                for target, data, members in targets:
                    limit = capacity.for_channel(target)
                    try:
                        await self.push(target, data, deadline=deadline, capacity=limit)
                    except ChannelFull:
                        full += members
                self.skip_full_members(group, full, sum(members for *_, members in targets))
                return
        await self._settle()
        overrides: dict[str, int] = {}
        if not capacity.uniform:
            # By queue, as the hub counts capacity: a normal member, or a process inbox.
            queues = {non_local_name(m) for m in await self.group_members(group)}
            overrides = {queue: capacity.for_channel(queue) for queue in queues}
        while len(self._group_sends) >= _GROUP_SENDS_IN_FLIGHT:
            room = asyncio.get_running_loop().create_future()
            self._room_waiters.append(room)
            try:
                await room
            except asyncio.CancelledError:
                if room.done() and not room.cancelled():
                    self._make_room()  # the room this task was given goes to the next
                raise
        # The hub fans out on its own; waiting for its answer (which comes once the members'
        # nodes have the message) would only delay the log lines about full members.
        link = self._links[0]
        request_id, future = link.start_batched(
            "gsend",
            (self._prefix + group, self.settings.prefix, capacity.default, overrides),
            (payload,),
        )
        timer = asyncio.get_running_loop().call_later(
            self._timeout + self._peer_timeout, _time_out, future, "group_send", link.endpoint
        )
        self._group_sends.add(future)

        def answered(future: asyncio.Future[Any]) -> None:
            self._group_sends.discard(future)
            self._make_room()
            link.pending.pop(request_id, None)
            timer.cancel()
            if future.cancelled():
                return
            error = future.exception()
            if error is not None:
                logger.warning("group_send to %r may not have reached everyone: %s", group, error)
                return
            # The hub answers with the full members and, since it sends envelopes, the
            # number of live members it reached for (older hubs: the full ones only).
            reply = future.result()[0]
            self.skip_full_members(group, len(reply[0]), reply[1] if len(reply) > 1 else None)

        future.add_done_callback(answered)

    def _make_room(self) -> None:
        while self._room_waiters:
            waiter = self._room_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def broker_stats(self) -> BrokerStats:
        """Each hub's queues and groups, plus this process's own inboxes; the inboxes of
        other processes live in those processes and are not counted."""
        await self._settle()
        replies = await asyncio.gather(
            *(
                link.call("stats", (self.settings.prefix,), (), self._timeout)
                for link in self._links
            )
        )
        queues: dict[str, int] = {}
        groups: dict[str, int] = {}
        for hub_queues, hub_groups in replies:
            for name, count in hub_queues.items():
                queues[name] = queues.get(name, 0) + count
            for name, count in hub_groups.items():
                groups[name] = groups.get(name, 0) + count
        if self._node is not None:
            current = now()
            start = len(self._prefix)
            with self._node.lock:
                for key, inbox in self._node.inboxes.items():
                    if key.startswith(self._prefix):
                        live = sum(1 for _channel, p in inbox.items if deadline_of(p) > current)
                        queues[key[start:]] = queues.get(key[start:], 0) + live
        return BrokerStats(
            queues={name: count for name, count in queues.items() if count},
            groups={name: count for name, count in groups.items() if count},
        )

    async def flush(self) -> None:
        assert self._node is not None
        await asyncio.gather(
            *(
                link.call("flush", (self.settings.prefix,), (), self._timeout + self._peer_timeout)
                for link in self._links
            )
        )
        self._node.flush(self._prefix)


def _time_out(future: asyncio.Future[Any], command: str, endpoint: str) -> None:
    if not future.done():
        future.set_exception(BrokerError(f"no answer from {endpoint} to {command!r} in time"))


def _close_all(sockets: list[zmq.Socket[bytes]]) -> None:
    for sock in sockets:
        sock.close(0)
    sockets.clear()


def _start_node(config: _NodeConfig, bind: Callable[[], str]) -> _Node:
    """The process's node for ``config``, started on ``bind()`` if there is none yet."""
    with _Node.nodes_lock:
        node = _Node.nodes.get(config)
        if node is None or not node.thread.is_alive():
            bound = _NodeConfig(config.hubs, config.names, bind(), config.heartbeat, config.curve)
            node = _Node.nodes[config] = _Node(bound)
        return node


_keys_lock = threading.Lock()
_keys: list[tuple[bytes, bytes]] = []


def _process_keys() -> tuple[bytes, bytes]:
    """A CURVE key pair made once per process, when the URL names none."""
    with _keys_lock:
        if not _keys:
            _keys.append(zmq.curve_keypair())
        return _keys[0]


def _route_to(host: str, port: int | None) -> str:
    """The local address this host uses to reach ``host``: where peers can reach us too."""
    try:
        if ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:
        if host == "localhost":
            return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, port or 9))
            address: str = probe.getsockname()[0]
            return address
    except OSError:
        return "127.0.0.1"


def _log_send_failure(sent: asyncio.Future[Any]) -> None:
    if not sent.cancelled() and sent.exception() is not None:
        logger.error("a write to the hub or a node failed: %s", sent.exception())
