"""The hub's poll loop: sockets, CURVE, request dispatch and the periodic sweep."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import zmq

from ....serialization import deadline_of
from ..protocol import BadRequest, decode, encode
from ..security import Gate, RefusalLog, is_loopback
from .groups import GroupCommands
from .queues import QueueCommands

__all__ = ["Hub"]

logger = logging.getLogger(__name__.rpartition(".")[0])

_SWEEP_EVERY = 0.5


class Hub(QueueCommands, GroupCommands):
    """The hub: its poll loop and command dispatch; ``main`` builds one from a command line."""

    # -- lifecycle -------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to end after the current step (safe from a signal handler)."""
        self._stopping = True

    def run(self) -> None:
        """Bind, serve until :meth:`stop`, then release every socket."""
        if any(secret is not None for secret in self._secrets):
            self._gate = Gate(self._context, self._allowed, RefusalLog(logger))
            if self._allowed is None and not all(map(is_loopback, self.binds)):
                logger.warning(
                    "CURVE without --curve-allow: any client that knows the hub's public key "
                    "may connect, and a public key is no secret"
                )
        try:
            for slot, secret in enumerate(self._secrets):
                if slot == 0 or secret is not None:
                    self._listeners.open(slot, secret, self._gate)
            self._loop()
        finally:
            for link in self._links.values():
                link.close(0)
            self._listeners.close_all(self._gate)
            if self._gate is not None:
                self._gate.stop()
            self._context.term()
            logger.info("hub stopped")

    def rekey(self, slot: int, secret: bytes | None) -> None:
        """Serve CURVE secret key ``secret`` on the endpoints of ``slot`` (0: ``binds``, 1:
        ``next_binds``), or stop listening there (None), at the next step of the loop.
        Safe from a signal handler; see docs/backends/zmq.md on rolling the hub's key."""
        self._next_secrets[slot] = secret

    def _apply_key(self, slot: int, secret: bytes | None) -> None:
        listeners = self._listeners
        if secret == listeners.secrets[slot] and (secret is not None) == listeners.is_open(slot):
            return
        if self._gate is None or not (self.binds, self._next_binds)[slot]:
            logger.error(
                "ignored a key for %s: no CURVE or no endpoint", ("--bind", "--next-bind")[slot]
            )
            return
        if secret is None and not listeners.is_open(1 - slot):
            logger.error("kept the hub's last key: the other slot does not listen")
            return
        before = listeners.link_key
        listeners.close(slot, self._gate)
        if secret is not None:
            try:
                listeners.open(slot, secret, self._gate)
            except zmq.ZMQError as error:
                logger.error("cannot listen with the new key: %s", error)
        if listeners.link_key != before:
            # Links to nodes reconnect with the key nodes accept from now on; forwards
            # in flight on them are parked, and handed over at the nodes' next heartbeat.
            for endpoint in list(self._links):
                self._poller.unregister(self._links[endpoint])
                self._links.pop(endpoint).close(0)

    def allow(self, keys: list[bytes]) -> None:
        """Replace the client allow list (Z85 keys) at the next step of the loop: new
        connections are checked against it, and nodes learn it at their next heartbeat.
        Safe from a signal handler."""
        self._next_allowed = list(keys)

    def _loop(self) -> None:
        next_sweep = time.monotonic() + _SWEEP_EVERY
        while not self._stopping:
            if self._next_allowed is not None:
                self._apply_allowed(self._next_allowed)
                self._next_allowed = None
            while self._next_secrets:
                self._apply_key(*self._next_secrets.popitem())
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

    def _apply_allowed(self, keys: list[bytes]) -> None:
        if self._gate is None:
            logger.warning("ignored a new allow list: CURVE is off")
            return
        if set(keys) == set(self._allowed or ()):
            return
        self._allowed = keys
        self._gate.allow(keys)
        logger.info("allow list replaced: %d client key(s)", len(keys))

    def _drain(self, sock: zmq.Socket[bytes]) -> None:
        if self._gate is not None and self._gate.watches(sock):
            self._gate.read(sock)
            return
        slot = self._listeners.slot_of(sock)
        # A bounded batch per wake-up keeps one busy socket from starving the timers.
        for _ in range(256):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if slot is not None:
                self._on_request(bytes([slot]) + frames[0], frames[1:])
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
                raise BadRequest(f"unknown command {command!r:.40}")
            handler(self, client, request_id, args, frames)
        except (BadRequest, IndexError, TypeError, ValueError) as error:
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

    _handlers: dict[str, Callable[[Hub, bytes, int, list[Any], list[bytes]], None]] = {
        "ping": QueueCommands._ping,
        "push": QueueCommands._push,
        "send": QueueCommands._send,
        "spush": QueueCommands._spush,
        "pop": QueueCommands._pop,
        "cancel": QueueCommands._cancel,
        "requeue": QueueCommands._requeue,
        "gadd": GroupCommands._group_add,
        "gdiscard": GroupCommands._group_discard,
        "gmembers": GroupCommands._group_members,
        "gsend": GroupCommands._group_send,
        "gwatch": GroupCommands._group_watch,
        "gack": GroupCommands._group_ack,
        "flush": GroupCommands._flush,
        "register": QueueCommands._register,
        "stats": QueueCommands._stats,
    }

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
