"""Bounded helpers shared by the conformance tests."""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack

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


def message_of(size: int) -> dict[str, Any]:
    """A message whose msgpack form is exactly ``size`` bytes (at least 20)."""
    filler = size - len(msgpack.packb({"type": "conf.size", "b": b""}, use_bin_type=True))
    # A longer bin needs a longer length prefix (1, 2 or 4 more bytes): take it from filler.
    # Where that skips a size (a 255-byte bin gives 275 bytes, a 256-byte one 277), a
    # longer type fills the gap a byte at a time.
    for pad in range(5):
        for shrink in range(5):
            message = {"type": "conf.size" + "." * pad, "b": b"s" * (filler - shrink - pad)}
            if len(msgpack.packb(message, use_bin_type=True)) == size:
                return message
    raise ValueError(f"no message of exactly {size} bytes")
