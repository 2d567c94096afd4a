"""Redis backend tests beyond the conformance suite: URLs, sharding, TLS, Sentinel,
restarts, cancellation and idle receives. Every server here is started by the test on a
free loopback port (tests/brokers.py); none touches the machine's shared Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
import redis.asyncio

from multilayer import BrokerError, ChannelFull, ChannelLayer, ConfigurationError
from multilayer.backends.redis import RedisBackend
from multilayer.backends.redis import backend as redis_backend
from multilayer.backends.redis.ring import Ring
from multilayer.backends.redis.shard import make_shards
from multilayer.capacity import CapacityPolicy
from multilayer.fanout import open_envelope, seal
from multilayer.names import non_local_name
from multilayer.serialization import pack, unpack_message
from tests.support.brokers import (
    BrokerProcess,
    broker,
    certificates,
    connections_to,
    free_port,
    redis_argv,
    redis_tls_argv,
)
from tests.support.faults import Relay, SentinelFailover
from tests.support.redis_layer import answered

T = TypeVar("T")


def run(body: Callable[[], Awaitable[T]], timeout: float = 60.0) -> T:
    """Run ``body()`` in a fresh event loop, bounded."""

    async def bounded() -> T:
        return await asyncio.wait_for(body(), timeout)

    return asyncio.run(bounded())


@pytest.fixture
def redis_port(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    with broker(redis_argv(port, tmp_path), port, tmp_path):
        yield port


def keys_on(port: int, pattern: str = "*") -> list[str]:
    client = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
    try:
        return sorted(client.keys(pattern))
    finally:
        client.close()


def members_on(port: int, key: str) -> list[str]:
    client = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
    try:
        return list(client.zrange(key, 0, -1))
    finally:
        client.close()


def scores_on(port: int, key: str) -> dict[str, float]:
    client = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
    try:
        return dict(client.zrange(key, 0, -1, withscores=True))
    finally:
        client.close()


async def open_backend(url: str, **options: Any) -> RedisBackend:
    """A backend instance as the core makes one, opened in the running loop."""
    layer = ChannelLayer(url, **options)
    backend = layer.backend_class(layer.url, layer.settings, layer.backend_options)
    assert isinstance(backend, RedisBackend)
    await backend.open()
    return backend


# -- URLs and options ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "options", "problem"),
    [
        ("redis://localhost/zero", {}, "database number"),
        ("redis://h1:6379,h1:6379/0", {}, "appears twice"),
        ("redis://localhost/0?ssl_ca_certs=/ca.pem", {}, "only to rediss://"),
        ("redis://localhost/0", {"ssl_cert_reqs": "none"}, "only to rediss://"),
        ("rediss://localhost/0?service=other", {}, "only to redis+sentinel://"),
        ("redis://localhost/0?sentinel_password=hush", {}, "only to redis+sentinel://"),
        ("redis+sentinel:///0", {}, "list the Sentinels"),
        ("redis+sentinel://s1/0?service=a,,b", {}, "empty master name"),
        ("redis+sentinel://s1/0?service=a,a", {}, "names a master twice"),
        ("rediss://localhost/0?ssl_cert_reqs=maybe", {}, "must be one of"),
        ("redis://localhost/0?ssl_cafile=/ca.pem", {}, "only to rediss://"),
        ("redis://localhost/0", {"ssl_verify": False}, "only to rediss://"),
        ("redis+sentinel://s1/0?ssl_check_hostname=false", {}, "only to rediss://"),
        ("rediss://localhost/0?ssl_keyfile=/k.pem", {}, "ssl_keyfile needs ssl_certfile"),
        ("rediss://localhost/0?ssl_ca_certs=/a.pem&ssl_cafile=/b.pem", {}, "set the same thing"),
        ("redis://localhost/0?socket_timeout=0.01", {}, ">= 0.2"),
        ("redis://localhost/0?retries=3", {}, "unknown option 'retries'"),
    ],
)
def test_bad_urls_are_refused_without_io(url: str, options: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(problem)):
        ChannelLayer(url, **options)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", {"ssl_ca_certs": None, "ssl_cert_reqs": "required", "ssl_check_hostname": True}),
        ("?ssl_cafile=/ca.pem&ssl_verify=false", {"ssl_ca_certs": "/ca.pem",
         "ssl_cert_reqs": "none", "ssl_check_hostname": False}),
        # The names documented before the shared TLS vocabulary still work.
        ("?ssl_ca_certs=/ca.pem&ssl_cert_reqs=none", {"ssl_ca_certs": "/ca.pem",
         "ssl_cert_reqs": "none", "ssl_check_hostname": False}),
        ("?ssl_cert_reqs=optional&ssl_check_hostname=false", {"ssl_ca_certs": None,
         "ssl_cert_reqs": "required", "ssl_check_hostname": False}),
        ("?ssl_certfile=/c.pem&ssl_keyfile=/k.pem", {"ssl_certfile": "/c.pem",
         "ssl_keyfile": "/k.pem", "ssl_cert_reqs": "required"}),
    ],
)  # fmt: skip
def test_tls_options_reach_redis_py_as_its_own_arguments(
    query: str, expected: dict[str, Any]
) -> None:
    layer = ChannelLayer(f"rediss://h1:6380,h2/0{query}")
    shards = make_shards(
        layer.url, layer.backend_options, ["h1:6380", "h2:6379"], lambda _shard: None
    )
    for shard in shards:
        arguments = shard.pool.connection_kwargs
        assert {name: arguments[name] for name in expected} == expected
    assert [shard.label for shard in shards] == ["h1:6380", "h2:6379"]


def test_errors_never_show_the_password() -> None:
    with pytest.raises(ConfigurationError) as caught:
        ChannelLayer("redis://user:s3cret@localhost/x")
    assert "s3cret" not in str(caught.value)
    with pytest.raises(ConfigurationError) as caught:
        ChannelLayer("redis://localhost/0?sentinel_password=s3cret")
    assert "s3cret" not in str(caught.value)
    assert "s3cret" not in repr(ChannelLayer("redis://user:s3cret@localhost/0"))


def test_unreachable_redis_is_a_broker_error_naming_the_host() -> None:
    port = free_port()

    async def body() -> None:
        layer = ChannelLayer(f"redis://:s3cret@127.0.0.1:{port}/0", connect_timeout=1)
        try:
            with pytest.raises(BrokerError, match=f"127.0.0.1:{port}") as caught:
                await layer.send("nobody.listens", {"n": 1})
            assert "s3cret" not in str(caught.value)
            assert caught.value.__cause__ is not None
        finally:
            await layer.close()

    run(body)


# -- sharding ----------------------------------------------------------------------------


def test_ring_moves_few_names_when_a_shard_is_added() -> None:
    names = [f"specific.{n:08x}!" for n in range(4000)]
    three, four = Ring(["a:1", "b:2", "c:3"]), Ring(["a:1", "b:2", "c:3", "d:4"])
    owners = [three.owner(name) for name in names]
    assert {owners.count(shard) for shard in range(3)} <= set(range(900, 1800))
    moved = sum(three.owner(name) != four.owner(name) for name in names)
    # Ideal is 1/4 (the new shard's share); naive modulo hashing would move 3/4.
    assert moved < len(names) * 0.35
    assert all(four.owner(name) == 3 for name in names if three.owner(name) != four.owner(name))


@pytest.fixture
def three_redis(tmp_path: Path) -> Iterator[list[int]]:
    ports = [free_port() for _ in range(3)]
    processes = [
        BrokerProcess(redis_argv(port, tmp_path), port, log=tmp_path / f"redis-{port}.log")
        for port in ports
    ]
    try:
        for process in processes:
            process.start()
        yield ports
    finally:
        for process in processes:
            process.stop()


def test_channels_and_groups_spread_over_shards(three_redis: list[int]) -> None:
    url = "redis://" + ",".join(f"127.0.0.1:{port}" for port in three_redis) + "/0"

    async def body() -> None:
        # Each layer is a process: its own inbox, hashed on its name up to '!'.
        receivers = [ChannelLayer(url, prefix="shard") for _ in range(12)]
        sender = ChannelLayer(url, prefix="shard")
        try:
            channels = [[await layer.new_channel() for _ in range(5)] for layer in receivers]
            for layer, names in zip(receivers, channels, strict=True):
                for name in names:
                    await sender.send(name, {"to": name})
                    await layer.group_add("everyone", name)
            for normal in range(20):
                await sender.send(f"work.{normal}", {"n": normal})
            # A process's inbox and its memberships live together on exactly one server,
            # and the twelve processes are spread over the servers.
            used = set()
            for names in channels:
                inbox = f"shard:q:{non_local_name(names[0])}"
                (port,) = [port for port in three_redis if inbox in keys_on(port)]
                assert set(names) <= set(members_on(port, "shard:g:everyone"))
                used.add(port)
            assert len(used) >= 2, "12 inboxes all hashed to one of three servers"
            await sender.group_send("everyone", {"all": True})
            for layer, names in zip(receivers, channels, strict=True):
                for name in names:
                    assert await asyncio.wait_for(layer.receive(name), 5) == {"to": name}
                    assert await asyncio.wait_for(layer.receive(name), 5) == {"all": True}
            for normal in range(20):
                assert await asyncio.wait_for(sender.receive(f"work.{normal}"), 5) == {"n": normal}
        finally:
            await sender.flush()
            for layer in (sender, *receivers):
                await layer.close()
        assert all(keys_on(port, "shard:*") == [] for port in three_redis)

    run(body)


def test_process_channels_are_sent_and_received_on_one_shard(three_redis: list[int]) -> None:
    """channels_redis#221: sends hashed the full name, receives the part up to '!'."""
    url = "redis://" + ",".join(f"127.0.0.1:{port}" for port in three_redis) + "/0"

    async def body() -> None:
        layer, sender = ChannelLayer(url, prefix="own"), ChannelLayer(url, prefix="own")
        try:
            names = [await layer.new_channel() for _ in range(30)]
            for name in names:
                await sender.send(name, {"to": name})
            inbox_key = f"own:q:{non_local_name(names[0])}"
            assert sum(inbox_key in keys_on(port) for port in three_redis) == 1
            for name in names:
                assert await asyncio.wait_for(layer.receive(name), 5) == {"to": name}
        finally:
            await layer.flush()
            await layer.close()
            await sender.close()

    run(body)


def test_group_send_with_per_channel_capacities_over_shards(three_redis: list[int]) -> None:
    """channel_capacity patterns make group_send look members up first (two round trips)."""
    url = "redis://" + ",".join(f"127.0.0.1:{port}" for port in three_redis) + "/0"

    async def body() -> None:
        options = {"prefix": "caps", "channel_capacity": {"tight.*": 1}, "capacity": 50}
        layer, sender = ChannelLayer(url, **options), ChannelLayer(url, **options)
        try:
            roomy = [f"roomy.{n}" for n in range(6)]
            for channel in ("tight.one", *roomy):
                await layer.group_add("caps-group", channel)
            for n in range(3):
                await sender.group_send("caps-group", {"n": n})
            assert await asyncio.wait_for(layer.receive("tight.one"), 5) == {"n": 0}
            for channel in roomy:
                got = [await asyncio.wait_for(layer.receive(channel), 5) for _ in range(3)]
                assert got == [{"n": 0}, {"n": 1}, {"n": 2}]
            await layer.group_discard("caps-group", "tight.one")
            await sender.group_send("caps-group", {"n": 3})
            for channel in roomy:
                assert await asyncio.wait_for(layer.receive(channel), 5) == {"n": 3}
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(layer.receive("tight.one"), 0.3)
        finally:
            await layer.flush()
            await layer.close()
            await sender.close()

    run(body)


def test_group_envelopes_count_against_an_inbox_capacity_pattern(redis_port: int) -> None:
    """With channel_capacity patterns the inbox's own capacity bounds its envelopes."""
    url = f"redis://127.0.0.1:{redis_port}/0"

    async def body() -> None:
        options = {"prefix": "boxcap", "channel_capacity": {"tight.*": 1}, "capacity": 50}
        layer, sender = ChannelLayer(url, **options), ChannelLayer(url, **options)
        try:
            tight = [await layer.new_channel("tight") for _ in range(3)]
            roomy = [await layer.new_channel("roomy") for _ in range(3)]
            for channel in tight + roomy:
                await layer.group_add("boxcap", channel)
            for n in range(2):
                await sender.group_send("boxcap", {"n": n})
            # One envelope fills the tight inbox: its three members get the first only.
            for channel in tight:
                assert await asyncio.wait_for(layer.receive(channel), 5) == {"n": 0}
            for channel in roomy:
                got = [await asyncio.wait_for(layer.receive(channel), 5) for _ in range(2)]
                assert got == [{"n": 0}, {"n": 1}]
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(layer.receive(tight[0]), 0.3)
            assert (await sender.stats()).dropped_full == 3
        finally:
            await layer.flush()
            await layer.close()
            await sender.close()

    run(body)


def command_calls(port: int, command: str) -> int:
    """How many times the server on ``port`` ran ``command`` (lower case) since its
    statistics were last reset."""
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        stats = client.info("commandstats").get(f"cmdstat_{command}", {})
        return int(stats.get("calls", 0))
    finally:
        client.close()


def queue_length(port: int, key: str) -> int:
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        return int(client.llen(key))
    finally:
        client.close()


def test_group_send_is_one_script_call_per_shard(three_redis: list[int]) -> None:
    url = "redis://" + ",".join(f"127.0.0.1:{port}" for port in three_redis) + "/0"

    async def body() -> None:
        receivers = [ChannelLayer(url, prefix="fan") for _ in range(10)]
        sender = ChannelLayer(url, prefix="fan")
        try:
            members = []
            for layer in receivers:
                for _ in range(10):
                    channel = await layer.new_channel()
                    await layer.group_add("fan-100", channel)
                    members.append((layer, channel))
            await sender.group_send("fan-nobody", {"loads": "the script"})
            before = [command_calls(port, "evalsha") for port in three_redis]
            await sender.group_send("fan-100", {"hello": "all"})
            await answered(sender)
            after = [command_calls(port, "evalsha") for port in three_redis]
            assert [b - a for a, b in zip(before, after, strict=True)] == [1, 1, 1]
            # Each process's inbox, wherever it hashed, holds one envelope for its ten.
            for layer in receivers:
                key = f"fan:q:{non_local_name(next(c for o, c in members if o is layer))}"
                assert sum(queue_length(port, key) for port in three_redis) == 1
            for layer, channel in members:
                assert await asyncio.wait_for(layer.receive(channel), 5) == {"hello": "all"}
        finally:
            await sender.flush()
            for layer in (sender, *receivers):
                await layer.close()

    run(body)


@contextlib.asynccontextmanager
async def paused_room(
    url: str, port: int, pause_ms: int, *, places: bool = False
) -> AsyncIterator[tuple[ChannelLayer, str, redis.asyncio.Redis]]:
    """A layer with an inbox in group ``room`` that got one group message, and one
    message on a normal channel (its links are up, the scripts are loaded, and it holds
    no place reserved in the inbox, so a send there waits for Redis) or, with
    ``places``, two in the inbox (the second reserving places there); then Redis paused
    for writes for ``pause_ms``; the layer, the inbox and an admin connection."""
    layer = ChannelLayer(url, prefix="paused")
    admin = redis.asyncio.Redis(host="127.0.0.1", port=port)
    try:
        inbox = await layer.new_channel()
        await layer.group_add("room", inbox)
        await layer.group_send("room", {"n": 0})
        one = [("primer", {"n": 0})]
        primers = [(inbox, {"n": 0.1}), (inbox, {"n": 0.2})] if places else one
        for channel, message in primers:
            await layer.send(channel, message)
        for channel, message in [(inbox, {"n": 0}), *primers]:
            assert await asyncio.wait_for(layer.receive(channel), 5) == message
        await admin.execute_command("CLIENT", "PAUSE", pause_ms, "WRITE")
        yield layer, inbox, admin
    finally:
        await admin.execute_command("CLIENT", "UNPAUSE")
        await admin.aclose()
        await layer.flush()
        await layer.close()


def test_a_group_send_returns_before_redis_answers_and_keeps_the_senders_order(
    redis_port: int,
) -> None:
    """On a link that is up, group_send returns once its script is with the socket: Redis
    paused for writes does not hold it up. A send made next still arrives after it."""

    async def body() -> None:
        url = f"redis://127.0.0.1:{redis_port}/0"
        async with paused_room(url, redis_port, 1500) as (layer, inbox, _):
            await asyncio.wait_for(layer.group_send("room", {"n": 1}), 0.5)
            sending = asyncio.ensure_future(layer.send(inbox, {"n": 2}))
            await asyncio.sleep(0.2)
            assert not sending.done(), "a send returns only once Redis accepted it"
            await asyncio.wait_for(sending, 5)
            got = [await asyncio.wait_for(layer.receive(inbox), 5) for _ in range(2)]
            assert got == [{"n": 1}, {"n": 2}]

    run(body)


def test_a_group_send_lost_after_it_returned_is_logged_and_the_next_one_waits(
    redis_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """The connection of a group send that returned unanswered is killed: the copy is
    lost (at most once), which is logged, and group sends then wait for Redis's answer,
    so the next one, into a Redis still paused, raises BrokerError as a send does."""

    async def body() -> None:
        url = f"redis://127.0.0.1:{redis_port}/0?socket_timeout=0.5"
        async with paused_room(url, redis_port, 3000) as (layer, _, admin):
            await asyncio.wait_for(layer.group_send("room", {"n": 1}), 0.5)
            await admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
            await answered(layer)
            assert "group_send to 'room' may be lost after it returned" in caplog.text
            with pytest.raises(BrokerError, match=r"no reply within 0\.5s"):
                await layer.group_send("room", {"n": 2})

    run(body)


def test_a_group_send_behind_a_waiting_send_returns_before_redis_answers(
    redis_port: int,
) -> None:
    """A send waiting for its reply does not hold up a group send of the same layer: the
    group send's script is written behind the send's and returns at once, and the send
    reads both replies. The two arrive in the order they were written."""

    async def body() -> None:
        url = f"redis://127.0.0.1:{redis_port}/0"
        async with paused_room(url, redis_port, 1500) as (layer, inbox, _):
            sending = asyncio.ensure_future(layer.send(inbox, {"n": 1}))
            await asyncio.sleep(0.1)
            assert not sending.done(), "a send returns only once Redis accepted it"
            await asyncio.wait_for(layer.group_send("room", {"n": 2}), 0.5)
            await asyncio.wait_for(sending, 5)
            await answered(layer)
            got = [await asyncio.wait_for(layer.receive(inbox), 5) for _ in range(2)]
            assert got == [{"n": 1}, {"n": 2}]

    run(body)


def test_a_group_send_behind_a_cancelled_send_is_logged_as_maybe_lost(
    redis_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A send cancelled before its reply costs its connection, and with it the reply of
    the group send written behind it: that group send is logged as maybe lost (never
    left silent, nor read as another command's reply), and nothing arrives twice."""

    async def body() -> None:
        url = f"redis://127.0.0.1:{redis_port}/0"
        async with paused_room(url, redis_port, 1000) as (layer, inbox, _):
            sending = asyncio.ensure_future(layer.send(inbox, {"n": 1}))
            await asyncio.sleep(0.1)
            await asyncio.wait_for(layer.group_send("room", {"n": 2}), 0.5)
            sending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await sending
            await answered(layer)
            assert "group_send to 'room' may be lost after it returned" in caplog.text
            assert "a command ahead of it was cancelled" in caplog.text
            await layer.send(inbox, {"n": 3})
            got = []
            while not got or got[-1] != {"n": 3}:
                got.append(await asyncio.wait_for(layer.receive(inbox), 5))
            assert got[-1:] == [{"n": 3}] and len(got) == len({m["n"] for m in got})

    with caplog.at_level(logging.WARNING, logger="multilayer"):
        run(body)


def test_a_group_send_never_overtakes_a_send_the_server_may_answer_noscript(
    redis_port: int,
) -> None:
    """A send whose script the server lacks is answered NOSCRIPT and sent again: a group
    send made while it waits is not written behind it (it would run first), but queued
    after it, so the two still arrive in the order they were made."""

    async def body() -> None:
        layer = ChannelLayer(f"redis://127.0.0.1:{redis_port}/0", prefix="unsure")
        admin = redis.asyncio.Redis(host="127.0.0.1", port=redis_port)
        try:
            await admin.script_flush()
            inbox = await layer.new_channel()
            await layer.group_add("room", inbox)
            # The server now has the group script alone, and the link knows it has it.
            await layer.group_send("room", {"n": 0})
            assert await asyncio.wait_for(layer.receive(inbox), 5) == {"n": 0}
            await admin.execute_command("CLIENT", "PAUSE", 500, "WRITE")
            sending = asyncio.ensure_future(layer.send(inbox, {"n": 1}))
            await asyncio.sleep(0.1)
            await asyncio.wait_for(layer.group_send("room", {"n": 2}), 5)
            await asyncio.wait_for(sending, 5)
            got = [await asyncio.wait_for(layer.receive(inbox), 5) for _ in range(2)]
            assert got == [{"n": 1}, {"n": 2}]
        finally:
            await admin.execute_command("CLIENT", "UNPAUSE")
            await admin.aclose()
            await layer.flush()
            await layer.close()

    run(body)


def test_a_send_and_the_group_send_behind_it_both_forgotten_go_out_again_in_order(
    redis_port: int,
) -> None:
    """The server forgot every script (SCRIPT FLUSH) while a send waits with a group send
    written behind it: both are answered NOSCRIPT, not run, and are sent again in the
    order they were made."""

    async def body() -> None:
        url = f"redis://127.0.0.1:{redis_port}/0"
        async with paused_room(url, redis_port, 500) as (layer, inbox, admin):
            await admin.script_flush()
            sending = asyncio.ensure_future(layer.send(inbox, {"n": 1}))
            await asyncio.sleep(0.1)
            await asyncio.wait_for(layer.group_send("room", {"n": 2}), 0.5)
            await asyncio.wait_for(sending, 5)
            await answered(layer)
            got = [await asyncio.wait_for(layer.receive(inbox), 5) for _ in range(2)]
            assert got == [{"n": 1}, {"n": 2}]
            assert await admin.llen(f"paused:q:{non_local_name(inbox)}") == 0

    run(body)


async def _to_group(layer: ChannelLayer, inbox: str, message: dict[str, Any]) -> None:
    if message["n"] == 0:
        await layer.group_add("room", inbox)
    await layer.group_send("room", message)


async def _to_inbox(layer: ChannelLayer, inbox: str, message: dict[str, Any]) -> None:
    await layer.send(inbox, message)


#: How a message reaches an inbox: by a group send, or by a send (the second one on a
#: place the first one reserved); either may return before Redis answers.
SENDS = {"group_send": _to_group, "send": _to_inbox}


def sends_outlive_their_event_loop(layer: ChannelLayer, operation: str) -> None:
    """As under async_to_sync: an event loop whose last call is a send or group send that
    returned unanswered ends without close(). Both messages, one of 1 MB, must reach the
    inbox."""
    big = "x" * 1_000_000
    deliver = SENDS[operation]

    async def send_and_end() -> str:
        inbox = await layer.new_channel()
        await deliver(layer, inbox, {"n": 0})
        await deliver(layer, inbox, {"n": 1, "big": big})
        return inbox

    async def receive_both(inbox: str) -> None:
        try:
            assert await asyncio.wait_for(layer.receive(inbox), 10) == {"n": 0}
            assert await asyncio.wait_for(layer.receive(inbox), 10) == {"n": 1, "big": big}
        finally:
            await layer.flush()
            await layer.close()

    inbox = asyncio.run(send_and_end())
    run(lambda: receive_both(inbox))


@pytest.mark.parametrize("operation", SENDS)
def test_sends_from_an_event_loop_that_ends_at_once_arrive(redis_port: int, operation: str) -> None:
    sends_outlive_their_event_loop(
        ChannelLayer(f"redis://127.0.0.1:{redis_port}/0", prefix="ends"), operation
    )


def plain_or_tls(tls: bool, tmp_path: Path) -> tuple[int, list[str], str, str]:
    """A Redis server to start, plain or over TLS: its port, its argv, and the scheme and
    options (``name=value&``, possibly none) of a URL to reach it, before its host."""
    port = free_port()
    if not tls:
        return port, redis_argv(port, tmp_path), "redis", ""
    argv = redis_tls_argv(port, tmp_path, certificates(tmp_path), client_certs="no")
    return port, argv, "rediss", f"ssl_cafile={tmp_path / 'ca.pem'}&"


@pytest.mark.parametrize("tls", [False, True], ids=["redis", "rediss"])
@pytest.mark.parametrize("operation", SENDS)
def test_a_send_a_slow_server_has_not_read_survives_the_event_loop_ending(
    operation: str, tls: bool, tmp_path: Path
) -> None:
    """The server reads slowly, so most of the 1 MB message waits unsent in this host's
    kernel, past asyncio's buffer (past the TLS layer's too). Were the send or group send
    to return then, the loop's end would close the connection with the first one's reply
    still due; that reply, arriving, resets the connection, and the reset drops the bytes
    not yet sent. So it returns only once every byte has left."""
    port, argv, scheme, options = plain_or_tls(tls, tmp_path)
    relay = Relay(port, pace=0.02)
    try:
        with broker(argv, port, tmp_path):
            url = f"{scheme}://127.0.0.1:{relay.port}/0?{options}"
            sends_outlive_their_event_loop(ChannelLayer(url, prefix="slow"), operation)
    finally:
        relay.close()


@pytest.mark.parametrize("tls", [False, True], ids=["redis", "rediss"])
def test_close_or_the_event_loop_ending_leaves_no_socket_open(tls: bool, tmp_path: Path) -> None:
    """A receiver keeps its connection between receives. Once close() returns, or the
    event loop ends without close(), every socket the layer opened is closed, even when
    the server goes silent first: a TLS shutdown must go both ways, so it is waited for,
    and cut short after connect_timeout. The receiver's task, cancelled first, closes its
    connection without waiting; the backend, released next, waits for that close too."""
    port, argv, scheme, options = plain_or_tls(tls, tmp_path)

    async def receive_then_silence(relay: Relay) -> ChannelLayer:
        layer = ChannelLayer(
            f"{scheme}://127.0.0.1:{relay.port}/0?{options}connect_timeout=0.5", prefix="shut"
        )
        inbox = await layer.new_channel()
        await layer.send(inbox, {"n": 0})
        assert await asyncio.wait_for(layer.receive(inbox), 5) == {"n": 0}
        assert connections_to(relay.port) > 0
        relay.hold()  # the server's replies are lost, its half of a shutdown too
        return layer

    async def closed(relay: Relay) -> None:
        await (await receive_then_silence(relay)).close()
        assert connections_to(relay.port) == 0

    def check(body: Callable[[Relay], Awaitable[object]]) -> None:
        relay = Relay(port)
        try:
            run(lambda: body(relay))
            assert connections_to(relay.port) == 0
        finally:
            relay.close()

    with broker(argv, port, tmp_path):
        check(closed)
        check(receive_then_silence)


def test_a_stream_of_sends_on_reserved_places_returns_before_redis_answers_in_order(
    redis_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A layer's second send to an inbox reserves places there for its next sends, which
    cannot be refused: while the layer only sends, they return once written, before Redis
    (paused for writes here) answers, and arrive in the order they were made."""
    # Places that outlast any pause of a loaded machine between the steps below.
    monkeypatch.setattr(redis_backend, "_RESERVE_MS", 10_000)

    async def body() -> None:
        url = f"redis://127.0.0.1:{redis_port}/0"
        admin = redis.asyncio.Redis(host="127.0.0.1", port=redis_port)
        async with sharing_an_inbox(url, "stream", 100) as (sender, _, owner, inbox):
            for n in (0, 1):
                await sender.send(inbox, {"n": n})
            try:
                await admin.execute_command("CLIENT", "PAUSE", 1500, "WRITE")
                for n in (2, 3):
                    await asyncio.wait_for(sender.send(inbox, {"n": n}), 0.5)
                await answered(sender)
            finally:
                await admin.execute_command("CLIENT", "UNPAUSE")
                await admin.aclose()
            got = [await asyncio.wait_for(owner.receive(inbox), 5) for _ in range(4)]
            assert got == [{"n": n} for n in range(4)]

    run(body)


def test_a_send_after_a_receive_waits_for_redis_and_gives_up_its_places(
    redis_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A layer that received since its last send to an inbox is most likely answering
    what it received, and its next step waits for the answer to that: its next send
    there waits for Redis, which is then quicker (see docs/backends/redis.md), and gives
    up the places it held."""
    monkeypatch.setattr(redis_backend, "_RESERVE_MS", 10_000)

    async def body() -> None:
        url = f"redis://127.0.0.1:{redis_port}/0"
        async with paused_room(url, redis_port, 1000, places=True) as (layer, inbox, _):
            sending = asyncio.ensure_future(layer.send(inbox, {"n": 1}))
            await asyncio.sleep(0.3)
            assert not sending.done(), "a send after a receive returns once Redis answers"
            await asyncio.wait_for(sending, 5)
            assert not layer._state().backend._reserved.take(non_local_name(inbox))
            assert await asyncio.wait_for(layer.receive(inbox), 5) == {"n": 1}

    run(body)


@contextlib.asynccontextmanager
async def sharing_an_inbox(
    url: str, prefix: str, capacity: int
) -> AsyncIterator[tuple[ChannelLayer, ChannelLayer, ChannelLayer, str]]:
    """Two senders (the first to reserve places) and the owner of an inbox with the given
    capacity: the three layers and the inbox; flushed and closed afterwards."""
    holder, other, owner = (ChannelLayer(url, prefix=prefix, capacity=capacity) for _ in "abc")
    try:
        yield holder, other, owner, await owner.new_channel()
    finally:
        await owner.flush()
        for layer in (holder, other, owner):
            await layer.close()


def test_places_reserved_for_one_sender_count_as_taken_for_the_others_until_they_end(
    redis_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sender's unused places count as taken for another sender, never for itself: it
    fills the inbox to exactly its capacity; after the places end, they are free again."""
    monkeypatch.setattr(redis_backend, "_RESERVE_MS", 10_000)

    async def body() -> None:
        url = f"redis://127.0.0.1:{redis_port}/0"
        async with sharing_an_inbox(url, "places", 10) as (holder, other, owner, inbox):
            # Two queued: the first send asked for nothing, the second got half the 8
            # free places (4) reserved for the holder.
            for n in range(2):
                await holder.send(inbox, {"by": "holder", "n": n})
            for n in range(4):
                await other.send(inbox, {"by": "other", "n": n})
            with pytest.raises(ChannelFull):
                await other.send(inbox, {"by": "other", "n": 4})
            # Queue depths leave the places reserved out.
            assert (await owner.stats()).queues == {non_local_name(inbox): 6}
            for n in range(2, 6):
                await holder.send(inbox, {"by": "holder", "n": n})
            with pytest.raises(ChannelFull):
                await holder.send(inbox, {"by": "holder", "n": 6})
            await answered(holder)
            got = [await asyncio.wait_for(owner.receive(inbox), 5) for _ in range(10)]
            assert [m["n"] for m in got if m["by"] == "holder"] == list(range(6))
            assert [m["n"] for m in got if m["by"] == "other"] == list(range(4))

            monkeypatch.setattr(redis_backend, "_RESERVE_MS", 300)
            for n in (7, 8):
                await holder.send(inbox, {"by": "holder", "n": n})
            await asyncio.sleep(0.5)
            for n in range(8):
                await other.send(inbox, {"by": "other", "n": n})
            with pytest.raises(ChannelFull):
                await other.send(inbox, {"by": "other", "n": 8})

    run(body)


def test_a_layers_own_flush_takes_its_places_with_it(
    redis_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After its own flush a layer holds no place: its next send to the inbox asks again,
    so a full inbox refuses it at once, not after it returned."""
    monkeypatch.setattr(redis_backend, "_RESERVE_MS", 10_000)

    async def body() -> None:
        url = f"redis://127.0.0.1:{redis_port}/0"
        async with sharing_an_inbox(url, "own", 5) as (holder, other, _, inbox):
            for n in (-1, 0):  # the second reserves a place
                await holder.send(inbox, {"n": n})
            await holder.flush()
            for n in range(1, 6):
                await other.send(inbox, {"n": n})
            with pytest.raises(ChannelFull):
                await holder.send(inbox, {"n": 6})

    run(body)


def test_a_send_whose_place_is_gone_is_checked_and_a_refusal_is_logged(
    redis_port: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Places flushed away, a send that counted on one is checked like any other: into
    an inbox with room it arrives; into a full one it is refused after it returned, which
    is logged (the message is lost, as at-most-once allows), and the sender's next sends
    wait for Redis's answer, so the next one raises ChannelFull."""
    monkeypatch.setattr(redis_backend, "_RESERVE_MS", 10_000)

    async def body() -> None:
        url = f"redis://127.0.0.1:{redis_port}/0"
        async with sharing_an_inbox(url, "gone", 7) as (holder, other, owner, inbox):
            # Two queued, the second reserving 2 places (half of 5) for the holder; all
            # flushed.
            for n in (-1, 0):
                await holder.send(inbox, {"n": n})
            await owner.flush()
            await holder.send(inbox, {"n": 1})
            await answered(holder)
            assert await asyncio.wait_for(owner.receive(inbox), 5) == {"n": 1}
            for n in range(2, 9):
                await other.send(inbox, {"n": n})
            await holder.send(inbox, {"n": 9})
            await answered(holder)
            assert f"send to {inbox!r} may be lost after it returned" in caplog.text
            with pytest.raises(ChannelFull):
                await holder.send(inbox, {"n": 10})
            got = [await asyncio.wait_for(owner.receive(inbox), 5) for _ in range(7)]
            assert got == [{"n": n} for n in range(2, 9)]

    with caplog.at_level(logging.WARNING, logger="multilayer"):
        run(body)


def test_the_group_script_seals_envelopes_byte_for_byte_as_fanout_does(redis_port: int) -> None:
    """The Lua script packs the envelope header itself; fanout must read it, and it must be
    the very bytes fanout.seal makes (cmsgpack would pack a whole-number deadline as an
    integer, which decodes alike but is not the same envelope)."""
    url = f"redis://127.0.0.1:{redis_port}/0"
    inbox = "specific.0123456789abcdef!"
    group = "seal-" + "g" * 35  # a msgpack str8, as is the longest suffix below
    expires = time.time() + 60
    # More members than a msgpack fixarray holds; suffixes of 1 to 40 characters; whole
    # and fractional membership deadlines, ending before the message expires or after.
    ending = [(f"{inbox}{n:02d}" + "x" * (2 * n), expires - 30 + n * 0.25) for n in range(20)]
    ending.append((f"{inbox}w", float(int(expires) - 7)))
    lasting = [(f"{inbox}L{n}", expires + 3600 + n) for n in range(3)]
    lasting.append((f"{inbox}at-expiry", expires))
    payload = struct.pack("!d", expires) + b"\x81\xa1n\x01"
    admin = redis.Redis(host="127.0.0.1", port=redis_port)

    async def body() -> None:
        backend = await open_backend(url, prefix="seal")
        try:
            for channel, until in ending + lasting:
                await backend.group_add(group, channel, deadline=until)
            await backend.group_add(group, "seal.normal", deadline=expires + 3600)
            before = time.time()
            await backend.group_send(group, payload, deadline=expires, capacity=CapacityPolicy(1))
            after = time.time()
        finally:
            await backend.close()
        (element,) = admin.lrange(f"seal:q:{inbox}", 0, -1)
        assert element[:1] == b"\n"
        opened = open_envelope(inbox, element[1:])
        assert (opened.group, opened.payload) == (group, payload)
        assert before <= opened.sent_at <= after
        # Memberships ending before the message does keep their deadline; the others,
        # which the copy cannot outlive, are sent as lasting forever. ZRANGE order: by
        # deadline, then by name.
        by_score = sorted(ending, key=lambda member: (member[1], member[0]))
        by_score += [(name, math.inf) for name, _ in sorted(lasting, key=lambda m: (m[1], m[0]))]
        assert opened.members == by_score
        assert element[1:] == seal(payload, group, opened.sent_at, inbox, by_score)
        assert admin.lrange("seal:q:seal.normal", 0, -1) == [b"\n" + payload]

    try:
        run(body)
    finally:
        admin.close()


def test_a_full_inbox_is_one_log_line_for_all_its_members(
    redis_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"redis://127.0.0.1:{redis_port}/0"

    async def body() -> None:
        layer = ChannelLayer(url, prefix="fullbox", capacity=1)
        try:
            channels = [await layer.new_channel() for _ in range(5)]
            for channel in channels:
                await layer.group_add("fullbox", channel)
            await layer.send(channels[0], {"n": 0})
            await layer.group_send("fullbox", {"n": 1})
            assert (await layer.stats()).dropped_full == 5
        finally:
            await layer.flush()
            await layer.close()

    with caplog.at_level(logging.WARNING, logger="multilayer"):
        run(body)
    (line,) = [r.getMessage() for r in caplog.records if "fullbox" in r.getMessage()]
    assert line == "group_send to 'fullbox' skipped 5 members: channel full"


def test_concurrent_sends_share_one_connection_and_keep_order(redis_port: int) -> None:
    url = f"redis://127.0.0.1:{redis_port}/0"

    async def body() -> None:
        sender = ChannelLayer(url, prefix="pipe", capacity=5000)
        receiver = ChannelLayer(url, prefix="pipe", capacity=5000)
        admin = redis.Redis(host="127.0.0.1", port=redis_port)
        try:
            inbox = await receiver.new_channel()
            baseline = len(admin.client_list())

            async def burst(source: int) -> None:
                for seq in range(20):
                    await sender.send(inbox, {"source": source, "seq": seq})

            await asyncio.gather(*(burst(source) for source in range(100)))
            assert len(admin.client_list()) == baseline + 1, "one connection for all sends"
            last = dict.fromkeys(range(100), -1)
            for _ in range(2000):
                message = await asyncio.wait_for(receiver.receive(inbox), 5)
                assert message["seq"] == last[message["source"]] + 1
                last[message["source"]] = message["seq"]
        finally:
            await receiver.flush()
            await sender.close()
            await receiver.close()
            admin.close()

    run(body)


# -- restarts, leaks, idle receives -----------------------------------------------------------


def test_a_server_that_stops_answering_fails_sends_and_receives_resume(redis_port: int) -> None:
    url = f"redis://127.0.0.1:{redis_port}/0?socket_timeout=0.5"

    async def body() -> None:
        layer, sender = ChannelLayer(url, prefix="hang"), ChannelLayer(url, prefix="hang")
        admin = redis.asyncio.Redis(host="127.0.0.1", port=redis_port)
        try:
            await sender.send("hang.work", {"n": 0})
            assert await asyncio.wait_for(layer.receive("hang.work"), 5) == {"n": 0}
            waiting = asyncio.ensure_future(layer.receive("hang.work"))
            await admin.execute_command("CLIENT", "PAUSE", 2500, "ALL")
            started = time.monotonic()
            with pytest.raises(BrokerError, match=r"no reply within 0\.5s"):
                await sender.send("hang.work", {"n": 1})
            assert time.monotonic() - started < 2.0
            await asyncio.sleep(2.5)
            await sender.send("hang.work", {"n": 2})
            # The message sent into the pause may have been stored: at most once.
            got = await asyncio.wait_for(waiting, 10)
            assert got in ({"n": 1}, {"n": 2})
        finally:
            await layer.flush()
            await layer.close()
            await sender.close()
            await admin.aclose()

    run(body)


def test_a_send_on_a_connection_closed_while_idle_goes_out_once_on_a_new_one(
    redis_port: int,
) -> None:
    """The server closing an idle send connection (CLIENT KILL, an idle timeout, a restart)
    costs no send: nothing was written on it, so the next send reconnects and is stored
    exactly once. redis-py 8 reports that EOF as an error where 7.x answered True."""
    url = f"redis://127.0.0.1:{redis_port}/0"

    async def body() -> None:
        sender = ChannelLayer(url, prefix="idle")
        admin = redis.asyncio.Redis(host="127.0.0.1", port=redis_port)
        try:
            await sender.send("idle.work", {"n": 1})
            killed = await admin.execute_command(
                "CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"
            )
            assert killed == 1, "the sender's one connection"
            await asyncio.sleep(0.1)  # the EOF reaches the sender's idle socket
            await sender.send("idle.work", {"n": 2})
            assert await admin.llen("idle:q:idle.work") == 2
            assert [await asyncio.wait_for(sender.receive("idle.work"), 5) for _ in "12"] == [
                {"n": 1},
                {"n": 2},
            ]
        finally:
            await sender.flush()
            await sender.close()
            await admin.aclose()

    run(body)


def test_a_receive_refused_by_redis_leaves_the_next_one_in_step(redis_port: int) -> None:
    """A queue key of the wrong type makes the blocking wait fail with a BrokerError naming
    the queue; the replies to the commands written behind it are never read as the next
    receive's: that one gets the message sent once the key is a queue again."""
    url = f"redis://127.0.0.1:{redis_port}/0"

    async def body() -> None:
        layer = ChannelLayer(url, prefix="wrong")
        admin = redis.asyncio.Redis(host="127.0.0.1", port=redis_port)
        try:
            await admin.set("wrong:q:refused", "not a list")
            with pytest.raises(BrokerError, match=r"refused.*WRONGTYPE"):
                await asyncio.wait_for(layer.receive("refused"), 5)
            await admin.delete("wrong:q:refused")
            await layer.send("refused", {"n": 1})
            assert await asyncio.wait_for(layer.receive("refused"), 5) == {"n": 1}
        finally:
            await layer.flush()
            await layer.close()
            await admin.aclose()

    run(body)


def test_a_send_whose_script_the_server_forgot_goes_out_once(redis_port: int) -> None:
    """A send on a live connection that ran the push script before meets a server whose
    scripts were flushed: NOSCRIPT means it did not run, so it is loaded and sent again,
    and stored exactly once."""
    url = f"redis://127.0.0.1:{redis_port}/0"

    async def body() -> None:
        sender = ChannelLayer(url, prefix="flushed")
        admin = redis.asyncio.Redis(host="127.0.0.1", port=redis_port)
        try:
            for n in (1, 2):
                await sender.send("flushed.work", {"n": n})
            await admin.script_flush()
            await sender.send("flushed.work", {"n": 3})
            await sender.send("flushed.work", {"n": 4})
            assert await admin.llen("flushed:q:flushed.work") == 4
            got = [await asyncio.wait_for(sender.receive("flushed.work"), 5) for _ in range(4)]
            assert got == [{"n": 1}, {"n": 2}, {"n": 3}, {"n": 4}]
        finally:
            await sender.flush()
            await sender.close()
            await admin.aclose()

    run(body)


def test_a_send_refused_by_redis_leaves_the_next_one_in_step(redis_port: int) -> None:
    """A queue key of the wrong type fails the send with a BrokerError naming the reason;
    the connection stays in step: a send to a full channel right after it is refused as
    full, and one to a queue again is stored."""
    url = f"redis://127.0.0.1:{redis_port}/0"

    async def body() -> None:
        sender = ChannelLayer(url, prefix="refused", channel_capacity={"refused.full": 1})
        admin = redis.asyncio.Redis(host="127.0.0.1", port=redis_port)
        try:
            await sender.send("refused.full", {"n": 0})
            await admin.set("refused:q:refused.work", "not a list")
            with pytest.raises(BrokerError, match="WRONGTYPE"):
                await sender.send("refused.work", {"n": 1})
            with pytest.raises(ChannelFull):
                await sender.send("refused.full", {"n": 1})
            await admin.delete("refused:q:refused.work")
            await sender.send("refused.work", {"n": 2})
            assert await asyncio.wait_for(sender.receive("refused.work"), 5) == {"n": 2}
            assert await admin.llen("refused:q:refused.full") == 1
        finally:
            await sender.flush()
            await sender.close()
            await admin.aclose()

    run(body)


def test_a_send_cancelled_before_its_reply_leaves_the_next_one_in_step(redis_port: int) -> None:
    """A send cancelled after its command went out, before Redis answered, costs its
    connection: the reply still due is never read as the next send's, so a send to a
    full channel right after it is refused as full. The cancelled one is stored at
    most once."""
    url = f"redis://127.0.0.1:{redis_port}/0"

    async def body() -> None:
        sender = ChannelLayer(url, prefix="cut", channel_capacity={"cut.full": 1})
        admin = redis.asyncio.Redis(host="127.0.0.1", port=redis_port)
        try:
            await sender.send("cut.full", {"n": 0})
            # Long enough that a slow machine still cancels inside it.
            await admin.execute_command("CLIENT", "PAUSE", 1000, "ALL")
            cut = asyncio.ensure_future(sender.send("cut.work", {"n": 1}))
            await asyncio.sleep(0.1)
            assert not cut.done(), "the send waits for its reply"
            cut.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cut
            with pytest.raises(ChannelFull):
                await asyncio.wait_for(sender.send("cut.full", {"n": 1}), 5)
            assert await admin.llen("cut:q:cut.work") <= 1
            assert await admin.llen("cut:q:cut.full") == 1
        finally:
            await sender.flush()
            await sender.close()
            await admin.aclose()

    run(body)


@pytest.mark.slow
def test_idle_receive_outlasts_redis_py_default_timeout(
    redis_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """channels_redis#422: with redis-py 8 an idle receive failed after 5 s."""

    async def body() -> None:
        layer = ChannelLayer(f"redis://127.0.0.1:{redis_port}/0")
        try:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(layer.receive("idle.channel"), 7)
            await layer.send("idle.channel", {"late": True})
            assert await asyncio.wait_for(layer.receive("idle.channel"), 5) == {"late": True}
        finally:
            await layer.close()

    with caplog.at_level(logging.WARNING, logger="multilayer"):
        run(body)
    assert caplog.records == []


def _blocked_moves(client: redis.Redis) -> list[dict[str, Any]]:
    return [c for c in client.client_list() if c.get("cmd") == "blmove" and "b" in c["flags"]]


def test_a_receive_sends_its_wait_before_the_event_loop_turns(redis_port: int) -> None:
    """The receive that starts waiting sends the BLMOVE from its own step (the backend
    pops on arm): one turn of the loop, and the server already blocks for it."""
    url = f"redis://127.0.0.1:{redis_port}/0"
    admin = redis.Redis(host="127.0.0.1", port=redis_port)

    async def body() -> None:
        layer = ChannelLayer(url, prefix="armed")
        try:
            await layer.send("armed.work", {"n": 1})
            assert await asyncio.wait_for(layer.receive("armed.work"), 5) == {"n": 1}
            # Connected, and nobody waits: no wait is left on the server.
            assert _blocked_moves(admin) == []
            waiting = asyncio.ensure_future(layer.receive("armed.work"))
            await asyncio.sleep(0)
            # Without yielding again (the loop is held while polling): it is there.
            deadline = time.monotonic() + 2
            while not _blocked_moves(admin) and time.monotonic() < deadline:
                time.sleep(0.005)  # noqa: ASYNC251 - the event loop must not turn here
            assert len(_blocked_moves(admin)) == 1
            await layer.send("armed.work", {"n": 2})
            assert await asyncio.wait_for(waiting, 5) == {"n": 2}
        finally:
            await layer.flush()
            await layer.close()
            admin.close()

    run(body)


def test_a_receive_backs_off_while_its_server_is_down(caplog: pytest.LogCaptureFixture) -> None:
    """With nobody answering, the receiving side retries with a growing delay (one
    warning, then debug lines), never in a tight loop of connection attempts."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0?socket_timeout=0.5&connect_timeout=0.5"

    async def body() -> None:
        layer = ChannelLayer(url, prefix="down")
        try:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(layer.receive("down.work"), 1.5)
        finally:
            await layer.close()

    with caplog.at_level(logging.DEBUG, logger="multilayer.backends.redis"):
        run(body)
    attempts = [r for r in caplog.records if r.name == "multilayer.backends.redis.receiver"]
    # 0.05 s doubling: about five attempts in 1.5 s.
    assert 1 <= len(attempts) <= 10, [r.getMessage() for r in attempts]
    assert sum(r.levelno >= logging.WARNING for r in attempts) == 1


def test_a_take_the_server_forgot_is_loaded_and_sent_again(redis_port: int) -> None:
    """A take written ahead of its reply meets a server whose scripts were flushed (a
    restart): NOSCRIPT means it did not run, so it is loaded and sent again."""
    url = f"redis://127.0.0.1:{redis_port}/0"
    admin = redis.Redis(host="127.0.0.1", port=redis_port)

    async def body() -> None:
        sender = ChannelLayer(url, prefix="forgot")
        backend = await open_backend(url, prefix="forgot")
        try:
            for round_ in range(2):
                for n in range(3):
                    await sender.send("forgot.work", {"n": n})
                admin.script_flush()
                got = await asyncio.wait_for(backend.pop("forgot.work", 5), 5)
                assert len(got) == 3, f"round {round_}: {got}"
        finally:
            await sender.flush()
            await sender.close()
            await backend.close()
            admin.close()

    run(body)


def test_a_receiver_that_keeps_up_blocks_instead_of_running_the_take_script(
    redis_port: int,
) -> None:
    """A take that found one message left the queue empty: the next pop blocks in BLMOVE
    (no script on the server) rather than taking again; once a backlog builds up, the
    LLEN behind the BLMOVE brings the take back, and the take stays while it finds
    batches."""
    url = f"redis://127.0.0.1:{redis_port}/0"
    admin = redis.Redis(host="127.0.0.1", port=redis_port)

    async def body() -> None:
        sender = await open_backend(url, prefix="keeps")
        backend = await open_backend(url, prefix="keeps")

        def calls(command: str) -> int:
            return command_calls(redis_port, command)

        async def send(n: int) -> None:
            deadline = time.time() + 60
            await sender.push(
                "keeps.work",
                pack({"n": n}, deadline, max_size=1 << 20),
                deadline=deadline,
                capacity=100,
            )

        try:
            await send(0)
            assert len(await asyncio.wait_for(backend.pop("keeps.work", 5), 5)) == 1
            admin.config_resetstat()
            for n in range(1, 6):
                await send(n)
                assert len(await asyncio.wait_for(backend.pop("keeps.work", 5), 5)) == 1
            # Five pushes are the only scripts; each pop was one BLMOVE.
            assert (calls("evalsha"), calls("blmove")) == (5, 5)
            for n in range(6, 9):
                await send(n)
            admin.config_resetstat()
            got = await asyncio.wait_for(backend.pop("keeps.work", 5), 5)
            assert [unpack_message(payload)["n"] for _, payload in got] == [6, 7, 8]
            # The BLMOVE landed the first, its LLEN saw two more: a take collected all.
            assert (calls("blmove"), calls("evalsha")) == (1, 1)
            for n in range(9, 12):
                await send(n)
            admin.config_resetstat()
            assert len(await asyncio.wait_for(backend.pop("keeps.work", 5), 5)) == 3
            # A batch came last: the next pop takes at once.
            assert (calls("blmove"), calls("evalsha")) == (0, 1)
        finally:
            await sender.close()
            await backend.close()
            admin.close()

    run(body)


def test_an_idle_receiver_closed_by_the_server_comes_back_quietly(
    redis_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """The connection of a queue nobody waits on is closed by the server (an idle
    timeout, a CLIENT KILL): no warning, and the next receive gets what was sent since."""
    url = f"redis://127.0.0.1:{redis_port}/0"
    admin = redis.Redis(host="127.0.0.1", port=redis_port)

    async def body() -> None:
        layer, sender = ChannelLayer(url, prefix="idle"), ChannelLayer(url, prefix="idle")
        try:
            inbox = await layer.new_channel()
            for channel in ("idle.work", inbox):
                await sender.send(channel, {"n": 1})
                assert await asyncio.wait_for(layer.receive(channel), 5) == {"n": 1}
            admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
            await asyncio.sleep(0.2)
            for channel in ("idle.work", inbox):
                await sender.send(channel, {"n": 2})
                assert await asyncio.wait_for(layer.receive(channel), 5) == {"n": 2}
        finally:
            await sender.flush()
            await layer.close()
            await sender.close()
            admin.close()

    with caplog.at_level(logging.WARNING, logger="multilayer"):
        run(body)
    assert [
        record.getMessage() for record in caplog.records if "receiving" in record.getMessage()
    ] == []


# -- cancellation ------------------------------------------------------------------------------


@pytest.mark.parametrize("moment", ["during take", "during blocking wait"])
def test_a_cancelled_pop_loses_and_doubles_nothing(redis_port: int, moment: str) -> None:
    """channels_redis#348: a receive cancelled between pop and backup lost its message.

    Here the server has already taken the message for the receiver when the receive is
    cancelled, and its reply is never read. The message is pushed by a synchronous
    client and the cancellation follows without yielding to the event loop, so the
    receiver cannot have read that reply.
    """
    url = f"redis://127.0.0.1:{redis_port}/0"
    pusher = redis.Redis(host="127.0.0.1", port=redis_port)

    def push_now(body: dict[str, Any]) -> None:
        payload = pack(body, time.time() + 60, max_size=1 << 20)
        pusher.rpush("cx:q:cx.work", b"\n" + payload)
        time.sleep(0.02)  # Redis runs the receiver's command meanwhile; the loop does not.

    async def body() -> None:
        first = await open_backend(url, prefix="cx")
        second = await open_backend(url, prefix="cx")
        try:
            for round_ in range(3):
                # Connected, with the take script loaded: nothing below waits for I/O
                # before the command under test is on the wire. Two, so that the next
                # pop of several takes again rather than blocking.
                push_now({"warm": round_})
                push_now({"warm": round_})
                assert len(await first.pop("cx.work", 5)) == 2
                if moment == "during take":
                    push_now({"round": round_})
                    popping = asyncio.ensure_future(first.pop("cx.work", 5))
                    await asyncio.sleep(0)  # the take script is written, its reply unread
                    push_now({"extra": round_})
                    # It ran: its in-flight batch is the marker and the message.
                    assert pusher.llen(f"cx:f:{first.consumer}:cx.work") == 2
                else:
                    popping = asyncio.ensure_future(first.pop("cx.work", 1))
                    await asyncio.sleep(0.1)  # blocked in BLMOVE
                    push_now({"round": round_})
                popping.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await popping
                got = await asyncio.wait_for(second.pop("cx.work", 10), 5)
                expected = 2 if moment == "during take" else 1
                assert len(got) == expected, f"round {round_}: got {got}"
                nothing = asyncio.ensure_future(second.pop("cx.work", 10))
                await asyncio.sleep(0.2)
                assert not nothing.done(), f"delivered twice: {nothing.result()}"
                nothing.cancel()
                await asyncio.gather(nothing, return_exceptions=True)
        finally:
            await first.close()
            await second.close()
            pusher.close()

    run(body)


@pytest.mark.parametrize("limit", [1, 5])
def test_reply_lost_to_a_dropped_connection_is_delivered_on_reconnect(
    redis_port: int, limit: int
) -> None:
    """A message taken (limit 5) or landed (limit 1, BLMOVE) for a receiver whose reply was
    lost with its connection is still on the server; after reconnecting it is delivered."""
    url = f"redis://127.0.0.1:{redis_port}/0"

    async def body() -> None:
        sender = ChannelLayer(url, prefix="lost")
        backend = await open_backend(url, prefix="lost")
        admin = redis.asyncio.Redis(host="127.0.0.1", port=redis_port)
        try:
            await sender.send("lost.work", {"n": 1})
            popping = asyncio.ensure_future(backend.pop("lost.work", limit))
            assert [channel for channel, _ in await popping] == ["lost.work"]
            # The next take runs, then its connection dies before the reply is read.
            await sender.send("lost.work", {"n": 2})
            await admin.execute_command("CLIENT", "PAUSE", 300, "ALL")
            popping = asyncio.ensure_future(backend.pop("lost.work", limit))
            await asyncio.sleep(0.1)
            await admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
            got = await asyncio.wait_for(popping, 10)
            assert len(got) == 1
            await sender.send("lost.work", {"n": 3})
            assert len(await asyncio.wait_for(backend.pop("lost.work", limit), 5)) == 1
        finally:
            await sender.flush()
            await sender.close()
            await backend.close()
            await admin.aclose()

    run(body)


# -- TLS and Sentinel ------------------------------------------------------------------------


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    return certificates(tmp_path)


def test_rediss_with_mutual_tls(certs: Path) -> None:
    port = free_port()
    # ssl_ca_certs: the spelling older URLs use (an alias of ssl_cafile) still connects.
    url = (
        f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={certs / 'ca.pem'}"
        f"&ssl_certfile={certs / 'client.pem'}&ssl_keyfile={certs / 'client.key'}"
    )
    with broker(redis_tls_argv(port, certs, certs), port, certs):

        async def body() -> None:
            layer, sender = ChannelLayer(url), ChannelLayer(url)
            untrusted = ChannelLayer(f"rediss://127.0.0.1:{port}/0")
            try:
                inbox = await layer.new_channel()
                await sender.send(inbox, {"tls": b"\x00bytes"})
                await layer.group_add("tls-group", inbox)
                await sender.group_send("tls-group", {"group": 1})
                assert await asyncio.wait_for(layer.receive(inbox), 5) == {"tls": b"\x00bytes"}
                assert await asyncio.wait_for(layer.receive(inbox), 5) == {"group": 1}
                # Without the CA the server certificate is not trusted.
                with pytest.raises(BrokerError):
                    await untrusted.send("tls.x", {"n": 1})
            finally:
                await layer.flush()
                for each in (layer, sender, untrusted):
                    await each.close()

        run(body)


def test_a_server_that_accepts_but_never_answers_fails_a_send_in_bounded_time() -> None:
    """A new connection's handshake (SELECT, CLIENT SETINFO) is bounded too: redis-py reads
    it without a timeout, and the reply watchdog only watches connections already made."""
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)  # connections complete in the backlog and are never answered
        port = mute.getsockname()[1]
        url = f"redis://127.0.0.1:{port}/3?socket_timeout=0.5&connect_timeout=0.5"

        async def body() -> None:
            layer = ChannelLayer(url, prefix="mute")
            try:
                calls: list[Callable[[], Awaitable[None]]] = [
                    lambda: layer.send("mute.work", {"n": 1}),
                    lambda: layer.group_send("room", {"n": 1}),
                    lambda: layer.group_add("room", "mute.work"),
                ]
                for call in calls:
                    started = time.monotonic()
                    with pytest.raises(BrokerError, match=f"127.0.0.1:{port}"):
                        await call()
                    assert time.monotonic() - started < 2.5
            finally:
                await layer.close()

        run(body, timeout=20)


def test_a_restarted_shard_gets_back_the_memberships_it_held(tmp_path: Path) -> None:
    """Two shards, members on both; one shard is SIGKILLed and restarted empty. Each member
    layer notices on reconnecting, finds its marker gone from that shard only, and adds
    its memberships there again with their original deadlines."""
    ports = [free_port() for _ in range(2)]
    processes = [
        BrokerProcess(redis_argv(port, tmp_path), port, log=tmp_path / f"redis-{port}.log")
        for port in ports
    ]
    url = "redis://" + ",".join(f"127.0.0.1:{port}" for port in ports) + "/0"
    try:
        for process in processes:
            process.start()

        async def body() -> None:
            sender = ChannelLayer(url, prefix="rs")
            members: list[tuple[ChannelLayer, str, int]] = []
            try:
                # Layers until both shards hold a member (each inbox hashes to one).
                while len({shard for *_, shard in members}) < 2 and len(members) < 40:
                    layer = ChannelLayer(url, prefix="rs", socket_timeout=1.0)
                    channel = await layer.new_channel()
                    await layer.group_add("room", channel)
                    await sender.send(channel, {"hello": True})
                    inbox = f"rs:q:{non_local_name(channel)}"
                    (shard,) = [i for i, port in enumerate(ports) if inbox in keys_on(port)]
                    assert await asyncio.wait_for(layer.receive(channel), 5) == {"hello": True}
                    members.append((layer, channel, shard))
                assert {shard for *_, shard in members} == {0, 1}
                before = [scores_on(port, "rs:g:room") for port in ports]
                waiting = [asyncio.ensure_future(layer.receive(c)) for layer, c, _ in members]
                await asyncio.to_thread(processes[0].restart, kill=True, down_for=0.5)
                restarted = time.monotonic()
                # Restored with the deadlines they had, never later ones. The check runs
                # about 1 s after the server answers again; the bound is for a loaded host.
                while (held := [scores_on(port, "rs:g:room") for port in ports]) != before:
                    assert time.monotonic() - restarted < 15, (
                        f"memberships not restored 15 s after the restart: {held} != {before}"
                    )
                    await asyncio.sleep(0.1)
                await sender.group_send("room", {"after": True})
                for task in waiting:
                    assert await asyncio.wait_for(task, 10) == {"after": True}
            finally:
                await sender.flush()
                for layer, *_ in members:
                    await layer.close()
                await sender.close()

        run(body, timeout=60)
    finally:
        for process in processes:
            process.stop()


def test_sentinel_discovers_the_master_and_follows_a_failover(tmp_path: Path) -> None:
    failover = SentinelFailover(tmp_path)
    try:
        failover.start()

        async def body() -> None:
            url = failover.url
            layer, sender = ChannelLayer(url, prefix="sn"), ChannelLayer(url, prefix="sn")
            try:
                inbox = await layer.new_channel()
                await sender.send(inbox, {"before": True})
                assert await asyncio.wait_for(layer.receive(inbox), 5) == {"before": True}
                waiting = asyncio.ensure_future(layer.receive(inbox))
                await asyncio.sleep(0.2)
                await asyncio.to_thread(failover.fail_over)
                await sender.send(inbox, {"after": True})
                assert await asyncio.wait_for(waiting, 20) == {"after": True}
            finally:
                await sender.close()
                await layer.close()

        run(body, timeout=90)
    finally:
        failover.close()
