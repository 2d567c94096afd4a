"""Peers that need no broker: Channels' own InMemoryChannelLayer."""

from __future__ import annotations

from . import LayerContender


def inmemory(url: str, capacity: int) -> LayerContender:
    """channels.layers.InMemoryChannelLayer; it shares nothing between instances, so the
    two "instances" of each scenario are one object."""
    from channels.layers import InMemoryChannelLayer

    shared = InMemoryChannelLayer(capacity=capacity, expiry=60)
    return LayerContender("inmemory", lambda: shared)
