"""The AMQP frames of every message, encoded and decoded here: the only module that
touches pika's private parts.

Measured: pika spends about 0.5 ms of CPU per message in its generic frame objects,
callback registry and write-readiness watcher. :class:`FastConnection` therefore
encodes publishes and acknowledgements, and decodes deliveries and publisher
confirms, on the channels registered with it, and writes to the socket at once when
pika has nothing buffered; every other frame still goes through pika, in arrival order.

This rests on pika internals named in :data:`INTERNALS`; :func:`missing_internals`
checks them, and tests/test_rabbitmq.py fails, naming the installed pika version, when
a pika release changes them.
"""

from __future__ import annotations

import inspect
import struct
from collections.abc import Callable
from typing import Any

import pika
import pika.connection
import pika.exceptions
import pika.spec
from pika.adapters import base_connection
from pika.adapters.asyncio_connection import AsyncioConnection
from pika.adapters.utils import io_services_utils
from pika.adapters.utils.io_services_utils import _AsyncPlaintextTransport

from ...exceptions import BrokerError

__all__ = ["INTERNALS", "Delivery", "FastConnection", "missing_internals"]

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
#: Most bytes one recv() asks for, and one readiness event reads.
_RECV_BYTES, _READ_AT_ONCE = 65536, 1 << 20

#: delivery tag, redelivered, routing key, ``type`` and ``message_id`` properties, body.
Delivery = tuple[int, bool, str, "str | None", "str | None", bytes]
#: consumer tag, delivery.
OnDelivery = Callable[[str, Delivery], None]
#: positive, delivery tag, multiple.
OnConfirm = Callable[[bool, int, bool], None]

#: The pika internals this module relies on: per class, the methods (with the parameter
#: names after ``self``) it overrides or calls, and the attributes its instances set.
INTERNALS: dict[type, tuple[dict[str, tuple[str, ...]], tuple[str, ...]]] = {
    pika.connection.Connection: (
        {
            "_on_data_available": ("data_in",),
            "_read_frame": (),
            "_trim_frame_buffer": ("byte_count",),
            "_process_frame": ("frame_value",),
            "_output_marshaled_frames": ("marshaled_frames",),
            "_adapter_emit_data": ("data",),
        },
        (
            "_frame_buffer",
            "_body_max_length",
            "bytes_sent",
            "frames_sent",
            "bytes_received",
            "frames_received",
        ),
    ),
    base_connection.BaseConnection: (
        {"_proto_connection_made": ("transport",)},
        ("_transport",),
    ),
    io_services_utils._AsyncTransportBase: (
        {"get_write_buffer_size": (), "_consume": ()},
        ("_sock", "_protocol", "_state"),
    ),
}


def missing_internals() -> list[str]:
    """What of :data:`INTERNALS` the installed pika lacks or spells otherwise ([] if none)."""
    problems: list[str] = []
    for owner, (methods, attributes) in INTERNALS.items():
        where = f"{owner.__module__}.{owner.__qualname__}"
        for name, parameters in methods.items():
            method = getattr(owner, name, None)
            if not callable(method):
                problems.append(f"{where}.{name} is gone")
                continue
            found = tuple(inspect.signature(method).parameters)[1:]
            if found != parameters:
                problems.append(f"{where}.{name} takes {found}, not {parameters}")
        source = inspect.getsource(owner)
        problems += [
            f"{where} no longer sets self.{name}"
            for name in attributes
            if f"self.{name} =" not in source and f"self.{name}:" not in source
        ]
    transport = _AsyncPlaintextTransport
    for name in ("RxEndOfFile", "_STATE_ACTIVE"):
        if not hasattr(transport, name):
            problems.append(f"{transport.__qualname__}.{name} is gone")
    if not issubclass(transport, io_services_utils._AsyncTransportBase):
        problems.append(f"{transport.__qualname__} no longer derives from _AsyncTransportBase")
    return problems


def _short_string(value: str) -> bytes:
    encoded = value.encode()
    if len(encoded) > 255:
        raise BrokerError(f"AMQP names are at most 255 bytes, not {value!r}")
    return bytes((len(encoded),)) + encoded


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


class FastConnection(AsyncioConnection):  # type: ignore[misc]
    """pika's asyncio connection with a short path for the frames of every message.

    Register a channel's delivery handler in ``deliveries`` and its confirm handler in
    ``confirms`` (by channel number); :meth:`publish` and :meth:`ack` write frames.
    ``answer_timeout`` is how long its channels wait for an answer or a confirm from
    RabbitMQ before they give up on the channel (see :mod:`.channel`).
    """

    _frame_buffer: bytes  # pika's: received bytes not yet decoded

    def __init__(self, *args: Any, answer_timeout: float = 30.0, **kwargs: Any) -> None:
        self.answer_timeout = answer_timeout
        self.deliveries: dict[int, OnDelivery] = {}
        self.confirms: dict[int, OnConfirm] = {}
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
