"""The ZeroMQ backend (``zmq://``, ``zmq+ipc://``): a hub process plus one node per process.

ZeroMQ is a socket library, not a broker, so the backend ships a hub; docs/backends/zmq.md
tells the whole design, its faults and its figures. Where things live:

* :mod:`.protocol`: the wire format every piece speaks (msgpack header frame, payload
  frames, batches of leased sends), item statuses, :class:`~.protocol.Leases` (places of
  a queue reserved for one sender) and :func:`~.protocol.shard` (rendezvous hashing of a
  name over several hubs).
* :mod:`.backend`: :class:`ZmqBackend`, the class the ``zmq`` and ``zmq+ipc`` entry points
  name. It is put together from one module per path:

  - :mod:`.core`: options, the links to the hubs, this process's node, and the watch
    that pings each hub and, when one restarted, re-issues parked receives and re-adds
    this layer's group memberships (**reconnects**);
  - :mod:`.sends`: **sends**. A normal channel's message goes to its hub queue; a
    process-specific one straight to the node owning the inbox once the hub has told us
    where it lives (the first one goes through the hub). Both use leases of places.
  - :mod:`.receives`: **receives**. Process-specific channels are read from this
    process's node; a normal channel by a ``pop`` parked at its hub.
  - :mod:`.groups`: **groups**. Memberships live at the hub; ``group_send`` is one
    request to the hub, or, for a small group streamed to, the sender's own fan-out from
    a copy of the members the hub leases it and invalidates before any change.
* :mod:`.node`: **the node**, one per process and hub set: a ROUTER socket holding the
  process's inboxes, served by a thread, or by the event loop waiting on an inbox while
  the thread lends it the socket (:mod:`.loan`). It registers its inboxes with the hub
  every heartbeat.
* :mod:`.link`: **links**, one DEALER socket per event loop to a hub or a peer node,
  matching replies to requests and batching what one loop step writes.
* :mod:`.security`: CURVE keys, the ZAP gate of hubs and nodes (allow list, refused
  peers logged), and the loopback-only default.
* :mod:`.hub`: **the hub** (``multilayer hub``): queues, groups, the directory of inboxes,
  in one single-threaded poll loop, listening with one key or, while it rolls, two.
"""

from .backend import ZmqBackend

__all__ = ["ZmqBackend"]
