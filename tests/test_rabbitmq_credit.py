"""Pipelined sends to process inboxes (multilayer/backends/rabbitmq/credit.py), on the
machine's shared RabbitMQ: a send returns before its confirm while the inbox has room
known to be free, and ChannelFull stays exact for one sender."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import subprocess
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from multilayer import ChannelFull, ChannelLayer
from tests.support.brokers import listening, require, require_binary, require_module

require_module("pika")

from multilayer.backends.rabbitmq import RabbitMQBackend  # noqa: E402

SHARED = "amqp://127.0.0.1:5672/"


@pytest.fixture
def shared() -> str:
    require(listening(5672), "no RabbitMQ on 127.0.0.1:5672")
    return SHARED


def run(body: Callable[[], Awaitable[None]], timeout: float = 60.0) -> None:
    asyncio.run(asyncio.wait_for(body(), timeout))


def _layer(url: str, **options: Any) -> ChannelLayer:
    options.setdefault("prefix", "rmqcredit" + secrets.token_hex(4))
    return ChannelLayer(url, **options)


def _count_confirm_waits(backend: RabbitMQBackend) -> list[int]:
    """Count the sends of ``backend`` that wait for their confirm (the slow path)."""
    waits = [0]
    counted = backend._counted

    async def counting(*args: Any) -> str:
        waits[0] += 1
        return await counted(*args)

    backend._counted = counting  # type: ignore[method-assign]
    return waits


async def _until(condition: Callable[[], bool], within: float) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"not within {within}s")
        await asyncio.sleep(0.01)


def _connections(rabbitmqctl: str, name: str) -> list[str]:
    """The broker's ids of the connections named ``name``."""
    listing = subprocess.run(
        [rabbitmqctl, "-q", "list_connections", "pid", "client_properties"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    return [line.split("\t")[0] for line in listing.splitlines() if f'"{name}"' in line]


def _close(rabbitmqctl: str, pids: list[str]) -> None:
    for pid in pids:
        subprocess.run([rabbitmqctl, "-q", "close_connection", pid, "test"], check=True, timeout=60)


async def _try(layer: ChannelLayer, channel: str, n: int) -> bool:
    try:
        await layer.send(channel, {"n": n})
    except ChannelFull:
        return False
    return True


def test_one_sender_fills_an_inbox_exactly_without_waiting_for_each_confirm(shared: str) -> None:
    """Capacity 40, nobody receiving, 100 sends one after the other: exactly the first 40
    return, each later one raises ChannelFull, at least 20 of the 40 did not wait for
    their confirm, and the receiver gets those 40 in order."""
    receiver = _layer(shared, capacity=40)
    sender = _layer(shared, prefix=receiver.prefix, capacity=40)

    async def body() -> None:
        inbox = await receiver.new_channel()
        waits = _count_confirm_waits(await sender._backend())
        accepted = [n for n in range(100) if await _try(sender, inbox, n)]
        assert accepted == list(range(40))
        # The 60 refused waited, and the first few, sent before the inbox was counted.
        assert waits[0] <= 100 - 20, f"{waits[0]} of 100 sends waited for their confirm"
        got = [(await asyncio.wait_for(receiver.receive(inbox), 10))["n"] for _ in range(40)]
        assert got == accepted
        # Room again once received: the next sends go through.
        assert await _try(sender, inbox, 100)
        assert (await asyncio.wait_for(receiver.receive(inbox), 10))["n"] == 100
        await sender.flush()
        await sender.close()
        await receiver.close()

    run(body)


def test_a_late_refusal_from_another_sender_is_logged(
    shared: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two senders (two backends) pipelining into one inbox of capacity 30: the inbox never
    holds more than 30, and every send that returned but whose message the broker then
    refused (the other sender filled it between two counts) is logged, one warning each."""
    receiver = _layer(shared, capacity=30)
    senders = [_layer(shared, prefix=receiver.prefix, capacity=30) for _ in range(2)]

    async def body() -> None:
        inbox = await receiver.new_channel()

        async def fill(layer: ChannelLayer, first: int) -> list[int]:
            return [n for n in range(first, first + 60) if await _try(layer, inbox, n)]

        with caplog.at_level(logging.WARNING, "multilayer.backends.rabbitmq"):
            returned = await asyncio.gather(fill(senders[0], 0), fill(senders[1], 1000))
            for sender in senders:
                await (await sender._backend()).credits.close(5)
        refused_late = sum("refused as full after its send returned" in r.message
                           for r in caplog.records)  # fmt: skip
        got = []
        while len(got) < 31:
            try:
                got.append((await asyncio.wait_for(receiver.receive(inbox), 1))["n"])
            except asyncio.TimeoutError:
                break
        assert len(got) == 30, got
        assert set(got) <= set(returned[0]) | set(returned[1])
        assert len(returned[0]) + len(returned[1]) - len(got) == refused_late
        await senders[0].flush()
        for layer in [*senders, receiver]:
            await layer.close()

    run(body)


def test_pipelined_sends_survive_a_dropped_connection_once_each(shared: str) -> None:
    """The sender's connection is closed by the broker while it sends as fast as it can:
    every send that returned is received exactly once, in order (a pipelined send lost
    with the connection is published again, and a copy of one that did arrive dropped)."""
    rabbitmqctl = require_binary("rabbitmqctl")
    name = "mlcredit-" + secrets.token_hex(4)
    receiver = _layer(shared, capacity=500)
    sender = _layer(f"{shared}?connection_name={name}", prefix=receiver.prefix, capacity=500)
    logging.getLogger("multilayer.backends.rabbitmq").disabled = True

    async def body() -> None:
        inbox = await receiver.new_channel()
        returned: list[int] = []
        got: list[int] = []
        await sender.send(inbox, {"n": -1})
        assert (await asyncio.wait_for(receiver.receive(inbox), 10))["n"] == -1
        pids = await asyncio.to_thread(_connections, rabbitmqctl, name)
        assert pids, f"no connection named {name!r} is listed"
        sending = True

        async def send() -> None:
            n = 0
            while sending:
                n += 1
                try:
                    await asyncio.wait_for(sender.send(inbox, {"n": n}), 15)
                    returned.append(n)
                except Exception:  # a send in flight when the connection drops; never retried
                    await asyncio.sleep(0.05)

        async def receive() -> None:
            while True:
                got.append((await receiver.receive(inbox))["n"])

        receiving = asyncio.ensure_future(receive())
        sender_task = asyncio.ensure_future(send())
        await _until(lambda: len(returned) >= 500, 30)
        closed_at = len(returned)
        await asyncio.to_thread(_close, rabbitmqctl, pids)
        await _until(lambda: len(returned) >= closed_at + 500, 30)
        sending = False
        await asyncio.wait_for(sender_task, 20)
        with contextlib.suppress(TimeoutError):  # the assertions below say what is missing
            await _until(lambda: set(returned) <= set(got), 20)
        receiving.cancel()
        await asyncio.gather(receiving, return_exceptions=True)
        assert len(got) == len(set(got)), "a message arrived twice"
        assert not sorted(set(returned) - set(got)), "a send returned, its message never came"
        assert got == sorted(got), "out of order"
        await sender.flush()
        await sender.close()
        await receiver.close()

    try:
        run(body, timeout=120)
    finally:
        logging.getLogger("multilayer.backends.rabbitmq").disabled = False
