"""The node: this process's inboxes behind one ROUTER socket, served by one thread.

Senders deliver process-specific messages here straight (``deliver``, answered per
item; ``send``, batched on a lease, unanswered); the node registers its inboxes with
their hubs every heartbeat and gives back the normal-channel messages a pop took beyond
what its receive wanted. :class:`~.loan.SocketLoan` lends the socket to a waiting loop.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import itertools
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import zmq

from ...backend import Item, now
from ...local import HeldMessages
from ...serialization import HEADER_SIZE, deadline_of
from ...toolkit import ProcessWide, wake
from .loan import OWNER_CHECK, SocketLoan
from .protocol import (
    DEFAULT_MAX_MESSAGE,
    FULL,
    OK,
    UNKNOWN,
    Leases,
    decode,
    encode,
    shard,
    split_batch,
)
from .security import Curve, Gate, RefusalLog

__all__ = ["Inbox", "Node", "NodeConfig", "running_nodes", "start_node"]

logger = logging.getLogger(__name__.rpartition(".")[0])

#: Normal-channel messages a pop took beyond what its receive wanted go back to the hub
#: after this many seconds.
PREFETCH_HOLD = 1.0
#: How long a stopping node waits for its last give-back to reach the hub (ms).
_GIVE_BACK_LINGER_MS = 2000


class Inbox:
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
        """Store ``item`` unless the inbox is full (``capacity`` None: sent on a lease), and
        wake the receives waiting; ``here`` is the event loop running in this thread."""
        if capacity is not None and len(self.items) + self.leases.reserved(sender) >= capacity:
            current = now()
            kept = [entry for entry in self.items if deadline_of(entry[1]) > current]
            if len(kept) + self.leases.reserved(sender) >= capacity:
                return False
            self.items = deque(kept)
        self.items.append(item)
        waiters, self.waiters = self.waiters, []
        for future in waiters:
            wake(future, here)
        return True

    def take(self, limit: int) -> list[Item]:
        """Up to ``limit`` unexpired messages, oldest first; expired ones are dropped."""
        taken: list[Item] = []
        current = now()
        while self.items and len(taken) < limit:
            item = self.items.popleft()
            if deadline_of(item[1]) > current:
                taken.append(item)
        return taken


@dataclass(frozen=True)
class NodeConfig:
    """What a node serves: its hubs (endpoints and shard names), where it binds, how often
    it re-registers its inboxes, and its CURVE keys."""

    hubs: tuple[str, ...]
    names: tuple[str, ...]
    bind: str
    heartbeat: float
    curve: Curve | None


class Node:
    """One per process and hub set: a ROUTER socket and the inboxes behind it.

    A thread serves the socket so that inboxes outlive any one event loop (``async_to_sync``
    runs each call in a fresh loop) and the hub hears from the process between calls.
    While an event loop waits on an inbox, the thread lends it the ROUTER socket: the loop
    reads it like any asyncio socket and a message for a receive in that loop wakes it
    directly, without a hop through this thread (:class:`~.loan.SocketLoan`).
    """

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.lock = threading.Lock()
        self.inboxes: dict[str, Inbox] = {}
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._router = self._context.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.MAXMSGSIZE, DEFAULT_MAX_MESSAGE)
        self._router.setsockopt(zmq.RCVHWM, 100_000)
        self._router.setsockopt(zmq.SNDHWM, 100_000)
        public = b""
        #: With CURVE, only the clients the hubs allow connect (the hubs send their list
        #: with every registration answer); until the first, only the hubs themselves.
        self._gate: Gate | None = None
        if config.curve is not None:
            self._gate = Gate(
                self._context, (), RefusalLog(logger), always=(config.curve.server_key,)
            )
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
        self.loan = SocketLoan(self._router, self._serve, self._poke)
        self.thread = threading.Thread(target=self._run, name="multilayer zmq node", daemon=True)
        self.thread.start()
        atexit.register(self.stop)
        logger.debug("node of process %d listens on %s", os.getpid(), self.endpoint)

    def register(self, key: str) -> concurrent.futures.Future[None]:
        """Make inbox ``key`` exist here and be known to its hub; the future ends when it is."""
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self.lock:
            self.inboxes.setdefault(key, Inbox())
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
        self.loan.ask(loop)

    def release(self, loop: asyncio.AbstractEventLoop) -> None:
        """Give the ROUTER socket back to the thread if ``loop`` (this thread's) serves it."""
        self.loan.give_back(loop)

    @property
    def lent_to(self) -> asyncio.AbstractEventLoop | None:
        """The event loop serving the ROUTER socket now; None: the node's thread."""
        return self.loan.owner

    def _poke(self) -> None:
        self._wake_send.send(b"\0")

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
        if self._gate is not None:
            poller.register(self._gate.watch(self._router), zmq.POLLIN)
        next_refresh = time.monotonic()  # with CURVE, ask for the allow lists at once
        try:
            while not self._stopping:
                self.loan.hand_over(poller)
                wait = max(0.0, next_refresh - time.monotonic())
                if self.held:
                    wait = min(wait, PREFETCH_HOLD / 4)
                if not self.loan.polled:
                    wait = min(wait, OWNER_CHECK)  # notice soon a loop that stopped
                for sock, _ in poller.poll(int(wait * 1000) + 1):
                    if sock is self._router:
                        self._serve()
                    elif self._gate is not None and self._gate.watches(sock):
                        self._gate.read(sock)
                    elif isinstance(sock, zmq.Socket):
                        self._registered(sock)
                    else:
                        self._take_commands()  # the wake-up socket, reported by descriptor
                if time.monotonic() >= next_refresh:
                    self._send_registrations(self._keys)
                    next_refresh = time.monotonic() + self.config.heartbeat
                if self.held:
                    self._give_back(PREFETCH_HOLD)
        except Exception:
            logger.exception("the zmq node thread failed; process inboxes are unreachable")
        finally:
            self.loan.end()
            with contextlib.suppress(Exception):
                self._give_back(0)
            for dealer in self._hubs:
                # Long enough for the held messages just given back to leave the process.
                dealer.close(linger=_GIVE_BACK_LINGER_MS)
            if self._gate is not None:
                self._gate.stop()
            self._router.close(0)
            self._wake_recv.close()
            self._wake_send.close()
            self._context.term()

    def _give_back(self, held_for: float) -> None:
        """Return messages held ``held_for`` seconds or more (0: all) to their hub queue."""
        for key, items in self.held.release(held_for):
            request_id = next(self._ids)
            header = encode("requeue", request_id, key, [channel for channel, _ in items])
            hub = self._hubs[shard(key.partition(":")[2], self.config.names)]
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
        # With CURVE every hub hears from us, inboxes or not: its answer has the allow list.
        by_hub: dict[int, list[str]] = {i: [] for i in range(len(self._hubs)) if self._gate}
        for key in keys:
            by_hub.setdefault(shard(key.partition(":")[2], self.config.names), []).append(key)
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
                if self._gate is not None and len(args) > 1 and request_id in self._requests:
                    self._gate.allow_from(self._hubs.index(dealer), args[1])
            except (ValueError, IndexError):
                logger.warning("ignored a malformed answer from a hub")
                continue
            with self.lock:
                for (key, channel), payload in zip(handed, frames[1:], strict=False):
                    self.inboxes.setdefault(key, Inbox()).put((channel, payload), None)
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


class _Slot:
    """Where the node of one configuration lives; a node whose thread died is replaced."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.node: Node | None = None


#: The nodes of this process, by configuration without the bound address: kept for the
#: process's life (inboxes outlive any one event loop and any one layer).
_nodes: ProcessWide[_Slot] = ProcessWide(keep=True)


def start_node(config: NodeConfig, bind: Callable[[], str], user: object) -> Node:
    """The process's node for ``config``, started on ``bind()`` if there is none yet."""
    slot = _nodes.use((config.hubs, config.names, config.heartbeat, config.curve), user, _Slot)
    with slot.lock:
        if slot.node is None or not slot.node.thread.is_alive():
            slot.node = Node(replace(config, bind=bind()))
        return slot.node


def running_nodes() -> list[Node]:
    """The nodes of this process whose thread runs."""
    nodes = (slot.node for slot in _nodes.under(()))
    return [node for node in nodes if node is not None and node.thread.is_alive()]
