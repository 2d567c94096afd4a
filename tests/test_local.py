"""Local buffers: cancellation at each step loses and doubles nothing (deterministic cases)."""

from __future__ import annotations

import asyncio
from typing import Any

from multilayer.backend import Capabilities, LayerSettings
from multilayer.capacity import CapacityPolicy
from multilayer.local import INBOX_BATCH, HeldMessages, LocalQueue
from multilayer.serialization import pack

SETTINGS = LayerSettings(
    prefix="t",
    expiry=60.0,
    group_expiry=60.0,
    capacity=CapacityPolicy(INBOX_BATCH),
    max_message_size=1 << 20,
)


class ScriptedBackend:
    """A backend whose pop() hands out what the test puts in, when the test says."""

    capabilities = Capabilities()
    pops_on_arm = False

    def __init__(self) -> None:
        self.incoming: asyncio.Queue[list[tuple[str, bytes]]] = asyncio.Queue()
        self.pops = 0
        self.limits: list[int] = []
        self.settings = SETTINGS
        self.skipped_full = 0

    async def pop(self, queue: str, limit: int) -> list[tuple[str, bytes]]:
        self.pops += 1
        self.limits.append(limit)
        return await self.incoming.get()

    def pop_nowait(self, queue: str, limit: int) -> list[tuple[str, bytes]]:
        self.limits.append(limit)
        return []


async def _receive(queue: LocalQueue, channel: str) -> bytes:
    while True:
        payload = queue.take(channel)
        if payload is not None:
            return payload
        await queue.wait(channel)


def run(body: Any) -> None:
    asyncio.run(asyncio.wait_for(body(), 10))


def test_woken_then_cancelled_passes_the_message_on() -> None:
    async def body() -> None:
        backend = ScriptedBackend()
        queue = LocalQueue(backend, "q")  # type: ignore[arg-type]
        first = asyncio.ensure_future(_receive(queue, "q"))
        second = asyncio.ensure_future(_receive(queue, "q"))
        await asyncio.sleep(0)
        backend.incoming.put_nowait([("q", b"one")])
        # Let the fetch task buffer it and wake `first`, then cancel `first` before it runs.
        await asyncio.sleep(0)
        assert queue.buffers["q"] and not first.done()
        first.cancel()
        assert await second == b"one"
        assert first.cancelled()

    run(body)


def test_cancelled_waiter_leaves_the_fetched_message_buffered() -> None:
    async def body() -> None:
        backend = ScriptedBackend()
        queue = LocalQueue(backend, "q")  # type: ignore[arg-type]
        waiter = asyncio.ensure_future(_receive(queue, "q"))
        await asyncio.sleep(0.01)
        waiter.cancel()
        await asyncio.sleep(0)
        # The pop in flight is not cancelled; what it returns is kept for the next receive.
        backend.incoming.put_nowait([("q", b"kept")])
        await asyncio.sleep(0.01)
        assert await _receive(queue, "q") == b"kept"
        assert backend.pops == 1

    run(body)


def test_inbox_messages_for_other_channels_wait_in_their_buffers() -> None:
    async def body() -> None:
        backend = ScriptedBackend()
        queue = LocalQueue(backend, "p!")  # type: ignore[arg-type]
        waiter = asyncio.ensure_future(_receive(queue, "p!b"))
        await asyncio.sleep(0)
        backend.incoming.put_nowait([("p!a", b"a1"), ("p!b", b"b1"), ("p!a", b"a2")])
        assert await waiter == b"b1"
        assert [queue.take("p!a"), queue.take("p!a"), queue.take("p!a")] == [b"a1", b"a2", None]

    run(body)


def test_fetch_failure_reaches_every_waiter() -> None:
    class Broken(ScriptedBackend):
        async def pop(self, queue: str, limit: int) -> list[tuple[str, bytes]]:
            raise ConnectionError("broker gone")

    async def body() -> None:
        queue = LocalQueue(Broken(), "q")  # type: ignore[arg-type]
        results = await asyncio.gather(
            _receive(queue, "q"), _receive(queue, "q"), return_exceptions=True
        )
        assert all(isinstance(r, ConnectionError) for r in results)

    run(body)


def test_shared_normal_channels_take_only_what_receivers_wait_for() -> None:
    # Another process may be idle on a shared normal channel: never take more than one
    # message per waiting receive. An inbox, or a channel no other process can reach,
    # may be taken in batches.
    class SingleProcess(ScriptedBackend):
        capabilities = Capabilities(multiprocess=False)

    for backend, queue, batch in [
        (ScriptedBackend(), "q", 1),
        (ScriptedBackend(), "p!", INBOX_BATCH),
        (SingleProcess(), "q", INBOX_BATCH),
    ]:

        async def body(backend: ScriptedBackend = backend, queue: str = queue) -> None:
            local = LocalQueue(backend, queue)  # type: ignore[arg-type]
            channel = queue + "c" if queue.endswith("!") else queue
            assert local.take(channel) is None
            waiting = asyncio.ensure_future(local.wait(channel))
            await asyncio.sleep(0.01)
            backend.incoming.put_nowait([(channel, b"x")])
            await asyncio.wait_for(waiting, 5)

        run(body)
        assert set(backend.limits) == {batch}, (queue, backend.limits)


def test_held_messages_are_taken_oldest_first_and_released_when_stale() -> None:
    live, dead = pack({"n": 1}, 1e12, max_size=100), pack({"n": 0}, 1.0, max_size=100)
    held = HeldMessages()
    assert not held
    held.hold("q", [("q", dead), ("q", live), ("q", live)])
    held.hold("other", [("other", live)])
    assert held.take("q", 1) == [("q", live)]  # the expired one is skipped, not returned
    assert held.release(60) == []  # nothing held that long yet
    held.discard(keep=lambda queue: queue == "q")
    assert held.release(0) == [("q", [("q", live)])]
    assert not held and held.take("q", 5) == []


class ArmedBackend(ScriptedBackend):
    """A backend that pops on arm: pop(queue, 0) hands out what the test puts in only
    after arm() asked for it, and records each arm with the pops pending at that moment."""

    pops_on_arm = True

    def __init__(self) -> None:
        super().__init__()
        self.arms: list[tuple[int, int]] = []
        self.armed = asyncio.Event()

    def arm(self, queue: str, limit: int) -> None:
        self.arms.append((limit, self.pops))
        self.armed.set()

    def pop_nowait(self, queue: str, limit: int) -> list[tuple[str, bytes]]:
        return []

    async def pop(self, queue: str, limit: int) -> list[tuple[str, bytes]]:
        self.pops += 1
        self.limits.append(limit)
        await self.armed.wait()
        self.armed.clear()
        return await self.incoming.get()


def test_a_receive_arms_the_pop_from_its_own_step() -> None:
    """A backend that pops on arm is asked for messages by the receive that starts
    waiting, before the event loop turns, and keeps one fetch task across receives."""

    async def body() -> None:
        backend = ArmedBackend()
        queue = LocalQueue(backend, "q")  # type: ignore[arg-type]
        waiter = asyncio.ensure_future(_receive(queue, "q"))
        await asyncio.sleep(0)
        # The receive's step armed it; the fetch task has not run yet.
        assert backend.arms == [(1, 0)]
        fetcher = queue._fetcher
        backend.incoming.put_nowait([("q", b"one")])
        assert await waiter == b"one"
        # Nobody waits: no arm, and the same task waits in pop(queue, 0).
        await asyncio.sleep(0.01)
        assert backend.arms == [(1, 0)] and backend.limits == [0, 0]
        assert queue._fetcher is fetcher and not fetcher.done()
        waiter = asyncio.ensure_future(_receive(queue, "q"))
        await asyncio.sleep(0)
        assert backend.arms == [(1, 0), (1, 2)]
        backend.incoming.put_nowait([("q", b"two")])
        assert await waiter == b"two"
        assert queue._fetcher is fetcher
        await queue.stop(ConnectionError("closed"))
        assert fetcher.cancelled()

    run(body)


def test_an_armed_pop_that_took_nothing_is_armed_again_while_receives_wait() -> None:
    async def body() -> None:
        backend = ArmedBackend()
        queue = LocalQueue(backend, "p!")  # type: ignore[arg-type]
        waiter = asyncio.ensure_future(_receive(queue, "p!a"))
        await asyncio.sleep(0)
        backend.incoming.put_nowait([])  # an idle wait timed out
        await asyncio.sleep(0.01)
        assert [limit for limit, _ in backend.arms] == [INBOX_BATCH, INBOX_BATCH]
        backend.incoming.put_nowait([("p!a", b"late")])
        assert await waiter == b"late"

    run(body)


def test_an_armed_pop_is_armed_once_for_all_the_receives_waiting() -> None:
    """One arm per pop, not one per receive; after a batch, the receives it woke run (and
    wait again) before the next arm."""

    async def body() -> None:
        backend = ArmedBackend()
        queue = LocalQueue(backend, "p!")  # type: ignore[arg-type]
        first = [asyncio.ensure_future(_receive(queue, f"p!{c}")) for c in "ab"]
        await asyncio.sleep(0)
        assert len(backend.arms) == 1
        backend.incoming.put_nowait([("p!a", b"1"), ("p!b", b"2")])
        assert await asyncio.gather(*first) == [b"1", b"2"]
        again = [asyncio.ensure_future(_receive(queue, f"p!{c}")) for c in "ab"]
        await asyncio.sleep(0.01)
        assert len(backend.arms) == 2
        backend.incoming.put_nowait([("p!a", b"3"), ("p!b", b"4")])
        assert await asyncio.gather(*again) == [b"3", b"4"]

    run(body)
