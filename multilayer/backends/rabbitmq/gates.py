"""Exact capacity for normal channels on quorum queues.

RabbitMQ 3.10's quorum queues apply ``x-max-length`` with reject-publish as a soft limit:
the queue tells the publishing channels once it is over the limit, so publishes already
in flight get in (measured on 3.10.8: capacity 5, 60 concurrent sends from three
connections, 20 accepted; one sender waiting for each confirm: 6), and it lets
publishes in again only once it has drained below 80 % of the limit.

So a quorum normal channel has a classic *gate* queue beside it (``<prefix>::gate:<name>``)
holding one token per message, with the channel's capacity and expiry: a classic queue
checks its limit and appends in one step. A send first publishes a token to the gate,
which refuses it when the channel is full (ChannelFull still comes from the broker),
then the message, typed :data:`GATED`; whoever takes a gated message from the queue
takes a token from the gate. The quorum queue keeps its own soft limit, which bounds
the group copies dead-lettered into it (they pass no gate).

The gate is not replicated: when its node dies the count starts again from zero, so the
channel may then hold up to twice its capacity until the older messages are received.
"""

from __future__ import annotations

import asyncio
import logging

import pika.exceptions

from ...exceptions import BrokerError, ChannelFull
from .channel import Channel
from .connection import Link
from .topology import Topology

__all__ = ["GATED", "Gates"]

logger = logging.getLogger(__package__)

#: AMQP ``type`` of a message that holds a token in its channel's gate.
GATED = "="


class Gates:
    """The gates of one backend's quorum normal channels: tokens taken and given back."""

    def __init__(self, link: Link, topology: Topology) -> None:
        self.link = link
        self.topology = topology
        #: gate queue -> tokens to take from it (messages received since).
        self._debts: dict[str, int] = {}
        self._paying: asyncio.Task[None] | None = None
        self._channel: Channel | None = None

    async def admit(self, name: str, capacity: int) -> None:
        """Take a place for one message in normal channel ``name`` (ChannelFull if none)."""
        gate = self.topology.gate(name)
        outcome = await self.link.publish("", gate, b"", None, mandatory=True)
        if outcome == "returned":
            # The gate went away (its node died, flush, idle expiry): make both again.
            queue = self.topology.queue(name)
            self.topology.forget(queue)
            await self.topology.declare(queue, name)
            outcome = await self.link.publish("", gate, b"", None, mandatory=True)
        if outcome == "nack":
            raise ChannelFull(f"channel {name!r} is full ({capacity} messages waiting)")
        if outcome == "returned":
            raise BrokerError(f"RabbitMQ at {self.link.url.sanitized()} did not route to {gate!r}")

    def release(self, name: str, count: int) -> None:
        """Give back the places of ``count`` messages taken from normal channel ``name``
        (in the background; a token left behind expires with its message anyway)."""
        gate = self.topology.gate(name)
        self._debts[gate] = self._debts.get(gate, 0) + count
        if self._paying is None or self._paying.done():
            self._paying = asyncio.ensure_future(self._pay())

    async def _pay(self) -> None:
        while self._debts:
            gate = next(iter(self._debts))
            count = self._debts.pop(gate)
            try:
                if self._channel is None or not self._channel.usable:
                    self._channel = await Channel.open(await self.link.connected())
                for _ in range(count):
                    if await self._channel.get(gate) is None:
                        break  # expired meanwhile, with the messages they counted
            except (pika.exceptions.AMQPError, BrokerError) as error:
                logger.debug("giving back %d place(s) of %s: %r", count, gate, error)

    async def close(self) -> None:
        """Stop giving back places (what is left expires with its messages)."""
        if self._paying is not None:
            self._paying.cancel()
            await asyncio.gather(self._paying, return_exceptions=True)
        if self._channel is not None:
            self._channel.close()
