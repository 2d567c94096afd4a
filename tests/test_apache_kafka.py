"""Apache Kafka run from its jars (tests/support/apache_kafka.py): a layer works through a
node, a killed node comes back on its ports with its data, and stopping leaves no process
and no open port. Without Java or Maven these skip, and fail under ``CI=true``."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from multilayer import ChannelLayer
from tests.support.apache_kafka import ApacheKafka, registered_brokers, require_tools
from tests.support.brokers import listening, require_module, started

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def require_kafka() -> None:
    """Skip without Java, Maven or kafka-python; fail instead under CI."""
    require_tools()
    require_module("kafka")


def run(body: Callable[[], Awaitable[T]], timeout: float = 60.0) -> T:
    """Run ``body()`` in a fresh event loop, bounded."""

    async def bounded() -> T:
        return await asyncio.wait_for(body(), timeout)

    return asyncio.run(bounded())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def send(url: str, channel: str, message: dict[str, int]) -> None:
    layer = ChannelLayer(url, prefix="apache")
    try:
        await layer.send(channel, message)
    finally:
        await layer.close()


async def receive(url: str, channel: str) -> dict[str, int]:
    layer = ChannelLayer(url, prefix="apache")
    try:
        return await asyncio.wait_for(layer.receive(channel), 30)
    finally:
        await layer.close()


def test_a_node_serves_a_layer_survives_a_kill_and_stops_clean() -> None:
    require_kafka()
    node = ApacheKafka(1)
    with started(node):
        (port,) = node.ports
        assert node.url == f"kafka://127.0.0.1:{port}"
        assert registered_brokers(port) == 1
        run(lambda: send(node.url, "apache.q", {"n": 1}))
        assert run(lambda: receive(node.url, "apache.q")) == {"n": 1}

        run(lambda: send(node.url, "apache.q", {"n": 2}))
        (pid,) = node.pids
        node.kill(0)
        assert not alive(pid) and not listening(port)
        node.restart(0)
        assert node.ports == [port] and registered_brokers(port) == 1
        # Same data directory: the message written before the kill is still there.
        assert run(lambda: receive(node.url, "apache.q")) == {"n": 2}
        pids = node.pids
    assert not any(alive(pid) for pid in pids)
    assert not any(listening(port) for port in (*node.ports, *node.controller_ports))
    assert not node.workdir.exists(), "the temporary working directory is removed"
