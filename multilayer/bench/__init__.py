"""``multilayer bench``: our layer and its peers on the same broker, interleaved in one run.

Scenarios, each with 100-byte msgpack messages:

* (a) send+receive throughput on a normal channel, sender and receiver in two instances;
* (b) the same on a process-specific channel between two instances;
* (c) ping-pong round-trip latency between two instances (p50 and p99), for at least
  :data:`PINGPONG_SECONDS` and ``n / 10`` round trips;
* (d) group_send to 1, 10 and 100 members: group_send calls/s and delivered messages/s;
* (r) a chat room end to end: daphne processes serving a Channels consumer, WebSocket
  clients in one room; fan-out latency, burst deliveries/s and deliveries lost
  (:mod:`multilayer.bench.room`). Contenders that have a ``channels_layer`` (the
  ``CHANNEL_LAYERS`` entry those processes use) run it.

A *contender* is anything with the four scenario coroutines; layer-API peers (Channels'
InMemoryChannelLayer, channels_redis, ...) are wrapped by :class:`LayerContender`, raw
client-library ceilings implement the scenarios that apply and raise
:class:`NotApplicable` for the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .room import RoomOptions

__all__ = [
    "CONTENDERS",
    "PINGPONG_SECONDS",
    "Contender",
    "LayerContender",
    "NotApplicable",
    "Result",
    "load_contender",
    "payload",
    "retry_while_full",
    "run_bench",
    "timed_rounds",
]


class NotApplicable(Exception):
    """A contender cannot run a scenario; the message says why."""


class Contender(Protocol):
    """What ``multilayer bench`` measures."""

    name: str

    async def throughput_normal(self, n: int) -> float: ...

    async def throughput_specific(self, n: int) -> float: ...

    async def pingpong(self, n: int) -> list[float]: ...

    async def group_send(self, members: int, n: int) -> tuple[float, float]: ...

    async def close(self) -> None: ...


def payload(i: int) -> dict[str, Any]:
    """A message whose msgpack form is 100 bytes."""
    return {"type": "bench.message", "i": i, "text": "x" * 66}


#: Peers and ceilings by name: "module:factory", factory(url, capacity) -> Contender.
CONTENDERS: dict[str, str] = {
    "inmemory": "multilayer.bench.peers:inmemory",
    "channels_redis": "multilayer.bench.peer_redis:channels_redis",
    "channels_redis_pubsub": "multilayer.bench.peer_redis:channels_redis_pubsub",
    "raw_redis": "multilayer.bench.peer_redis:raw_redis",
    "channels_rabbitmq": "multilayer.bench.peer_rabbitmq:channels_rabbitmq",
    "raw_pika": "multilayer.bench.peer_rabbitmq:raw_pika",
    "channels_kafka": "multilayer.bench.peer_kafka:channels_kafka",
    "raw_kafka": "multilayer.bench.peer_kafka:raw_kafka",
    "channels_zmq": "multilayer.bench.peer_zmq:channels_zmq",
    "raw_zmq": "multilayer.bench.peer_zmq:raw_zmq",
    "multilayer_metrics": "multilayer.bench.metered:multilayer_metrics",
}


def load_contender(name: str, url: str, capacity: int) -> Contender:
    """Build the contender registered as ``name`` for the broker at ``url``."""
    try:
        target = CONTENDERS[name]
    except KeyError:
        raise NotApplicable(
            f"unknown peer {name!r}; known: {', '.join(sorted(CONTENDERS))}"
        ) from None
    module_name, _, factory_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise NotApplicable(f"{name} is not installed: {error}") from error
    factory: Callable[[str, int], Contender] = getattr(module, factory_name)
    return factory(url, capacity)


async def retry_while_full(operation: Callable[[], Awaitable[None]]) -> None:
    """Run ``operation`` until it stops raising ChannelFull: a benchmark waits, never drops."""
    from channels.exceptions import ChannelFull

    while True:
        try:
            await operation()
            return
        except ChannelFull:
            await asyncio.sleep(0.001)


#: Shortest time scenario (c) ping-pongs. Its p50 is then the steady state, not that of
#: the first rounds after connecting, while the kernel still settles which CPUs the
#: process and a local broker run on: on a 2-CPU machine a peer's first 200 round trips
#: ran 1.8 times as fast as the rest, and ours ran at one speed throughout.
PINGPONG_SECONDS = 1.0


async def timed_rounds(
    n: int, echo: Callable[[], Awaitable[None]], round_trip: Callable[[int], Awaitable[object]]
) -> list[float]:
    """Seconds each call of ``round_trip(i)`` took, one after another, while ``echo()``,
    called again and again, answers them: at least ``n`` calls, and for at least
    :data:`PINGPONG_SECONDS`."""

    async def answer() -> None:
        while True:
            await echo()

    echoer = asyncio.ensure_future(answer())
    rounds: list[float] = []
    began = time.perf_counter()
    try:
        while len(rounds) < n or time.perf_counter() - began < PINGPONG_SECONDS:
            started = time.perf_counter()
            await round_trip(len(rounds))
            rounds.append(time.perf_counter() - started)
    finally:
        echoer.cancel()
        await asyncio.wait([echoer])
    if not echoer.cancelled() and echoer.exception() is not None:
        raise RuntimeError("the echo side of the ping-pong failed") from echoer.exception()
    return rounds


class LayerContender:
    """The four scenarios over any object with the Channels layer API.

    Peers that subscribe lazily, connect lazily or lack a feature override the small
    ``_`` hooks below rather than the scenarios, so every contender is timed alike.
    """

    def __init__(
        self,
        name: str,
        factory: Callable[[], Any],
        channels_layer: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.factory = factory
        #: The ``CHANNEL_LAYERS["default"]`` entry (``BACKEND``, JSON-serializable
        #: ``CONFIG``) that daphne processes use for scenario (r); None: not applicable.
        self.channels_layer = channels_layer
        self._layers: list[Any] = []

    def _layer(self) -> Any:
        layer = self.factory()
        self._layers.append(layer)
        return layer

    async def _warm(self, layer: Any) -> None:
        """Make ``layer`` connected and ready before the clock starts."""
        await layer.new_channel()

    async def _inbox(self, layer: Any) -> str:
        """A process-specific channel of ``layer``, ready to receive."""
        channel: str = await layer.new_channel()
        return channel

    async def _queue(self, sender: Any, receiver: Any) -> str:
        """A normal channel that ``receiver`` is ready to receive from."""
        return f"bench.a{secrets.token_hex(4)}"

    async def _joined(self, receiver: Any) -> None:
        """Called once ``receiver``'s channels joined a group, before the clock starts."""

    def _echo(self, message: dict[str, Any]) -> dict[str, Any]:
        """What the ping-pong echo sends back for ``message``."""
        return message

    async def _group_send(self, layer: Any, group: str, message: dict[str, Any]) -> None:
        await layer.group_send(group, message)

    async def _send(self, layer: Any, channel: str, message: dict[str, Any]) -> None:
        await retry_while_full(lambda: layer.send(channel, message))

    async def _stream(self, sender: Any, receiver: Any, channel: str, n: int) -> float:
        async def produce() -> None:
            for i in range(n):
                await self._send(sender, channel, payload(i))

        async def consume() -> None:
            for _ in range(n):
                await receiver.receive(channel)

        started = time.perf_counter()
        await asyncio.gather(produce(), consume())
        return n / (time.perf_counter() - started)

    async def throughput_normal(self, n: int) -> float:
        sender, receiver = self._layer(), self._layer()
        await self._warm(sender)
        await self._warm(receiver)
        return await self._stream(sender, receiver, await self._queue(sender, receiver), n)

    async def throughput_specific(self, n: int) -> float:
        sender, receiver = self._layer(), self._layer()
        await self._warm(sender)
        await self._warm(receiver)
        return await self._stream(sender, receiver, await self._inbox(receiver), n)

    async def pingpong(self, n: int) -> list[float]:
        a, b = self._layer(), self._layer()
        ping, pong = await self._inbox(b), await self._inbox(a)

        async def echo() -> None:
            await b.send(pong, self._echo(await b.receive(ping)))

        async def round_trip(i: int) -> None:
            await a.send(ping, payload(i))
            await a.receive(pong)

        return await timed_rounds(n, echo, round_trip)

    async def group_send(self, members: int, n: int) -> tuple[float, float]:
        sender, receiver = self._layer(), self._layer()
        await self._warm(sender)
        group = f"bench-g{secrets.token_hex(4)}"
        channels = [await receiver.new_channel() for _ in range(members)]
        for channel in channels:
            await receiver.group_add(group, channel)
        await self._joined(receiver)

        async def consume(channel: str) -> None:
            for _ in range(n):
                await receiver.receive(channel)

        consumers = asyncio.gather(*(consume(channel) for channel in channels))
        started = time.perf_counter()
        for i in range(n):
            await self._group_send(sender, group, payload(i))
        sent = time.perf_counter() - started
        await consumers
        delivered = time.perf_counter() - started
        return n / sent, n * members / delivered

    async def close(self) -> None:
        for layer in self._layers:
            if hasattr(layer, "flush"):
                with contextlib.suppress(NotImplementedError):
                    await layer.flush()
            closer = getattr(layer, "close", None) or getattr(layer, "close_pools", None)
            if closer is not None:
                await closer()
        self._layers.clear()


@dataclass
class Result:
    """Medians of one contender on one scenario; ``skipped`` holds why it did not run."""

    values: dict[str, list[float]] = field(default_factory=dict)
    skipped: str | None = None

    def median(self, metric: str) -> float | None:
        samples = self.values.get(metric)
        return statistics.median(samples) if samples else None


# metric name -> (label, higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "a": ("(a) normal channel msgs/s", True),
    "b": ("(b) process-specific msgs/s", True),
    "c50": ("(c) ping-pong p50 ms", False),
    "c99": ("(c) ping-pong p99 ms", False),
    **{
        f"d{m}{kind}": (f"(d) group of {m}: {label}", True)
        for m in (1, 10, 100)
        for kind, label in (("calls", "group_send/s"), ("msgs", "delivered msgs/s"))
    },
    "r50": ("(r) room fan-out p50 ms", False),
    "r99": ("(r) room fan-out p99 ms", False),
    "rfull": ("(r) room rounds reaching all, %", True),
    "rburst": ("(r) room burst deliveries/s", True),
    "rlost": ("(r) room deliveries lost", False),
    "rdup": ("(r) room deliveries duplicated", False),
}


async def _measure(
    contender: Contender, scenario: str, n: int, room: RoomOptions | None
) -> dict[str, float]:
    if scenario == "r":
        layer = getattr(contender, "channels_layer", None)
        if layer is None:
            raise NotApplicable("not a Channels layer that separate daphne processes can share")
        from .room import run_room

        return (await run_room(layer, room)).metrics()
    if scenario == "a":
        return {"a": await contender.throughput_normal(n)}
    if scenario == "b":
        return {"b": await contender.throughput_specific(n)}
    if scenario == "c":
        rounds = sorted(await contender.pingpong(max(50, n // 10)))
        return {
            "c50": 1000 * statistics.median(rounds),
            "c99": 1000 * rounds[min(len(rounds) - 1, int(len(rounds) * 0.99))],
        }
    out: dict[str, float] = {}
    for members in (1, 10, 100):
        calls, msgs = await contender.group_send(members, max(10, n // members))
        out[f"d{members}calls"], out[f"d{members}msgs"] = calls, msgs
    return out


async def run_bench(
    contenders: Sequence[Contender],
    *,
    n: int,
    repeat: int,
    scenarios: str = "abcd",
    progress: Callable[[str], None] = lambda _: None,
    timeout: float = 300.0,
    room: RoomOptions | None = None,
) -> dict[str, dict[str, Result]]:
    """Run every scenario ``repeat`` times, contenders interleaved; results by scenario.

    ``room`` sizes scenario (r) (default: :class:`~multilayer.bench.room.RoomOptions`).
    """
    results: dict[str, dict[str, Result]] = {}
    for scenario in scenarios:
        per = results[scenario] = {c.name: Result() for c in contenders}
        for rep in range(repeat):
            for contender in contenders:
                result = per[contender.name]
                if result.skipped:
                    continue
                progress(f"({scenario}) {contender.name} run {rep + 1}/{repeat}")
                try:
                    measured = await asyncio.wait_for(
                        _measure(contender, scenario, n, room), timeout
                    )
                except NotApplicable as why:
                    result.skipped = str(why)
                    continue
                except Exception as error:  # a peer's failure is a result, not a crash
                    result.skipped = f"failed: {type(error).__name__}: {error}"
                    continue
                finally:
                    await contender.close()
                for metric, value in measured.items():
                    result.values.setdefault(metric, []).append(value)
                # The table shows medians; each run's figures stay visible here.
                progress("    " + ", ".join(f"{m} {_fmt(v)}" for m, v in measured.items()))
    return results


def format_report(results: dict[str, dict[str, Result]], names: Sequence[str]) -> str:
    """A table: one row per metric, one column per contender, then ours/peer ratios."""
    ours, peers = names[0], names[1:]
    header = ["metric", *names, *(f"{ours}/{peer}" for peer in peers)]
    rows = [header]
    notes = []
    for scenario, per in results.items():
        for name, result in per.items():
            if result.skipped:
                notes.append(f"({scenario}) {name}: {result.skipped}")
        metrics = [m for m in METRICS if m.startswith(scenario)]
        for metric in metrics:
            label, _higher = METRICS[metric]
            values = [per[name].median(metric) for name in names]
            cells = [label, *(_fmt(v) for v in values)]
            for peer_value in values[1:]:
                ratio = values[0] / peer_value if values[0] and peer_value else None
                cells.append(f"{ratio:.2f}x" if ratio is not None else "-")
            rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if notes:
        lines += ["", *notes]
    lines.append("")
    lines.append("Ratios are ours/peer: above 1 is better for throughput, below 1 for latency.")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"
