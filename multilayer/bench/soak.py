"""``multilayer soak``: sustained traffic with connect/disconnect churn, checking every delivery.

One process holds a pool of process-specific channels (1,000 by default), each with a
receive always waiting, as a server holding that many websocket consumers would. A driver
sends to them, to their groups and to a normal channel at a fixed rate, and churns the
pool: every so often a channel leaves (``group_discard``, its pending messages drained,
its receive cancelled) and a new one joins (``new_channel`` + ``group_add``). Because the
driver is the only writer and knows every membership when it sends, it knows exactly which
channel must get which message, so the run counts messages lost (expected, never
received), duplicated and unexpected, the latency of each delivery, and the resident
memory of the process per interval.

Memory growth is counted from the end of a warm-up as long as the layer's ``expiry``:
whatever the layer (or the driver) keeps for up to that long, such as a message's
deadline or a recent ``group_discard``, has then reached its working size. The resident
memory before any traffic is reported too; in-process ``memory://`` grows about 13 % in
its warm-up and about 2 % after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import resource
import secrets
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..layer import ChannelLayer

__all__ = ["Interval", "SoakReport", "format_soak", "resident_kib", "soak"]

#: seconds a retired channel may take to receive what was sent to it before it left
DRAIN = 10.0
#: seconds a group_send may be in flight: a channel that joins or leaves its group that
#: soon after it may or may not get the message (RabbitMQ applies a process's own
#: memberships when the message reaches the process, not when group_send is called).
RACE = 1.0


def resident_kib() -> int:
    """Resident memory of this process in KiB (the peak where /proc is missing)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


@dataclass
class Interval:
    """One reporting interval of a soak run."""

    end: float
    operations: int
    delivered: int
    p50_ms: float
    p99_ms: float
    joined: int
    rss_kib: int


@dataclass
class SoakReport:
    """Totals of a soak run; ``lost``, ``duplicates`` and ``unexpected`` must be 0."""

    url: str
    duration: float
    channels: int
    expected: int = 0
    delivered: int = 0
    lost: int = 0
    duplicates: int = 0
    unexpected: int = 0
    raced: int = 0
    operations: int = 0
    joined: int = 0
    rss_start_kib: int = 0
    #: Resident memory at the end of the warm-up (the first row at or after ``warmup`` s).
    rss_warm_kib: int = 0
    rss_end_kib: int = 0
    warmup: float = 0.0
    intervals: list[Interval] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicates or self.unexpected)

    @property
    def rss_growth(self) -> float | None:
        """Resident memory growth after the warm-up, as a fraction; None: the run ended
        within its warm-up."""
        if not self.rss_warm_kib:
            return None
        return self.rss_end_kib / self.rss_warm_kib - 1


def _percentile(values: list[float], share: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


class _Member:
    """One process-specific channel of the pool and the messages it must still get."""

    def __init__(self, name: str, group: str) -> None:
        self.name, self.group = name, group
        # Messages sent to this channel and not received yet (received ones are dropped, so
        # this bookkeeping does not grow with the run and the RSS column shows the layer).
        self.outstanding: set[int] = set()
        # Group messages in flight while this channel joined or left: either outcome is fine.
        self.optional: set[int] = set()
        self.delivered = 0
        self.raced = 0
        self.last = 0  # the highest number received: a number again at or below it is a copy
        self.task: asyncio.Task[None] | None = None


class _Soak:
    def __init__(self, layer: ChannelLayer, report: SoakReport, groups: int, seed: int) -> None:
        self.layer, self.report, self.groups = layer, report, groups
        self.random = random.Random(seed)
        self.members: dict[str, _Member] = {}
        self.retired: list[tuple[float, _Member]] = []
        self.latencies: list[float] = []
        self.delivered_now = 0
        self.seq = 0
        # Recent group_sends: (when, seq, group), for the channels that join meanwhile.
        self.group_sends: deque[tuple[float, int, str]] = deque()

    async def _receive(self, member: _Member) -> None:
        while True:
            message = await self.layer.receive(member.name)
            seq = message["seq"]
            self.delivered_now += 1
            self.latencies.append(time.monotonic() - message["at"])
            if seq in member.outstanding:
                member.outstanding.discard(seq)
                member.delivered += 1
            elif seq in member.optional:
                member.optional.discard(seq)
            elif seq <= member.last:
                self.report.duplicates += 1
            else:
                self.report.unexpected += 1
            member.last = max(member.last, seq)

    async def join(self) -> None:
        name = await self.layer.new_channel()
        member = _Member(name, f"soak-{self.random.randrange(self.groups)}")
        await self.layer.group_add(member.group, name)
        since = time.monotonic() - RACE
        while self.group_sends and self.group_sends[0][0] < since:
            self.group_sends.popleft()
        member.optional.update(seq for _, seq, group in self.group_sends if group == member.group)
        member.raced = len(member.optional)
        member.task = asyncio.ensure_future(self._receive(member))
        self.members[name] = member
        self.report.joined += 1

    async def leave(self) -> None:
        member = self.members.pop(self.random.choice(list(self.members)))
        await self.layer.group_discard(member.group, member.name)
        since = time.monotonic() - RACE
        raced = {seq for when, seq, _ in self.group_sends if when >= since} & member.outstanding
        member.outstanding -= raced
        member.optional |= raced
        member.raced += len(raced)
        self.retired.append((time.monotonic(), member))

    def _settled(self, member: _Member) -> bool:
        return not member.outstanding

    async def _close(self, member: _Member) -> None:
        assert member.task is not None
        member.task.cancel()
        await asyncio.gather(member.task, return_exceptions=True)
        # The cancelled task's traceback holds the frame that holds this member: without
        # this, each retired channel is a reference cycle only a full collection frees.
        member.task = None
        self.report.raced += member.raced
        self.report.expected += member.delivered + len(member.outstanding)
        self.report.delivered += member.delivered
        self.report.lost += len(member.outstanding)

    async def reap(self, *, everything: bool = False) -> None:
        """Close retired channels that got all they must, or whose drain time is over."""
        now, keep = time.monotonic(), []
        for since, member in self.retired:
            if everything or self._settled(member) or now - since > DRAIN:
                await self._close(member)
            else:
                keep.append((since, member))
        self.retired = keep

    async def operate(self) -> None:
        """One send (19 times in 20) or group_send (once in 20) to the pool."""
        self.seq += 1
        body = {"seq": self.seq, "at": time.monotonic(), "pad": "x" * 64}
        if self.seq % 20:
            member = self.members[self.random.choice(list(self.members))]
            member.outstanding.add(self.seq)
            await self.layer.send(member.name, body)
        else:
            group = f"soak-{self.random.randrange(self.groups)}"
            for member in self.members.values():
                if member.group == group:
                    member.outstanding.add(self.seq)
            self.group_sends.append((time.monotonic(), self.seq, group))
            await self.layer.group_send(group, body)
        self.report.operations += 1


async def soak(
    url: str,
    duration: float,
    *,
    channels: int = 1000,
    rate: float = 200.0,
    churn: float = 20.0,
    groups: int = 20,
    interval: float = 5.0,
    progress: Callable[[Interval], None] | None = None,
    **options: Any,
) -> SoakReport:
    """Run the soak against ``url`` for ``duration`` seconds and return its report.

    ``rate`` operations (sends and group_sends) per second; ``churn`` channels leave and
    as many join per second; ``options`` go to the layer (a fresh random prefix is used
    unless given).
    """
    options.setdefault("prefix", "soak" + secrets.token_hex(4))
    options.setdefault("capacity", 1000)
    layer = ChannelLayer(url, **options)
    report = SoakReport(layer.url.sanitized(), duration, channels, warmup=layer.expiry)
    run = _Soak(layer, report, groups, seed=secrets.randbits(32))
    try:
        for _ in range(channels):
            await run.join()
        report.rss_start_kib = resident_kib()
        started = time.monotonic()
        next_report, operations_done, churned = started + interval, 0, 0
        mark = (report.operations, started)
        while (now := time.monotonic()) < started + duration:
            due = int((now - started) * rate) - operations_done
            for _ in range(max(0, due)):
                await run.operate()
                operations_done += 1
            while churned < int((now - started) * churn):
                churned += 1
                await run.leave()
                await run.join()
            await run.reap()
            if time.monotonic() >= next_report:
                done = Interval(
                    end=round(time.monotonic() - started, 1),
                    operations=report.operations - mark[0],
                    delivered=run.delivered_now,
                    p50_ms=round(1000 * _percentile(run.latencies, 0.50), 2),
                    p99_ms=round(1000 * _percentile(run.latencies, 0.99), 2),
                    joined=report.joined - channels,
                    rss_kib=resident_kib(),
                )
                report.intervals.append(done)
                if not report.rss_warm_kib and done.end >= report.warmup:
                    report.rss_warm_kib = done.rss_kib
                if progress is not None:
                    progress(done)
                run.latencies, run.delivered_now = [], 0
                mark = (report.operations, time.monotonic())
                next_report += interval
            await asyncio.sleep(0.005)
        # Everyone still in the pool leaves and gets what was sent to it.
        while run.members:
            await run.leave()
        deadline = time.monotonic() + DRAIN
        while run.retired and time.monotonic() < deadline:
            await run.reap()
            await asyncio.sleep(0.05)
        await run.reap(everything=True)
        report.rss_end_kib = resident_kib()
    finally:
        for _, member in run.retired:
            if member.task is not None:
                member.task.cancel()
        for member in run.members.values():
            if member.task is not None:
                member.task.cancel()
        with contextlib.suppress(Exception):
            await layer.flush()
        await layer.close()
    return report


def format_soak(report: SoakReport) -> str:
    """The report as the ``multilayer soak`` command prints it."""
    lines = [
        f"soak {report.url}: {report.duration:g}s, {report.channels} channels, "
        f"{report.joined - report.channels} joined and left during the run",
        f"{'t (s)':>7} {'ops':>7} {'delivered':>9} {'p50 ms':>8} {'p99 ms':>8} {'RSS MiB':>8}",
    ]
    for row in report.intervals:
        lines.append(
            f"{row.end:>7} {row.operations:>7} {row.delivered:>9} {row.p50_ms:>8} "
            f"{row.p99_ms:>8} {row.rss_kib / 1024:>8.1f}"
        )
    lines.append(
        f"expected {report.expected}, delivered {report.delivered}, lost {report.lost}, "
        f"duplicates {report.duplicates}, unexpected {report.unexpected} ({report.raced} group "
        f"messages sent within {RACE:g}s of a join or leave, either way)"
    )
    memory = (
        f"resident memory {report.rss_start_kib / 1024:.1f} MiB before traffic, "
        f"{report.rss_end_kib / 1024:.1f} MiB at end"
    )
    growth = report.rss_growth
    if growth is None:
        memory += f" (no growth figure: the run ended within its {report.warmup:g} s warm-up)"
    else:
        memory += (
            f"; {report.rss_warm_kib / 1024:.1f} MiB after the {report.warmup:g} s warm-up "
            f"(the layer's expiry), so {100 * growth:+.1f} % after it"
        )
    lines.append(memory)
    return "\n".join(lines)
