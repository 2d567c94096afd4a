"""The ZeroMQ backend beyond the shared suite: hub faults, sharding, IPC, CURVE, fuzzing.

Every test starts its own hub (``python -m multilayer.backends.zmq.hub``) on a free
loopback port or a socket in its temporary directory.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import msgpack
import pytest
import zmq
import zmq.asyncio

from multilayer import BrokerError, ChannelFull, ChannelLayer, ConfigurationError, fanout
from multilayer.backends.zmq import ZmqBackend
from multilayer.backends.zmq import groups as zmq_groups
from multilayer.backends.zmq.groups import STREAMING
from multilayer.backends.zmq.hub.main import _exposed
from multilayer.backends.zmq.node import Node, running_nodes
from multilayer.backends.zmq.protocol import DEFAULT_MAX_MESSAGE, WANT, Leases, shard
from multilayer.backends.zmq.security import RefusalLog, is_loopback
from multilayer.serialization import pack, unpack_message
from tests.support.brokers import BrokerProcess, free_port

T = TypeVar("T")


def run(coroutine: Awaitable[T], timeout: float = 30) -> T:
    """Run ``coroutine`` in a fresh event loop, failing after ``timeout`` seconds."""

    async def bounded() -> T:
        return await asyncio.wait_for(coroutine, timeout)

    return asyncio.run(bounded())


def hub_argv(endpoint: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "multilayer.backends.zmq.hub", "--bind", endpoint, *extra]


class Hub(BrokerProcess):
    """A test-owned hub on a free loopback port."""

    def __init__(self, tmp: Path, *extra: str) -> None:
        port = free_port()
        super().__init__(
            hub_argv(f"tcp://127.0.0.1:{port}", *extra), port, log=tmp / f"hub-{port}.log"
        )
        self.url = f"zmq://127.0.0.1:{port}"


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    process = Hub(tmp_path, "--peer-timeout", "0.5")
    process.start()
    try:
        yield process
    finally:
        process.stop()


async def recv(layer: ChannelLayer, channel: str, timeout: float = 10) -> dict[str, Any]:
    return await asyncio.wait_for(layer.receive(channel), timeout)


async def nothing(layer: ChannelLayer, channel: str, wait: float = 0.3) -> None:
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(layer.receive(channel), wait)


# -- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("zmq://127.0.0.1", "HOST:PORT"),
        ("zmq://127.0.0.1:5599,other", "HOST:PORT"),
        ("zmq+ipc://host/sock", "zmq\\+ipc:///path"),
        ("zmq+ipc://", "zmq\\+ipc:///path"),
        ("zmq+ipc:///run/hub.sock?advertise=10.0.0.1", "applies only to zmq://"),
        ("zmq://127.0.0.1:5599?curve_serverkey=short", "40 Z85"),
        ("zmq://127.0.0.1:5599?curve_secretkey=" + "a" * 40, "needs curve_serverkey"),
        ("zmq://127.0.0.1:5599?timeout=soon", "timeout"),
    ],
)
def test_bad_urls_are_refused_without_io(url: str, problem: str) -> None:
    with pytest.raises(ConfigurationError, match=problem):
        ChannelLayer(url)


def test_max_message_size_must_fit_a_frame_once_encrypted() -> None:
    # Nodes and hubs refuse frames over DEFAULT_MAX_MESSAGE: about 6.3 MB of msgpack, encrypted.
    fits = ChannelLayer("zmq://127.0.0.1:5599", max_message_size=6_000_000)
    fits.backend_class(fits.url, fits.settings, fits.backend_options)
    too_large = ChannelLayer("zmq://127.0.0.1:5599", max_message_size=6_400_000)
    with pytest.raises(ConfigurationError, match="max_message_size=6400000 makes payloads"):
        too_large.backend_class(too_large.url, too_large.settings, too_large.backend_options)


def test_curve_secret_never_shows_in_errors() -> None:
    secret = "s" * 39
    with pytest.raises(ConfigurationError) as caught:
        ChannelLayer(f"zmq://127.0.0.1:5599?curve_serverkey={'k' * 40}&curve_secretkey={secret}")
    assert secret not in str(caught.value)


def test_rendezvous_sharding_is_order_free_and_spreads() -> None:
    hubs = ["h1:5599", "h2:5600", "h3:5601"]
    names = [f"chat.room{i}" for i in range(3000)]
    placed = [hubs[shard(name, hubs)] for name in names]
    assert placed == [hubs[::-1][shard(name, hubs[::-1])] for name in names]
    assert all(800 < placed.count(hub) < 1200 for hub in hubs)
    # Adding a hub moves only the names that now land on it.
    grown = [*hubs, "h4:5602"]
    moved = [a for a, name in zip(placed, names, strict=True) if grown[shard(name, grown)] != a]
    assert 500 < len(moved) < 1000


def test_the_hub_depends_on_no_layer_above_it() -> None:
    # The hub server sits low: the wire protocol and the core's helpers, never the package
    # root (which imports the layer), the CLI or the backend classes.
    import ast

    import multilayer.backends.zmq.hub as hub_package

    imported = set()
    for path in Path(hub_package.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                imported.add(("." * node.level) + (node.module or ""))
    allowed = {".", ".groups", ".listeners", ".main", ".queues", ".server", ".state"}
    allowed |= {"..protocol", "..security"}
    allowed |= {"....serialization", "....names", "....fanout"}
    assert imported <= allowed, imported - allowed


# -- transports and sharding -----------------------------------------------------------


def _exercise(url: str) -> None:
    async def body() -> None:
        sender, receiver = ChannelLayer(url, prefix="ex"), ChannelLayer(url, prefix="ex")
        try:
            inbox = await receiver.new_channel()
            await receiver.group_add("room", inbox)
            await receiver.group_add("room", "ex.normal")
            await sender.send("ex.normal", {"n": 1})
            await sender.send(inbox, {"n": 2})
            await sender.group_send("room", {"n": 3})
            assert await recv(receiver, "ex.normal") == {"n": 1}
            assert await recv(receiver, inbox) == {"n": 2}
            assert await recv(receiver, inbox) == {"n": 3}
            assert await recv(receiver, "ex.normal") == {"n": 3}
        finally:
            await sender.flush()
            await sender.close()
            await receiver.close()

    run(body())


def _node_for(url: str) -> Node:
    hub = url.removeprefix("zmq://")
    return next(n for n in running_nodes() if n.config.names == (hub,))


async def _lent_to_this_loop(node: Node) -> None:
    deadline = time.monotonic() + 5
    while node.lent_to is not asyncio.get_running_loop():
        assert time.monotonic() < deadline, "a loop waiting on an inbox never got the node socket"
        await asyncio.sleep(0.01)


def test_node_socket_moves_to_the_receiving_loop_and_back(hub: Hub) -> None:
    # One layer used from successive event loops, as async_to_sync does.
    receiver, sender = ChannelLayer(hub.url, prefix="own"), ChannelLayer(hub.url, prefix="own")

    async def waiting_loop() -> str:
        channel = await receiver.new_channel()
        waiting = asyncio.ensure_future(receiver.receive(channel))
        await _lent_to_this_loop(_node_for(hub.url))
        await sender.send(channel, {"n": 1})
        assert await asyncio.wait_for(waiting, 5) == {"n": 1}
        return channel

    channel = run(waiting_loop())  # ends without closing either layer
    node = _node_for(hub.url)
    deadline = time.monotonic() + 5
    while node.lent_to is not None:  # the thread takes the socket back from the dead loop
        assert time.monotonic() < deadline, "the node thread did not take its socket back"
        time.sleep(0.01)

    async def later_loop() -> None:
        await sender.send(channel, {"n": 2})  # the thread serves it: nobody waits yet
        assert await recv(receiver, channel) == {"n": 2}
        waiting = asyncio.ensure_future(receiver.receive(channel))
        await _lent_to_this_loop(node)
        await sender.send(channel, {"n": 3})
        assert await asyncio.wait_for(waiting, 5) == {"n": 3}
        await receiver.close()
        assert node.lent_to is None  # closing the backend gives the socket back
        await sender.send(channel, {"n": 4})
        await sender.flush()
        await sender.close()

    run(later_loop())


def _block_until_taken_back(node: Node) -> None:
    deadline = time.monotonic() + 5
    while node.lent_to is not None:
        assert time.monotonic() < deadline, "the node left its socket to a blocked loop"
        time.sleep(0.05)


def test_the_node_takes_its_socket_back_from_a_blocked_loop(hub: Hub) -> None:
    async def body() -> None:
        layer = ChannelLayer(hub.url, prefix="blocked")
        try:
            channel = await layer.new_channel()
            waiting = asyncio.ensure_future(layer.receive(channel))
            node = _node_for(hub.url)
            await _lent_to_this_loop(node)
            _block_until_taken_back(node)  # blocks this loop, as sync code in a coroutine does
            await layer.send(channel, {"n": 1})
            assert await asyncio.wait_for(waiting, 5) == {"n": 1}
        finally:
            await layer.flush()
            await layer.close()

    run(body())


# -- small groups fanned out by the sender ------------------------------------------------


def _copy(layer: ChannelLayer, group: str) -> list[str] | None:
    """The members of ``group`` that ``layer`` fans out to itself, if it holds a copy."""
    backend = layer._state().backend
    assert isinstance(backend, ZmqBackend)
    copy = backend._group_copies.get(group)
    if copy is None or copy[0] is None or copy[1] - time.monotonic() < 0.1:
        return None  # none, a large group, or one about to lapse
    return sorted(member for member, _ in copy[0])


async def _copied(
    sender: ChannelLayer, group: str, members: list[str], receiver: ChannelLayer, most: int = 1000
) -> None:
    """Streams of group_send warm-ups until ``sender`` holds a fresh copy of ``group``, then
    receive the (at most ``most``) warm-ups each member got, quickly, while the copy holds."""
    deadline = time.monotonic() + 10
    sent = 0
    while _copy(sender, group) != sorted(members):
        assert time.monotonic() < deadline, "the sender never got a copy of the group"
        for _ in range(STREAMING + 8):  # a stream: the sender asks the hub for a copy
            await sender.group_send(group, {"warm": sent})
            sent += 1
        await asyncio.sleep(0.05)
    for member in members:
        for n in range(min(sent, most)):
            assert await recv(receiver, member) == {"warm": n}


def test_a_group_copy_never_outlives_a_membership_change(hub: Hub) -> None:
    async def body() -> None:
        sender, other = ChannelLayer(hub.url, prefix="cp"), ChannelLayer(hub.url, prefix="cp")
        try:
            a, b = await sender.new_channel(), await sender.new_channel()
            await other.group_add("g", a)
            await _copied(sender, "g", [a], sender)
            await sender.group_send("g", {"n": 1})  # from the copy, straight to the node
            assert await recv(sender, a) == {"n": 1}
            await other.group_discard("g", a)  # answered once the sender dropped its copy
            assert _copy(sender, "g") is None
            await sender.group_send("g", {"n": 2})
            await nothing(sender, a)
            await other.group_add("g", b)
            await _copied(sender, "g", [b], sender)
            await other.group_add("g", a)
            assert _copy(sender, "g") is None
            await sender.group_send("g", {"n": 3})
            assert await recv(sender, a) == {"n": 3}
            assert await recv(sender, b) == {"n": 3}
        finally:
            await sender.flush()
            await sender.close()
            await other.close()

    run(body())


def test_a_group_copy_keeps_capacity_exact(hub: Hub, caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        sender = ChannelLayer(hub.url, prefix="cpfull", capacity=3)
        try:
            channel = await sender.new_channel()
            await sender.group_add("g", channel)
            await _copied(sender, "g", [channel], sender, most=3)
            caplog.clear()  # the warm-ups beyond the capacity were skipped too
            for n in range(10):
                await sender.group_send("g", {"n": n})
            assert _copy(sender, "g") == [channel]  # all ten went out from the copy
            assert [(await recv(sender, channel))["n"] for _ in range(3)] == [0, 1, 2]
            await nothing(sender, channel)
        finally:
            await sender.flush()
            await sender.close()

    run(body())
    assert "group_send to 'g' skipped 1 of 1 members: channel full" in caplog.text


@pytest.mark.parametrize("size", [2, 30])
def test_a_group_copy_sends_one_envelope_per_inbox(hub: Hub, size: int) -> None:
    # A group counts by the queues its members live in: a crowd in one process is small.
    async def body() -> None:
        sender = ChannelLayer(hub.url, prefix="cpbox", capacity=4)
        try:
            members = [await sender.new_channel() for _ in range(size)]
            for member in members:
                await sender.group_add("g", member)
            await _copied(sender, "g", members, sender, most=4)
            for n in range(4):  # one place of the inbox each, not one per member
                await sender.group_send("g", {"n": n})
            assert _copy(sender, "g") == sorted(members)  # all went from the copy
            for member in members:
                assert [(await recv(sender, member))["n"] for _ in range(4)] == [0, 1, 2, 3]
            await nothing(sender, members[0], 0.1)
        finally:
            await sender.flush()
            await sender.close()

    run(body())


def test_a_group_copy_leaves_an_envelope_too_large_for_a_frame_to_the_hub(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def body() -> None:
        sender = ChannelLayer(hub.url, prefix="cpbig")
        try:
            members = [await sender.new_channel() for _ in range(2)]
            for member in members:
                await sender.group_add("g", member)
            await _copied(sender, "g", members, sender)
            backend = sender._state().backend
            assert isinstance(backend, ZmqBackend) and not backend._group_sends
            # As if the message were near the largest a frame holds (sockets already made).
            monkeypatch.setattr(zmq_groups, "DEFAULT_MAX_MESSAGE", 64)
            await sender.group_send("g", {"n": 1})
            assert backend._group_sends  # sent to the hub, not from the copy
            for member in members:
                assert await recv(sender, member) == {"n": 1}
        finally:
            await sender.flush()
            await sender.close()

    run(body())


def test_a_change_waits_at_most_a_lease_for_a_silent_copy_holder(hub: Hub) -> None:
    sender, other = ChannelLayer(hub.url, prefix="cpgone"), ChannelLayer(hub.url, prefix="cpgone")

    async def holder() -> str:
        channel = await other.new_channel()
        await other.group_add("g", channel)
        await _copied(sender, "g", [channel], other)
        return channel

    first = run(holder())  # its loop ends: nobody reads the sender's hub link any more

    async def change() -> None:
        second = await other.new_channel()
        started = time.monotonic()
        await other.group_add("g", second)
        assert time.monotonic() - started < 2  # the hub stops waiting when the lease ends
        await sender.group_send("g", {"n": 1})
        assert await recv(other, first) == {"n": 1}
        assert await recv(other, second) == {"n": 1}
        await other.flush()
        await other.close()
        await sender.close()

    run(change())


def test_ipc_hub(tmp_path: Path) -> None:
    path = tmp_path / "hub.sock"
    with open(tmp_path / "hub.log", "wb") as log:
        process = subprocess.Popen(hub_argv(f"ipc://{path}"), stderr=log)
    try:
        deadline = time.monotonic() + 10
        while not path.exists():
            assert time.monotonic() < deadline, "the IPC hub did not start"
            time.sleep(0.05)
        _exercise(f"zmq+ipc://{path}")
    finally:
        process.terminate()
        assert process.wait(10) == 0


def test_two_hubs_share_the_load(tmp_path: Path) -> None:
    first, second = Hub(tmp_path), Hub(tmp_path)
    first.start()
    second.start()
    try:
        both = f"zmq://127.0.0.1:{first.port},127.0.0.1:{second.port}"
        _exercise(both)

        async def body() -> None:
            layer = ChannelLayer(both, prefix="shard")
            alone = [ChannelLayer(hub.url, prefix="shard") for hub in (first, second)]
            channels = [f"shard.c{i}" for i in range(20)]
            try:
                inbox = await layer.new_channel()
                for channel in channels:
                    await layer.send(channel, {"c": channel})
                    await layer.group_add("everyone", channel)
                await layer.group_add("everyone", inbox)
                await layer.group_send("everyone", {"c": "all"})
                assert await recv(layer, inbox) == {"c": "all"}
                # Each hub alone holds only its share of the channels.
                held = [0, 0]
                for channel in channels:
                    for index, single in enumerate(alone):
                        try:
                            got = await asyncio.wait_for(single.receive(channel), 0.2)
                        except asyncio.TimeoutError:
                            continue
                        assert got == {"c": channel}
                        held[index] += 1
                        assert await recv(single, channel) == {"c": "all"}
                assert sum(held) == len(channels) and min(held) > 0
            finally:
                await layer.flush()
                for each in (layer, *alone):
                    await each.close()

        run(body())
    finally:
        first.stop()
        second.stop()


# -- faults ----------------------------------------------------------------------------


def test_hub_restart_resumes_receives_and_reregisters(hub: Hub) -> None:
    options = {"prefix": "restart", "heartbeat": 0.2, "timeout": 5.0}

    async def body() -> None:
        owner, sender = ChannelLayer(hub.url, **options), ChannelLayer(hub.url, **options)
        try:
            inbox = await owner.new_channel()
            await sender.send("restart.lost", {"n": 0})
            waiting = asyncio.ensure_future(recv(owner, "restart.wait", 20))
            await asyncio.sleep(0.3)
            await asyncio.get_running_loop().run_in_executor(None, hub.restart)
            await asyncio.sleep(1.0)  # a few heartbeats: pops re-issued, inbox re-registered
            await sender.send("restart.wait", {"n": 1})
            assert await waiting == {"n": 1}
            # A sender that never met the owner finds it through the new hub's directory.
            stranger = ChannelLayer(hub.url, **options)
            try:
                await stranger.send(inbox, {"n": 2})
            finally:
                await stranger.close()
            assert await recv(owner, inbox) == {"n": 2}
            # What the old hub queued died with it.
            await nothing(owner, "restart.lost")
        finally:
            await sender.flush()
            await owner.close()
            await sender.close()

    run(body(), 60)


def test_send_while_the_hub_is_down_fails_cleanly(tmp_path: Path) -> None:
    url = f"zmq://127.0.0.1:{free_port()}?timeout=0.5"

    async def body() -> None:
        layer = ChannelLayer(url)
        try:
            started = time.monotonic()
            with pytest.raises(BrokerError, match="no answer"):
                await layer.send("down.normal", {"n": 1})
            assert time.monotonic() - started < 3
        finally:
            await layer.close()

    run(body())


def test_hub_exits_cleanly_on_sigterm_and_sigint(tmp_path: Path) -> None:
    for number in (signal.SIGTERM, signal.SIGINT):
        process = Hub(tmp_path)
        process.start()
        assert process.process is not None
        process.process.send_signal(number)
        assert process.process.wait(10) == 0
        log = process.log.read_text()
        assert f"received {number.name}, stopping" in log and "hub stopped" in log


def _garbage(chaos: random.Random) -> list[bytes]:
    commands = ["ping", "push", "spush", "pop", "cancel", "requeue", "gadd", "gdiscard"]
    commands += ["gmembers", "gsend", "flush", "register", "send", "batch", "nope"]
    values: list[Any] = [
        None,
        -1,
        2**64 - 1,
        -(2**63),
        1.5,
        "x",
        b"\xff",
        [],
        {},
        ["a", 1],
        {"k": [1]},
    ]
    kind = chaos.randrange(4)
    if kind == 0:
        return [chaos.randbytes(chaos.randrange(0, 40)) for _ in range(chaos.randrange(0, 4))]
    header: list[Any] = [chaos.choice(commands), chaos.choice([1, -5, "id", None])]
    header += [chaos.choice(values) for _ in range(chaos.randrange(0, 6))]
    frames = [msgpack.packb(header if kind != 1 else header[0])]
    return frames + [chaos.randbytes(chaos.randrange(0, 16)) for _ in range(chaos.randrange(3))]


def test_hub_survives_random_frames(hub: Hub) -> None:
    chaos = random.Random(2024)
    context = zmq.Context.instance()
    dealers = [context.socket(zmq.DEALER) for _ in range(3)]
    try:
        for dealer in dealers:
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(f"tcp://127.0.0.1:{hub.port}")
        for _ in range(3000):
            frames = _garbage(chaos) or [b""]
            chaos.choice(dealers).send_multipart(frames)
        # Raw TCP garbage as well, below the ZeroMQ framing.
        import socket

        with socket.create_connection(("127.0.0.1", hub.port), timeout=5) as raw:
            raw.sendall(chaos.randbytes(4096))
    finally:
        for dealer in dealers:
            dealer.close(0)
    _exercise(hub.url)
    assert hub.process is not None and hub.process.poll() is None
    assert "Traceback" not in hub.log.read_text()


def test_leases_never_let_two_senders_overfill_a_channel(hub: Hub) -> None:
    async def body() -> None:
        first = ChannelLayer(hub.url, prefix="leases", capacity=10)
        second = ChannelLayer(hub.url, prefix="leases", capacity=10)
        receiver = ChannelLayer(hub.url, prefix="leases", capacity=10)
        accepted = 0
        try:
            for n in range(30):
                for layer in (first, second):
                    try:
                        await layer.send("leases.q", {"n": n})
                    except ChannelFull:
                        continue
                    accepted += 1
            # Places leased and not used count as taken, so the two may stop short of 10,
            # but never go past it, and every accepted message is there.
            assert 5 <= accepted <= 10
            got = [await recv(receiver, "leases.q") for _ in range(accepted)]
            assert len(got) == accepted
            await nothing(receiver, "leases.q")
        finally:
            await receiver.flush()
            for layer in (first, second, receiver):
                await layer.close()

    run(body())


def test_leases_go_to_senders_that_ask_again_and_hold_half_the_room_at_most() -> None:
    leases = Leases()
    assert leases.grant(b"once", 100, WANT) == 0  # a first ask reserves nothing
    assert leases.reserved() == 0
    assert leases.grant(b"streaming", 100, WANT) == 0
    assert leases.grant(b"streaming", 99, WANT) == 49
    assert leases.grant(b"other", 98, WANT) == 0
    # Together, never more than half of the free room: half of it is leased already.
    assert leases.grant(b"other", 97, WANT) == 0
    assert leases.grant(b"other", 120, WANT) == 60 - 49
    assert leases.reserved() == 60
    assert leases.grant(b"streaming", 98, 5) == 5  # a new ask replaces the sender's lease


def test_prefetched_messages_go_back_to_the_hub(hub: Hub) -> None:
    async def body() -> list[Any]:
        layer = ChannelLayer(hub.url, prefix="prefetch")
        try:
            for n in range(5):
                await layer.send("prefetch.q", {"n": n})
            # The pop takes all five; the receive wants one, the node holds four.
            assert await recv(layer, "prefetch.q") == {"n": 0}
            await asyncio.sleep(1.6)  # past the hold: the node has given them back
            dealer = zmq.asyncio.Context.instance().socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(f"tcp://127.0.0.1:{hub.port}")
            try:
                await dealer.send_multipart(
                    [msgpack.packb(["pop", 7, "prefetch:prefetch.q", 9, 0])]
                )
                frames = await asyncio.wait_for(dealer.recv_multipart(), 5)
            finally:
                dealer.close(0)
            return [unpack_message(frame)["n"] for frame in frames[1:]]
        finally:
            await layer.close()

    assert run(body()) == [1, 2, 3, 4]


def _hub_dealer(hub: Hub) -> zmq.Socket[bytes]:
    """A DEALER talking the hub's protocol directly; each receive waits 5 s at most."""
    dealer: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVTIMEO, 5000)
    dealer.connect(f"tcp://127.0.0.1:{hub.port}")
    return dealer


def test_hub_answers_each_request_of_a_batch(hub: Hub) -> None:
    dealer = _hub_dealer(hub)
    try:
        payload = msgpack.packb([0.0, 0]) + b"x" * 8
        batch = [["ping", 1, [], 0], ["gmembers", 2, ["g"], 0], ["gsend", 3, ["g", "p", 5, {}], 1]]
        dealer.send_multipart([msgpack.packb(["batch", 0, batch]), payload])
        answers = [msgpack.unpackb(dealer.recv_multipart()[0]) for _ in range(3)]
        assert [(answer[0], answer[1]) for answer in answers] == [("ok", 1), ("ok", 2), ("ok", 3)]
        # A malformed entry ends its batch, never the hub; an entry claiming more payload
        # frames than the batch has, or a nested batch, counts as malformed.
        for bad in ([["ping", 4, [], 5]], [["batch", 5, [], 0]], [["ping", "6", [], 0]], "x"):
            dealer.send_multipart([msgpack.packb(["batch", 0, bad])])
        dealer.send_multipart([msgpack.packb(["ping", 7])])
        assert msgpack.unpackb(dealer.recv_multipart()[0])[:2] == ["ok", 7]
    finally:
        dealer.close(0)


def test_hub_parks_one_envelope_per_inbox_and_reports_its_members_full(hub: Hub) -> None:
    dealer = _hub_dealer(hub)

    def call(*request: Any, payload: bytes | None = None) -> tuple[list[Any], list[bytes]]:
        frames = [msgpack.packb(list(request))] + ([payload] if payload is not None else [])
        dealer.send_multipart(frames)
        answer, *payloads = dealer.recv_multipart()
        return msgpack.unpackb(answer)[2:], payloads

    try:
        until = time.time() + 60
        members = ["specific.nobody!a", "specific.nobody!b", "park.worker"]
        for rid, member in enumerate(members, 1):
            call("gadd", rid, "park:g", member, until)
        payload = struct.pack("!d", until) + b"body"
        # Nobody owns the inbox: the hub parks its envelope, one place of capacity 2.
        for rid in (4, 5):
            assert call("gsend", rid, "park:g", "park", 2, {}, payload=payload)[0] == [[], 3]
        full, live = call("gsend", 6, "park:g", "park", 2, {}, payload=payload)[0]
        assert (sorted(full), live) == (sorted(members), 3)
        assert call("stats", 7, "park")[0][0] == {"specific.nobody!": 2, "park.worker": 2}
        # The owner registering gets the envelopes, each naming both members.
        (handed, clients), envelopes = call(
            "register", 8, ["park:specific.nobody!"], "tcp://x:1", "", 5
        )
        assert handed == [["park:specific.nobody!", "specific.nobody!"]] * 2
        assert clients is None  # no CURVE: no allow list for the node
        for envelope in envelopes:
            opened = fanout.open_envelope("specific.nobody!", envelope)
            assert (opened.group, opened.payload) == ("g", payload)
            assert opened.members == [(member, until) for member in members[:2]]
    finally:
        dealer.close(0)


def test_hub_sends_copies_where_an_envelope_would_not_fit_a_frame(hub: Hub) -> None:
    dealer = _hub_dealer(hub)
    try:
        until = time.time() + 60
        for rid, member in enumerate(["specific.big!a", "specific.big!b"], 1):
            dealer.send_multipart([msgpack.packb(["gadd", rid, "big:g", member, until])])
            assert msgpack.unpackb(dealer.recv_multipart()[0])[:2] == ["ok", rid]
        deadline = struct.pack("!d", until)
        for rid, size in ((3, 100), (4, DEFAULT_MAX_MESSAGE - 20)):
            request = msgpack.packb(["gsend", rid, "big:g", "big", 10, {}])
            dealer.send_multipart([request, deadline + b"x" * (size - len(deadline))])
            assert msgpack.unpackb(dealer.recv_multipart()[0]) == ["ok", rid, [], 2]
        dealer.send_multipart([msgpack.packb(["stats", 5, "big"])])
        # The small message as one envelope, the large one as a copy per member.
        assert msgpack.unpackb(dealer.recv_multipart()[0])[2] == {"specific.big!": 3}
    finally:
        dealer.close(0)


def test_a_full_inbox_is_one_line_naming_its_members_count(
    hub: Hub, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        owner = ChannelLayer(hub.url, prefix="fullbox", capacity=1)
        sender = ChannelLayer(hub.url, prefix="fullbox", capacity=1)
        try:
            members = [await owner.new_channel() for _ in range(3)]
            for member in members:
                await owner.group_add("g", member)
            await sender.group_add("g", "fullbox.worker")
            for n in range(2):  # sparse: through the hub; the second finds both queues full
                await sender.group_send("g", {"n": n})
            await sender.close()  # waits for the hub's answers
            for member in members:
                assert await recv(owner, member) == {"n": 0}
        finally:
            await owner.flush()
            await owner.close()
            await sender.close()

    with caplog.at_level(logging.WARNING, logger="multilayer"):
        run(body())
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert lines == ["group_send to 'g' skipped 4 of 4 members: channel full"]


def test_node_survives_malformed_leased_batches(hub: Hub) -> None:
    async def body() -> None:
        layer = ChannelLayer(hub.url, prefix="nodefuzz")
        sender = ChannelLayer(hub.url, prefix="nodefuzz")
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        try:
            channel = await layer.new_channel()
            key = "nodefuzz:" + channel.partition("!")[0] + "!"
            endpoints = [n.endpoint for n in running_nodes()]
            dealer.setsockopt(zmq.LINGER, 0)
            for endpoint in endpoints:
                dealer.connect(endpoint)
            good = msgpack.packb([0.0, 0]) + b"x" * 8
            for items, frame in [
                ([[key, channel, 5]], b"1234"),  # sizes do not add up
                ([[key, channel, 2]], b"12"),  # shorter than a payload header
                ("not a list", b""),
                ([[key, channel, "9"]], good),
                ([[key]], good),
            ]:
                dealer.send_multipart([msgpack.packb(["send", 0, items]), frame])
            await asyncio.sleep(0.3)
            # Every batch above was refused whole; the node still serves its inboxes.
            await sender.send(channel, {"n": 1})
            assert await recv(layer, channel) == {"n": 1}
            await nothing(layer, channel)
        finally:
            dealer.close(0)
            await sender.close()
            await layer.close()

    run(body())


def test_hub_queue_cap_bounds_memory(tmp_path: Path) -> None:
    process = Hub(tmp_path, "--max-queue", "5")
    process.start()
    try:

        async def body() -> None:
            layer = ChannelLayer(process.url, prefix="cap", capacity=1000)
            try:
                for n in range(5):
                    await layer.send("cap.q", {"n": n})
                with pytest.raises(ChannelFull):
                    await layer.send("cap.q", {"n": 5})
            finally:
                await layer.flush()
                await layer.close()

        run(body())
    finally:
        process.stop()


# -- CURVE -----------------------------------------------------------------------------


def test_curve_encrypts_and_authenticates(tmp_path: Path) -> None:
    server_public, server_secret = zmq.curve_keypair()
    # Z85 keys may begin with "-", which argparse takes for an option unless written as
    # --option=VALUE (as the docs say): make sure such a key is the one passed.
    client_public, client_secret = zmq.curve_keypair()
    while not client_public.startswith(b"-"):
        client_public, client_secret = zmq.curve_keypair()
    process = Hub(
        tmp_path,
        f"--curve-secret-key={server_secret.decode()}",
        f"--curve-allow={client_public.decode()}",
    )
    process.start()
    try:
        base = f"{process.url}?curve_serverkey={quote(server_public.decode(), safe='')}"
        _exercise(f"{base}&curve_secretkey={quote(client_secret.decode(), safe='')}")

        async def refused(url: str) -> None:
            layer = ChannelLayer(url, timeout=0.5)
            try:
                with pytest.raises(BrokerError):
                    await layer.send("curve.x", {"n": 1})
            finally:
                await layer.close()

        _, stranger_secret = zmq.curve_keypair()
        run(refused(f"{base}&curve_secretkey={quote(stranger_secret.decode(), safe='')}"))
        run(refused(process.url))
        log = process.log.read_text()
        assert "refused 127.0.0.1: its CURVE key is not on the allow list" in log
        assert "its handshake failed (no CURVE, or a wrong server key)" in log
        assert zmq.curve_public(stranger_secret).decode() not in log
    finally:
        process.stop()


# -- secure by default -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "loopback"),
    [
        ("tcp://127.0.0.1:5599", True),
        ("tcp://127.8.9.10:*", True),
        ("tcp://[::1]:5599", True),
        ("tcp://localhost:5599", True),
        ("ipc:///run/ml.sock", True),
        ("tcp://0.0.0.0:5599", False),
        ("tcp://*:5599", False),
        ("tcp://[::]:5599", False),
        ("tcp://10.0.0.1:5599", False),
        ("tcp://eth0:5599", False),
        ("tcp://hub.example:5599", False),
    ],
)
def test_what_counts_as_loopback(endpoint: str, loopback: bool) -> None:
    assert is_loopback(endpoint) is loopback


@pytest.mark.parametrize("bind", ["tcp://0.0.0.0:{port}", "tcp://*:{port}", "tcp://[::]:{port}"])
def test_the_hub_refuses_an_open_door(bind: str) -> None:
    endpoint = bind.format(port=free_port())
    done = subprocess.run(
        hub_argv(f"tcp://127.0.0.1:{free_port()},{endpoint}"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert f"refusing to listen on {endpoint} without CURVE" in done.stderr
    assert "--curve-secret-key=" in done.stderr and "--insecure" in done.stderr


def test_insecure_lets_the_hub_open_the_door_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Checked without binding: a test never opens a port beyond loopback.
    binds = ["tcp://127.0.0.1:5599", "tcp://0.0.0.0:5599"]
    with caplog.at_level(logging.WARNING, logger="multilayer"):
        assert _exposed(binds, None, insecure=True) is None
        assert _exposed(binds, b"k" * 40, insecure=False) is None
        assert _exposed(binds[:1], None, insecure=False) is None
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "--insecure: listening on tcp://0.0.0.0:5599 without CURVE" in caplog.text


@pytest.mark.parametrize(
    ("url", "refused"),
    [
        ("zmq://10.1.2.3:5599", True),
        ("zmq://hub.example:5599,127.0.0.1:5600", True),
        ("zmq://127.0.0.1:5599?advertise=10.0.0.1", True),
        ("zmq://10.1.2.3:5599?insecure=true", False),
        ("zmq://10.1.2.3:5599?advertise=127.0.0.1", False),
        ("zmq://10.1.2.3:5599?curve_serverkey=KEY", False),
        ("zmq://[::1]:5599", False),
        ("zmq://localhost:5599", False),
    ],
)
def test_a_layer_refuses_a_node_open_to_the_network(url: str, refused: bool) -> None:
    url = url.replace("KEY", quote(zmq.curve_keypair()[0].decode(), safe=""))
    if refused:
        with pytest.raises(ConfigurationError, match="insecure=true"):
            ChannelLayer(url)
    else:
        ChannelLayer(url)  # no I/O: nothing to close


def test_refused_peers_are_logged_once_each_and_rate_limited(
    caplog: pytest.LogCaptureFixture,
) -> None:
    refusals = RefusalLog(logging.getLogger("multilayer.test"), window=0.3, burst=3)
    with caplog.at_level(logging.WARNING, logger="multilayer.test"):
        for _ in range(5):
            refusals.refused("10.0.0.1", "no")  # one peer, again and again: one line
        for n in range(2, 40):
            refusals.refused(f"10.0.0.{n}", "no")  # a scan: the burst, then silence
        assert len(caplog.records) == 3
        time.sleep(0.35)
        refusals.refused("10.0.0.99", "no")
    assert len(caplog.records) == 4
    assert caplog.records[-1].getMessage() == (
        "refused 10.0.0.99: no (36 more refused peers not logged)"
    )


def _dealer(
    context: zmq.Context[Any], endpoint: str, server: bytes | None, keys: tuple[bytes, bytes]
) -> zmq.Socket[Any]:
    """A DEALER to ``endpoint``: a CURVE client of ``server`` with ``keys`` (public,
    secret), or plaintext when ``server`` is None."""
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    if server is not None:
        dealer.setsockopt(zmq.CURVE_SERVERKEY, server)
        dealer.setsockopt(zmq.CURVE_PUBLICKEY, keys[0])
        dealer.setsockopt(zmq.CURVE_SECRETKEY, keys[1])
    dealer.connect(endpoint)
    return dealer


def _deliver(dealer: zmq.Socket[Any], channel: str, n: int, wait: float) -> list[Any] | None:
    """Send ``{"n": n}`` to ``channel`` as a sender's node request does; the answer, or None
    when none comes within ``wait`` seconds."""
    key = "gate:" + channel.partition("!")[0] + "!"
    payload = pack({"n": n}, time.time() + 60, max_size=1 << 20)
    header = msgpack.packb(["deliver", n, [[key, channel, 100]], time.time() + wait, 0])
    dealer.send_multipart([header, payload])
    if not dealer.poll(int(wait * 1000)):
        return None
    answer: list[Any] = msgpack.unpackb(dealer.recv_multipart()[0])
    return answer


def _curve_url(port: int, server: bytes, client: tuple[bytes, bytes]) -> str:
    """A layer URL for the CURVE hub on ``port`` (public key ``server``) as ``client``."""
    return (
        f"zmq://127.0.0.1:{port}?heartbeat=0.2&curve_serverkey={quote(server.decode(), safe='')}"
        f"&curve_secretkey={quote(client[1].decode(), safe='')}"
    )


async def _answers(url: str) -> bool:
    """Whether a hub takes a send from a layer on ``url`` within half a second."""
    layer = ChannelLayer(url, prefix="probe", timeout=0.5)
    try:
        await layer.send("probe.q", {"n": 0})
        await layer.flush()
    except BrokerError:
        return False
    finally:
        await layer.close()
    return True


def _node_of(layer: ChannelLayer) -> Node:
    """The node serving ``layer``'s inboxes in this process."""
    backend = layer._state().backend
    assert isinstance(backend, ZmqBackend) and backend._node is not None
    return backend._node


def test_a_node_admits_only_the_clients_its_hub_allows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hub_public, hub_secret = zmq.curve_keypair()
    listed, stranger = zmq.curve_keypair(), zmq.curve_keypair()
    process = Hub(
        tmp_path,
        f"--curve-secret-key={hub_secret.decode()}",
        f"--curve-allow={listed[0].decode()}",
    )
    process.start()
    url = _curve_url(process.port, hub_public, listed)
    context: zmq.Context[Any] = zmq.Context()

    async def body() -> None:
        layer = ChannelLayer(url, prefix="gate")
        dealers: list[zmq.Socket[Any]] = []
        try:
            channel = await layer.new_channel()
            node = _node_of(layer)
            server = node.public_key.encode()
            # A valid key pair the hub does not list, knowing the node's key and endpoint.
            intruder = _dealer(context, node.endpoint, server, stranger)
            dealers.append(intruder)
            assert _deliver(intruder, channel, 1, 1.5) is None
            # Plaintext, to the node and to the hub.
            plain = _dealer(context, node.endpoint, None, stranger)
            dealers.append(plain)
            assert _deliver(plain, channel, 2, 1.0) is None
            plain_hub = _dealer(context, f"tcp://127.0.0.1:{process.port}", None, stranger)
            dealers.append(plain_hub)
            plain_hub.send_multipart([msgpack.packb(["ping", 1])])
            assert not plain_hub.poll(1000)
            await nothing(layer, channel, 0.5)  # nothing they sent was delivered
            # A listed client, same request: accepted and delivered.
            friend = _dealer(context, node.endpoint, server, listed)
            dealers.append(friend)
            answer = _deliver(friend, channel, 3, 5.0)
            assert answer is not None and answer[:3] == ["ok", 3, [0]]
            assert await recv(layer, channel) == {"n": 3}
            await nothing(layer, channel)
        finally:
            for dealer in dealers:
                dealer.close(0)
            await layer.flush()
            await layer.close()

    try:
        with caplog.at_level(logging.WARNING, logger="multilayer"):
            run(body())
    finally:
        context.destroy(linger=0)
        process.stop()
    node_log = caplog.text
    assert "refused 127.0.0.1: its CURVE key is not on the allow list" in node_log
    assert "its handshake failed" in node_log
    hub_log = process.log.read_text()
    assert "its handshake failed" in hub_log
    for secret_or_not in (*stranger, *listed):
        assert secret_or_not.decode() not in node_log + hub_log


def test_the_allow_list_changes_without_a_restart(tmp_path: Path) -> None:
    hub_public, hub_secret = zmq.curve_keypair()
    first, second = zmq.curve_keypair(), zmq.curve_keypair()
    allow = tmp_path / "allow"
    allow.write_text(f"# first only\n{first[0].decode()}\n")
    process = Hub(
        tmp_path, f"--curve-secret-key={hub_secret.decode()}", f"--curve-allow-file={allow}"
    )
    process.start()
    assert process.process is not None

    def url(keys: tuple[bytes, bytes]) -> str:
        return _curve_url(process.port, hub_public, keys)

    def hup(keys: list[tuple[bytes, bytes]]) -> None:
        allow.write_text("".join(f"{key[0].decode()}\n" for key in keys))
        assert process.process is not None
        process.process.send_signal(signal.SIGHUP)

    async def body() -> None:
        owner = ChannelLayer(url(first), prefix="gate")
        context: zmq.Context[Any] = zmq.Context()
        try:
            channel = await owner.new_channel()
            node = _node_of(owner)
            server = node.public_key.encode()
            assert not await _answers(url(second))
            early = _dealer(context, node.endpoint, server, second)
            assert _deliver(early, channel, 1, 1.0) is None
            early.close(0)
            # Listed and SIGHUP: the hub takes new connections from it at once, the node
            # once its next registration brings the list (a heartbeat).
            hup([first, second])
            deadline = time.monotonic() + 10
            while not await _answers(url(second)):
                assert time.monotonic() < deadline, "the hub did not read the new allow list"
            answer = None
            while answer is None:
                assert time.monotonic() < deadline, "the node did not learn the new allow list"
                later = _dealer(context, node.endpoint, server, second)
                answer = _deliver(later, channel, 2, 0.5)
                later.close(0)
            assert await recv(owner, channel) == {"n": 2}
            # Struck off: new connections are refused again, by the hub and the node.
            hup([first])
            await asyncio.sleep(1.0)
            assert not await _answers(url(second))
            struck = _dealer(context, node.endpoint, server, second)
            assert _deliver(struck, channel, 3, 1.0) is None
            struck.close(0)
            await nothing(owner, channel)
        finally:
            context.destroy(linger=0)
            await owner.flush()
            await owner.close()

    try:
        run(body(), 60)
    finally:
        process.stop()
    assert process.log.read_text().count("allow list replaced: ") == 2


def test_the_hub_key_rolls_without_a_restart(tmp_path: Path) -> None:
    old, new = zmq.curve_keypair(), zmq.curve_keypair()
    clients = [zmq.curve_keypair() for _ in range(3)]
    current, following = tmp_path / "hub.key", tmp_path / "next.key"
    current.write_text(old[1].decode())
    following.write_text("")
    next_port = free_port()
    process = Hub(
        tmp_path,
        f"--curve-secret-key-file={current}",
        f"--next-bind=tcp://127.0.0.1:{next_port}",
        f"--next-curve-secret-key-file={following}",
        *(f"--curve-allow={public.decode()}" for public, _ in clients),
    )
    process.start()

    url = _curve_url

    def hup() -> None:
        assert process.process is not None
        process.process.send_signal(signal.SIGHUP)

    async def body() -> None:
        before = ChannelLayer(url(process.port, old[0], clients[0]), prefix="roll")
        after = ChannelLayer(url(next_port, new[0], clients[1]), prefix="roll")
        try:
            old_inbox = await before.new_channel()
            assert not await _answers(url(next_port, new[0], clients[2]))
            following.write_text(new[1].decode())  # the new key, on the spare endpoint
            hup()
            deadline = time.monotonic() + 10
            while not await _answers(url(next_port, new[0], clients[2])):
                assert time.monotonic() < deadline, "the hub did not take its next key"
            # Layers on either key share one hub: queues, groups and the inboxes' nodes.
            new_inbox = await after.new_channel()
            await before.send("roll.q", {"n": 1})
            assert await recv(after, "roll.q") == {"n": 1}
            await after.group_add("g", new_inbox)
            await before.group_send("g", {"n": 2})
            assert await recv(after, new_inbox) == {"n": 2}
            await after.send(old_inbox, {"n": 3})
            assert await recv(before, old_inbox) == {"n": 3}
            # Every process has moved: retire the old key.
            current.write_text("")
            hup()
            while await _answers(url(process.port, old[0], clients[2])):
                assert time.monotonic() < deadline, "the old key still answers"
            stranger = ChannelLayer(url(next_port, new[0], clients[2]), prefix="roll")
            try:  # through the hub, which now reaches nodes with its new key
                await stranger.send(new_inbox, {"n": 4})
            finally:
                await stranger.close()
            assert await recv(after, new_inbox) == {"n": 4}
            await after.send("roll.q", {"n": 5})
            assert await recv(after, "roll.q") == {"n": 5}
        finally:
            await after.flush()
            await before.close()
            await after.close()

    try:
        run(body(), 60)
    finally:
        process.stop()
    log = process.log.read_text()
    assert f"hub stopped listening on tcp://127.0.0.1:{process.port}" in log
    assert old[1].decode() not in log and new[1].decode() not in log


# -- the shared suite, against a hub this test owns ---------------------------------------
