"""`multilayer bench`'s timing of scenario (c): how many round trips it takes."""

from __future__ import annotations

import asyncio
import time

import pytest

from multilayer import bench
from multilayer.bench import timed_rounds


def echoing() -> tuple[asyncio.Queue[int], asyncio.Queue[int]]:
    return asyncio.Queue(), asyncio.Queue()


def test_ping_pong_goes_on_for_its_time_when_its_rounds_are_done_sooner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bench, "PINGPONG_SECONDS", 0.2)

    async def run() -> tuple[list[float], float, list[int]]:
        pings, pongs = echoing()
        answered: list[int] = []

        async def echo() -> None:
            number = await pings.get()
            answered.append(number)
            await pongs.put(number)

        async def round_trip(i: int) -> None:
            await pings.put(i)
            assert await pongs.get() == i

        began = time.perf_counter()
        rounds = await asyncio.wait_for(timed_rounds(5, echo, round_trip), 10)
        return rounds, time.perf_counter() - began, answered

    rounds, took, answered = asyncio.run(run())
    assert took >= 0.2
    assert len(rounds) > 5
    # Every round trip was answered once, in order, and timed.
    assert answered == list(range(len(rounds)))


def test_ping_pong_takes_its_rounds_when_they_outlast_its_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bench, "PINGPONG_SECONDS", 0.01)

    async def run() -> list[float]:
        pings, pongs = echoing()

        async def echo() -> None:
            await pongs.put(await pings.get())

        async def round_trip(i: int) -> None:
            await pings.put(i)
            await pongs.get()
            await asyncio.sleep(0.02)

        return await asyncio.wait_for(timed_rounds(3, echo, round_trip), 10)

    rounds = asyncio.run(run())
    assert len(rounds) == 3
    assert all(seconds >= 0.02 for seconds in rounds)


def test_ping_pong_reports_a_failed_echo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "PINGPONG_SECONDS", 0.01)

    async def echo() -> None:
        raise ValueError("the echo broke")

    async def round_trip(i: int) -> None:
        await asyncio.sleep(0.001)

    with pytest.raises(RuntimeError, match="echo side") as raised:
        asyncio.run(asyncio.wait_for(timed_rounds(3, echo, round_trip), 10))
    assert isinstance(raised.value.__cause__, ValueError)
