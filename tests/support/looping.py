"""Hypothesis against real brokers: one event loop in a thread for every example of a test.

Opening connections per example would make a few dozen examples take minutes; with the
loop (and so the layers' connections) kept, each example costs its own traffic only.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable
from typing import TypeVar

from hypothesis import HealthCheck, settings

T = TypeVar("T")

#: No per-example deadline: a shared CI machine under load must not turn into flaky tests.
UNHURRIED = settings(deadline=None)

#: Per backend: small enough for CI against real brokers (a few seconds each).
BROKER_EXAMPLES = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class LoopThread:
    """One event loop in a thread, so that hypothesis examples share the layers' connections."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coroutine: Awaitable[T], timeout: float = 20.0) -> T:
        async def bounded() -> T:
            return await asyncio.wait_for(coroutine, timeout)

        return asyncio.run_coroutine_threadsafe(bounded(), self.loop).result(timeout + 5)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
