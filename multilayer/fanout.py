"""Group copies for process inboxes: one copy per inbox and ``group_send``, naming its members.

All process-specific channels of one process share an inbox, so a group whose members
live in one process needs one copy of a message there, not one per member: counted per
member, a room with more local members than ``capacity`` lost copies on every broadcast.
A backend that fans out puts into each inbox with members one *envelope*, stored under
the inbox's own name (``"specific.3f2a9c!"``):

    deadline (8 bytes) | MARK | header length (4 bytes) | header | body

The deadline and body are those of the message's payload, so a member's copy is
``deadline + body``, byte for byte what a direct send stores (encrypted bodies included).
The header is msgpack ``[group, sent_at, [suffix, ...], [membership deadline, ...]]``,
where a suffix is the part of a member's name after the inbox's ``!``. ``MARK`` (0xc1) is
the one byte msgpack never uses, and a Fernet token starts with ``g``, so no payload a
layer makes starts with it.

The receiving process (:class:`multilayer.local.LocalQueue`) hands the body to each
listed member unless its membership ended before the copy arrived: its deadline passed,
or this layer discarded it after the copy was sent (:class:`Departures`). Capacity counts
the envelope once in the inbox, and the backlog a process keeps per member is bounded
by that member's capacity: a copy for a member whose backlog is full is dropped and
counted, with one log line per envelope.
"""

from __future__ import annotations

import math
import struct
import threading
import time
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import msgpack

from .names import non_local_name

__all__ = ["MARK", "Departures", "Envelope", "is_envelope", "open_envelope", "seal", "split"]

MARK = b"\xc1"
_HEADER_AT = 8
_LENGTH = struct.Struct("!I")
_BODY_AT = _HEADER_AT + len(MARK) + _LENGTH.size

#: A member and the deadline of its membership (``math.inf`` when the backend cannot tell).
Member = tuple[str, float]


class Envelope(NamedTuple):
    """An opened envelope: each member's copy is :attr:`payload`."""

    group: str
    sent_at: float
    members: list[Member]
    payload: bytes


def split(members: Iterable[Member]) -> tuple[dict[str, list[Member]], list[Member]]:
    """``members`` as process-specific ones by inbox, and normal channels."""
    inboxes: dict[str, list[Member]] = {}
    normal: list[Member] = []
    for member in members:
        inbox = non_local_name(member[0])
        if inbox == member[0]:
            normal.append(member)
        else:
            inboxes.setdefault(inbox, []).append(member)
    return inboxes, normal


def seal(
    payload: bytes, group: str, sent_at: float, inbox: str, members: Sequence[Member]
) -> bytes:
    """The envelope carrying ``payload`` to ``members``, all process-specific in ``inbox``."""
    start = len(inbox)
    header = msgpack.packb(
        [group, sent_at, [name[start:] for name, _ in members], [until for _, until in members]],
        use_bin_type=True,
    )
    return b"".join(
        (payload[:_HEADER_AT], MARK, _LENGTH.pack(len(header)), header, payload[_HEADER_AT:])
    )


def is_envelope(payload: bytes) -> bool:
    """Whether ``payload`` is an envelope rather than one channel's message."""
    return payload[_HEADER_AT : _HEADER_AT + 1] == MARK


def open_envelope(inbox: str, data: bytes) -> Envelope:
    """The group, send time, members and payload of an envelope; ValueError if malformed."""
    try:
        (length,) = _LENGTH.unpack_from(data, _HEADER_AT + len(MARK))
        end = _BODY_AT + length
        if end > len(data):
            raise ValueError("its header runs past its end")
        header = msgpack.unpackb(data[_BODY_AT:end], raw=False, use_list=True)
        group, sent_at, suffixes, untils = header
    except (ValueError, TypeError, struct.error, msgpack.UnpackException) as error:
        raise ValueError(f"malformed group envelope ({type(error).__name__})") from None
    if (
        type(group) is not str
        or not isinstance(sent_at, (int, float))
        or type(suffixes) is not list
        or type(untils) is not list
        or len(suffixes) != len(untils)
        or not all(type(suffix) is str for suffix in suffixes)
        or not all(isinstance(until, (int, float)) for until in untils)
    ):
        raise ValueError("malformed group envelope (header of the wrong shape)")
    members = [
        (inbox + suffix, float(until)) for suffix, until in zip(suffixes, untils, strict=True)
    ]
    return Envelope(group, float(sent_at), members, data[:_HEADER_AT] + data[end:])


class Departures:
    """Memberships this layer ended with ``group_discard``, and when.

    A group copy sent before a discard may still be in flight; the receiving process
    drops it for that member. Discards are remembered for ``keep_for`` seconds (the
    layer's expiry: older copies are dropped as expired anyway). Thread-safe: a layer is
    used from several event loops.
    """

    def __init__(self, keep_for: float) -> None:
        self._keep_for = keep_for
        self._lock = threading.Lock()
        self._left: dict[tuple[str, str], float] = {}
        self._next_purge = math.inf

    def __bool__(self) -> bool:
        return bool(self._left)

    def leave(self, group: str, channel: str) -> None:
        """Note that ``channel`` left ``group`` now."""
        current = time.time()
        with self._lock:
            self._left[group, channel] = current
            if current >= self._next_purge:
                cutoff = current - self._keep_for
                self._left = {key: at for key, at in self._left.items() if at > cutoff}
                self._next_purge = math.inf
            if self._next_purge == math.inf:
                self._next_purge = current + self._keep_for

    def join(self, group: str, channel: str) -> None:
        """Note that ``channel`` (re)joined ``group``: copies sent from now on are its own."""
        if self._left:
            with self._lock:
                self._left.pop((group, channel), None)

    def left_after(self, group: str, channel: str, sent_at: float) -> bool:
        """Whether ``channel`` left ``group`` at or after ``sent_at``."""
        left = self._left.get((group, channel))
        return left is not None and left >= sent_at

    def clear(self) -> None:
        """Forget every departure (the layer was flushed)."""
        with self._lock:
            self._left.clear()
            self._next_purge = math.inf
