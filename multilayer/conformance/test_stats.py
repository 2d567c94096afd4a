"""Operator statistics: ``ChannelLayer.stats()`` as the broker and this process see them."""

from __future__ import annotations

import asyncio

import pytest
from channels.exceptions import ChannelFull

from ..layer import LayerStats
from ..url import LayerURL
from ._util import recv
from .plugin import Harness


def test_stats_report_depths_groups_and_counters(harness: Harness) -> None:
    async def body() -> None:
        # One capacity for all: layers sharing a prefix must agree on it (RabbitMQ checks).
        sender, receiver, observer = (harness.layer(capacity=3) for _ in range(3))
        for number in range(3):
            await sender.send("conf.stats-a", {"n": number})
        with pytest.raises(ChannelFull):
            await sender.send("conf.stats-a", {"n": 3})
        await sender.send("conf.stats-b", {"n": 0})
        member = await receiver.new_channel()
        await receiver.group_add("conf-stats-room", member)
        await receiver.group_add("conf-stats-room", "conf.stats-b")
        await receiver.group_add("conf-stats-solo", "conf.stats-c")

        stats = await observer.stats()
        assert stats.prefix == harness.prefix
        assert stats.url == LayerURL.parse(harness.url).sanitized()
        if harness.capabilities.queue_depth:
            assert stats.queues is not None
            assert stats.queues.get("conf.stats-a") == 3
            assert stats.queues.get("conf.stats-b") == 1
            assert "conf.stats-c" not in stats.queues
        else:
            assert stats.queues is None
            assert stats.unknown is not None and "queue depths" in stats.unknown
        if harness.capabilities.group_sizes:
            assert stats.groups == {"conf-stats-room": 2, "conf-stats-solo": 1}
        else:
            assert stats.groups is None
            assert stats.unknown is not None and "group sizes" in stats.unknown
        if harness.capabilities.queue_depth and harness.capabilities.group_sizes:
            assert stats.unknown is None

        # Counters are this layer object's own.
        assert _counters(stats) == (0, 0, 0, 0, 0), stats
        assert stats.buffered == {}
        assert await recv(receiver, "conf.stats-a") == {"n": 0}
        sent = await sender.stats()
        assert (sent.sent, sent.dropped_full, sent.received) == (4, 1, 0)
        await sender.group_send("conf-stats-room", {"g": 1})
        assert (await sender.stats()).group_sent == 1
        assert await recv(receiver, member) == {"g": 1}
        received = await receiver.stats()
        assert (received.received, received.sent, received.reconnects) == (2, 0, 0)

    harness.run(body)


def test_stats_count_group_copies_skipped_at_capacity(harness: Harness) -> None:
    async def body() -> None:
        layer = harness.layer(capacity=1)
        full, free = await layer.new_channel("conf-full"), await layer.new_channel("conf-free")
        await layer.send(full, {"n": 0})
        await layer.group_add("conf-stats-full", full)
        await layer.group_add("conf-stats-full", free)
        await layer.group_send("conf-stats-full", {"n": 1})
        assert await recv(layer, free) == {"n": 1}
        # Some brokers tell of a refused copy only after group_send returned.
        for _ in range(100):
            if (await layer.stats()).dropped_full:
                break
            await asyncio.sleep(0.05)
        stats = await layer.stats()
        assert stats.dropped_full == 1, stats
        assert (stats.sent, stats.group_sent) == (1, 1)

    harness.run(body)


def test_stats_see_a_flush(harness: Harness) -> None:
    harness.require("queue_depth", "the broker cannot tell queue depths")

    async def body() -> None:
        layer = harness.layer()
        await layer.send("conf.stats-flushed", {"n": 0})
        assert (await layer.stats()).queues == {"conf.stats-flushed": 1}
        await layer.flush()
        stats = await layer.stats()
        assert stats.queues == {}
        assert stats.groups in ({}, None)

    harness.run(body)


def _counters(stats: LayerStats) -> tuple[int, ...]:
    return (stats.sent, stats.group_sent, stats.received, stats.expired, stats.dropped_full)
