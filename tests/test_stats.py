"""What ``ChannelLayer.stats()`` counts in the core, independent of any broker."""

from __future__ import annotations

import asyncio

from multilayer import ChannelLayer


def test_expired_counts_messages_that_outlived_their_buffer() -> None:
    async def body() -> None:
        layer = ChannelLayer("memory://stats-expired", expiry=0.2)
        first, second = await layer.new_channel(), await layer.new_channel()
        await layer.send(first, {"n": 1})
        await layer.send(second, {"n": 2})
        # One pop of the process inbox takes both; the second waits in this process.
        assert await asyncio.wait_for(layer.receive(first), 5) == {"n": 1}
        assert (await layer.stats()).buffered == {second: 1}
        await asyncio.sleep(0.3)
        receive = asyncio.ensure_future(layer.receive(second))
        await asyncio.sleep(0.2)
        assert not receive.done()
        receive.cancel()
        stats = await layer.stats()
        assert (stats.received, stats.expired, stats.buffered) == (1, 1, {})
        await layer.close()

    asyncio.run(asyncio.wait_for(body(), 30))


def test_counts_survive_the_event_loop_that_made_them() -> None:
    layer = ChannelLayer("memory://stats-loops", capacity=1)

    async def fill() -> None:
        await layer.send("stats.full", {"n": 0})
        await layer.group_add("stats-room", "stats.full")
        await layer.group_send("stats-room", {"n": 1})

    async def read() -> tuple[int, int, int]:
        stats = await layer.stats()
        await layer.close()
        return stats.sent, stats.group_sent, stats.dropped_full

    asyncio.run(fill())
    # The first loop's backend, and the copy it refused, are gone with that loop.
    assert asyncio.run(read()) == (1, 1, 1)
