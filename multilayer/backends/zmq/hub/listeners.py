"""The hub's listening sockets: one ROUTER per key slot, two while its CURVE key rolls.

A CURVE socket serves one key pair, so a hub rolling its key serves the old one on its
``--bind`` endpoints and the new one on its ``--next-bind`` endpoints, both in front of
the same queues, groups and directory. Each client is known by its slot (one byte) and
its ROUTER routing id, so a reply leaves by the socket its request came in by.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import zmq

from ..security import Gate

__all__ = ["Listeners"]

logger = logging.getLogger(__name__.rpartition(".")[0])


class Listeners:
    """The ROUTER sockets of slots 0 (``--bind``) and 1 (``--next-bind``)."""

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        poller: zmq.Poller,
        binds: Sequence[Sequence[str]],
        max_message_size: int,
    ) -> None:
        self._context = context
        self._poller = poller
        self._binds = [list(endpoints) for endpoints in binds]
        self._max_message_size = max_message_size
        self._routers: list[zmq.Socket[bytes] | None] = [None] * len(self._binds)
        self._monitors: list[zmq.Socket[bytes] | None] = [None] * len(self._binds)
        #: The CURVE secret key each slot serves (None: plaintext, or closed).
        self.secrets: list[bytes | None] = [None] * len(self._binds)

    def open(self, slot: int, secret: bytes | None, gate: Gate | None) -> None:
        """Listen on the endpoints of ``slot``, with CURVE when ``secret`` is given."""
        router = self._context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.MAXMSGSIZE, self._max_message_size)
        router.setsockopt(zmq.SNDHWM, 100_000)
        router.setsockopt(zmq.RCVHWM, 100_000)
        if secret is not None:
            router.setsockopt(zmq.CURVE_SERVER, 1)
            router.setsockopt(zmq.CURVE_SECRETKEY, secret)
            public = zmq.curve_public(secret).decode()
            logger.info("CURVE on; hub public key %s on %s", public, ", ".join(self._binds[slot]))
        try:
            for endpoint in self._binds[slot]:
                router.bind(endpoint)
                logger.info("hub listening on %s", endpoint)
        except zmq.ZMQError:
            router.close(0)
            raise
        self._poller.register(router, zmq.POLLIN)
        if gate is not None:
            monitor = self._monitors[slot] = gate.watch(router)
            self._poller.register(monitor, zmq.POLLIN)
        self._routers[slot], self.secrets[slot] = router, secret

    def close(self, slot: int, gate: Gate | None) -> None:
        """Stop listening on the endpoints of ``slot``; its clients are cut off."""
        router, monitor = self._routers[slot], self._monitors[slot]
        if monitor is not None and gate is not None:
            self._poller.unregister(monitor)
            gate.unwatch(monitor)
        if router is not None:
            self._poller.unregister(router)
            router.close(0)
            logger.info("hub stopped listening on %s", ", ".join(self._binds[slot]))
        self._routers[slot] = self._monitors[slot] = self.secrets[slot] = None

    def is_open(self, slot: int) -> bool:
        """True while ``slot`` listens."""
        return self._routers[slot] is not None

    def slot_of(self, sock: zmq.Socket[bytes]) -> int | None:
        """The slot whose ROUTER ``sock`` is; None for any other socket."""
        for slot, router in enumerate(self._routers):
            if router is sock:
                return slot
        return None

    def send(self, client: bytes, frames: Sequence[bytes]) -> None:
        """Send to ``client`` (slot byte + routing id); zmq.ZMQError when it is gone."""
        router = self._routers[client[0]] if client and client[0] < len(self._routers) else None
        if router is None:
            raise zmq.ZMQError(zmq.EHOSTUNREACH)
        router.send_multipart([client[1:], *frames], zmq.NOBLOCK)

    @property
    def link_key(self) -> bytes | None:
        """The secret key the hub uses as a CURVE client of nodes: the first slot's."""
        return next((secret for secret in self.secrets if secret is not None), None)

    def close_all(self, gate: Gate | None) -> None:
        """Close every slot (at the end of the hub)."""
        for slot in range(len(self._routers)):
            self.close(slot, gate)
