"""The hub of the ZeroMQ backend: normal-channel queues, groups and the process directory.

Run it with ``multilayer hub --bind tcp://127.0.0.1:5599`` or
``python -m multilayer.backends.zmq.hub --bind tcp://127.0.0.1:5599``; layers then use
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
(:func:`~..protocol.split_batch`), the same format nodes take from senders holding an inbox lease.
A ``gsend`` queues the message for each normal member and puts one envelope
(:mod:`multilayer.fanout`) into each process inbox with members, forwarded to its node or
parked here, capacity checked once per inbox; it answers with the members left out and
the number of live members.
A ``gwatch`` hands a client the members of a small group (few queues, see
``_group_watch``) with a lease (``GROUP_LEASE``);
until it ends, a ``gadd``, ``gdiscard`` or ``flush`` touching the group first sends that
client a ``ginval`` and is answered only once the client's ``gack`` (or the lease's end)
says it no longer fans out from its copy.

Modules: :mod:`.state` (what the hub holds; queueing, forwarding to owner nodes),
:mod:`.queues` and :mod:`.groups` (the commands), :mod:`.server` (the poll loop,
CURVE, dispatch, the sweep), :mod:`.listeners` (the ROUTER socket of each key slot),
:mod:`.main` (the command line).
"""

from .main import main
from .server import Hub

__all__ = ["Hub", "main"]
