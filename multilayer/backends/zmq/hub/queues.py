"""The hub's commands on queues and process inboxes."""

from __future__ import annotations

import logging
import time
from collections import deque
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import zmq

from ....serialization import deadline_of
from ..protocol import FULL, OK, BadRequest, count, encode, number, split_batch, text
from .state import HubState, Job, Owner, Waiter, payload_frame

__all__ = ["QueueCommands"]

logger = logging.getLogger(__name__.rpartition(".")[0])

#: Longest a pop waits at the hub before answering empty; clients then ask again.
MAX_POP_WAIT = 30.0
#: Longest a process registration lives without being refreshed.
MAX_REGISTRATION_TTL = 120.0

try:
    _VERSION = version("multilayer")
except PackageNotFoundError:  # run from a source tree that was never installed
    _VERSION = "unknown"


class QueueCommands(HubState):
    """The commands on queues and inboxes: push, send, spush, pop, cancel, requeue, register."""

    def _ping(self, client: bytes, rid: int, args: list[Any], frames: list[bytes]) -> None:
        self._reply(client, encode("ok", rid, self.epoch, _VERSION))

    def _push(self, client: bytes, rid: int, args: list[Any], frames: list[bytes]) -> None:
        key, channel, capacity = text(args[0]), text(args[1]), count(args[2])
        want = count(args[3]) if len(args) > 3 else 0
        accepted = self._enqueue(key, channel, payload_frame(frames, 1), capacity, client)
        granted = self._lease(key, client, capacity, want) if accepted and want else 0
        self._reply(client, encode("ok", rid, OK if accepted else FULL, granted))

    def _send(self, client: bytes, rid: int, args: list[Any], frames: list[bytes]) -> None:
        # Pushes on a lease, batched, answered by nobody: the places were reserved.
        for key, channel, payload in split_batch(args[0], frames[1] if len(frames) > 1 else b""):
            leases = self.leases.get(key)
            if leases is not None:
                leases.use(client)
            self._enqueue(key, channel, payload, None)

    def _spush(self, client: bytes, rid: int, args: list[Any], frames: list[bytes]) -> None:
        key, channel, capacity = text(args[0]), text(args[1]), count(args[2])
        payload = payload_frame(frames, 1)
        owner = self.directory.get(key)
        if owner is None:
            accepted = self._enqueue(key, channel, payload, capacity)
            self._reply(client, encode("ok", rid, OK if accepted else FULL, None, None))
            return
        job = Job(client, rid, "spush", key=key)
        self._forward(job, owner, [(key, channel, capacity)], payload)

    def _pop(self, client: bytes, rid: int, args: list[Any], frames: list[bytes]) -> None:
        key, limit, wait = text(args[0]), max(1, count(args[1])), number(args[2])
        taken = self._take(key, limit, time.time())
        if taken or wait <= 0:
            self._send_taken(client, rid, key, taken)
            return
        until = time.time() + min(wait, MAX_POP_WAIT)
        self.waiters.setdefault(key, deque()).append(Waiter(client, rid, limit, until))

    def _cancel(self, client: bytes, rid: int, args: list[Any], frames: list[bytes]) -> None:
        key, pop_id = text(args[0]), count(args[1])
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
        key, channels = text(args[0]), args[1]
        if not isinstance(channels, list) or len(channels) != len(frames) - 1:
            raise BadRequest("requeue needs one channel per payload frame")
        queue = self.queues.setdefault(key, deque())
        for index in range(len(channels) - 1, -1, -1):
            queue.appendleft((text(channels[index]), payload_frame(frames, index + 1)))
        self._serve(key)
        self._reply(client, encode("ok", rid))

    def _register(self, client: bytes, rid: int, args: list[Any], frames: list[bytes]) -> None:
        keys, endpoint, public_key = args[0], text(args[1]), text(args[2])
        ttl = min(number(args[3]), MAX_REGISTRATION_TTL)
        if not isinstance(keys, list):
            raise BadRequest("register needs a list of inboxes")
        until = time.time() + ttl
        handed: list[list[str]] = []
        payloads: list[bytes] = []
        for key in map(text, keys):
            known = self.directory.get(key)
            if known is None or known.endpoint != endpoint:
                logger.info("inbox %s now lives at %s", key, endpoint)
            self.directory[key] = Owner(endpoint, public_key, until)
            # Messages parked while nobody owned the inbox go to the owner with this reply.
            for channel, payload in self.queues.pop(key, ()):
                handed.append([key, channel])
                payloads.append(payload)
        self._reply(client, encode("ok", rid, handed, self._node_clients()), *payloads)

    def _node_clients(self) -> list[str] | None:
        """The CURVE keys a node may let connect: the clients this hub allows, and the hub
        itself (it forwards to nodes); None: any CURVE client, as the hub allows."""
        hub_keys = {zmq.curve_public(s) for s in self._listeners.secrets if s is not None}
        if self._gate is None or self._gate.allowed is None or not hub_keys:
            return None
        return sorted(key.decode() for key in self._gate.allowed | hub_keys)

    def _stats(self, client: bytes, rid: int, args: list[Any], frames: list[bytes]) -> None:
        # Live messages per queue and members per group under a prefix; process inboxes
        # appear only while the hub parks messages for them (their owners hold the rest).
        start = text(args[0]) + ":"
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
