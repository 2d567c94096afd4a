"""Load on every backend of the run (``--multilayer-url``): a short soak with channel churn,
and 10,000 process-specific channels and groups in one process.

The soak asserts correctness only (nothing lost, nothing twice), never timing; its figures
and the 5-minute command are in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import tracemalloc
from collections.abc import Awaitable
from typing import Any

import pytest

from multilayer import ChannelLayer
from multilayer.bench.soak import Interval, SoakReport, format_soak, soak


def test_short_soak_loses_and_doubles_nothing(layer_url: str) -> None:
    report = asyncio.run(
        asyncio.wait_for(soak(layer_url, 10.0, channels=1000, rate=150, interval=5.0), 120)
    )
    print(format_soak(report))
    assert report.operations > 1000
    assert report.joined - report.channels >= 150, "the pool did not churn"
    assert report.expected > 1000 and report.delivered == report.expected
    assert (report.lost, report.duplicates, report.unexpected) == (0, 0, 0)


def test_soak_memory_growth_counts_from_the_end_of_the_warm_up() -> None:
    def row(end: float, rss_mib: float) -> Interval:
        return Interval(end, 100, 100, 1.0, 2.0, 0, int(rss_mib * 1024))

    report = SoakReport("memory://", 300, 10, warmup=60.0, rss_start_kib=30 * 1024)
    report.intervals = [row(30, 33.0), row(60, 34.0), row(300, 35.0)]
    report.rss_warm_kib, report.rss_end_kib = 34 * 1024, 35 * 1024
    assert report.rss_growth == pytest.approx(1 / 34)
    printed = format_soak(report)
    assert "30.0 MiB before traffic, 35.0 MiB at end; 34.0 MiB after the 60 s warm-up" in printed
    assert "+2.9 % after it" in printed
    # A run no longer than its warm-up gives no growth figure rather than a wrong one.
    short = SoakReport("memory://", 10, 10, warmup=60.0, rss_start_kib=1, rss_end_kib=2)
    assert short.rss_growth is None
    assert "no growth figure" in format_soak(short)


SCALE = 10_000


async def in_batches(calls: list[Awaitable[Any]], size: int = 200) -> list[Any]:
    """Await ``calls`` at most ``size`` at a time, as a busy server's consumers would."""
    results: list[Any] = []
    for start in range(0, len(calls), size):
        results.extend(await asyncio.gather(*calls[start : start + size]))
    return results


@pytest.mark.timeout(300)
def test_ten_thousand_channels_and_groups_in_one_process(layer_url: str) -> None:
    """Every channel gets its messages, rounds after round, whatever the number of
    channels waiting: no receive is starved by the others."""

    async def body() -> None:
        # A process's channels share one inbox, so its capacity must hold a whole round.
        layer = ChannelLayer(layer_url, prefix="scale" + secrets.token_hex(4), capacity=2 * SCALE)
        received: dict[str, list[int]] = {}
        tasks: list[asyncio.Task[None]] = []

        async def receive_forever(channel: str) -> None:
            while True:
                received[channel].append((await layer.receive(channel))["round"])

        try:
            # Python heap allocations (tracemalloc) are exact and not blurred by memory
            # an earlier test freed; the broker clients' C buffers are not in them.
            tracemalloc.start()
            started = time.monotonic()
            channels = await in_batches([layer.new_channel() for _ in range(SCALE)])
            await in_batches([layer.group_add(f"scale-{n}", c) for n, c in enumerate(channels)])
            made = time.monotonic() - started
            for name in channels:
                received[name] = []
                tasks.append(asyncio.ensure_future(receive_forever(name)))
            await asyncio.sleep(0.5)
            per_channel = tracemalloc.get_traced_memory()[0] / SCALE
            tracemalloc.stop()
            rounds = []
            for round_ in range(3):
                started = time.monotonic()
                if round_ == 1:
                    sends = [layer.group_send(f"scale-{n}", {"round": 1}) for n in range(SCALE)]
                else:
                    sends = [layer.send(name, {"round": round_}) for name in channels]
                await in_batches(sends)
                deadline = started + 60
                while any(len(got) <= round_ for got in received.values()):
                    starved = sum(len(got) <= round_ for got in received.values())
                    assert time.monotonic() < deadline, f"round {round_}: {starved} starved"
                    await asyncio.sleep(0.05)
                rounds.append(time.monotonic() - started)
            wrong = {name: got for name, got in received.items() if got != [0, 1, 2]}
            assert not wrong, f"{len(wrong)} channels got other rounds: {list(wrong.items())[:5]}"
            print(
                f"{layer.url.scheme}: {SCALE} channels in {SCALE} groups made in {made:.1f}s; "
                f"{per_channel:.0f} bytes of Python heap per channel (with its waiting receive "
                f"and membership); rounds of {SCALE} messages delivered to all in "
                + ", ".join(f"{r:.2f}s" for r in rounds)
            )
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await layer.flush()
            await layer.close()

    asyncio.run(asyncio.wait_for(body(), 280))
