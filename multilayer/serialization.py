"""How messages travel: an 8-byte expiry deadline followed by the msgpack body.

The deadline (seconds since the epoch, as a big-endian double) stays readable without
decoding the body, so brokers' scripts and the core can drop expired messages cheaply.
A future encryption step wraps :class:`Serializer`; the envelope stays the same.
"""

from __future__ import annotations

import struct
import threading
from typing import Any, Protocol

import msgpack

from .exceptions import MessageTooLarge

__all__ = ["MsgpackSerializer", "Serializer", "deadline_of", "pack", "unpack", "unpack_message"]

_DEADLINE = struct.Struct("!d")
HEADER_SIZE = _DEADLINE.size


class Serializer(Protocol):
    """Turns a message dict into bytes and back."""

    def dumps(self, message: dict[str, Any]) -> bytes: ...

    def loads(self, data: bytes) -> dict[str, Any]: ...


class MsgpackSerializer:
    """msgpack with bin/str kept apart, so bytes and str survive the round trip."""

    def __init__(self) -> None:
        # A Packer is reused (it is twice as fast as packb) but is not thread-safe.
        self._local = threading.local()

    def dumps(self, message: dict[str, Any]) -> bytes:
        try:
            packer = self._local.packer
        except AttributeError:
            packer = self._local.packer = msgpack.Packer(use_bin_type=True)
        try:
            data: bytes = packer.pack(message)
        except (TypeError, ValueError, OverflowError) as error:
            packer.reset()
            raise TypeError(f"message is not msgpack-serializable: {error}") from None
        return data

    def loads(self, data: bytes) -> dict[str, Any]:
        message: dict[str, Any] = msgpack.unpackb(data, raw=False, strict_map_key=False)
        return message


DEFAULT_SERIALIZER = MsgpackSerializer()


def pack(
    message: dict[str, Any],
    deadline: float,
    *,
    max_size: int,
    serializer: Serializer = DEFAULT_SERIALIZER,
) -> bytes:
    """The payload of ``message``; MessageTooLarge when it exceeds ``max_size`` bytes."""
    payload = _DEADLINE.pack(deadline) + serializer.dumps(message)
    if len(payload) > max_size:
        raise MessageTooLarge(
            f"message of {len(payload)} bytes exceeds max_message_size={max_size}"
        )
    return payload


def unpack(
    payload: bytes, serializer: Serializer = DEFAULT_SERIALIZER
) -> tuple[float, dict[str, Any]]:
    """The deadline and message of a payload made by :func:`pack`."""
    return _DEADLINE.unpack_from(payload)[0], serializer.loads(payload[HEADER_SIZE:])


def unpack_message(payload: bytes, serializer: Serializer = DEFAULT_SERIALIZER) -> dict[str, Any]:
    """The message of a payload made by :func:`pack`."""
    return serializer.loads(payload[HEADER_SIZE:])


def deadline_of(payload: bytes) -> float:
    """The expiry deadline of a payload, without decoding its body."""
    deadline: float = _DEADLINE.unpack_from(payload)[0]
    return deadline
