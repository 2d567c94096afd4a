"""Per-channel capacities: a default plus ``channel_capacity`` glob patterns or regexes."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from typing import Any

from .exceptions import ConfigurationError
from .names import non_local_name

__all__ = ["CapacityPolicy"]


class CapacityPolicy:
    """Answers "how many messages may wait in this channel?".

    Patterns are tried in the order given; the first that matches wins. A glob (``str``)
    is matched with :mod:`fnmatch` rules; a compiled regex with ``pattern.match``. A
    process-specific channel's messages all wait in its process's queue, so its capacity
    is looked up, and counted, on the non-local part of its name (up to and including
    ``!``).
    """

    def __init__(self, default: int, patterns: Mapping[Any, int] | None = None) -> None:
        self.default = default
        self._rules: list[tuple[re.Pattern[str], int]] = []
        for pattern, value in (patterns or {}).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(
                    f"channel_capacity[{pattern!r}] must be a positive integer, not {value!r}"
                )
            if isinstance(pattern, re.Pattern):
                self._rules.append((pattern, value))
            elif isinstance(pattern, str):
                self._rules.append((re.compile(fnmatch.translate(pattern)), value))
            else:
                raise ConfigurationError(
                    f"channel_capacity keys must be glob strings or compiled regexes, "
                    f"not {pattern!r}"
                )
        self._cache: dict[str, int] = {}

    @property
    def uniform(self) -> bool:
        """True when every channel has the default capacity."""
        return not self._rules

    def for_channel(self, channel: str) -> int:
        """The capacity of ``channel`` (of its process queue, for a process-specific one)."""
        # Cached per queue, not per channel: process-specific channels come and go by the
        # thousand, their process queue stays.
        name = non_local_name(channel)
        try:
            return self._cache[name]
        except KeyError:
            pass
        capacity = next((value for rule, value in self._rules if rule.match(name)), self.default)
        if len(self._cache) < 10_000:
            self._cache[name] = capacity
        return capacity
