"""Broadcasts: a group's members in one process share one copy of each group message.

A room with more members in one process than ``capacity`` must still reach every member:
the process's inbox counts one copy per ``group_send``, and the process hands it to each.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from ._util import assert_nothing, recv
from .plugin import Harness

#: Small, so that three times as many members as capacity stay quick on every broker.
CAPACITY = 10


def test_a_group_of_three_times_capacity_in_one_process_gets_every_message(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        owner, sender = harness.layer(capacity=CAPACITY), harness.layer(capacity=CAPACITY)
        members = [await owner.new_channel() for _ in range(3 * CAPACITY)]
        for member in members:
            await owner.group_add("conf-crowd", member)
        for n in range(3):
            await sender.group_send("conf-crowd", {"n": n})
        for member in members:
            assert [(await recv(owner, member))["n"] for _ in range(3)] == [0, 1, 2]
        for member in members[:3]:
            await assert_nothing(owner, member, 0.1)
        stats = await owner.stats()
        assert stats.dropped_full == 0

    with caplog.at_level(logging.WARNING, logger="multilayer"):
        harness.run(body)
    assert not [r for r in caplog.records if "full" in r.getMessage()]


def test_members_spread_over_two_processes_each_get_one_copy(harness: Harness) -> None:
    async def body() -> None:
        # Two layer objects are two processes to the layer: each has its own inbox.
        first, second = harness.layer(capacity=CAPACITY), harness.layer(capacity=CAPACITY)
        sender = harness.layer(capacity=CAPACITY)
        here = [await first.new_channel() for _ in range(2 * CAPACITY)]
        there = [await second.new_channel() for _ in range(2 * CAPACITY)]
        for member in here + there:
            await (first if member in here else second).group_add("conf-spread", member)
        await sender.group_add("conf-spread", "conf.spread-worker")
        for n in range(2):
            await sender.group_send("conf-spread", {"n": n})
        for layer, channels in ((first, here), (second, there)):
            for member in channels:
                assert [(await recv(layer, member))["n"] for _ in range(2)] == [0, 1]
            await assert_nothing(layer, channels[0], 0.1)
        assert [(await recv(sender, "conf.spread-worker"))["n"] for _ in range(2)] == [0, 1]

    harness.run(body)


def test_a_member_discarded_while_copies_are_in_flight_gets_none_of_them(
    harness: Harness,
) -> None:
    async def body() -> None:
        owner, sender = harness.layer(), harness.layer()
        staying, leaving = await owner.new_channel(), await owner.new_channel()
        await owner.group_add("conf-leave", staying)
        await owner.group_add("conf-leave", leaving)
        for n in range(3):
            await sender.group_send("conf-leave", {"n": n})
        # The copies wait in the owner's inbox (or its buffers) when the member leaves.
        await owner.group_discard("conf-leave", leaving)
        assert [(await recv(owner, staying))["n"] for _ in range(3)] == [0, 1, 2]
        await assert_nothing(owner, leaving, 0.3)
        # Its own messages still arrive, and a re-join gets what is sent afterwards.
        await sender.send(leaving, {"direct": True})
        assert await recv(owner, leaving) == {"direct": True}
        await owner.group_add("conf-leave", leaving)
        await sender.group_send("conf-leave", {"n": 3})
        assert await recv(owner, leaving) == {"n": 3}
        assert await recv(owner, staying) == {"n": 3}

    harness.run(body)


def test_group_copies_keep_their_order_with_direct_sends(harness: Harness) -> None:
    async def body() -> None:
        owner, sender = harness.layer(), harness.layer()
        first, second = await owner.new_channel(), await owner.new_channel()
        await owner.group_add("conf-order", first)
        await owner.group_add("conf-order", second)
        await sender.send(first, {"n": 0})
        await sender.group_send("conf-order", {"n": 1})
        await sender.send(first, {"n": 2})
        await sender.send(second, {"n": 2})
        await sender.group_send("conf-order", {"n": 3})
        for member in (first, second):
            got = [(await recv(owner, member))["n"] for _ in range(4 if member == first else 3)]
            assert got == ([0, 1, 2, 3] if member == first else [1, 2, 3])

    harness.run(body)


def test_a_member_that_never_receives_holds_at_most_its_capacity(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        owner, sender = harness.layer(capacity=CAPACITY), harness.layer(capacity=CAPACITY)
        idle, busy = await owner.new_channel(), await owner.new_channel()
        await owner.group_add("conf-idle", idle)
        await owner.group_add("conf-idle", busy)
        sends = 3 * CAPACITY
        for n in range(sends):
            await sender.group_send("conf-idle", {"n": n})
            # Receiving keeps the inbox below capacity, and fetches the idle one's copies.
            assert (await recv(owner, busy))["n"] == n
        stats = await owner.stats()
        assert stats.buffered.get(idle, 0) <= CAPACITY
        assert stats.dropped_full == sends - stats.buffered.get(idle, 0)
        assert [(await recv(owner, idle))["n"] for _ in range(stats.buffered[idle])] == list(
            range(stats.buffered[idle])
        )

    with caplog.at_level(logging.WARNING, logger="multilayer"):
        harness.run(body)
    lines = [r.getMessage() for r in caplog.records if "backlog" in r.getMessage()]
    # One line per group_send that skipped someone, never one per member.
    assert 0 < len(lines) <= 2 * CAPACITY
    assert all("conf-idle" in line and "1 of 2" in line for line in lines)


@pytest.mark.parametrize("members", [1, 3])
def test_a_full_inbox_skips_its_members_without_raising(harness: Harness, members: int) -> None:
    async def body() -> None:
        owner, sender = harness.layer(capacity=2), harness.layer(capacity=2)
        channels = [await owner.new_channel() for _ in range(members)]
        for channel in channels:
            await owner.group_add("conf-fullbox", channel)
        for n in range(4):
            await sender.group_send("conf-fullbox", {"n": n})
        await asyncio.sleep(0.2)
        for channel in channels:
            assert [(await recv(owner, channel))["n"] for _ in range(2)] == [0, 1]
            await assert_nothing(owner, channel, 0.2)

    harness.run(body)
