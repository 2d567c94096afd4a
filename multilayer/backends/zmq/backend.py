"""ZeroMQ backend: ``zmq://`` and ``zmq+ipc://`` on pyzmq, with a hub and direct paths.

Features: every contract point, across processes and hosts. A hub process
(:mod:`multilayer.backends.zmq.hub`, ``multilayer hub --bind tcp://127.0.0.1:5599``)
holds normal-channel queues with capacity and expiry, group memberships with expiry, and
the directory of live process inboxes. Each process runs one *node*: a ROUTER socket on
an ephemeral port, served by a background thread (or, while an event loop waits on an
inbox, by that loop, so a message wakes its receive with no thread hop), holding the
inboxes of that process's layers. Process-specific messages go straight from sender to
node once the sender has learnt the node's endpoint (the first message travels through
the hub, which answers with the endpoint); the node checks capacity and answers ok/full,
and with an ok leases a sender that asks again a few places (all leases at most half the
free room, for 0.2 s) that it fills without waiting for answers. Normal-channel sends
get the same leases from the hub, and a pop takes up to 100 waiting messages, the ones
no receive wanted going back to the hub after 1 s. ``group_send`` is one request to the
hub, which queues a copy for each normal member and forwards to each process inbox with
members one envelope (:mod:`multilayer.fanout`) naming them, counted once against the
inbox's capacity; the receiving layer hands it to each member. To a group whose members
live in at most two queues (normal channels or inboxes) the sender sends itself, the
same copies and envelopes, from a copy of the members the hub leases it for 0.5 s and
invalidates before it answers any change to the group. Several hubs shard queues, groups
and inboxes by rendezvous hashing of the name.
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

from ...backend import BrokerStats, now
from ...serialization import deadline_of
from .groups import GroupSends
from .receives import Receives

__all__ = ["ZmqBackend"]


class ZmqBackend(GroupSends, Receives):
    """Channel layer backend on ZeroMQ: see the module documentation.

    Its parts live in one module each: :class:`~.core.ZmqCore` (options, links, node,
    hub restarts), :class:`~.sends.Sends`, :class:`~.receives.Receives` and
    :class:`~.groups.GroupSends`.
    """

    async def flush(self) -> None:
        assert self._node is not None
        await asyncio.gather(
            *(
                link.call("flush", (self.settings.prefix,), (), self._timeout + self._peer_timeout)
                for link in self._links
            )
        )
        self._node.flush(self._prefix)

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
