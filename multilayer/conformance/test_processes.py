"""Several OS processes sharing one broker: at-most-once, ownership, groups."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

from .plugin import Harness

pytestmark = pytest.mark.multiprocess


#: Seconds a worker may take to exit after its stop message, and after a kill.
EXIT_TIMEOUT = 30.0
KILL_TIMEOUT = 10.0


class Worker:
    """One ``multilayer.conformance.worker`` process."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, harness: Harness, role: str, arg: str, options: dict[str, Any]) -> Worker:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "multilayer.conformance.worker",
            role,
            harness.url,
            harness.prefix,
            json.dumps(options),
            arg,
            stdout=asyncio.subprocess.PIPE,
        )
        return cls(process)

    async def event(self, timeout: float = 30) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        if not line:
            await asyncio.wait_for(self.process.wait(), EXIT_TIMEOUT)
            raise AssertionError(f"worker exited with {self.process.returncode} and no output")
        event: dict[str, Any] = json.loads(line)
        return event

    async def reap(self, patience: float) -> bool:
        """Wait up to ``patience`` seconds for the process to exit, else kill it; either
        way return only once it is gone and its pipe is closed. True if it exited itself.
        """
        if patience > 0:
            try:
                await asyncio.wait_for(self.process.wait(), patience)
                return True
            except asyncio.TimeoutError:
                pass
        with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
            self.process.kill()
        await asyncio.wait_for(self.process.wait(), KILL_TIMEOUT)
        return False


@contextlib.asynccontextmanager
async def workers(
    harness: Harness, role: str, arg: str, options: dict[str, Any], count: int = 2
) -> AsyncIterator[list[Worker]]:
    """``count`` workers, every one reaped before the block is left, however it is left.

    Each worker's stdout is an asyncio pipe transport of the test's event loop, closed
    only when the loop sees the process exit. A worker still running when the loop
    ends leaves it open, and the child watcher's thread keeps it reachable until the
    process exits (a worker gives up after 120 s): the ResourceWarning then comes out
    of some later test's garbage collection. So a failing block kills the workers at
    once (nobody will send them their stop message), and a passing one gives them
    ``EXIT_TIMEOUT`` seconds, then kills them and fails.
    """
    started: list[Worker] = []
    passed = False
    try:
        for _ in range(count):
            started.append(await Worker.start(harness, role, arg, options))
        yield started
        passed = True
    finally:
        patience = EXIT_TIMEOUT if passed else 0.0
        exited = [await worker.reap(patience) for worker in started]
    if not all(exited):
        raise AssertionError(f"a worker did not exit within {EXIT_TIMEOUT}s of its stop message")


def _require(harness: Harness) -> None:
    harness.require("multiprocess", "its channels live inside one process")


def test_two_processes_drain_one_channel_each_message_once(harness: Harness) -> None:
    _require(harness)

    async def body() -> None:
        options = {"capacity": 2000}
        total = 1000
        async with workers(harness, "drain", "conf.drain", options) as drains:
            for worker in drains:
                assert await worker.event() == {"ready": True}
            sender = harness.layer(**options)
            for i in range(total):
                await sender.send("conf.drain", {"i": i})
                if i % 50 == 0:
                    await asyncio.sleep(0.005)
            for _ in drains:
                await sender.send("conf.drain", {"stop": True})
            results = [(await worker.event(60))["got"] for worker in drains]
        everything = results[0] + results[1]
        assert len(everything) == len(set(everything)), "a message was delivered twice"
        assert sorted(everything) == list(range(total)), "a message was lost"
        for got in results:
            assert got == sorted(got), "one process saw messages out of order"

    harness.run(body, timeout=150)


def test_process_specific_channels_and_groups_across_processes(harness: Harness) -> None:
    _require(harness)

    async def body() -> None:
        options = {"capacity": 500}
        async with workers(harness, "inbox", "conf-procs", options) as inboxes:
            channels = [(await worker.event())["channel"] for worker in inboxes]
            sender = harness.layer(**options)
            for i in range(100):
                await sender.send(channels[0], {"i": i})
                await sender.send(channels[1], {"i": 1000 + i})
            await sender.group_send("conf-procs", {"i": -1})
            for channel in channels:
                await sender.send(channel, {"stop": True})
            results = [(await worker.event(60))["got"] for worker in inboxes]
        assert results[0] == [*range(100), -1]
        assert results[1] == [*range(1000, 1100), -1]

    harness.run(body, timeout=150)
