"""What Redis tests ask of a layer beyond the Channels API."""

from __future__ import annotations

from multilayer import ChannelLayer

__all__ = ["answered"]


async def answered(layer: ChannelLayer) -> None:
    """Wait (up to 5 s) until Redis answered the group sends of ``layer`` (in this event
    loop) that returned before their answer: a test that looks at the server next sees
    what they did."""
    await layer._state().backend._unanswered.drain(5.0)
