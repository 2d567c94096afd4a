"""One layer used from event loops that end without close(), as ``async_to_sync`` uses it
(each call runs in a new loop): what the backend of an ended loop shares beyond it is let
go of once the next loop's backend is open, never before, and never twice."""

from __future__ import annotations

import asyncio
from typing import Any

from asgiref.sync import async_to_sync

from multilayer import ChannelLayer
from multilayer.backends.memory import MemoryBackend

Events = list[tuple[str, int]]


def recording_layer(
    url: str, events: Events, *, failing: frozenset[int] = frozenset()
) -> ChannelLayer:
    """A memory layer whose backends (numbered from 1) record ``(what, serial)`` for each
    open, close and abandon; the opens of the backends numbered in ``failing`` fail."""
    made: list[Backend] = []

    class Backend(MemoryBackend):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            made.append(self)
            self.serial = len(made)

        async def open(self) -> None:
            if self.serial in failing:
                events.append(("open failed", self.serial))
                raise OSError("no broker")
            await super().open()
            events.append(("open", self.serial))

        async def close(self) -> None:
            events.append(("close", self.serial))
            await super().close()

        def abandon(self) -> None:
            events.append(("abandon", self.serial))

    layer = ChannelLayer(url)
    layer.backend_class = Backend
    return layer


def test_the_backend_of_an_ended_loop_is_abandoned_once_the_next_is_open() -> None:
    events: Events = []
    layer = recording_layer("memory://loops-abandon", events)
    for n in range(3):
        async_to_sync(layer.send)("loops.a", {"n": n})
    async_to_sync(layer.close)()
    assert events == [
        ("open", 1),
        ("open", 2),
        ("abandon", 1),
        ("open", 3),
        ("abandon", 2),
        # close() in a fourth loop, which made no backend: the third loop's is abandoned.
        ("abandon", 3),
    ]


def test_a_closed_loop_state_is_closed_not_abandoned() -> None:
    events: Events = []
    layer = recording_layer("memory://loops-closed", events)

    async def send_and_close(n: int) -> None:
        await layer.send("loops.c", {"n": n})
        await layer.close()

    asyncio.run(send_and_close(1))
    asyncio.run(send_and_close(2))
    assert events == [("open", 1), ("close", 1), ("open", 2), ("close", 2)]


def test_nothing_is_abandoned_until_a_new_backend_opens() -> None:
    """Abandoning first would drop the process-wide state the next backend is about to
    use, and make it again: an ended loop's backend waits through a failed open."""
    events: Events = []
    layer = recording_layer("memory://loops-failing", events, failing=frozenset({2}))

    async def send(n: int) -> str:
        try:
            await layer.send("loops.f", {"n": n})
        except OSError:
            return "failed"
        return "sent"

    async def receive() -> Any:
        return await asyncio.wait_for(layer.receive("loops.f"), 5)

    assert [asyncio.run(send(n)) for n in range(3)] == ["sent", "failed", "sent"]
    assert asyncio.run(receive()) == {"n": 0}
    assert asyncio.run(receive()) == {"n": 2}
    asyncio.run(layer.close())
    assert events == [
        ("open", 1),
        ("open failed", 2),
        # A backend whose open failed let go of everything itself: only 1 is abandoned.
        ("open", 3),
        ("abandon", 1),
        ("open", 4),
        ("abandon", 3),
        ("open", 5),
        ("abandon", 4),
        # close() in a new loop: the last receive's loop ended, so its backend is abandoned.
        ("abandon", 5),
    ]
