"""RabbitMQ backend: ``amqp://`` and ``amqps://``, on pika's asyncio connection adapter.

Features
    * Normal channels are queues named ``<prefix>:<channel>``. Any number of processes may
      consume one; each message reaches exactly one of them, because it is acknowledged to
      RabbitMQ only after ``pop()`` hands it to the layer. Their consumers prefetch one
      message, acknowledged when the next pop starts, so that one never gives back a
      message another process may have overtaken (which would then see it out of order).
    * All process-specific channels of one process share its inbox queue
      ``<prefix>:<name>!``; every message carries its full channel name in the AMQP ``type``
      property. The inbox is an ordinary auto-expiring queue rather than an exclusive one,
      so it survives the reconnects of the several connections (one per event loop) that a
      process may hold. Only its process consumes it, so it acknowledges every
      ``prefetch / 2`` messages rather than each one; every message carries a
      ``message_id``, and a redelivered message (after a dropped connection) that this
      process already handed out is dropped, so none is received twice.
    * Expiry is the queue's ``x-message-ttl``; capacity is ``x-max-length`` with
      ``x-overflow=reject-publish`` and publisher confirms, so a send RabbitMQ refuses raises
      ChannelFull; idle queues are removed by ``x-expires``. Everything is a queue argument
      set by the client: no plugin and no policy is needed (RabbitMQ 3.7 or later for
      ``x-overflow``; tested on 3.10).
    * Groups are bindings on the direct exchange ``<prefix>::groups`` (routing key = group
      name), so RabbitMQ does the fan-out: one publish per ``group_send`` whatever the
      member count, confirmed in the background (up to 64 in flight) because a full member
      is logged, never reported to the caller.

      - A process inbox is bound once per group, and the process hands each group message
        to the core as one envelope naming its live member channels here
        (:mod:`multilayer.fanout`), which copies it to each; the inbox's capacity counts
        it once. Memberships of the inbox live in the process: a
        ``group_add`` made in the same process records them directly, one made in another
        process reaches the owner as a control message in the inbox, ordered before any
        later group message. The owner skips members past their deadline and unbinds a
        group left with none.
      - A normal channel joins through a membership queue ``<prefix>::member:<group>:<channel>``
        bound to the exchange, with ``x-message-ttl=0`` and dead-lettering into the channel's
        queue. Its ``x-expires`` is ``group_expiry``: RabbitMQ deletes the membership when
        ``group_add`` has not renewed it (by re-declaring) in time, which is how
        ``group_expiry`` is honoured with no timer in any process.
    * ``flush()`` deletes the queues listed in the catalog queue ``<prefix>::catalog``
      (every layer records there each queue it creates, because AMQP cannot list queues)
      and re-creates the groups exchange, which drops every group binding of the prefix,
      and the catalog. Other prefixes on the vhost are untouched. Neither outlives the
      prefix's use: the catalog expires (``x-expires``, renewed by connected backends) and
      the exchange is auto-deleted with its last binding, which is the catalog's.
    * Reliability: heartbeats detect dead connections; after a dropped connection or a
      broker restart the backend reconnects with backoff, re-declares its inboxes, re-binds
      the memberships it made and resumes waiting receives. Prefetch is bounded, and a
      consumer is paused (its unread messages returned to the queue) a few milliseconds
      after no receive wants messages, so capacity and expiry keep applying on the broker.
    * Speed: pika's generic frame handling cost about 0.5 ms of CPU per message, so the
      frames of publishes, acknowledgements, confirms and deliveries are encoded and decoded
      by this module (every other frame still goes through pika) and written to the socket
      at once; see ``_Connection``.

URL format
    ``amqp://[user[:password]@]host[:port][,host[:port]...][/vhost][?option=value...]``;
    ``amqps://`` for TLS. Defaults: ``guest:guest@localhost``, port 5672 (5671 for TLS), vhost
    ``/`` (write a named vhost as the path, ``/`` itself as ``%2F``). Several hosts are tried
    in order on every (re)connection.

Options (URL query or keyword arguments, besides the core ones)
    ``heartbeat`` (int, 60): seconds between heartbeats; 0 asks for none.
    ``connection_name`` (str, "multilayer"): shown by ``rabbitmqctl list_connections``.
    ``connect_timeout`` (float, 10): seconds to open a connection; also how long a send
    waits for a lost connection to come back before raising BrokerError.
    ``prefetch`` (int, 64): most messages an inbox consumer holds unacknowledged (a normal
    channel's holds one).
    ``queue_expiry`` (float, 300): seconds an unused queue lives (at least twice ``expiry``).
    ``ca_file``, ``cert_file``, ``key_file`` (str): TLS trust store and client certificate.
    ``verify`` (bool, true): check the server certificate and host name (``amqps`` only).

    Every layer sharing a prefix must use the same ``expiry``, ``capacity``,
    ``channel_capacity`` and ``queue_expiry``: they are queue arguments, and RabbitMQ refuses
    to re-declare a queue with different ones (reported as BrokerError).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import ssl
import struct
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, ClassVar, Generic, TypeVar

import msgpack
import pika
import pika.channel
import pika.exceptions
import pika.frame
import pika.spec
from pika.adapters.asyncio_connection import AsyncioConnection
from pika.adapters.utils.io_services_utils import _AsyncPlaintextTransport

from ..backend import Backend, Capabilities, Item, LayerSettings, now
from ..capacity import CapacityPolicy
from ..exceptions import BrokerError, ChannelFull, ConfigurationError
from ..fanout import seal
from ..names import non_local_name
from ..options import Option
from ..serialization import deadline_of, log_malformed
from ..url import LayerURL

__all__ = ["RabbitMQBackend"]

logger = logging.getLogger(__name__)


#: How long a consumer with no receive waiting keeps its prefetched messages: enough for
#: a receive loop that sends a reply in between to keep it, short because meanwhile the
#: consumer takes messages that max-length no longer counts (only ready ones count).
_PAUSE_AFTER = 0.005
#: Most group_send publishes waiting for their confirm at once.
_GROUP_WINDOW = 64
_JOIN, _LEAVE = "+", "-"
#: Routing key of the catalog's binding to the groups exchange, which keeps the
#: (auto-deleted) exchange alive while the catalog lives; no group name contains "!".
_ANCHOR = "!catalog"
_NOT_FOUND, _PRECONDITION_FAILED = 404, 406


class _Memberships:
    """Group memberships of the channels of one process inbox.

    Shared by every backend of the owning layer in this OS process (one per event loop),
    because any of them may be the one receiving from the inbox.
    """

    def __init__(self) -> None:
        self._groups: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()

    def join(self, group: str, channel: str, deadline: float) -> None:
        with self._lock:
            self._groups.setdefault(group, {})[channel] = deadline

    def leave(self, group: str, channel: str) -> bool:
        """Remove a membership; True when the group has no member left here."""
        with self._lock:
            members = self._groups.get(group)
            if members is None:
                return True
            members.pop(channel, None)
            if members:
                return False
            del self._groups[group]
            return True

    def live(self, group: str) -> list[tuple[str, float]]:
        """The unexpired members of ``group`` with their deadlines, forgetting the expired."""
        current = now()
        with self._lock:
            members = self._groups.get(group)
            if members is None:
                return []
            for channel in [c for c, deadline in members.items() if deadline <= current]:
                del members[channel]
            if not members:
                del self._groups[group]
            return list(members.items())

    def groups(self) -> list[str]:
        with self._lock:
            return list(self._groups)

    def clear(self) -> None:
        with self._lock:
            self._groups.clear()


class _Handed:
    """Ids of the messages recently handed out from one queue in this OS process.

    Consumers acknowledge after handing out (an inbox's in batches), so after a dropped
    connection RabbitMQ delivers again (flagged redelivered) messages this process already
    handed out; their ids here are how it recognises and drops them.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._order: deque[str] = deque()
        self._ids: set[str] = set()
        self._lock = threading.Lock()

    def add(self, ids: list[str]) -> None:
        with self._lock:
            for message_id in ids:
                if message_id not in self._ids:
                    self._ids.add(message_id)
                    self._order.append(message_id)
            while len(self._order) > self._size:
                self._ids.discard(self._order.popleft())

    def __contains__(self, message_id: str) -> bool:
        with self._lock:
            return message_id in self._ids


_Key = tuple[Any, ...]
_Shared = TypeVar("_Shared")


class _ProcessWide(Generic[_Shared]):
    """Per-queue state shared by every backend of this OS process on one broker and vhost.

    Layer instances of one process may share an inbox (and consume the same normal
    channels), so what they know about it lives here, keyed by broker, vhost and queue.
    An entry lives while a backend that used it is open, so a long-running process does
    not keep one for every queue it ever touched.
    """

    def __init__(self) -> None:
        self._entries: dict[_Key, tuple[_Shared, set[int]]] = {}
        self._lock = threading.Lock()

    def use(self, key: _Key, user: object, make: Callable[[], _Shared]) -> _Shared:
        """The state under ``key`` (``make()`` if none), kept until ``user`` releases it."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = (make(), set())
            entry[1].add(id(user))
            return entry[0]

    def get(self, key: _Key) -> _Shared | None:
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry[0]

    def under(self, prefix: _Key) -> list[_Shared]:
        """The state of every key that starts with ``prefix``."""
        with self._lock:
            n = len(prefix)
            return [state for key, (state, _users) in self._entries.items() if key[:n] == prefix]

    def release(self, user: object) -> None:
        """``user`` is done: drop what no other open backend uses."""
        with self._lock:
            for key, (_state, users) in list(self._entries.items()):
                users.discard(id(user))
                if not users:
                    del self._entries[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


#: Memberships of the inboxes owned by this OS process.
_owned: _ProcessWide[_Memberships] = _ProcessWide()
#: Ids recently handed out, per queue consumed in this OS process.
_handed: _ProcessWide[_Handed] = _ProcessWide()


class _Disconnected(BrokerError):
    """The connection closed under an operation that can wait for the next one."""


def _settle(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def _reply_code(error: BaseException | None) -> int | None:
    if isinstance(error, pika.exceptions.ChannelClosedByBroker):
        code: int = error.reply_code
        return code
    return None


#: AMQP frame header (type, channel, size), and the frame-end octet.
_FRAME = struct.Struct(">BHI")
_FRAME_END = 0xCE
_METHOD_FRAME, _HEADER_FRAME, _BODY_FRAME = 1, 2, 3
#: class and method ids of a method frame; basic.deliver, basic.ack and basic.nack.
_METHOD_ID = struct.Struct(">HH")
_DELIVER, _ACK, _NACK = (60, 60), (60, 80), (60, 120)
#: delivery tag and the bit field after it (basic.deliver, basic.ack, basic.nack).
_TAG = struct.Struct(">QB")
#: content header: class, weight, body size, property flags.
_CONTENT = struct.Struct(">HHQH")
#: the property flags of ``message_id`` and ``type``, the properties this backend sets.
_ID_FLAG, _TYPE_FLAG = 0x0080, 0x0020
#: a whole basic.ack frame.
_ACK_FRAME = struct.Struct(">BHIHHQBB")

#: delivery tag, redelivered, routing key, ``type`` and ``message_id`` properties, body.
_Delivery = tuple[int, bool, str, "str | None", "str | None", bytes]
#: consumer tag, delivery.
_OnDelivery = Callable[[str, _Delivery], None]
#: positive, delivery tag, multiple.
_OnConfirm = Callable[[bool, int, bool], None]


def _short_string(value: str) -> bytes:
    encoded = value.encode()
    if len(encoded) > 255:
        raise BrokerError(f"AMQP names are at most 255 bytes, not {value!r}")
    return bytes((len(encoded),)) + encoded


#: Most bytes one recv() asks for, and one readiness event reads.
_RECV_BYTES, _READ_AT_ONCE = 65536, 1 << 20


def _read_available(transport: _AsyncPlaintextTransport) -> None:
    """What pika's transport does when its socket is readable, minus a system call.

    pika reads until the socket raises EAGAIN, which costs a second recv() per message;
    a short read already says the socket is drained, and the event loop calls again when
    more arrives. EAGAIN and errors propagate to pika's handler as before.
    """
    sock, protocol = transport._sock, transport._protocol
    read = 0
    while read < _READ_AT_ONCE:
        data = sock.recv(_RECV_BYTES)
        if not data:
            raise transport.RxEndOfFile()
        read += len(data)
        protocol.data_received(data)
        if len(data) < _RECV_BYTES or transport._state != transport._STATE_ACTIVE:
            return


class _Connection(AsyncioConnection):  # type: ignore[misc]
    """pika's asyncio connection with a short path for the frames of every message.

    Measured: pika spends most of a message's CPU in its generic frame objects, callback
    registry and write-readiness watcher. Publishes, acknowledgements, publisher
    confirms and deliveries on the channels registered in ``confirms`` and
    ``deliveries`` are therefore encoded and decoded here, and written to the socket at
    once when pika has nothing buffered; every other frame still goes through pika, in
    arrival order.
    """

    _frame_buffer: bytes  # pika's: received bytes not yet decoded

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.deliveries: dict[int, _OnDelivery] = {}
        self.confirms: dict[int, _OnConfirm] = {}
        #: channel -> the delivery being assembled: [consumer tag, delivery tag,
        #: redelivered, routing key, type, message id, body size left, body chunks].
        self._incoming: dict[int, list[Any]] = {}
        self._publish_methods: dict[tuple[int, str, str, bool], bytes] = {}
        super().__init__(*args, **kwargs)

    def forget_channel(self, number: int) -> None:
        """Stop the short path on channel ``number`` (closed; pika reuses numbers)."""
        self.deliveries.pop(number, None)
        self.confirms.pop(number, None)
        self._incoming.pop(number, None)

    def _proto_connection_made(self, transport: Any) -> None:
        super()._proto_connection_made(transport)
        if isinstance(transport, _AsyncPlaintextTransport):
            transport._consume = lambda: _read_available(transport)

    # -- out ------------------------------------------------------------------------

    def _output_marshaled_frames(self, marshaled_frames: list[bytes]) -> None:
        self._write(b"".join(marshaled_frames), len(marshaled_frames))

    def _write(self, data: bytes, frames: int) -> None:
        """Send ``data`` (``frames`` whole frames) after whatever pika has buffered."""
        self.bytes_sent += len(data)
        self.frames_sent += frames
        transport = self._transport
        if isinstance(transport, _AsyncPlaintextTransport) and not (
            transport.get_write_buffer_size()
        ):
            # Straight to the socket: pika would watch for writability first, which
            # costs two epoll changes and a loop iteration per write.
            sock = transport._sock
            try:
                sent = sock.send(data) if sock is not None else 0
            except OSError:
                sent = 0  # pika's own write meets the error again and aborts properly
            if sent == len(data):
                return
            data = data[sent:]
        self._adapter_emit_data(data)

    def publish(
        self,
        number: int,
        exchange: str,
        routing_key: str,
        body: bytes,
        kind: str | None,
        message_id: str,
        *,
        mandatory: bool,
    ) -> None:
        """basic.publish on channel ``number``, with ``type`` = ``kind`` if given."""
        if self.is_closed:
            raise pika.exceptions.ConnectionWrongStateError("the connection is closed")
        key = (number, exchange, routing_key, mandatory)
        method = self._publish_methods.get(key)
        if method is None:
            arguments = b"".join(
                (
                    _METHOD_ID.pack(60, 40),
                    b"\0\0",
                    _short_string(exchange),
                    _short_string(routing_key),
                    b"\1" if mandatory else b"\0",
                )
            )
            method = _FRAME.pack(_METHOD_FRAME, number, len(arguments)) + arguments + b"\xce"
            if len(self._publish_methods) >= 4096:
                self._publish_methods.clear()
            self._publish_methods[key] = method
        if kind is None:
            header = _CONTENT.pack(60, 0, len(body), _ID_FLAG) + _short_string(message_id)
        else:
            header = b"".join(
                (
                    _CONTENT.pack(60, 0, len(body), _ID_FLAG | _TYPE_FLAG),
                    _short_string(message_id),
                    _short_string(kind),
                )
            )
        pieces = [method, _FRAME.pack(_HEADER_FRAME, number, len(header)), header, b"\xce"]
        limit = self._body_max_length
        for start in range(0, len(body), limit):
            chunk = body[start : start + limit]
            pieces += (_FRAME.pack(_BODY_FRAME, number, len(chunk)), chunk, b"\xce")
        self._write(b"".join(pieces), 2 + -(-len(body) // limit))

    def ack(self, number: int, delivery_tag: int, *, multiple: bool) -> None:
        """basic.ack on channel ``number``."""
        self._write(
            _ACK_FRAME.pack(_METHOD_FRAME, number, 13, 60, 80, delivery_tag, multiple, _FRAME_END),
            1,
        )

    # -- in -------------------------------------------------------------------------

    def _on_data_available(self, data_in: bytes) -> None:
        if not (self.deliveries or self.confirms):
            super()._on_data_available(data_in)
            return
        buffer = self._frame_buffer + data_in if self._frame_buffer else data_in
        position, size = 0, len(buffer)
        while size - position >= 8:
            kind, number, length = _FRAME.unpack_from(buffer, position)
            end = position + 7 + length
            if end >= size:
                break
            if buffer[end] == _FRAME_END and self._short_path(
                kind, number, buffer, position + 7, end
            ):
                self.frames_received += 1
                self.bytes_received += end + 1 - position
                position = end + 1
                continue
            # Anything else (and a malformed frame, which pika rejects) goes to pika.
            self._frame_buffer = buffer[position:]
            consumed, frame_value = self._read_frame()
            if frame_value is None:
                return
            self._trim_frame_buffer(consumed)
            self._process_frame(frame_value)
            buffer, position = self._frame_buffer, 0
            size = len(buffer)
        self._frame_buffer = buffer[position:] if position else buffer

    def _short_path(self, kind: int, number: int, data: bytes, start: int, end: int) -> bool:
        """Handle one frame if it is a message's; False leaves it to pika."""
        if kind == _METHOD_FRAME:
            method = _METHOD_ID.unpack_from(data, start)
            if method == _DELIVER and number in self.deliveries:
                at = start + 4
                consumer_tag = data[at + 1 : at + 1 + data[at]].decode()
                at += 1 + data[at]
                delivery_tag, redelivered = _TAG.unpack_from(data, at)
                at += 9
                at += 1 + data[at]  # the exchange
                routing_key = data[at + 1 : at + 1 + data[at]].decode()
                self._incoming[number] = [
                    consumer_tag,
                    delivery_tag,
                    bool(redelivered & 1),
                    routing_key,
                    None,
                    None,
                    0,
                    [],
                ]
                return True
            if method in (_ACK, _NACK) and number in self.confirms:
                delivery_tag, bits = _TAG.unpack_from(data, start + 4)
                self.confirms[number](method == _ACK, delivery_tag, bool(bits & 1))
                return True
            return False
        incoming = self._incoming.get(number)
        if incoming is None:
            return False
        if kind == _HEADER_FRAME:
            _class, _weight, body_size, flags = _CONTENT.unpack_from(data, start)
            if flags & ~(_ID_FLAG | _TYPE_FLAG):
                properties = pika.spec.BasicProperties()
                properties.decode(data[start + 12 : end])
                incoming[4], incoming[5] = properties.type, properties.message_id
            else:
                at = start + 14
                if flags & _ID_FLAG:
                    incoming[5] = data[at + 1 : at + 1 + data[at]].decode()
                    at += 1 + data[at]
                if flags & _TYPE_FLAG:
                    incoming[4] = data[at + 1 : at + 1 + data[at]].decode()
            incoming[6] = body_size
            if not body_size:
                self._deliver(number, incoming)
            return True
        if kind == _BODY_FRAME:
            incoming[7].append(data[start:end])
            incoming[6] -= end - start
            if incoming[6] <= 0:
                self._deliver(number, incoming)
            return True
        return False

    def _deliver(self, number: int, incoming: list[Any]) -> None:
        del self._incoming[number]
        consumer_tag, delivery_tag, redelivered, routing_key, kind, message_id, _, chunks = incoming
        on_delivery = self.deliveries.get(number)
        if on_delivery is not None:
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            on_delivery(
                consumer_tag, (delivery_tag, redelivered, routing_key, kind, message_id, body)
            )


class _Channel:
    """A pika channel whose synchronous methods are awaitable and fail when it closes."""

    def __init__(self, channel: pika.channel.Channel) -> None:
        self.channel = channel
        self.connection: _Connection = channel.connection
        self.number: int = channel.channel_number
        self.closed: BaseException | None = None
        self._pending: set[asyncio.Future[Any]] = set()
        self._on_close: list[Callable[[BaseException], None]] = []
        channel.add_on_close_callback(self._closed)

    @classmethod
    async def open(cls, connection: AsyncioConnection) -> _Channel:
        opened: asyncio.Future[pika.channel.Channel] = asyncio.get_running_loop().create_future()

        def closed(_channel: pika.channel.Channel, reason: BaseException) -> None:
            _fail(opened, reason)

        channel = connection.channel(on_open_callback=lambda ch: _settle(opened, ch))
        channel.add_on_close_callback(closed)
        return cls(await opened)

    def on_close(self, callback: Callable[[BaseException], None]) -> None:
        self._on_close.append(callback)

    def future(self) -> asyncio.Future[Any]:
        """A future that fails with the channel's closing reason if it closes first."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.closed is not None:
            future.set_exception(self.closed)
            return future
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        return future

    async def call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a synchronous AMQP method (one taking ``callback=``) and await its reply."""
        future = self.future()
        if not future.done():
            method(*args, callback=lambda frame: _settle(future, frame), **kwargs)
        return await future

    def close(self) -> None:
        if self.closed is None and self.channel.is_open:
            self.channel.close()

    def _closed(self, _channel: pika.channel.Channel, reason: BaseException) -> None:
        self.closed = reason
        self.connection.forget_channel(self.number)
        for future in list(self._pending):
            _fail(future, reason)
        for callback in self._on_close:
            callback(reason)


class _Confirm:
    """A publish waiting for RabbitMQ's confirm."""

    __slots__ = ("exchange", "future", "returned", "routing_key")

    def __init__(self, future: asyncio.Future[str] | None, exchange: str, routing_key: str):
        self.future = future
        self.exchange = exchange
        self.routing_key = routing_key
        self.returned = False


class _Publisher:
    """The confirm-mode channel every publish goes through, in publish order."""

    def __init__(self, channel: _Channel) -> None:
        self.channel = channel
        self._sent = 0
        self._waiting: dict[int, _Confirm] = {}
        #: with the publish count, the message_id of each publish (see _Handed).
        self._id_prefix = secrets.token_hex(8) + "."
        channel.on_close(self._closed)

    @classmethod
    async def open(cls, connection: AsyncioConnection) -> _Publisher:
        channel = await _Channel.open(connection)
        publisher = cls(channel)
        channel.channel.add_on_return_callback(publisher._returned)
        await channel.call(channel.channel.confirm_delivery, publisher._confirmed)
        channel.connection.confirms[channel.number] = publisher._confirm
        return publisher

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        kind: str | None,
        *,
        mandatory: bool,
        wait: bool = True,
    ) -> asyncio.Future[str] | None:
        """Publish with ``type`` = ``kind``; the future gives ``"ack"``, ``"nack"`` or
        ``"returned"`` (unroutable)."""
        channel = self.channel
        if channel.closed is not None:
            raise channel.closed
        if not channel.channel.is_open:
            raise pika.exceptions.ChannelWrongStateError("the publishing channel is closing")
        # Failed by _closed() if the channel closes first.
        future = asyncio.get_running_loop().create_future() if wait else None
        sequence = self._sent + 1
        channel.connection.publish(
            channel.number,
            exchange,
            routing_key,
            body,
            kind,
            self._id_prefix + str(sequence),
            mandatory=mandatory,
        )
        self._sent = sequence
        self._waiting[sequence] = _Confirm(future, exchange, routing_key)
        return future

    def _returned(
        self,
        _channel: pika.channel.Channel,
        method: pika.spec.Basic.Return,
        _properties: pika.BasicProperties,
        _body: bytes,
    ) -> None:
        # RabbitMQ sends a message's return before its confirm, and both in publish
        # order, so the oldest unmatched publish to that destination is the one returned.
        for confirm in self._waiting.values():
            if (
                not confirm.returned
                and confirm.exchange == method.exchange
                and confirm.routing_key == method.routing_key
            ):
                confirm.returned = True
                return

    def _confirmed(self, frame: pika.frame.Method) -> None:
        method = frame.method
        self._confirm(isinstance(method, pika.spec.Basic.Ack), method.delivery_tag, method.multiple)

    def _confirm(self, positive: bool, delivery_tag: int, multiple: bool) -> None:
        tags = [delivery_tag]
        if multiple:
            tags = [tag for tag in self._waiting if tag <= delivery_tag]
        for tag in tags:
            confirm = self._waiting.pop(tag, None)
            if confirm is not None and confirm.future is not None:
                outcome = "returned" if confirm.returned else "ack" if positive else "nack"
                _settle(confirm.future, outcome)

    def _closed(self, reason: BaseException) -> None:
        for confirm in self._waiting.values():
            if confirm.future is not None:
                _fail(confirm.future, reason)
        self._waiting.clear()


class _Consumer:
    """Consumes one queue while pops want messages, acknowledging what pop hands out."""

    def __init__(self, backend: RabbitMQBackend, queue: str, name: str) -> None:
        self.backend = backend
        self.queue = queue
        self.name = name
        self.inbox = name.endswith("!")
        self.channel: _Channel | None = None
        self.tag: str | None = None
        self.buffer: deque[_Delivery] = deque()
        # An inbox has no other consumer than this process, which recognises what RabbitMQ
        # delivers again (see _Handed): it prefetches, and acknowledges every ack_every
        # messages, saving a write per message.
        # A normal channel's consumer must never hand a message back while it may have
        # overtaken it elsewhere, or another process would receive it after a later one:
        # it prefetches one message and acknowledges it when the next pop starts (or on
        # pause), so RabbitMQ has sent nothing it has not handed out when it pauses.
        self.handed = backend.handed(queue)
        self.prefetch = backend.prefetch if self.inbox else 1
        self.ack_every = max(1, backend.prefetch // 2)
        #: delivery tag of the last message handed out and not acknowledged, and how many.
        self.unacked_tag: int | None = None
        self.unacked = 0
        self.popping = 0
        self._wakeup: asyncio.Future[None] | None = None
        self._pause: asyncio.TimerHandle | None = None
        #: loop time since which no pop has been running, None while one is.
        self._idle_since: float | None = None
        self._cancel_ok: asyncio.Future[Any] | None = None

    async def pop(self, limit: int) -> list[Item]:
        self.popping += 1
        self._idle_since = None
        if not self.inbox:
            self.acknowledge()  # RabbitMQ sends the next message once this is in
        try:
            while True:
                taken = self._take(limit)
                if taken:
                    return taken
                if not self.inbox:
                    # What _take dropped (expired or malformed) was the one message
                    # RabbitMQ lets this consumer hold: acknowledge it or none follows.
                    self.acknowledge()
                if self.tag is None:
                    await self._start()
                    continue
                self._wakeup = asyncio.get_running_loop().create_future()
                try:
                    await self._wakeup
                finally:
                    self._wakeup = None
        finally:
            self.popping -= 1
            if not self.popping and self.tag is not None:
                loop = asyncio.get_running_loop()
                self._idle_since = loop.time()
                # One timer for a run of pops, not one armed and cancelled per pop.
                if self._pause is None:
                    self._pause = loop.call_later(_PAUSE_AFTER, self._pause_if_idle)

    def _pause_if_idle(self) -> None:
        self._pause = None
        if self._idle_since is None:
            return  # a pop is running; it re-arms the timer when it ends
        left = self._idle_since + _PAUSE_AFTER - asyncio.get_running_loop().time()
        if left > 0:
            self._pause = asyncio.get_running_loop().call_later(left, self._pause_if_idle)
        else:
            self.stop()

    def stop(self, *, closing: bool = False) -> None:
        """Cancel the consumer and hand its unread messages back to RabbitMQ."""
        self._idle_since = None
        if self.channel is None or not self.channel.channel.is_open:
            return
        channel = self.channel.channel
        # (Without a consumer tag, the consumer is cancelled already; an acknowledgement
        # may still be due.)
        if self.tag is not None and closing:
            channel.basic_cancel(self.tag)
        elif self.tag is not None:
            cancel_ok = self._cancel_ok = self.channel.future()
            channel.basic_cancel(self.tag, callback=lambda frame: _settle(cancel_ok, frame))
        self.tag = None
        # After the cancel: acknowledging first could let RabbitMQ send one more message.
        self.acknowledge()
        if self.buffer:
            channel.basic_nack(self.buffer[-1][0], multiple=True, requeue=True)
            self.buffer.clear()

    def cancel_pause(self) -> None:
        self._idle_since = None
        if self._pause is not None:
            self._pause.cancel()
            self._pause = None

    def reset(self) -> None:
        """Forget the consumer after its channel or connection closed (RabbitMQ requeues)."""
        self.channel = None
        self.tag = None
        self._cancel_ok = None
        self.unacked_tag, self.unacked = None, 0
        self.buffer.clear()
        self._wake()

    async def _start(self) -> None:
        backend = self.backend
        try:
            connection = await backend.connected(forever=True)
            if self.channel is None or self.channel.closed is not None:
                channel = await _Channel.open(connection)
                channel.on_close(lambda reason: self._closed(channel, reason))
                channel.channel.add_on_cancel_callback(self._cancelled_by_broker)
                await channel.call(channel.channel.basic_qos, prefetch_count=self.prefetch)
                self.channel = channel
            if backend.stale(self.queue):
                await backend.declare(self.queue, self.name, channel=self.channel)
            if self._cancel_ok is not None:
                # Deliveries to the cancelled consumer may still be on their way back to the
                # queue; consuming again before its cancel-ok would overtake them.
                await self._cancel_ok
                self._cancel_ok = None
            self.channel.connection.deliveries[self.channel.number] = self._delivered
            self.tag = self.channel.channel.basic_consume(self.queue, self._delivered_by_pika)
        except (pika.exceptions.AMQPError, BrokerError) as error:
            if isinstance(error, pika.exceptions.ChannelClosedByBroker):
                raise backend._error(f"consuming {self.queue!r}", error) from error
            if isinstance(error.__cause__, pika.exceptions.ChannelClosedByBroker):
                raise  # a refused declare, already explained
            # The connection went down meanwhile; connected() waits for the next one.
            logger.debug("restarting the consumer of %s: %r", self.queue, error)
            self.reset()
            await asyncio.sleep(0.05)

    def _closed(self, channel: _Channel, reason: BaseException) -> None:
        if self.channel is not channel:
            return
        if _reply_code(reason) == _NOT_FOUND:
            # Consumed without a declare (declared recently), but flush() deleted it since.
            self.backend.forget(self.queue)
        self.reset()

    def _delivered_by_pika(
        self,
        _channel: pika.channel.Channel,
        method: pika.spec.Basic.Deliver,
        properties: pika.BasicProperties,
        body: bytes,
    ) -> None:
        self._delivered(
            method.consumer_tag,
            (
                method.delivery_tag,
                method.redelivered,
                method.routing_key,
                properties.type,
                properties.message_id,
                body,
            ),
        )

    def _delivered(self, consumer_tag: str, delivery: _Delivery) -> None:
        if consumer_tag != self.tag:
            # Sent before RabbitMQ processed our cancel: back to the queue, unread.
            if self.channel is not None and self.channel.channel.is_open:
                self.channel.channel.basic_nack(delivery[0], requeue=True)
            return
        self.buffer.append(delivery)
        self._wake()

    def _cancelled_by_broker(self, _frame: pika.frame.Method) -> None:
        # The queue was deleted (flush() somewhere); the next start re-creates it.
        self.backend.forget(self.queue)
        self.tag = None
        self.buffer.clear()
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None:
            _settle(self._wakeup, None)

    def _take(self, limit: int) -> list[Item]:
        taken: list[Item] = []
        handed, ids = self.handed, []
        buffer = self.buffer
        while buffer and len(taken) < limit:
            tag, redelivered, routing_key, kind, message_id, body = buffer.popleft()
            self.unacked_tag = tag
            self.unacked += 1
            if message_id is not None:
                if redelivered and message_id in handed:
                    continue  # handed out here before the connection dropped
                ids.append(message_id)
            # A group message comes back as one envelope for the core to hand to members.
            try:
                taken.extend(self._open(routing_key, kind, body))
            except Exception as error:  # another client's garbage must not stop the queue
                log_malformed(self.queue, len(body), f"bad envelope ({type(error).__name__})")
        if ids:
            handed.add(ids)
        # Acknowledged no earlier than the return: the caller has these messages before
        # anything else can run, and a cancelled pop loses nothing (an unacknowledged
        # message goes back to the queue with its channel).
        if self.inbox and self.unacked >= self.ack_every:
            self.acknowledge()
        return taken

    def acknowledge(self) -> None:
        """Acknowledge every message handed out so far."""
        channel, tag = self.channel, self.unacked_tag
        self.unacked_tag, self.unacked = None, 0
        if tag is not None and channel is not None and channel.channel.is_open:
            channel.connection.ack(channel.number, tag, multiple=True)

    def _open(self, routing_key: str, kind: str | None, body: bytes) -> list[Item]:
        if not self.inbox:
            return [(self.name, body)] if deadline_of(body) > now() else []
        if kind in (_JOIN, _LEAVE):
            memberships = self.backend.memberships(self.queue)
            group, channel, deadline = msgpack.unpackb(body)
            named = isinstance(group, str) and isinstance(channel, str)
            if not named or type(deadline) not in (int, float):
                raise ValueError("a membership is [group, channel, deadline]")
            if kind == _JOIN:
                memberships.join(group, channel, deadline)
            elif memberships.leave(group, channel):
                self.backend.unbind_later(self.queue, group)
            return []
        if deadline_of(body) <= now():
            return []
        if kind:
            return [(kind, body)]
        if routing_key == self.queue:
            # Group messages come through the groups exchange, routed by group name; this
            # was published straight into the inbox without a channel name, by something
            # that is not a layer.
            raise ValueError("no channel name")
        group = routing_key
        members = self.backend.memberships(self.queue).live(group)
        if not members:
            self.backend.unbind_later(self.queue, group)
            return []
        # The process's own membership state is already current (a discard here, or one
        # made elsewhere and told here, arrived before this message), so the time it is
        # opened stands for the send time: the core's departure check drops no one more.
        return [(self.name, seal(body, group, now(), self.name, members))]


class RabbitMQBackend(Backend):
    """Channels as RabbitMQ queues, groups as bindings; see the module docstring."""

    capabilities: ClassVar[Capabilities] = Capabilities(
        multiprocess=True, native_expiry=True, native_fanout=True, restartable=False
    )
    extra: ClassVar[str | None] = "rabbitmq"
    options: ClassVar[Mapping[str, Option]] = {
        "heartbeat": Option(int, 60, "seconds between AMQP heartbeats (0: none)", minimum=0),
        "connection_name": Option(str, "multilayer", "connection name shown by RabbitMQ"),
        "connect_timeout": Option(
            float, 10.0, "seconds to (re)connect before an operation fails", minimum=0.1
        ),
        "prefetch": Option(int, 64, "unacknowledged messages per inbox consumer", minimum=1),
        "queue_expiry": Option(
            float, 300.0, "seconds an unused queue lives (at least 2 x expiry)", minimum=1.0
        ),
        "ca_file": Option(str, None, "CA bundle for amqps://"),
        "cert_file": Option(str, None, "client certificate (PEM) for amqps://"),
        "key_file": Option(str, None, "client private key (PEM) for amqps://"),
        "verify": Option(bool, True, "verify the server certificate and host name"),
    }

    def __init__(self, url: LayerURL, settings: LayerSettings, options: Mapping[str, Any]) -> None:
        super().__init__(url, settings, options)
        self.prefetch: int = self.config["prefetch"]
        prefix = settings.prefix
        self._prefix = prefix + ":"
        self._exchange = f"{prefix}::groups"
        self._catalog = f"{prefix}::catalog"
        self._vhost = url.path or "/"
        self._key = (url.hosts, self._vhost)
        self._queue_args = {
            "x-message-ttl": max(1, round(settings.expiry * 1000)),
            "x-overflow": "reject-publish",
            "x-expires": round(max(self.config["queue_expiry"], 2 * settings.expiry) * 1000),
        }
        self._renew_after = self._queue_args["x-expires"] / 2000
        # Twice a queue's idle lifetime: renewed by every connected backend, the catalog
        # outlives each queue it lists, and expires once the prefix is unused.
        self._catalog_args = {"x-expires": 2 * self._queue_args["x-expires"]}
        self._connection: AsyncioConnection | None = None
        self._admin: _Channel | None = None
        self._publisher: _Publisher | None = None
        self._ready = asyncio.Event()
        self._closing = False
        self._keeper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._group_confirms: deque[asyncio.Future[str]] = deque()
        self._consumers: dict[str, _Consumer] = {}
        #: queue -> loop time of this backend's last declare (renews x-expires).
        self._declared: dict[str, float] = {}
        #: queues this backend has listed in the catalog since they last went missing.
        self._cataloged: set[str] = set()
        self._inboxes: set[str] = set()
        #: (group, channel) -> deadline of the normal-channel memberships made here.
        self._memberships: dict[tuple[str, str], float] = {}

    # -- configuration --------------------------------------------------------------

    @classmethod
    def check_url(cls, url: LayerURL, options: Mapping[str, Any]) -> None:
        tls = url.scheme == "amqps"
        if not tls and any(options.get(name) for name in ("ca_file", "cert_file", "key_file")):
            raise ConfigurationError(
                f"ca_file, cert_file and key_file need an amqps:// URL, not {url.sanitized()}"
            )
        if options.get("key_file") and not options.get("cert_file"):
            raise ConfigurationError(f"key_file needs cert_file too ({url.sanitized()})")

    @classmethod
    def versions(cls) -> dict[str, str]:
        return {"pika": pika.__version__}

    async def broker_version(self) -> str | None:
        connection = self._connection
        properties = getattr(connection, "server_properties", None) or {}
        version = properties.get("version")
        return version.decode() if isinstance(version, bytes) else version

    def _parameters(self, host: str, port: int | None) -> pika.ConnectionParameters:
        url, config = self.url, self.config
        tls = url.scheme == "amqps"
        ssl_options = None
        if tls:
            context = ssl.create_default_context(cafile=config["ca_file"])
            if config["cert_file"]:
                context.load_cert_chain(config["cert_file"], config["key_file"])
            if not config["verify"]:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            ssl_options = pika.SSLOptions(context, server_hostname=host)
        return pika.ConnectionParameters(
            host=host,
            port=port or (5671 if tls else 5672),
            virtual_host=self._vhost,
            credentials=pika.PlainCredentials(
                url.username if url.username is not None else "guest",
                url.password if url.password is not None else "guest",
            ),
            heartbeat=config["heartbeat"],
            client_properties={"connection_name": config["connection_name"]},
            ssl_options=ssl_options,
            connection_attempts=1,
            socket_timeout=config["connect_timeout"],
            stack_timeout=config["connect_timeout"],
        )

    # -- connection -----------------------------------------------------------------

    async def open(self) -> None:
        await self._connect()
        self._keeper = asyncio.create_task(self._keep_connected(), name="multilayer amqp")

    async def close(self) -> None:
        self._closing = True
        tasks = [t for t in (self._keeper, *self._background) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._disconnect()
        _owned.release(self)
        _handed.release(self)

    async def _disconnect(self) -> None:
        self._closing = True
        for consumer in self._consumers.values():
            consumer.cancel_pause()
            # Acknowledges what was handed out, which RabbitMQ would otherwise deliver again.
            consumer.stop(closing=True)
        connection, self._connection = self._connection, None
        self._ready.clear()
        if connection is not None and not (connection.is_closed or connection.is_closing):
            closed = asyncio.get_running_loop().create_future()
            connection.add_on_close_callback(lambda _c, _r: _settle(closed, None))
            connection.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(closed, self.config["connect_timeout"])

    async def _connect(self) -> None:
        errors: list[BaseException] = []
        for host, port in self.url.hosts or (("localhost", None),):
            try:
                connection = await self._open_connection(self._parameters(host, port))
            except Exception as error:  # pika's connection workflow raises its own types
                errors.append(error)
                continue
            try:
                await self._setup(connection)
            except (pika.exceptions.AMQPError, BrokerError) as error:
                self._connection_closed(connection, error)
                connection.close()
                errors.append(error)
                continue
            return
        raise BrokerError(
            f"cannot connect to RabbitMQ at {self.url.sanitized()}: {errors[-1]!r}"
        ) from errors[-1]

    async def _open_connection(self, parameters: pika.ConnectionParameters) -> AsyncioConnection:
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[AsyncioConnection] = loop.create_future()
        connection = _Connection(
            parameters,
            on_open_callback=lambda c: _settle(opened, c),
            on_open_error_callback=lambda _c, error: _fail(
                opened, error if isinstance(error, BaseException) else OSError(str(error))
            ),
            on_close_callback=self._connection_closed,
            custom_ioloop=loop,
        )
        try:
            return await asyncio.wait_for(opened, self.config["connect_timeout"])
        except BaseException:
            if not (connection.is_closed or connection.is_closing):
                connection.close()
            raise

    async def _setup(self, connection: AsyncioConnection) -> None:
        """Open the channels, then restore what this backend owns (after a restart)."""
        admin = await _Channel.open(connection)
        publisher = await _Publisher.open(connection)
        await self._declare_topology(connection)
        self._connection, self._admin, self._publisher = connection, admin, publisher
        self._ready.set()
        for name in self._inboxes:
            queue = self._prefix + name
            await self.declare(queue, name)
            for group in self.memberships(queue).groups():
                await self._bind(queue, group)
        for (group, channel), deadline in list(self._memberships.items()):
            if deadline > now():
                await self._add_member_queue(group, channel)
            else:
                del self._memberships[group, channel]

    async def _declare_topology(self, connection: AsyncioConnection) -> None:
        """Declare the groups exchange and the catalog, the catalog bound to the exchange.

        Neither outlives the prefix's use: the catalog expires when no backend has
        renewed it for twice a queue's idle lifetime, and the exchange is auto-deleted
        with its last binding, the catalog's own once every group's is gone.
        """
        declares: list[Callable[[_Channel], Awaitable[Any]]] = [
            lambda ch: ch.call(
                ch.channel.exchange_declare,
                self._exchange,
                exchange_type="direct",
                auto_delete=True,
            ),
            lambda ch: ch.call(
                ch.channel.queue_declare, self._catalog, arguments=self._catalog_args
            ),
        ]
        channel = await _Channel.open(connection)
        try:
            for declare in declares:
                try:
                    await declare(channel)
                except pika.exceptions.AMQPError as error:
                    if _reply_code(error) != _PRECONDITION_FAILED:
                        raise
                    # Made by an earlier version without these arguments: it works as it
                    # is, and the next flush() replaces it.
                    channel = await _Channel.open(connection)
            await channel.call(
                channel.channel.queue_bind, self._catalog, self._exchange, routing_key=_ANCHOR
            )
        finally:
            channel.close()

    def _connection_closed(self, connection: AsyncioConnection, reason: BaseException) -> None:
        if connection is not self._connection:
            return
        self._ready.clear()
        self._connection = self._admin = self._publisher = None
        # A restarted broker has lost its transient queues and the catalog listing them.
        self._declared.clear()
        self._cataloged.clear()
        for consumer in self._consumers.values():
            consumer.reset()
        if not self._closing:
            logger.warning("lost RabbitMQ connection to %s: %r", self.url.sanitized(), reason)

    async def _keep_connected(self) -> None:
        try:
            await self._reconnect_forever()
        except asyncio.CancelledError:
            if not self._closing:
                # The event loop is ending without close() (asyncio.run() returning,
                # async_to_sync): close the connection now, or the messages prefetched
                # here would stay unacknowledged, out of every other consumer's reach,
                # until the socket is garbage-collected.
                await self._disconnect()
            raise

    async def _reconnect_forever(self) -> None:
        delay = 0.1
        while True:
            connection = self._connection
            if connection is not None and not connection.is_closed:
                lost = asyncio.get_running_loop().create_future()
                connection.add_on_close_callback(lambda _c, _r, done=lost: _settle(done, None))
                while not lost.done():
                    await asyncio.wait([lost], timeout=self._renew_after)
                    if not lost.done():
                        await self._renew_topology(connection)
                delay = 0.1
                continue
            try:
                await self._connect()
                self.reconnects += 1
                logger.info("reconnected to RabbitMQ at %s", self.url.sanitized())
            except BrokerError as error:
                logger.debug("%s", error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _renew_topology(self, connection: AsyncioConnection) -> None:
        """Keep the catalog (and so the exchange) alive while this backend is connected."""
        try:
            await self._declare_topology(connection)
        except pika.exceptions.AMQPError as error:
            # A lost connection is handled by the caller's loop; the next renewal retries.
            logger.debug("renewing %r on %s: %r", self._catalog, self.url.sanitized(), error)

    async def connected(self, *, forever: bool = False) -> AsyncioConnection:
        """The connection, once usable (BrokerError after ``connect_timeout`` unless forever)."""
        if not self._ready.is_set():
            try:
                await asyncio.wait_for(
                    self._ready.wait(), None if forever else self.config["connect_timeout"]
                )
            except asyncio.TimeoutError:
                raise BrokerError(f"RabbitMQ at {self.url.sanitized()} is unreachable") from None
        if self._connection is None:
            raise _Disconnected(f"lost the connection to RabbitMQ at {self.url.sanitized()}")
        return self._connection

    async def _channel(self) -> _Channel:
        """The admin channel, reopened if a refused operation closed it."""
        connection = await self.connected()
        if self._admin is None or self._admin.closed is not None:
            self._admin = await _Channel.open(connection)
        return self._admin

    async def _publisher_channel(self) -> _Publisher:
        connection = await self.connected()
        if self._publisher is None or self._publisher.channel.closed is not None:
            self._publisher = await _Publisher.open(connection)
        return self._publisher

    def _error(self, what: str, error: BaseException) -> BrokerError:
        broker_error = BrokerError(f"RabbitMQ at {self.url.sanitized()}: {what}: {error!r}")
        broker_error.__cause__ = error
        return broker_error

    # -- queues ---------------------------------------------------------------------

    def _arguments(self, name: str) -> dict[str, Any]:
        return {**self._queue_args, "x-max-length": self.settings.capacity.for_channel(name)}

    async def declare(self, queue: str, name: str, *, channel: _Channel | None = None) -> None:
        """Declare the queue of channel or inbox ``name`` and list it in the catalog."""
        channel = channel or await self._channel()
        try:
            await channel.call(
                channel.channel.queue_declare, queue, arguments=self._arguments(name)
            )
        except pika.exceptions.AMQPError as error:
            if _reply_code(error) == _PRECONDITION_FAILED:
                raise BrokerError(
                    f"queue {queue!r} on {self.url.sanitized()} exists with other arguments "
                    "(every layer sharing a prefix needs the same expiry, capacity and "
                    f"queue_expiry): {error}"
                ) from error
            raise self._error(f"declaring queue {queue!r}", error) from error
        self._declared[queue] = asyncio.get_running_loop().time()
        await self._list(queue)

    async def _list(self, queue: str) -> None:
        """List ``queue`` in the catalog, unless this backend did since it last went missing."""
        if queue not in self._cataloged:
            publisher = await self._publisher_channel()
            publisher.publish("", self._catalog, queue.encode(), None, mandatory=False, wait=False)
            self._cataloged.add(queue)

    def stale(self, queue: str) -> bool:
        """True when this backend has not declared ``queue`` for half its idle lifetime."""
        declared = self._declared.get(queue)
        return declared is None or asyncio.get_running_loop().time() - declared > self._renew_after

    def forget(self, queue: str) -> None:
        """Note that ``queue`` disappeared, so that its next declare catalogs it again."""
        self._declared.pop(queue, None)
        self._cataloged.discard(queue)

    async def _publish(
        self, exchange: str, routing_key: str, payload: bytes, kind: str | None, *, mandatory: bool
    ) -> str:
        try:
            publisher = self._publisher  # None from the moment the connection is lost
            if publisher is None or publisher.channel.closed is not None:
                publisher = await self._publisher_channel()
            future = publisher.publish(exchange, routing_key, payload, kind, mandatory=mandatory)
            assert future is not None
            return await future
        except pika.exceptions.AMQPError as error:
            raise self._error(f"publishing to {routing_key!r}", error) from error

    async def declare_inbox(self, inbox: str) -> None:
        queue = self._prefix + inbox
        _owned.use((*self._key, queue), self, _Memberships)
        self._inboxes.add(inbox)
        await self.declare(queue, inbox)

    def handed(self, queue: str) -> _Handed:
        """The ids of the messages recently handed out from ``queue`` in this process."""
        size = max(256, 4 * self.prefetch)
        return _handed.use((*self._key, queue), self, lambda: _Handed(size))

    def memberships(self, queue: str) -> _Memberships:
        return _owned.use((*self._key, queue), self, _Memberships)

    def _owned_inboxes(self) -> list[_Memberships]:
        return _owned.under(self._key)

    def _owner_here(self, queue: str) -> _Memberships | None:
        return _owned.get((*self._key, queue))

    async def push(self, channel: str, payload: bytes, *, deadline: float, capacity: int) -> None:
        name = non_local_name(channel)
        queue = self._prefix + name
        kind = channel if name != channel else None
        if self.stale(queue):
            await self.declare(queue, name)
        outcome = await self._publish("", queue, payload, kind, mandatory=True)
        if outcome == "returned":
            # The queue went away (idle expiry, flush, broker restart): make it again.
            self.forget(queue)
            await self.declare(queue, name)
            outcome = await self._publish("", queue, payload, kind, mandatory=True)
        if outcome == "nack":
            raise ChannelFull(f"channel {channel!r} is full ({capacity} messages waiting)")
        if outcome == "returned":
            raise BrokerError(f"RabbitMQ at {self.url.sanitized()} did not route to {queue!r}")

    async def pop(self, queue: str, limit: int) -> list[Item]:
        consumer = self._consumers.get(queue)
        if consumer is None:
            consumer = self._consumers[queue] = _Consumer(self, self._prefix + queue, queue)
        return await consumer.pop(limit)

    # -- groups ---------------------------------------------------------------------

    def _member_queue(self, group: str, channel: str) -> str:
        return f"{self._prefix}:member:{group}:{channel}"

    async def _bind(self, queue: str, group: str) -> None:
        channel = await self._channel()
        await channel.call(channel.channel.queue_bind, queue, self._exchange, routing_key=group)

    def unbind_later(self, queue: str, group: str) -> None:
        """Stop routing ``group`` to an inbox that has no member of it left."""

        async def unbind() -> None:
            channel = await self._channel()
            await channel.call(
                channel.channel.queue_unbind, queue, self._exchange, routing_key=group
            )
            # A member that joined from another process meanwhile needs the binding back;
            # its join message (sent before its own bind) is in the inbox by now or never.
            if self.memberships(queue).live(group):
                await self._bind(queue, group)

        self._spawn(unbind())

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("RabbitMQ background operation failed: %r", task.exception())

    async def _add_member_queue(self, group: str, channel: str) -> None:
        """Make normal ``channel`` a member: its queue must exist to receive dead letters."""
        await self.declare(self._prefix + channel, channel)
        member = self._member_queue(group, channel)
        admin = await self._channel()
        arguments = {
            "x-expires": max(1, math.ceil(self.settings.group_expiry * 1000)),
            "x-message-ttl": 0,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": self._prefix + channel,
        }
        try:
            await admin.call(admin.channel.queue_declare, member, arguments=arguments)
        except pika.exceptions.AMQPError as error:
            if _reply_code(error) != _PRECONDITION_FAILED:
                raise
            # Made by a layer with another group_expiry; it holds no message, so replace it.
            admin = await self._channel()
            await admin.call(admin.channel.queue_delete, member)
            await admin.call(admin.channel.queue_declare, member, arguments=arguments)
        # Listed so that flush() deletes it rather than leave it for group_expiry.
        await self._list(member)
        await admin.call(admin.channel.queue_bind, member, self._exchange, routing_key=group)

    async def group_add(self, group: str, channel: str, *, deadline: float) -> None:
        name = non_local_name(channel)
        queue = self._prefix + name
        try:
            if name == channel:
                await self._add_member_queue(group, channel)
                self._memberships[group, channel] = deadline
                return
            memberships = self._owner_here(queue)
            if memberships is not None:
                memberships.join(group, channel, deadline)
            else:
                # Its process may not have received yet, nor made its inbox: declared
                # here, the inbox holds the join and the group's messages for it, as it
                # holds a send's.
                if self.stale(queue):
                    await self.declare(queue, name)
                await self._tell_owner(queue, channel, _JOIN, [group, channel, deadline])
            await self._bind(queue, group)
        except pika.exceptions.AMQPError as error:
            if _reply_code(error) == _NOT_FOUND and name != channel:
                return  # the inbox is gone, and with it its process: nothing to join
            raise self._error(f"adding {channel!r} to group {group!r}", error) from error

    async def group_discard(self, group: str, channel: str) -> None:
        name = non_local_name(channel)
        queue = self._prefix + name
        if name == channel:
            self._memberships.pop((group, channel), None)
            admin = await self._channel()
            member = self._member_queue(group, channel)
            try:
                await admin.call(admin.channel.queue_delete, member)
            except pika.exceptions.AMQPError as error:
                raise self._error(f"removing {channel!r} from {group!r}", error) from error
            self._cataloged.discard(member)
            return
        memberships = self._owner_here(queue)
        if memberships is None:
            await self._tell_owner(queue, channel, _LEAVE, [group, channel, 0.0])
        elif memberships.leave(group, channel):
            self.unbind_later(queue, group)

    async def _tell_owner(self, queue: str, channel: str, kind: str, body: list[Any]) -> None:
        """Queue a membership change for the process that owns inbox ``queue``."""
        body_bytes = msgpack.packb(body)
        outcome = await self._publish("", queue, body_bytes, kind, mandatory=True)
        if outcome == "returned" and kind == _JOIN:
            # The inbox went away since this backend declared it (flush, idle expiry).
            self.forget(queue)
            await self.declare(queue, non_local_name(channel))
            outcome = await self._publish("", queue, body_bytes, kind, mandatory=True)
        if outcome == "nack":
            raise ChannelFull(f"cannot change the groups of {channel!r}: its process inbox is full")

    async def group_send(
        self, group: str, payload: bytes, *, deadline: float, capacity: CapacityPolicy
    ) -> None:
        # group_send never reports a full member to its caller, so it need not wait for
        # each confirm: up to _GROUP_WINDOW publishes are in flight, the oldest awaited
        # beyond that (backpressure), and a negative confirm is logged when it arrives.
        try:
            publisher = await self._publisher_channel()
            confirm = publisher.publish(self._exchange, group, payload, None, mandatory=False)
        except pika.exceptions.AMQPError as error:
            raise self._error(f"publishing to group {group!r}", error) from error
        assert confirm is not None
        confirm.add_done_callback(lambda done: self._group_confirmed(group, done))
        window = self._group_confirms
        window.append(confirm)
        while len(window) > _GROUP_WINDOW:
            oldest = window.popleft()
            try:
                await oldest
            except pika.exceptions.AMQPError as error:
                raise self._error(f"publishing to group {group!r}", error) from error

    def _group_confirmed(self, group: str, confirm: asyncio.Future[str]) -> None:
        with contextlib.suppress(ValueError):
            self._group_confirms.remove(confirm)
        if confirm.cancelled():
            return
        error = confirm.exception()
        if error is not None:
            logger.warning("group_send to %r may be lost: %r", group, error)
        elif confirm.result() == "nack":
            # RabbitMQ confirms negatively when any bound queue refused its copy, and does
            # not say which nor how many; the other members have theirs.
            self.skip_full_members(group, 1, exact=False)

    # -- flush ----------------------------------------------------------------------

    async def flush(self) -> None:
        connection = await self.connected()
        channel = await _Channel.open(connection)
        try:
            queues = await self._drain_catalog(channel)
            for queue in queues:
                await channel.call(channel.channel.queue_delete, queue)
                self.forget(queue)
            # Deleting the exchange drops every binding of the prefix; both go so that
            # ones an earlier version made (never expiring) are replaced.
            await channel.call(channel.channel.exchange_delete, self._exchange)
            await channel.call(channel.channel.queue_delete, self._catalog)
            # Layers of this prefix in other processes may still be open and publish to
            # them: declared again, both disappear by themselves once the prefix is unused.
            await self._declare_topology(connection)
        except pika.exceptions.AMQPError as error:
            raise self._error("flushing", error) from error
        finally:
            channel.close()
        self._declared.clear()
        self._cataloged.clear()
        self._memberships.clear()
        for memberships in self._owned_inboxes():
            memberships.clear()
        for consumer in self._consumers.values():
            consumer.buffer.clear()

    async def _drain_catalog(self, channel: _Channel) -> set[str]:
        """Every queue name in the catalog, emptying it."""
        queues: set[str] = set()
        current: list[asyncio.Future[bytes | None]] = []

        def empty(_frame: pika.frame.Method) -> None:
            _settle(current[0], None)

        def got(_ch: Any, _method: Any, _properties: Any, body: bytes) -> None:
            _settle(current[0], body)

        channel.channel.add_callback(empty, [pika.spec.Basic.GetEmpty], one_shot=False)
        while True:
            current[:] = [channel.future()]
            channel.channel.basic_get(self._catalog, got, auto_ack=True)
            body = await current[0]
            if body is None:
                return queues
            queues.add(body.decode())
