"""``multilayer bench --scenarios r``: the chat room with real daphne processes, small.

memory:// cannot be shared by separate processes, so the room runs on Redis
(``REDIS_URL``, default db 15 of the local server). Only the shape of the results and
that deliveries were counted are checked: timings on a shared machine prove nothing.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import secrets

import pytest

from multilayer.bench import load_contender
from multilayer.bench.room import RoomOptions, run_room
from multilayer.cli import main
from multilayer.url import LayerURL
from tests.support.brokers import listening, require, require_module

require_module("daphne")
require_module("websockets.asyncio.client")

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")
SMALL = RoomOptions(servers=2, clients=6, rounds=5, burst=5, start_timeout=20.0)


@pytest.fixture
def redis_url() -> str:
    host, port = LayerURL.parse(REDIS_URL).hosts[0]
    require(listening(port or 6379, host), f"no Redis at {REDIS_URL}")
    return REDIS_URL


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_room_counts_every_delivery_on_multilayer(redis_url: str) -> None:
    layer = {
        "BACKEND": "multilayer.ChannelLayer",
        "CONFIG": {"url": redis_url, "prefix": "room" + secrets.token_hex(4)},
    }
    result = asyncio.run(run_room(layer, SMALL))
    assert result.expected == (5 + 5) * 6
    assert 0 < result.received <= result.expected
    assert result.lost == result.expected - result.received
    assert result.burst_delivered > 0
    assert len(result.latencies) <= 5
    assert set(result.metrics()) >= {"rlost", "rdup", "rfull", "rburst"}


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
def test_cli_runs_the_room_against_a_peer(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("channels_redis")
    argv = ["bench", redis_url, "--scenarios", "r", "--repeat", "1", "--vs", "channels_redis"]
    argv += ["--servers", "2", "--clients", "6", "--rounds", "5", "--burst", "5"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "room: 2 servers, 6 clients, 5 rounds, burst 5" in out
    burst = next(line for line in out.splitlines() if line.startswith("(r) room burst"))
    # A figure for each contender and a ratio: neither run was skipped.
    assert burst.split()[4:6] != ["-", "-"] and burst.rstrip().endswith("x")
    assert "failed" not in out


def test_peer_room_configurations_build() -> None:
    pytest.importorskip("channels_redis")

    async def build() -> None:
        for name in ("channels_redis", "channels_redis_pubsub"):
            layer = load_contender(name, "redis://:pw@127.0.0.1:6380/3", 100).channels_layer
            assert layer is not None
            module, _, name = layer["BACKEND"].rpartition(".")
            # What a daphne process does with the entry; it connects only on first use.
            backend = getattr(importlib.import_module(module), name)
            assert backend(**layer["CONFIG"]).prefix == layer["CONFIG"]["prefix"]
            # redis-py 8's 5 s socket timeout would race channels_redis's blocking pops.
            assert layer["CONFIG"]["hosts"] == [
                {"address": "redis://:pw@127.0.0.1:6380/3", "socket_timeout": None}
            ]
            assert "capacity" not in layer["CONFIG"]

    asyncio.run(build())
    rabbit = pytest.importorskip("channels_rabbitmq.core")
    layer = load_contender("channels_rabbitmq", "amqp://u:p@h:5673/v", 100).channels_layer
    assert layer is not None
    assert layer["BACKEND"] == f"{rabbit.__name__}.RabbitmqChannelLayer"
    assert layer["CONFIG"]["host"] == "amqp://u:p@h:5673/v"
    assert layer["CONFIG"]["groups_exchange"].startswith("bench")
