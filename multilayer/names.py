"""Channel and group name rules (those of ``channels.layers``) and message checks."""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "MAX_NAME_LENGTH",
    "check_channel_name",
    "check_group_name",
    "check_message",
    "non_local_name",
]

#: Names are shorter than this, as in ``channels.layers.BaseChannelLayer``.
MAX_NAME_LENGTH = 100

_CHANNEL = re.compile(r"[a-zA-Z\d\-_.]+(![a-zA-Z\d\-_.]*)?")
_GROUP = re.compile(r"[a-zA-Z\d\-_.]+")
_RULE = "ASCII letters, digits, '-', '_' or '.', shorter than 100 characters"
# Names already checked; hot paths skip the regex for them. Emptied when full: process-
# specific names churn with connections, and a cache that kept the first 100,000 grew by
# about 0.9 MiB over a 5-minute soak (and up to about 12 MiB) for names long gone.
_KNOWN_CHANNELS: set[str] = set()
_KNOWN_LIMIT = 4096


def check_channel_name(name: Any) -> str:
    """Return ``name`` if it is a valid channel name, else raise TypeError naming it."""
    if type(name) is str:
        if name in _KNOWN_CHANNELS:
            return name
        if len(name) < MAX_NAME_LENGTH and _CHANNEL.fullmatch(name):
            if len(_KNOWN_CHANNELS) >= _KNOWN_LIMIT:
                _KNOWN_CHANNELS.clear()
            _KNOWN_CHANNELS.add(name)
            return name
    raise TypeError(
        f"invalid channel name {name!r}: use {_RULE}, with at most one '!' "
        "(process-specific channels)"
    )


def check_group_name(name: Any) -> str:
    """Return ``name`` if it is a valid group name, else raise TypeError naming it."""
    if type(name) is str and len(name) < MAX_NAME_LENGTH and _GROUP.fullmatch(name):
        return name
    raise TypeError(f"invalid group name {name!r}: use {_RULE}")


def check_message(message: Any) -> dict[str, Any]:
    """Return ``message`` if it is a dict with string keys, else raise TypeError naming why."""
    if not isinstance(message, dict):
        raise TypeError(f"message must be a dict, not {type(message).__name__}: {message!r:.80}")
    for key in message:
        if not isinstance(key, str):
            raise TypeError(f"message keys must be strings, not {type(key).__name__}: {key!r:.80}")
    return message


def non_local_name(name: str) -> str:
    """The part of a channel name up to and including '!' (the whole name if it has none)."""
    bang = name.find("!")
    return name if bang < 0 else name[: bang + 1]
