"""Several OS processes sharing one broker: at-most-once, ownership, groups."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import pytest

from .plugin import Harness

pytestmark = pytest.mark.multiprocess


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
            await self.process.wait()
            raise AssertionError(f"worker exited with {self.process.returncode} and no output")
        event: dict[str, Any] = json.loads(line)
        return event

    async def finish(self) -> None:
        try:
            await asyncio.wait_for(self.process.wait(), 30)
        except asyncio.TimeoutError:
            self.process.kill()
            await self.process.wait()
            raise


def _require(harness: Harness) -> None:
    harness.require("multiprocess", "its channels live inside one process")


def test_two_processes_drain_one_channel_each_message_once(harness: Harness) -> None:
    _require(harness)

    async def body() -> None:
        options = {"capacity": 2000}
        workers = [await Worker.start(harness, "drain", "conf.drain", options) for _ in range(2)]
        try:
            for worker in workers:
                assert await worker.event() == {"ready": True}
            sender = harness.layer(**options)
            total = 1000
            for i in range(total):
                await sender.send("conf.drain", {"i": i})
                if i % 50 == 0:
                    await asyncio.sleep(0.005)
            for _ in workers:
                await sender.send("conf.drain", {"stop": True})
            results = [(await worker.event(60))["got"] for worker in workers]
        finally:
            for worker in workers:
                await worker.finish()
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
        workers = [await Worker.start(harness, "inbox", "conf-procs", options) for _ in range(2)]
        try:
            channels = [(await worker.event())["channel"] for worker in workers]
            sender = harness.layer(**options)
            for i in range(100):
                await sender.send(channels[0], {"i": i})
                await sender.send(channels[1], {"i": 1000 + i})
            await sender.group_send("conf-procs", {"i": -1})
            for channel in channels:
                await sender.send(channel, {"stop": True})
            results = [(await worker.event(60))["got"] for worker in workers]
        finally:
            for worker in workers:
                await worker.finish()
        assert results[0] == [*range(100), -1]
        assert results[1] == [*range(1000, 1100), -1]

    harness.run(body, timeout=150)
