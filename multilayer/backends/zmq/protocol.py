"""The wire protocol hubs, nodes and layers speak: frames, statuses, leases, sharding.

Every request is a multipart ZeroMQ message whose first frame is a msgpack list
``[command, request_id, *arguments]`` (:func:`encode`, :func:`decode`) and whose further
frames are payloads; replies have the same shape, with ``ok`` or ``error`` as command.
Messages sent on a lease travel batched: one frame holds the payloads back to back
(:func:`split_batch`). Nothing here opens a socket.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Any

import msgpack

from ...serialization import HEADER_SIZE

__all__ = [
    "DEFAULT_MAX_MESSAGE",
    "FULL",
    "GROUP_LEASE",
    "LEASE",
    "OK",
    "UNKNOWN",
    "WANT",
    "BadRequest",
    "Leases",
    "count",
    "decode",
    "encode",
    "number",
    "shard",
    "split_batch",
    "text",
]

#: Item statuses in replies: accepted, refused for capacity, no such inbox here.

OK, FULL, UNKNOWN = 0, 1, 2
#: Frames larger than this are refused by the sockets themselves. A frame holds one payload
#: or a batch of at most 1 MiB of them, and a payload is at most
#: ``largest_payload(max_message_size, encrypted=True)``: 3.5 MB at the default
#: max_message_size, and the ZeroMQ backend refuses a max_message_size beyond ~6 MB.
DEFAULT_MAX_MESSAGE = 8 * 1024 * 1024 + 64 * 1024
#: Places a sender asks a queue's owner (hub or node) to lease it.
WANT = 256
#: How long places leased to a sender stay reserved for it (hub queues and node inboxes).
LEASE = 0.2
#: How long a client may fan out on its own to the members of a small group it asked for
#: (``gwatch``), unless the hub invalidates that copy first (``ginval``).
GROUP_LEASE = 0.5


def encode(command: str, request_id: int, *args: Any) -> bytes:
    """The header frame of a request or reply."""
    data: bytes = msgpack.packb([command, request_id, *args], use_bin_type=True)
    return data


def decode(frame: bytes) -> tuple[str, int, list[Any]]:
    """Split a header frame; ValueError when it is not one."""
    try:
        header = msgpack.unpackb(frame, raw=False, use_list=True)
    except Exception as error:  # msgpack raises many types for garbage
        raise ValueError(f"undecodable header ({error})") from None
    if (
        not isinstance(header, list)
        or len(header) < 2
        or not isinstance(header[0], str)
        or type(header[1]) is not int
    ):
        raise ValueError("header is not [command, request_id, ...]")
    return header[0], header[1], header[2:]


class BadRequest(ValueError):
    """A request whose arguments do not fit its command."""


def text(value: Any) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"expected text, got {type(value).__name__}")
    return value


def count(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise BadRequest(f"expected a count, got {value!r:.40}")
    return value


def number(value: Any) -> float:
    if type(value) not in (int, float):
        raise BadRequest(f"expected a number, got {value!r:.40}")
    return float(value)


class Leases:
    """Places of one queue reserved for senders (hub queues and node inboxes alike).

    With an ok, the queue's owner leases a sender that asked before within ``LEASE``
    seconds up to ``want`` places for ``LEASE`` seconds: the sender then sends that many
    messages without waiting for answers. A sender's first ask gets no lease, so one that
    sends once (a Django view's ``async_to_sync`` call, a backend per event loop) never
    holds places it will not use. Places leased and not used yet count as taken for
    everyone else, and all leases together hold at most half the free room, so another
    sender is refused only once the queue is at least half full of stored messages.
    """

    def __init__(self) -> None:
        #: sender id -> (places left, monotonic end of the lease)
        self._leases: dict[bytes, tuple[int, float]] = {}
        #: sender id -> monotonic time of its last ask, for ``LEASE`` seconds
        self._asked: dict[bytes, float] = {}

    def __bool__(self) -> bool:
        return bool(self._leases or self._asked)

    def reserved(self, but: bytes = b"") -> int:
        """Places leased to senders other than ``but``; drops spent and expired leases."""
        current = time.monotonic()
        for sender, asked in list(self._asked.items()):
            if asked + LEASE <= current:
                del self._asked[sender]
        total = 0
        for sender, (count, until) in list(self._leases.items()):
            if count <= 0 or until <= current:
                del self._leases[sender]
            elif sender != but:
                total += count
        return total

    def grant(self, sender: bytes, free: int, want: int) -> int:
        """Lease ``sender`` up to ``want`` of ``free`` places (free of stored messages)."""
        self._leases.pop(sender, None)
        reserved = self.reserved()
        asked_before = sender in self._asked
        current = self._asked[sender] = time.monotonic()
        if not asked_before:
            return 0
        granted = max(0, min(want, free // 2 - reserved))
        if granted:
            self._leases[sender] = (granted, current + LEASE)
        return granted

    def use(self, sender: bytes) -> bool:
        """Use one leased place of ``sender``; False when it holds none."""
        count, until = self._leases.get(sender, (0, 0.0))
        if count <= 0 or until <= time.monotonic():
            return False
        self._leases[sender] = (count - 1, until)
        return True


def split_batch(items: Any, blob: bytes) -> list[tuple[str, str, bytes]]:
    """The messages of a batch of leased sends: ``items`` are ``[key, channel, size]``
    triples, ``blob`` the payloads back to back. ValueError, before anything is used,
    when the batch does not add up.
    """
    if not isinstance(items, list):
        raise BadRequest("a batch needs a list of [key, channel, size]")
    messages: list[tuple[str, str, bytes]] = []
    start = 0
    for item in items:
        if not isinstance(item, list) or len(item) != 3:
            raise BadRequest("a batch item is [key, channel, size]")
        key, channel, size = text(item[0]), text(item[1]), item[2]
        if type(size) is not int or size < HEADER_SIZE:
            raise BadRequest("short payload in a batch")
        messages.append((key, channel, blob[start : start + size]))
        start += size
    if start != len(blob):
        raise BadRequest("batch payload sizes do not add up")
    return messages


def shard(name: str, hubs: Sequence[str]) -> int:
    """Rendezvous hashing: the hub a name lives on, stable whatever the order of ``hubs``."""
    if len(hubs) == 1:
        return 0
    scores = [hashlib.blake2b(f"{hub}\0{name}".encode(), digest_size=8).digest() for hub in hubs]
    return scores.index(max(scores))
