"""The Redis protocol on our own connections: commands packed and replies read here.

redis-py makes each connection (TLS, credentials, ``HELLO``, ``SELECT``, Sentinel
discovery); from then on a :class:`Wire` writes what :func:`pack` made and reads the
replies straight from the connection's stream. redis-py's reader takes half a dozen
nested awaits per reply; here a reply already received costs one function call, and a
batch of replies usually one read from the stream. Error replies become the exceptions
redis-py raises for them (NOSCRIPT, MOVED, ASK, TRYAGAIN, ...), from its own table.
"""

from __future__ import annotations

import asyncio
import fcntl
import sys
from collections.abc import Sequence
from typing import Any

from redis._parsers import BaseParser
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import (
    AskError,
    ClusterCrossSlotError,
    ClusterDownError,
    MasterDownError,
    MovedError,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

__all__ = ["Incomplete", "Push", "Wire", "discard", "pack", "parse"]

#: Most bytes one read takes from the stream: a take's reply of 256 messages fits.
_READ_SIZE = 1 << 16
#: Buffered bytes over which a write waits for the socket to take them.
_WRITE_HIGH = 1 << 16
#: Linux's ioctl for the bytes a TCP socket holds that it has not sent (linux/sockios.h).
_SIOCOUTQNSD = 0x894B
_NO_BYTES = bytes(4)


class Incomplete(Exception):
    """The buffer ends before the reply does; it must be ``need`` bytes long at least."""

    def __init__(self, need: int) -> None:
        super().__init__(need)
        self.need = need


class Push:
    """A RESP3 push (``>``): out-of-band news from the server, not a reply."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items


def pack(command: Sequence[Any]) -> bytes:
    """``command`` in the Redis protocol; leaner than redis-py's general packer."""
    parts = [b"*%d\r\n" % len(command)]
    for argument in command:
        if type(argument) is not bytes:
            argument = (repr(argument) if type(argument) is float else str(argument)).encode()
        parts.append(b"$%d\r\n%b\r\n" % (len(argument), argument))
    return b"".join(parts)


def parse(buffer: bytes, at: int) -> tuple[Any, int]:
    """The reply (RESP2 or RESP3) starting at ``at`` in ``buffer``, and where it ends.

    Values come as redis-py gives them undecoded: bytes, int, float, bool, None, lists,
    dicts. An error reply is its redis-py exception, returned in place (inside an array
    too, as redis-py does) except for the connection-level ones, raised at once.
    :class:`Incomplete` when ``buffer`` ends first.
    """
    end = buffer.find(b"\r\n", at)
    if end < 0:
        raise Incomplete(len(buffer) + 1)
    kind = buffer[at]
    after = end + 2
    if kind == 0x24 or kind == 0x3D:  # $ bulk string, = verbatim string
        size = int(buffer[at + 1 : end])
        if size < 0:
            return None, after
        stop = after + size
        if len(buffer) < stop + 2:
            raise Incomplete(stop + 2)
        return buffer[after + 4 if kind == 0x3D else after : stop], stop + 2
    if kind == 0x3A or kind == 0x28:  # : integer, ( big number
        return int(buffer[at + 1 : end]), after
    if kind == 0x2A or kind == 0x7E or kind == 0x3E:  # * array, ~ set, > push
        count = int(buffer[at + 1 : end])
        if count < 0:
            return None, after
        items = []
        for _ in range(count):
            item, after = parse(buffer, after)
            items.append(item)
        return (Push(items) if kind == 0x3E else items), after
    if kind == 0x2B:  # + simple string
        return buffer[at + 1 : end], after
    if kind == 0x5F:  # _ null
        return None, after
    if kind == 0x2D:  # - error
        return _error(buffer[at + 1 : end]), after
    if kind == 0x21:  # ! blob error
        size = int(buffer[at + 1 : end])
        if len(buffer) < after + size + 2:
            raise Incomplete(after + size + 2)
        return _error(buffer[after : after + size]), after + size + 2
    if kind == 0x2C:  # , double
        return float(buffer[at + 1 : end]), after
    if kind == 0x23:  # # boolean
        return buffer[at + 1 : end] == b"t", after
    if kind == 0x25 or kind == 0x7C:  # % map, | attributes (which precede a reply)
        mapping = {}
        for _ in range(int(buffer[at + 1 : end])):
            key, after = parse(buffer, after)
            mapping[key], after = parse(buffer, after)
        return (mapping, after) if kind == 0x25 else parse(buffer, after)
    # Not the Redis protocol: the stream cannot be trusted any further.
    raise RedisConnectionError(f"Protocol error: {buffer[at:end]!r}")


class _Errors(BaseParser):
    """redis-py's table of error replies, with the cluster's: redis-py 8 has them in its
    base parser, 5.x to 7.x only in the parser of its cluster client."""

    EXCEPTION_CLASSES = {
        **BaseParser.EXCEPTION_CLASSES,
        "ASK": AskError,
        "TRYAGAIN": TryAgainError,
        "MOVED": MovedError,
        "CLUSTERDOWN": ClusterDownError,
        "CROSSSLOT": ClusterCrossSlotError,
        "MASTERDOWN": MasterDownError,
    }


def _error(text: bytes) -> RedisError:
    error: RedisError = _Errors.parse_error(text.decode("utf-8", errors="replace"))  # type: ignore[no-untyped-call]
    if isinstance(error, RedisConnectionError):
        # As redis-py does: the server refuses this connection (LOADING, auth, ...).
        raise error
    return error


class Wire:
    """A connected redis-py connection, used for our own commands only.

    Nothing else reads from it: redis-py's reader never over-reads, so the stream holds
    exactly the replies not yet read when a connection is handed over. Reads fail with
    redis-py's ConnectionError once the connection is closed (by the server, or by the
    backend's watchdog).
    """

    __slots__ = (
        "_buffer", "_countable", "_pos", "_socket", "_stream", "_transports", "_writer",
        "connection",
    )  # fmt: skip

    def __init__(self, connection: AbstractConnection) -> None:
        self.connection = connection
        stream, writer = connection._reader, connection._writer
        if stream is None or writer is None:
            raise RedisConnectionError("Connection closed before use")
        self._stream = stream
        self._writer = writer
        self._buffer = b""
        self._pos = 0
        self._socket = writer.transport.get_extra_info("socket")
        self._transports, self._countable = _holders(writer.transport)

    def send(self, data: bytes) -> None:
        """Send ``data`` without waiting: what the socket does not take at once is
        buffered (fit for commands, which are small)."""
        writer = self._writer
        if writer.transport.is_closing():
            raise RedisConnectionError("Connection closed before write")
        writer.write(data)

    def all_sent(self) -> bool:
        """Whether every byte written has left this host: neither asyncio nor the kernel
        holds any. False where that cannot be told.

        Only then is a command whose reply nobody awaits safe from the event loop's end.
        A connection closed while replies are due is reset by the first to arrive, and
        the reset drops what the kernel had not sent yet; bytes already sent still reach
        the server.
        """
        if any(transport.get_write_buffer_size() for transport in self._transports):
            return False
        # Asked each time: a closed socket's descriptor (-1 then) may be another's now.
        fd = self._socket.fileno() if self._countable else -1
        if fd < 0:
            return False
        try:
            return fcntl.ioctl(fd, _SIOCOUTQNSD, _NO_BYTES) == _NO_BYTES
        except OSError:
            return False

    async def write(self, data: bytes) -> None:
        """Send ``data``; waits only while the socket is behind."""
        self.send(data)
        if self._writer.transport.get_write_buffer_size() > _WRITE_HIGH:
            await self._writer.drain()

    async def read(self) -> Any:
        """The next reply; an error reply is raised as redis-py raises it."""
        while True:
            buffer, at = self._buffer, self._pos
            need = len(buffer) + 1
            if at < len(buffer):
                try:
                    reply, self._pos = parse(buffer, at)
                except Incomplete as incomplete:
                    need = incomplete.need
                else:
                    if isinstance(reply, RedisError):
                        raise reply
                    if type(reply) is not Push:
                        return reply
                    continue
            # Joined once there is enough for the reply: a large one arrives in many
            # pieces. A read cancelled meanwhile drops them, and its caller the connection.
            chunks, have = [buffer[at:]], len(buffer)
            while have < need:
                data = await self._stream.read(max(_READ_SIZE, need - have))
                if not data:
                    raise RedisConnectionError("Connection closed by server.")
                chunks.append(data)
                have += len(data)
            self._buffer = b"".join(chunks)
            self._pos = 0

    def unfit(self) -> bool:
        """Whether this idle connection cannot take a new command: closed, reset, or
        holding a stray reply. Nothing has been written on it since its last reply, so
        the caller may reconnect and send instead."""
        return (
            self._pos < len(self._buffer)
            or self.closed()
            # asyncio has no public way to ask whether bytes wait unread.
            or bool(getattr(self._stream, "_buffer", b""))
        )

    def closed(self) -> bool:
        """Whether the connection is closed, closing, or reset (replies may be due)."""
        stream = self._stream
        return (
            self._writer.transport.is_closing() or stream.at_eof() or stream.exception() is not None
        )

    async def close(self, *, wait: bool = False) -> None:
        """Close the connection; with ``wait``, until it is closed, even if it was closed
        before without waiting, and aborted past the connect timeout.

        A TLS connection closes only once its shutdown has gone both ways, in the event
        loop: one left half closed when the loop ends keeps its socket open.
        """
        await self.connection.disconnect(nowait=True)
        if not wait or self.released():
            return
        try:
            await asyncio.wait_for(
                self._writer.wait_closed(), self.connection.socket_connect_timeout
            )
        except BaseException as error:
            # Aborted, the socket closes at the loop's next step, whatever the peer does.
            self._writer.transport.abort()
            if not isinstance(error, (asyncio.TimeoutError, OSError)):
                raise

    def released(self) -> bool:
        """Whether the socket is closed (True where that cannot be told)."""
        return self._socket is None or self._socket.fileno() < 0


def _holders(transport: asyncio.WriteTransport) -> tuple[list[asyncio.WriteTransport], bool]:
    """The transports that may hold bytes written on ``transport``, and whether the
    kernel can be asked about the bytes its socket holds."""
    countable = sys.platform == "linux" and transport.get_extra_info("socket") is not None
    if transport.get_extra_info("ssl_object") is None:
        return [transport], countable
    # asyncio's TLS transport counts only the bytes not encrypted yet; the encrypted ones
    # wait in the TCP transport beneath it, which asyncio offers no public way to reach.
    beneath = getattr(getattr(transport, "_ssl_protocol", None), "_transport", None)
    if not isinstance(beneath, asyncio.WriteTransport):
        return [transport], False
    return [transport, beneath], countable


async def discard(wire: Wire | None, *, wait: bool = False) -> None:
    """Close ``wire``, if any (see :meth:`Wire.close`)."""
    if wire is not None:
        await wire.close(wait=wait)
