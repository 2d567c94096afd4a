"""The layer object: attributes, flush, close, event loops, async_to_sync."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.layers import BaseChannelLayer

from ._util import assert_nothing, recv
from .plugin import Harness


def test_contract_attributes(harness: Harness) -> None:
    layer = harness.layer(expiry=30, group_expiry=600, capacity=50)
    assert "groups" in layer.extensions and "flush" in layer.extensions
    assert (layer.expiry, layer.group_expiry, layer.capacity) == (30, 600, 50)
    for method in (
        "send",
        "receive",
        "new_channel",
        "group_add",
        "group_discard",
        "group_send",
        "flush",
        "close",
    ):
        assert asyncio.iscoroutinefunction(getattr(layer, method)), method
    # The Channels base class accepts what the layer accepts, and the reverse.
    assert BaseChannelLayer.channel_name_regex.match("a.b-c_d!e")


def test_flush_is_seen_by_other_instances(harness: Harness) -> None:
    async def body() -> None:
        first, second = harness.layer(), harness.layer()
        channel = await first.new_channel()
        await second.send("conf.flushed", {"n": 1})
        await second.send(channel, {"n": 1})
        await first.group_add("conf-flushed", channel)
        await second.flush()
        await assert_nothing(first, "conf.flushed", 0.3)
        await second.group_send("conf-flushed", {"n": 2})
        await assert_nothing(first, channel, 0.3)
        # The layers stay usable after a flush.
        channel = await first.new_channel()
        await second.send(channel, {"n": 3})
        assert await recv(first, channel) == {"n": 3}
        await second.send("conf.flushed", {"n": 4})
        assert await recv(first, "conf.flushed") == {"n": 4}

    harness.run(body)


def test_flush_keeps_other_prefixes(harness: Harness) -> None:
    async def body() -> None:
        mine = harness.layer()
        other = harness.layer(prefix=harness.prefix + "x")
        try:
            await other.send("conf.keep", {"kept": True})
            await mine.send("conf.keep", {"kept": False})
            await mine.flush()
            assert await recv(other, "conf.keep") == {"kept": True}
        finally:
            await other.flush()

    harness.run(body)


def test_close_is_idempotent_and_works_unused(harness: Harness) -> None:
    async def body() -> None:
        unused = harness.layer()
        await unused.close()
        await unused.close()
        used = harness.layer()
        await used.send("conf.close", {"n": 1})
        await used.close()
        await used.close()
        # A closed layer reconnects on demand.
        assert await recv(used, "conf.close") == {"n": 1}

    harness.run(body)


def test_close_ends_a_waiting_receive(harness: Harness) -> None:
    async def body() -> None:
        layer = harness.layer()
        waiting = asyncio.ensure_future(layer.receive("conf.never"))
        await asyncio.sleep(0.2)
        await layer.close()
        done, _ = await asyncio.wait([waiting], timeout=10)
        assert done, "receive() still waits after close()"
        assert waiting.exception() is not None

    harness.run(body)


def test_one_layer_in_several_event_loops(harness: Harness) -> None:
    layer = harness.layer()
    sender = harness.layer()

    async def first_loop() -> str:
        channel = await layer.new_channel()
        await sender.send("conf.loops", {"n": 1})
        await sender.send("conf.loops", {"n": 2})
        assert await recv(layer, "conf.loops") == {"n": 1}
        await sender.send(channel, {"n": 3})
        return channel

    async def second_loop(channel: str) -> None:
        assert await recv(layer, "conf.loops") == {"n": 2}
        assert await recv(layer, channel) == {"n": 3}
        fresh = await layer.new_channel()
        await sender.send(fresh, {"n": 4})
        assert await recv(layer, fresh) == {"n": 4}

    channel = asyncio.run(asyncio.wait_for(first_loop(), 60))
    harness.run(lambda: second_loop(channel))


def test_async_to_sync(harness: Harness) -> None:
    layer = harness.layer()
    try:
        channel = async_to_sync(layer.new_channel)()
        async_to_sync(layer.send)(channel, {"sync": 1})
        async_to_sync(layer.send)("conf.sync", {"sync": 2})
        async_to_sync(layer.group_add)("conf-sync", channel)
        async_to_sync(layer.group_send)("conf-sync", {"sync": 3})
        receive = async_to_sync(recv)
        assert receive(layer, channel) == {"sync": 1}
        assert receive(layer, "conf.sync") == {"sync": 2}
        assert receive(layer, channel) == {"sync": 3}
    finally:
        async_to_sync(layer.flush)()
        async_to_sync(layer.close)()


def _open_sockets() -> int | None:
    """How many sockets this process holds; None where there is no /proc to tell."""
    if not os.path.isdir("/proc/self/fd"):
        return None
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


def test_a_call_per_event_loop_keeps_groups_and_leaves_no_sockets(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """A Django view calls the layer with ``async_to_sync`` once per request, each call in
    an event loop of its own. A group joined in one loop still gets what is sent to it
    from the next ones; what the layer opens in a loop is closed when the loop ends, or
    reused, so a server's sockets do not grow with its requests; and a loop's end is
    nothing to warn about."""
    caplog.set_level(logging.WARNING, logger="multilayer")
    layer = harness.layer()

    def request(channel: str, number: int) -> None:
        async_to_sync(layer.send)(channel, {"n": number})
        async_to_sync(layer.group_send)("conf-requests", {"g": number})
        assert async_to_sync(recv)(layer, channel) == {"n": number}
        assert async_to_sync(recv)(layer, channel) == {"g": number}

    try:
        channel = async_to_sync(layer.new_channel)()
        async_to_sync(layer.group_add)("conf-requests", channel)
        for number in range(3):
            request(channel, number)
        settled = _open_sockets()
        for number in range(3, 23):
            request(channel, number)
        # A margin for connections of other layers in this process (left open by
        # earlier tests) that come and go meanwhile; one per loop would be 20.
        now_open = _open_sockets()
        assert settled is None or now_open is None or now_open <= settled + 3
    finally:
        async_to_sync(layer.flush)()
        async_to_sync(layer.close)()
    assert [r.getMessage() for r in caplog.records if r.name.startswith("multilayer")] == []


def test_close_keeps_what_a_loop_fetched_for_another_channel(harness: Harness) -> None:
    # channels_redis's test_double_receive: one receive's pop takes the process inbox's
    # backlog, the first channel's message included, then close() ends that event loop's
    # state; the next receive of the first channel, in another loop, must still get it.
    layer = harness.layer()
    sender = harness.layer()
    try:
        first = async_to_sync(layer.new_channel)()
        second = async_to_sync(layer.new_channel)()

        async def send_both() -> None:
            await sender.send(first, {"n": 1})
            await sender.send(second, {"n": 2})
            await sender.close()

        async def receive_then_close(channel: str) -> dict[str, Any]:
            message = await recv(layer, channel)
            await layer.close()
            return message

        async_to_sync(send_both)()
        assert async_to_sync(receive_then_close)(second) == {"n": 2}
        assert async_to_sync(receive_then_close)(first) == {"n": 1}

        # The same when close() comes from a later event loop than the receive's.
        async_to_sync(send_both)()
        assert async_to_sync(recv)(layer, second) == {"n": 2}
        async_to_sync(layer.close)()
        assert async_to_sync(recv)(layer, first) == {"n": 1}
    finally:
        async_to_sync(layer.flush)()
        async_to_sync(layer.close)()
        async_to_sync(sender.close)()


def test_close_keeps_what_a_running_loop_fetched(harness: Harness) -> None:
    # close() closes the layer's other loops' states in their own loops, later: what a
    # loop still running in another thread had fetched reaches a receive waiting here.
    layer = harness.layer()
    sender = harness.layer()
    other = asyncio.new_event_loop()
    thread = threading.Thread(target=other.run_forever, daemon=True)
    thread.start()
    try:

        async def fetch_both() -> tuple[str, dict[str, Any]]:
            first, second = await layer.new_channel(), await layer.new_channel()
            await sender.send(first, {"n": 1})
            await sender.send(second, {"n": 2})
            await sender.close()
            return first, await recv(layer, second)

        first, message = asyncio.run_coroutine_threadsafe(fetch_both(), other).result(60)
        assert message == {"n": 2}

        async def close_then_receive() -> dict[str, Any]:
            await layer.close()
            return await recv(layer, first)

        assert harness.run(close_then_receive) == {"n": 1}
    finally:
        other.call_soon_threadsafe(other.stop)
        thread.join(10)
        other.close()


@pytest.mark.parametrize("ending", ["close", "loop end"])
def test_what_was_sent_arrives_after_its_sender_stops(harness: Harness, ending: str) -> None:
    """A send or group_send that returned is the layer's to deliver, even when the layer
    closes, or its event loop ends, at once: what it still had to write goes out rather
    than being dropped with its connections. A Django view does this on every request:
    ``async_to_sync(layer.group_send)(...)`` runs in an event loop of its own, and the
    next call's loop takes over."""
    receiver = harness.layer()
    sender = harness.layer()

    async def send_all(channel: str, number: int) -> None:
        await sender.send("conf.stops", {"n": number})
        await sender.send(channel, {"n": number})
        await sender.group_send("conf-stops", {"g": number})
        if ending == "close":
            await sender.close()

    try:
        channel = async_to_sync(receiver.new_channel)()
        async_to_sync(receiver.group_add)("conf-stops", channel)
        for number in range(20):
            async_to_sync(send_all)(channel, number)
            async_to_sync(sender.group_send)("conf-stops", {"g": number, "alone": True})

        async def drain() -> None:
            for number in range(20):
                assert await recv(receiver, "conf.stops") == {"n": number}
                assert await recv(receiver, channel) == {"n": number}
                assert await recv(receiver, channel) == {"g": number}
                assert await recv(receiver, channel) == {"g": number, "alone": True}

        async_to_sync(drain)()
    finally:
        async_to_sync(receiver.flush)()
        async_to_sync(receiver.close)()
        async_to_sync(sender.close)()
