"""Scenario (r) of ``multilayer bench``: a chat room served by real daphne processes.

S daphne processes serve :mod:`multilayer.bench.chatroom` on free loopback ports, all with
one Channels layer configuration; N WebSocket clients (the ``websockets`` package, all in
this process) connect round-robin over them and join one room. Once every client has
received a room message (the join barrier), three figures are taken:

* **fan-out latency**: K rounds; in each, one client (a different one each round, so every
  server originates messages) sends one frame, and the round lasts from that send until
  the last of the N clients received it. p50 and p99 over the rounds that reached every
  client; a round that did not within ``round_timeout`` only adds to the losses.
* **burst**: one client sends B frames back to back; deliveries per second are the copies
  all clients received divided by the time from the first send to the last delivery.
* **lost**: the (K + B) * N copies expected minus the distinct copies received by the end.

Every client shares this process's clock, so a frame carries only its id (``r:3``, ``b:41``;
``w:`` frames are the barrier's and are not counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BACKEND_ENV", "CONFIG_ENV", "RoomError", "RoomOptions", "RoomResult", "run_room"]

APPLICATION = "multilayer.bench.chatroom:application"
#: How the servers learn their layer: the Channels ``BACKEND`` and its ``CONFIG`` as JSON.
#: Defined here rather than in chatroom, which configures Django when imported.
BACKEND_ENV = "MULTILAYER_BENCH_BACKEND"
CONFIG_ENV = "MULTILAYER_BENCH_CONFIG"


class RoomError(Exception):
    """The room could not be set up: a server did not start, or clients did not join."""


@dataclass(frozen=True)
class RoomOptions:
    """Size of the room and the bound of each wait, in seconds."""

    servers: int = 2
    clients: int = 200
    rounds: int = 50
    burst: int = 100
    #: Servers listening, then clients connected, then all of them joined: each phase.
    start_timeout: float = 30.0
    #: One fan-out round.
    round_timeout: float = 2.0
    #: After the burst's last send, the run waits for the missing copies until none has
    #: come for ``quiet`` seconds (they are lost, not slow), and at most ``drain_timeout``.
    quiet: float = 3.0
    drain_timeout: float = 60.0
    #: WebSocket handshakes in flight at once.
    connecting: int = 20


@dataclass
class RoomResult:
    """What one run of the room measured."""

    #: Seconds from send to the last client, for each round that reached every client.
    latencies: list[float]
    rounds: int
    burst_delivered: int
    burst_seconds: float
    expected: int
    #: Distinct copies received (a copy received twice counts once, and as a duplicate).
    received: int
    duplicated: int

    @property
    def lost(self) -> int:
        """Copies expected and never received."""
        return self.expected - self.received

    def metrics(self) -> dict[str, float]:
        """The figures under ``multilayer bench``'s metric names (``bench.METRICS``)."""
        out = {
            "rlost": float(self.lost),
            "rdup": float(self.duplicated),
            # p50 and p99 are over complete rounds only: this says how many there were.
            "rfull": 100.0 * len(self.latencies) / self.rounds if self.rounds else 0.0,
        }
        if self.latencies:
            ordered = sorted(self.latencies)
            out["r50"] = 1000 * statistics.median(ordered)
            out["r99"] = 1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        if self.burst_seconds > 0:
            out["rburst"] = self.burst_delivered / self.burst_seconds
        return out


@dataclass
class _Deliveries:
    """Every frame each client received, and the events the scenario waits on."""

    clients: int
    seen: list[set[str]] = field(init=False)
    counts: dict[str, int] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)
    duplicated: int = 0
    #: Distinct copies of round and burst frames received.
    received: int = 0
    joined: set[int] = field(default_factory=set)
    burst_expected: int = 0
    burst_count: int = 0
    burst_last: float = 0.0
    all_joined: asyncio.Event = field(default_factory=asyncio.Event)
    burst_done: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: dict[str, asyncio.Event] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.seen = [set() for _ in range(self.clients)]

    def got(self, client: int, frame: str) -> None:
        now = time.perf_counter()
        seen = self.seen[client]
        if frame in seen:
            self.duplicated += 1
            return
        if frame.startswith("w:"):
            # One warm-up frame proves a client joined; they are not deliveries.
            self.joined.add(client)
            if len(self.joined) == self.clients:
                self.all_joined.set()
            return
        seen.add(frame)
        self.received += 1
        count = self.counts[frame] = self.counts.get(frame, 0) + 1
        self.last[frame] = now
        if frame.startswith("b:"):
            self.burst_count += 1
            self.burst_last = now
            if self.burst_count == self.burst_expected:
                self.burst_done.set()
        elif count == self.clients and frame in self.waiting:
            self.waiting.pop(frame).set()

    def expect(self, frame: str) -> asyncio.Event:
        """An event set once every client has received ``frame``."""
        event = self.waiting[frame] = asyncio.Event()
        return event


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _Server:
    """One daphne process serving the chat room, its output in a log file."""

    def __init__(self, process: asyncio.subprocess.Process, port: int, log: Path) -> None:
        self.process = process
        self.port = port
        self.log = log

    @classmethod
    async def start(cls, env: Mapping[str, str], log: Path) -> _Server:
        port = _free_port()
        # A local file opens at once; the child keeps its own descriptor of it.
        with open(log, "wb") as out:  # noqa: ASYNC230
            process = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port)),
                APPLICATION,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return cls(process, port, log)

    def failure(self, what: str) -> RoomError:
        tail = self.log.read_text(errors="replace")[-2000:]
        return RoomError(f"daphne on port {self.port} {what}; the end of its log:\n{tail}")

    async def wait_listening(self, deadline: float) -> None:
        while True:
            if self.process.returncode is not None:
                raise self.failure(f"exited with status {self.process.returncode}")
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", self.port), 1.0
                )
            except (OSError, asyncio.TimeoutError):
                if time.monotonic() > deadline:
                    raise self.failure("did not listen in time") from None
                await asyncio.sleep(0.1)
                continue
            writer.close()
            await writer.wait_closed()
            return

    async def stop(self) -> None:
        """Terminate, then kill if it has not exited after 5 seconds."""
        with contextlib.suppress(ProcessLookupError):
            if self.process.returncode is None:
                self.process.terminate()
                try:
                    await asyncio.wait_for(self.process.wait(), 5.0)
                except asyncio.TimeoutError:
                    self.process.kill()
        await asyncio.wait_for(self.process.wait(), 5.0)


async def _read(client: Any, index: int, deliveries: _Deliveries) -> None:
    from websockets.exceptions import ConnectionClosed

    with contextlib.suppress(ConnectionClosed):
        async for frame in client:
            deliveries.got(index, frame if isinstance(frame, str) else frame.decode())


async def _stop_readers(readers: Sequence[asyncio.Future[None]]) -> None:
    for reader in readers:
        reader.cancel()
    await asyncio.gather(*readers, return_exceptions=True)


async def _close_all(clients: Sequence[Any]) -> None:
    # Each close is bounded by the clients' close_timeout; gather so they overlap.
    await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)


async def _join(clients: Sequence[Any], deliveries: _Deliveries, timeout: float) -> None:
    """Send warm-up frames until every client received one, from a different client each
    time: a server joins a client before accepting it, but a layer may still be
    connecting or subscribing when the first frames go out."""
    deadline = time.monotonic() + timeout
    sent = 0
    while not deliveries.all_joined.is_set():
        if time.monotonic() > deadline:
            raise RoomError(
                f"only {len(deliveries.joined)} of {deliveries.clients} clients received a room "
                f"message within {timeout:g}s"
            )
        await clients[sent % len(clients)].send(f"w:{sent}")
        sent += 1
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(deliveries.all_joined.wait(), 0.5)
    # Let the barrier's last copies drain, so they do not fill inboxes in round 1.
    await asyncio.sleep(0.5)


async def _flush(layer: Mapping[str, Any]) -> None:
    """Remove what the run left on the broker, where the layer can flush."""
    module_name, _, class_name = str(layer["BACKEND"]).rpartition(".")
    backend = getattr(importlib.import_module(module_name), class_name)
    if "flush" not in getattr(backend, "extensions", ()):
        return
    instance = backend(**layer.get("CONFIG", {}))
    try:
        await asyncio.wait_for(instance.flush(), 20.0)
    finally:
        closer = getattr(instance, "close", None) or getattr(instance, "close_pools", None)
        if closer is not None:
            await asyncio.wait_for(closer(), 10.0)


async def run_room(layer: Mapping[str, Any], options: RoomOptions | None = None) -> RoomResult:
    """Run the chat room once with the Channels layer ``layer`` (a ``CHANNEL_LAYERS`` entry:
    ``BACKEND`` and a JSON-serializable ``CONFIG``) and return what it measured."""
    from websockets.asyncio.client import connect

    options = options or RoomOptions()
    env = {
        **os.environ,
        BACKEND_ENV: str(layer["BACKEND"]),
        CONFIG_ENV: json.dumps(layer.get("CONFIG", {})),
    }
    # chatroom configures Django itself; a settings module from the caller would win.
    env.pop("DJANGO_SETTINGS_MODULE", None)
    deliveries = _Deliveries(options.clients)
    try:
        async with contextlib.AsyncExitStack() as stack:
            logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-room-")))
            servers: list[_Server] = []
            for i in range(options.servers):
                server = await _Server.start(env, logs / f"daphne{i}.log")
                stack.push_async_callback(server.stop)
                servers.append(server)
            deadline = time.monotonic() + options.start_timeout
            for server in servers:
                await server.wait_listening(deadline)

            clients: list[Any] = []
            stack.push_async_callback(_close_all, clients)
            gate = asyncio.Semaphore(options.connecting)

            async def join(index: int) -> None:
                port = servers[index % len(servers)].port
                async with gate:
                    client = await connect(
                        f"ws://127.0.0.1:{port}/room",
                        open_timeout=options.start_timeout,
                        close_timeout=2.0,
                        # The figures are the layer's: no compression work, no keepalive
                        # pings timing out while the clients' event loop is busy.
                        compression=None,
                        ping_interval=None,
                        proxy=None,
                    )
                clients.append(client)

            await asyncio.gather(*(join(i) for i in range(options.clients)))
            # Fixed from here on: clients[i] is the i-th reader's index.
            readers = [
                asyncio.ensure_future(_read(client, i, deliveries))
                for i, client in enumerate(clients)
            ]
            stack.push_async_callback(_stop_readers, readers)
            await _join(clients, deliveries, options.start_timeout)
            result = await _measure(clients, deliveries, options)
    finally:
        # Leftovers expire on their own; a failing cleanup must not hide the run's
        # own error or result.
        with contextlib.suppress(Exception):
            await _flush(layer)
    return result


async def _drain(deliveries: _Deliveries, options: RoomOptions) -> None:
    """Wait for the burst's copies while they keep coming: a slow layer is slow, not lossy."""
    deadline = time.monotonic() + options.drain_timeout
    while not deliveries.burst_done.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        before = deliveries.received
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(deliveries.burst_done.wait(), min(options.quiet, left))
        if deliveries.received == before:
            return


async def _measure(
    clients: Sequence[Any], deliveries: _Deliveries, options: RoomOptions
) -> RoomResult:
    latencies = []
    for r in range(options.rounds):
        frame = f"r:{r}"
        reached_all = deliveries.expect(frame)
        started = time.perf_counter()
        await clients[r % len(clients)].send(frame)
        try:
            await asyncio.wait_for(reached_all.wait(), options.round_timeout)
        except asyncio.TimeoutError:
            deliveries.waiting.pop(frame, None)
            continue
        latencies.append(deliveries.last[frame] - started)

    deliveries.burst_expected = options.burst * len(clients)
    first_send = time.perf_counter()
    for b in range(options.burst):
        await clients[0].send(f"b:{b}")
    await _drain(deliveries, options)
    return RoomResult(
        latencies=latencies,
        rounds=options.rounds,
        burst_delivered=deliveries.burst_count,
        burst_seconds=deliveries.burst_last - first_send if deliveries.burst_count else 0.0,
        expected=(options.rounds + options.burst) * len(clients),
        received=deliveries.received,
        duplicated=deliveries.duplicated,
    )
