"""Channels: round trips, ordering, at-most-once delivery, capacity, expiry, validation."""

from __future__ import annotations

import asyncio
import random
import re
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.exceptions import ChannelFull, MessageTooLarge

from ..exceptions import ForeignChannel
from ._util import assert_nothing, recv
from .plugin import Harness

MSGPACK_VALUES = {
    "none": None,
    "true": True,
    "false": False,
    "zero": 0,
    "negative": -(2**63),
    "big": 2**64 - 1,
    "float": 3.25,
    "text": "héllo wörld ✓ 中文",
    "empty_text": "",
    "bytes": bytes(range(256)),
    "empty_bytes": b"",
    "list": [1, "two", b"three", [4.0, None]],
    "nested": {"a": {"b": {"c": [1, {"d": b"e"}]}}},
    "empty_list": [],
    "empty_dict": {},
    "type": "websocket.send",
}


def test_round_trip_every_msgpack_type(harness: Harness) -> None:
    async def body() -> None:
        sender, receiver = harness.layer(), harness.layer()
        await sender.send("conf.types", MSGPACK_VALUES)
        assert await recv(receiver, "conf.types") == MSGPACK_VALUES
        inbox = await receiver.new_channel()
        await sender.send(inbox, MSGPACK_VALUES)
        assert await recv(receiver, inbox) == MSGPACK_VALUES

    harness.run(body)


def test_round_trip_one_megabyte(harness: Harness) -> None:
    async def body() -> None:
        # Within the default max_message_size, which admits any 1 MiB of JSON.
        sender, receiver = harness.layer(), harness.layer()
        blob = random.Random(7).randbytes(1024 * 1024)
        text = "x" * (1024 * 1024)
        await sender.send("conf.big", {"blob": blob})
        await sender.send("conf.big", {"text": text})
        assert (await recv(receiver, "conf.big"))["blob"] == blob
        assert (await recv(receiver, "conf.big"))["text"] == text
        inbox = await receiver.new_channel()
        await sender.send(inbox, {"blob": blob})
        assert (await recv(receiver, inbox))["blob"] == blob

    harness.run(body)


def test_fifo_thousand_messages(harness: Harness) -> None:
    async def body() -> None:
        sender, receiver = harness.layer(capacity=2000), harness.layer(capacity=2000)
        inbox = await receiver.new_channel()
        for i in range(1000):
            await sender.send("conf.fifo", {"i": i})
            await sender.send(inbox, {"i": i})
        assert [(await recv(receiver, "conf.fifo"))["i"] for _ in range(1000)] == list(range(1000))
        assert [(await recv(receiver, inbox))["i"] for _ in range(1000)] == list(range(1000))

    harness.run(body)


def test_message_waits_for_a_later_receiver(harness: Harness) -> None:
    async def body() -> None:
        sender, receiver = harness.layer(), harness.layer()
        inbox = await receiver.new_channel()
        await sender.send("conf.early", {"n": 1})
        await sender.send(inbox, {"n": 2})
        await asyncio.sleep(0.3)
        assert await recv(receiver, "conf.early") == {"n": 1}
        assert await recv(receiver, inbox) == {"n": 2}

    harness.run(body)


def test_receive_waits_for_a_later_send(harness: Harness) -> None:
    async def body() -> None:
        sender, receiver = harness.layer(), harness.layer()
        inbox = await receiver.new_channel()
        normal = asyncio.ensure_future(recv(receiver, "conf.later"))
        specific = asyncio.ensure_future(recv(receiver, inbox))
        await asyncio.sleep(1.0)
        assert not normal.done() and not specific.done()
        await sender.send("conf.later", {"n": 1})
        await sender.send(inbox, {"n": 2})
        assert await normal == {"n": 1}
        assert await specific == {"n": 2}

    harness.run(body)


async def _drain(layers_and_channels: list[tuple[object, str]], expected: int) -> list[int]:
    """Receive with one task per (layer, channel) until ``expected`` messages arrived."""
    got: list[int] = []
    done = asyncio.Event()

    async def receiver(layer: object, channel: str) -> None:
        while not done.is_set():
            message = await layer.receive(channel)  # type: ignore[attr-defined]
            got.append(message["i"])
            if len(got) >= expected:
                done.set()

    tasks = [asyncio.ensure_future(receiver(layer, ch)) for layer, ch in layers_and_channels]
    try:
        await asyncio.wait_for(done.wait(), 30)
        await asyncio.sleep(0.5)  # let any duplicate show itself
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return got


def test_two_receivers_one_instance_each_message_once(harness: Harness) -> None:
    async def body() -> None:
        sender, receiver = harness.layer(capacity=500), harness.layer(capacity=500)
        for i in range(300):
            await sender.send("conf.shared", {"i": i})
        got = await _drain([(receiver, "conf.shared"), (receiver, "conf.shared")], 300)
        assert sorted(got) == list(range(300))

    harness.run(body)


def test_two_receivers_two_instances_each_message_once(harness: Harness) -> None:
    async def body() -> None:
        sender = harness.layer(capacity=500)
        first, second = harness.layer(capacity=500), harness.layer(capacity=500)
        drained = asyncio.ensure_future(_drain([(first, "conf.work"), (second, "conf.work")], 300))
        await asyncio.sleep(0.2)
        for i in range(300):
            await sender.send("conf.work", {"i": i})
        assert sorted(await drained) == list(range(300))

    harness.run(body)


def test_process_specific_channel_across_instances(harness: Harness) -> None:
    async def body() -> None:
        owner, other = harness.layer(), harness.layer()
        channel = await owner.new_channel()
        await other.send(channel, {"to": "owner"})
        assert await recv(owner, channel) == {"to": "owner"}
        await owner.send(channel, {"to": "self"})
        assert await recv(owner, channel) == {"to": "self"}

    harness.run(body)


def test_process_specific_channel_only_for_its_owner(harness: Harness) -> None:
    async def body() -> None:
        owner, other = harness.layer(), harness.layer()
        channel = await owner.new_channel()
        with pytest.raises(ForeignChannel, match=re.escape(channel)):
            await other.receive(channel)
        mine = await other.new_channel()
        await other.send(channel, {"for": "owner"})
        await other.send(mine, {"for": "other"})
        assert await recv(other, mine) == {"for": "other"}
        assert await recv(owner, channel) == {"for": "owner"}

    harness.run(body)


def test_many_channels_of_one_process_keep_apart(harness: Harness) -> None:
    async def body() -> None:
        owner, sender = harness.layer(), harness.layer()
        channels = [await owner.new_channel() for _ in range(20)]
        for round_ in range(3):
            for index, channel in enumerate(channels):
                await sender.send(channel, {"c": index, "r": round_})
        for index, channel in reversed(list(enumerate(channels))):
            got = [await recv(owner, channel) for _ in range(3)]
            assert got == [{"c": index, "r": r} for r in range(3)]

    harness.run(body)


def test_new_channel_names(harness: Harness) -> None:
    async def body() -> None:
        first, second = harness.layer(), harness.layer()
        random.seed(1234)
        a = [await first.new_channel() for _ in range(200)]
        random.seed(1234)
        b = [await second.new_channel() for _ in range(200)]
        assert len(set(a) | set(b)) == 400
        pattern = re.compile(r"specific\.[A-Za-z0-9_.-]+![A-Za-z0-9_.-]+")
        assert all(pattern.fullmatch(name) and len(name) < 100 for name in a + b)
        custom = await first.new_channel("http.response")
        assert custom.startswith("http.response.") and "!" in custom
        await second.send(custom, {"ok": True})
        assert await recv(first, custom) == {"ok": True}
        with pytest.raises(TypeError):
            await first.new_channel("bad prefix!")

    harness.run(body)


def test_capacity_raises_channel_full_and_loses_nothing(harness: Harness) -> None:
    async def body() -> None:
        sender, receiver = harness.layer(capacity=5), harness.layer(capacity=5)
        inbox = await receiver.new_channel()
        for channel in ("conf.cap", inbox):
            for i in range(5):
                await sender.send(channel, {"i": i})
            with pytest.raises(ChannelFull):
                await sender.send(channel, {"i": 5})
            assert [(await recv(receiver, channel))["i"] for _ in range(5)] == list(range(5))
            await assert_nothing(receiver, channel, 0.3)
            await sender.send(channel, {"i": 6})
            assert await recv(receiver, channel) == {"i": 6}

    harness.run(body)


def test_capacity_is_atomic_across_instances(harness: Harness) -> None:
    async def body() -> None:
        senders = [harness.layer(capacity=10) for _ in range(2)]
        receiver = harness.layer(capacity=10)
        inbox = await receiver.new_channel()

        async def attempt(layer: object, channel: str, i: int) -> bool:
            try:
                await layer.send(channel, {"i": i})  # type: ignore[attr-defined]
            except ChannelFull:
                return False
            return True

        for channel in ("conf.race", inbox):
            accepted = await asyncio.gather(
                *(attempt(senders[i % 2], channel, i) for i in range(40))
            )
            assert sum(accepted) == 10, "two senders both took the last free place"
            got = [(await recv(receiver, channel))["i"] for _ in range(10)]
            assert sorted(got) == [i for i, ok in enumerate(accepted) if ok]
            await assert_nothing(receiver, channel, 0.3)

    harness.run(body)


def test_a_sender_per_send_fills_the_whole_capacity(harness: Harness) -> None:
    # A Django view's async_to_sync(layer.send) runs each send in an event loop, and so on
    # a connection, of its own: a new sender every time. Places a layer sets aside for a
    # sender's next sends must not make a channel look full to the others while it is not.
    sender, receiver = harness.layer(capacity=10), harness.layer(capacity=10)
    send = async_to_sync(sender.send)
    try:
        inbox = async_to_sync(receiver.new_channel)()
        for channel in ("conf.once", inbox):
            for i in range(10):
                send(channel, {"i": i})
            with pytest.raises(ChannelFull):
                send(channel, {"i": 10})

            async def drain(channel: str) -> list[Any]:
                got = [(await recv(receiver, channel))["i"] for _ in range(10)]
                await assert_nothing(receiver, channel, 0.3)
                return got

            assert async_to_sync(drain)(channel) == list(range(10))
    finally:
        async_to_sync(receiver.flush)()
        async_to_sync(receiver.close)()
        async_to_sync(sender.close)()


def test_concurrent_sends_of_one_layer_fill_the_capacity_and_every_accepted_one_arrives(
    harness: Harness,
) -> None:
    # Eight tasks of one layer send ten messages each at once: a layer that lets sends
    # go on before the broker answers must still refuse exactly what does not fit, and
    # deliver everything it did not refuse.
    async def body() -> None:
        sender, receiver = harness.layer(capacity=50), harness.layer(capacity=50)
        inbox = await receiver.new_channel()

        async def task(channel: str, t: int, accepted: list[tuple[int, int]]) -> None:
            for i in range(10):
                try:
                    await sender.send(channel, {"t": t, "i": i})
                except ChannelFull:
                    continue
                accepted.append((t, i))

        for channel in ("conf.crowd", inbox):
            accepted: list[tuple[int, int]] = []
            await asyncio.gather(*(task(channel, t, accepted) for t in range(8)))
            assert len(accepted) == 50
            got = [await recv(receiver, channel) for _ in range(50)]
            assert sorted((m["t"], m["i"]) for m in got) == sorted(accepted)
            for t in range(8):
                sent = [m["i"] for m in got if m["t"] == t]
                assert sent == sorted(sent), f"task {t}'s messages arrived out of order"
            await assert_nothing(receiver, channel, 0.3)

    harness.run(body)


def test_capacity_of_process_channels_counts_the_whole_inbox(harness: Harness) -> None:
    async def body() -> None:
        sender, owner = harness.layer(capacity=4), harness.layer(capacity=4)
        first, second = await owner.new_channel(), await owner.new_channel()
        for i in range(2):
            await sender.send(first, {"i": i})
            await sender.send(second, {"i": i})
        with pytest.raises(ChannelFull):
            await sender.send(first, {"i": 9})
        assert [(await recv(owner, second))["i"] for _ in range(2)] == [0, 1]
        assert [(await recv(owner, first))["i"] for _ in range(2)] == [0, 1]

    harness.run(body)


def test_channel_capacity_globs_and_regexes(harness: Harness) -> None:
    async def body() -> None:
        options = {
            "capacity": 10,
            "channel_capacity": {"conf.small.*": 2, re.compile(r"^conf\.regex$"): 3},
        }
        sender, receiver = harness.layer(**options), harness.layer(**options)
        for channel, limit in (("conf.small.one", 2), ("conf.regex", 3), ("conf.other", 10)):
            for i in range(limit):
                await sender.send(channel, {"i": i})
            with pytest.raises(ChannelFull):
                await sender.send(channel, {"i": limit})
            assert [(await recv(receiver, channel))["i"] for _ in range(limit)] == list(
                range(limit)
            )

    harness.run(body)


def test_message_too_large_is_refused_and_queue_intact(harness: Harness) -> None:
    async def body() -> None:
        sender, receiver = harness.layer(max_message_size=1000), harness.layer()
        await sender.send("conf.size", {"n": 1})
        with pytest.raises(MessageTooLarge):
            await sender.send("conf.size", {"blob": b"x" * 2000})
        with pytest.raises(MessageTooLarge):
            await sender.group_send("conf-size", {"blob": b"x" * 2000})
        await sender.send("conf.size", {"n": 2})
        assert [await recv(receiver, "conf.size") for _ in range(2)] == [{"n": 1}, {"n": 2}]

    harness.run(body)


@pytest.mark.slow
def test_expiry_drops_undelivered_messages(harness: Harness) -> None:
    async def body() -> None:
        sender, receiver = harness.layer(expiry=1, capacity=3), harness.layer(expiry=1, capacity=3)
        inbox = await receiver.new_channel()
        for channel in ("conf.expiring", inbox):
            await sender.send(channel, {"old": True})
            await sender.send(channel, {"old": True})
            await sender.send(channel, {"old": True})
        await asyncio.sleep(1.6)
        for channel in ("conf.expiring", inbox):
            # Expired messages no longer count against capacity either.
            for _ in range(3):
                await sender.send(channel, {"old": False})
            assert [await recv(receiver, channel) for _ in range(3)] == [{"old": False}] * 3
            await assert_nothing(receiver, channel, 0.3)

    harness.run(body)


BAD_CHANNELS: list[Any] = [
    "",
    "a" * 100,
    "has space",
    "ünicode",
    "semi;colon",
    "two!bangs!",
    42,
    None,
    b"b",
]
BAD_GROUPS: list[Any] = ["", "a" * 100, "bang!", "has space", 7, None]


def test_invalid_names_and_messages_raise_type_error(harness: Harness) -> None:
    async def body() -> None:
        layer = harness.layer()
        await layer.send("conf.valid", {"kept": 1})
        for bad in BAD_CHANNELS:
            for call in (layer.send(bad, {}), layer.receive(bad), layer.group_add("g", bad)):
                with pytest.raises(TypeError, match=re.escape(repr(bad)[:20])):
                    await call
        for bad in BAD_GROUPS:
            for call in (
                layer.group_add(bad, "conf.valid"),
                layer.group_discard(bad, "conf.valid"),
                layer.group_send(bad, {}),
            ):
                with pytest.raises(TypeError, match=re.escape(repr(bad)[:20])):
                    await call
        for message in (None, "text", [1, 2], 3):
            with pytest.raises(TypeError, match=type(message).__name__):
                await layer.send("conf.valid", message)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="set"):
            await layer.send("conf.valid", {"not msgpack": {1, 2}})
        await layer.send("a" * 99, {"longest": True})
        assert await recv(layer, "a" * 99) == {"longest": True}
        assert await recv(layer, "conf.valid") == {"kept": 1}

    harness.run(body)


def test_send_does_not_keep_the_callers_dict(harness: Harness) -> None:
    async def body() -> None:
        layer = harness.layer()
        message = {"items": [1, 2], "text": "before"}
        await layer.send("conf.copy", message)
        message["text"] = "after"
        message["items"].append(3)  # type: ignore[attr-defined]
        assert await recv(layer, "conf.copy") == {"items": [1, 2], "text": "before"}

    harness.run(body)


def test_cancelled_receives_lose_and_double_nothing(harness: Harness) -> None:
    async def body() -> None:
        sender = harness.layer(capacity=1000)
        first, second = harness.layer(capacity=1000), harness.layer(capacity=1000)
        inbox = await first.new_channel()
        chaos = random.Random(99)
        total = 300
        got: dict[str, list[int]] = {"conf.cancel": [], inbox: []}

        async def produce() -> None:
            for i in range(total):
                await sender.send("conf.cancel", {"i": i})
                await sender.send(inbox, {"i": i})
                if i % 10 == 0:
                    await asyncio.sleep(0.001)

        async def consume(layer: object, channel: str, wanted: int) -> None:
            while len(got[channel]) < wanted:
                task = asyncio.ensure_future(layer.receive(channel))  # type: ignore[attr-defined]
                await asyncio.sleep(chaos.choice([0, 0, 0.0001, 0.001, 0.003]))
                if not task.done():
                    task.cancel()
                try:
                    message = await task
                except asyncio.CancelledError:
                    continue
                got[channel].append(message["i"])

        producer = asyncio.ensure_future(produce())
        consumers = [
            asyncio.ensure_future(consume(first, "conf.cancel", total)),
            asyncio.ensure_future(consume(second, "conf.cancel", total)),
            asyncio.ensure_future(consume(first, inbox, total)),
        ]
        await producer
        try:
            await asyncio.wait_for(asyncio.gather(*consumers), 60)
        finally:
            for task in consumers:
                task.cancel()
            await asyncio.gather(*consumers, return_exceptions=True)
        normal = got["conf.cancel"]
        assert sorted(normal) == list(range(total)), "lost or doubled on the normal channel"
        assert got[inbox] == list(range(total)), "lost, doubled or reordered on the inbox"

    harness.run(body, timeout=150)


def test_fifty_concurrent_senders(harness: Harness) -> None:
    async def body() -> None:
        senders = [harness.layer(capacity=2000) for _ in range(2)]
        receiver = harness.layer(capacity=2000)
        inbox = await receiver.new_channel()

        async def send_all(sender_id: int) -> None:
            layer = senders[sender_id % 2]
            for seq in range(20):
                await layer.send("conf.fanin", {"s": sender_id, "q": seq})
                await layer.send(inbox, {"s": sender_id, "q": seq})

        await asyncio.gather(*(send_all(s) for s in range(50)))
        for channel in ("conf.fanin", inbox):
            last = dict.fromkeys(range(50), -1)
            for _ in range(1000):
                message = await recv(receiver, channel)
                assert message["q"] == last[message["s"]] + 1, "a sender's order was broken"
                last[message["s"]] = message["q"]
            assert all(seq == 19 for seq in last.values())
            await assert_nothing(receiver, channel, 0.2)

    harness.run(body)
