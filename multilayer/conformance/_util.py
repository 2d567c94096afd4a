"""Bounded helpers shared by the conformance tests."""

from __future__ import annotations

import asyncio
from typing import Any

from ..layer import ChannelLayer

#: How long a test waits for a message that should arrive.
ARRIVAL = 10.0


async def recv(layer: ChannelLayer, channel: str, timeout: float = ARRIVAL) -> dict[str, Any]:
    """The next message on ``channel``, failing the test after ``timeout`` seconds."""
    try:
        return await asyncio.wait_for(layer.receive(channel), timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"no message on {channel!r} within {timeout}s") from None


async def assert_nothing(layer: ChannelLayer, channel: str, wait: float = 0.5) -> None:
    """Fail if a message arrives on ``channel`` within ``wait`` seconds."""
    try:
        message = await asyncio.wait_for(layer.receive(channel), wait)
    except asyncio.TimeoutError:
        return
    raise AssertionError(f"unexpected message on {channel!r}: {message!r}")
