"""Partitions of the Kafka log (issue 14): a process's cost does not grow with other
processes' inbox traffic, and a group send costs work only in the processes with members.

Four real OS processes on one Apache Kafka node each receive on a process-specific
channel of their own while sending to the three others; each counts the operations its
replay decoded (``Replay.decoded``, per partition). Counts, not timings."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

import pytest

from tests.support.apache_kafka import ApacheKafka, require_tools
from tests.support.brokers import require_module, started

require_module("kafka")

#: Processes, messages each sends to each other process, group sends.
PROCESSES = 4
MESSAGES = 1500
GROUP_SENDS = 200
#: Bounds of every wait (s).
WAIT = 90.0


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    require_tools()
    with started(ApacheKafka(1)) as node:
        yield node.url


def _decoded(layer: Any) -> dict[int, int]:
    return dict(layer._state().backend.hub.replay.decoded)


async def _worker(url: str, prefix: str, conn: Connection) -> None:
    from multilayer import ChannelLayer

    layer = ChannelLayer(url, prefix=prefix, capacity=10_000)
    try:
        channel = await layer.new_channel()
        hub = layer._state().backend.hub  # type: ignore[attr-defined]
        conn.send((channel, hub.view.part_of(channel.partition("!")[0] + "!")))
        while True:
            command, *args = await asyncio.to_thread(conn.recv)
            if command == "decoded":
                conn.send(_decoded(layer))
            elif command == "join":
                await layer.group_add("parts-g", channel)
                conn.send("ok")
            elif command == "traffic":
                (others,) = args
                sends = [layer.send(other, {"n": n}) for n in range(MESSAGES) for other in others]
                for start in range(0, len(sends), 500):
                    await asyncio.gather(*sends[start : start + 500])
                got = 0
                while got < MESSAGES * len(others):
                    await asyncio.wait_for(layer.receive(channel), WAIT)
                    got += 1
                conn.send(got)
            elif command == "group_send":
                for n in range(GROUP_SENDS):
                    await layer.group_send("parts-g", {"g": n})
                conn.send("ok")
            elif command == "receive":
                for _ in range(args[0]):
                    await asyncio.wait_for(layer.receive(channel), WAIT)
                conn.send("ok")
            elif command == "close":
                return
    finally:
        await layer.close()


def _run_worker(url: str, prefix: str, conn: Connection) -> None:
    asyncio.run(_worker(url, prefix, conn))


def _ask(conns: list[Connection], message: tuple[Any, ...]) -> list[Any]:
    for conn in conns:
        conn.send(message)
    answers = []
    for conn in conns:
        assert conn.poll(WAIT), f"no answer to {message[0]} within {WAIT:g}s"
        answers.append(conn.recv())
    return answers


def _data(before: dict[int, int], after: dict[int, int]) -> int:
    return sum(after.get(p, 0) - before.get(p, 0) for p in set(after) | set(before) if p)


def _control(before: dict[int, int], after: dict[int, int]) -> int:
    return after.get(0, 0) - before.get(0, 0)


def test_each_process_decodes_its_own_traffic_and_its_groups_only(url: str) -> None:
    prefix = f"parts{time.time_ns()}"
    context = multiprocessing.get_context("spawn")
    pipes = [context.Pipe() for _ in range(PROCESSES)]
    processes = [
        context.Process(target=_run_worker, args=(url, prefix, child), daemon=True)
        for _parent, child in pipes
    ]
    conns = [parent for parent, _child in pipes]
    for process in processes:
        process.start()
    try:
        opened = []
        for conn in conns:
            assert conn.poll(WAIT), "a worker did not open its layer"
            opened.append(conn.recv())
        channels = [channel for channel, _partition in opened]
        partitions = [partition for _channel, partition in opened]
        # Enough partitions: each inbox gets one of its own.
        assert len(set(partitions)) == PROCESSES and 0 not in partitions, partitions

        # Each process sends MESSAGES to each of the others and receives theirs.
        before = _ask(conns, ("decoded",))
        received = []
        for conn, channel in zip(conns, channels, strict=True):
            conn.send(("traffic", [other for other in channels if other != channel]))
        for conn in conns:
            assert conn.poll(WAIT), "a worker did not finish its traffic"
            received.append(conn.recv())
        after = _ask(conns, ("decoded",))
        for index in range(PROCESSES):
            data, control = (
                _data(before[index], after[index]),
                _control(before[index], after[index]),
            )
            print(
                f"process {index}: received {received[index]}, decoded {data} in its "
                f"partitions ({data / received[index]:.2f}x) and {control} in control"
            )
            assert received[index] == MESSAGES * (PROCESSES - 1)
            assert data <= 1.5 * received[index], (index, data, received[index])
            assert control <= 50, (index, control)

        # Processes 0 and 1 have members of the group; 2 and 3 have none. The last take
        # records of the traffic (written within 20 ms) are replayed before counting.
        _ask(conns[:2], ("join",))
        time.sleep(0.5)
        before = _ask(conns, ("decoded",))
        _ask(conns[:1], ("group_send",))
        _ask(conns[:2], ("receive", GROUP_SENDS))
        time.sleep(0.5)  # anything stray would reach the others' replays by now
        after = _ask(conns, ("decoded",))
        for index in range(PROCESSES):
            data, control = (
                _data(before[index], after[index]),
                _control(before[index], after[index]),
            )
            print(f"group sends: process {index} decoded {data} + {control} in control")
            assert control <= 10, (index, control)
            if index < 2:
                assert data >= GROUP_SENDS, (index, data)
            else:
                assert data == 0, (index, data)
    finally:
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.send(("close",))
        for process in processes:
            process.join(30)
            if process.is_alive():
                process.kill()
