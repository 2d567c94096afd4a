"""The Redis reply reader of our own connections (multilayer.backends.redis.wire): every
reply type, replies split across reads, error replies as redis-py raises them, and a
real server's replies read the same way redis-py reads them."""

from __future__ import annotations

import asyncio
import fcntl
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from redis.asyncio.connection import ConnectionPool, SSLConnection
from redis.exceptions import (
    AskError,
    BusyLoadingError,
    MovedError,
    NoScriptError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from multilayer.backends.redis.wire import Incomplete, Wire, pack, parse
from tests.support.brokers import broker, certificates, free_port, redis_argv, redis_tls_argv
from tests.support.faults import Relay


class _Transport:
    def __init__(self) -> None:
        self.closing = False
        self.written: list[bytes] = []

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str) -> None:
        return None


class _Writer:
    def __init__(self) -> None:
        self.transport = _Transport()

    def write(self, data: bytes) -> None:
        self.transport.written.append(data)


class _Connection:
    """What a Wire takes from a redis-py connection: its stream and its writer."""

    def __init__(self) -> None:
        self._reader = asyncio.StreamReader()
        self._writer = _Writer()


def _wire() -> tuple[Wire, asyncio.StreamReader]:
    connection = _Connection()
    return Wire(connection), connection._reader  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("data", "value"),
    [
        (b"+OK\r\n", b"OK"),
        (b":42\r\n", 42),
        (b":-7\r\n", -7),
        (b"(123456789012345678901234567890\r\n", 123456789012345678901234567890),
        (b"$5\r\nhe\r\nl\r\n", b"he\r\nl"),
        (b"$0\r\n\r\n", b""),
        (b"$-1\r\n", None),
        (b"*-1\r\n", None),
        (b"_\r\n", None),
        (b"*0\r\n", []),
        (b"*3\r\n:1\r\n$1\r\na\r\n*2\r\n_\r\n*1\r\n+x\r\n", [1, b"a", [None, [b"x"]]]),
        (b",1.5\r\n", 1.5),
        (b"#t\r\n", True),
        (b"#f\r\n", False),
        (b"=8\r\ntxt:abcd\r\n", b"abcd"),
        (b"%2\r\n+a\r\n:1\r\n+b\r\n*1\r\n:2\r\n", {b"a": 1, b"b": [2]}),
        (b"~2\r\n:1\r\n:2\r\n", [1, 2]),
        (b"|1\r\n+ttl\r\n:3\r\n:9\r\n", 9),
    ],
)
def test_parse_each_reply_type(data: bytes, value: Any) -> None:
    assert parse(data + b"+next\r\n", 0) == (value, len(data))


@pytest.mark.parametrize(
    "data",
    [b"*2\r\n:1\r\n$3\r\nabc\r\n", b"$5\r\nhello\r\n", b"%1\r\n+a\r\n:1\r\n", b"!3\r\nERR\r\n"],
)
def test_parse_says_incomplete_at_every_cut(data: bytes) -> None:
    for cut in range(len(data)):
        with pytest.raises(Incomplete):
            parse(data[:cut], 0)
    assert parse(data, 0)[1] == len(data)


def test_error_replies_are_redis_py_exceptions() -> None:
    for line, kind in [
        (b"-NOSCRIPT No matching script\r\n", NoScriptError),
        (b"-MOVED 3999 127.0.0.1:6381\r\n", MovedError),
        (b"-ASK 3999 127.0.0.1:6381\r\n", AskError),
        (b"-TRYAGAIN Multiple keys request during rehashing of slot\r\n", TryAgainError),
        (b"-ERR Error running script\r\n", ResponseError),
        (b"!21\r\nSYNTAX invalid syntax\r\n", ResponseError),
    ]:
        error, end = parse(line, 0)
        assert type(error) is kind and end == len(line)
    moved, _ = parse(b"-MOVED 3999 127.0.0.1:6381\r\n", 0)
    assert (moved.slot_id, moved.host, moved.port) == (3999, "127.0.0.1", 6381)
    # Inside an array an error stays in place, as redis-py leaves it.
    (first, second), _ = parse(b"*2\r\n-ERR bad\r\n:1\r\n", 0)
    assert isinstance(first, ResponseError) and str(first) == "bad" and second == 1
    # A server refusing the connection raises at once: the connection is unusable.
    with pytest.raises(BusyLoadingError):
        parse(b"-LOADING Redis is loading the dataset in memory\r\n", 0)


def test_not_the_redis_protocol_is_a_lost_connection() -> None:
    with pytest.raises(RedisConnectionError, match="Protocol error"):
        parse(b"HTTP/1.1 400 Bad Request\r\n", 0)


async def _replies_split_across_reads() -> None:
    wire, stream = _wire()
    replies = b"*2\r\n$5\r\nhello\r\n:1\r\n:2\r\n$-1\r\n-NOSCRIPT gone\r\n+OK\r\n"

    async def trickle() -> None:
        for at in range(len(replies)):
            stream.feed_data(replies[at : at + 1])
            await asyncio.sleep(0)

    feeder = asyncio.ensure_future(trickle())
    assert await wire.read() == [b"hello", 1]
    assert await wire.read() == 2
    assert await wire.read() is None
    with pytest.raises(NoScriptError):
        await wire.read()
    assert await wire.read() == b"OK"
    await feeder
    assert not wire.unfit()


async def _a_large_reply_in_small_pieces_is_joined_once() -> None:
    wire, stream = _wire()
    body = bytes(range(256)) * (32 << 10)  # 8 MiB
    reply = b"$%d\r\n%b\r\n" % (len(body), body)

    async def trickle() -> None:
        for at in range(0, len(reply), 4096):
            stream.feed_data(reply[at : at + 4096])
            await asyncio.sleep(0)

    feeder = asyncio.ensure_future(trickle())
    started = time.perf_counter()
    assert await wire.read() == body
    # Joining the buffer at every piece copies about 8 GiB: many seconds, not a fraction.
    assert time.perf_counter() - started < 2.0
    await feeder


async def _a_push_is_not_a_reply() -> None:
    wire, stream = _wire()
    stream.feed_data(b">3\r\n$6\r\nMOVING\r\n:1\r\n:2\r\n:5\r\n")
    assert await wire.read() == 5


async def _replies_of_one_read_are_read_one_at_a_time() -> None:
    wire, stream = _wire()
    stream.feed_data(b":1\r\n:2\r\n:3")
    assert await wire.read() == 1
    # A reply not read yet makes an idle connection unfit for a new command.
    assert wire.unfit()
    assert await wire.read() == 2
    stream.feed_data(b"\r\n")
    assert await wire.read() == 3
    assert not wire.unfit()


async def _a_closed_stream_fails_the_read_and_the_connection() -> None:
    wire, stream = _wire()
    stream.feed_data(b"$10\r\nabc")
    stream.feed_eof()
    with pytest.raises(RedisConnectionError):
        await wire.read()
    assert wire.unfit()


async def _write_refuses_a_closing_connection() -> None:
    connection = _Connection()
    wire = Wire(connection)  # type: ignore[arg-type]
    await wire.write(pack(("PING",)))
    assert connection._writer.transport.written == [b"*1\r\n$4\r\nPING\r\n"]
    connection._writer.transport.closing = True
    assert wire.unfit()
    with pytest.raises(RedisConnectionError):
        await wire.write(pack(("PING",)))


def test_bytes_count_as_unsent_where_the_kernel_cannot_be_asked() -> None:
    async def body() -> None:
        wire, _ = _wire()  # its transport has no socket
        assert not wire.all_sent()

    asyncio.run(body())


def test_pack() -> None:
    assert pack(("SET", "k", b"v\r\n", 3, 0.1)) == (
        b"*5\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv\r\n\r\n$1\r\n3\r\n$3\r\n0.1\r\n"
    )


@pytest.fixture
def redis_port(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    with broker(redis_argv(port, tmp_path), port, tmp_path):
        yield port


async def _a_real_server_reads_as_with_redis_py(redis_port: int, protocol: int) -> None:
    # Each command runs twice (ours, then redis-py's): none changes what the next reads.
    commands: list[tuple[Any, ...]] = [
        ("SET", "s", b"a\r\n"),
        ("GET", "s"),
        ("LRANGE", "l", 0, -1),
        ("LPOP", "missing"),
        ("EVAL", "return {1, 'x', {false, 2.5}, redis.error_reply('BAD one')}", 0),
        ("EVAL", "return redis.error_reply('TRYAGAIN moving')", 0),
        ("EVALSHA", "0" * 40, 0),
        ("HGETALL", "h"),
        ("BLMOVE", "missing", "l", "LEFT", "RIGHT", 0.01),
        ("PING",),
    ]
    pool = ConnectionPool(host="127.0.0.1", port=redis_port, protocol=protocol)
    theirs, ours = pool.make_connection(), pool.make_connection()
    await theirs.connect()
    await ours.connect()
    wire = Wire(ours)
    try:
        await wire.write(pack(("RPUSH", "l", b"x", b"")) + pack(("HSET", "h", "f", "v")))
        assert [await wire.read(), await wire.read()] == [2, 1]
        await wire.write(b"".join(pack(command) for command in commands))
        for command in commands:
            await theirs.send_packed_command(pack(command))
            try:
                expected = await theirs.read_response()
            except ResponseError as error:
                kind, message = type(error), str(error)
                if message.startswith("TRYAGAIN "):
                    # redis-py before 8 knows the cluster's errors in its cluster client
                    # only; the wire knows them on every connection.
                    kind, message = TryAgainError, message.removeprefix("TRYAGAIN ")
                with pytest.raises(kind, match=re.escape(message)):
                    await wire.read()
                continue
            if isinstance(expected, list):
                # redis-py leaves an error inside an array in place, as the wire does.
                got = await wire.read()
                assert [repr(item) for item in got] == [repr(item) for item in expected]
            else:
                assert await wire.read() == expected
        assert not wire.unfit()
    finally:
        await theirs.disconnect()
        await wire.close(wait=True)


def test_replies_split_across_reads() -> None:
    asyncio.run(_replies_split_across_reads())


def test_a_large_reply_in_small_pieces_is_joined_once() -> None:
    asyncio.run(_a_large_reply_in_small_pieces_is_joined_once())


def test_a_push_is_not_a_reply() -> None:
    asyncio.run(_a_push_is_not_a_reply())


def test_replies_of_one_read_are_read_one_at_a_time() -> None:
    asyncio.run(_replies_of_one_read_are_read_one_at_a_time())


def test_a_closed_stream_fails_the_read_and_the_connection() -> None:
    asyncio.run(_a_closed_stream_fails_the_read_and_the_connection())


def test_write_refuses_a_closing_connection() -> None:
    asyncio.run(_write_refuses_a_closing_connection())


@pytest.mark.parametrize("protocol", [2, 3])
def test_a_real_server_reads_as_with_redis_py(redis_port: int, protocol: int) -> None:
    asyncio.run(_a_real_server_reads_as_with_redis_py(redis_port, protocol))


async def _all_sent_counts_what_asyncio_and_the_kernel_hold(port: int, tls: Path | None) -> None:
    relay = Relay(port, pace=0.2)  # the server reads 32 KiB each 0.2 s
    options: dict[str, Any] = {"host": "127.0.0.1", "port": relay.port}
    if tls is not None:
        options.update(connection_class=SSLConnection, ssl_ca_certs=str(tls / "ca.pem"))
    connection = ConnectionPool(**options).make_connection()
    await connection.connect()
    wire = Wire(connection)
    # The kernel's answer as if it held nothing unsent: then only asyncio's buffers count.
    kernel_empty = mock.patch.object(fcntl, "ioctl", lambda *_: bytes(4))
    try:
        await wire.write(pack(("PING",)))
        assert await wire.read() == b"PONG"
        assert wire.all_sent()
        wire.send(pack(("SET", "big", b"x" * 300_000)))
        with kernel_empty:
            deadline = time.monotonic() + 10
            while not wire.all_sent():
                assert time.monotonic() < deadline, "asyncio never handed the bytes over"
                await asyncio.sleep(0.001)
        # asyncio handed them all to the kernel, which has not sent them all yet.
        assert not wire.all_sent()
        # More than the kernel takes at once: asyncio holds the rest. Beneath TLS, the TCP
        # transport holds it: the TLS transport encrypts what it is given at once.
        wire.send(pack(("SET", "bigger", b"x" * 8_000_000)))
        with kernel_empty:
            assert not wire.all_sent()
    finally:
        # Closed at once: a close waits until the server has read what it was sent.
        if connection._writer is not None:
            connection._writer.transport.abort()
        await wire.close(wait=True)
        relay.close()


@pytest.mark.parametrize("tls", [False, True], ids=["redis", "rediss"])
def test_all_sent_counts_what_asyncio_and_the_kernel_hold(tls: bool, tmp_path: Path) -> None:
    port = free_port()
    certs = certificates(tmp_path) if tls else None
    argv = redis_argv(port, tmp_path)
    if certs is not None:
        argv = redis_tls_argv(port, tmp_path, certs, client_certs="no")
    with broker(argv, port, tmp_path):
        asyncio.run(_all_sent_counts_what_asyncio_and_the_kernel_hold(port, certs))
