"""Which shard holds a name: consistent hashing, so that adding a shard moves few names.

The backend hashes the part of a channel name up to ``!`` (:func:`multilayer.names.
non_local_name`), so a process's inbox and its process-specific channels, sent to or
received from, always meet on one server; a group's memberships live on each member's
shard. Shards are labelled by the URL (``host:port``, or the Sentinel service name), never
by a resolved address, so every process given the same URL places every name alike.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence

__all__ = ["Ring"]


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class Ring:
    """Consistent hashing of names onto shards: adding a shard moves about 1/n of them."""

    #: Points per shard on the ring: the more, the more even the shares.
    POINTS = 160

    def __init__(self, labels: Sequence[str]) -> None:
        points = sorted(
            (_hash(f"{label}#{point}"), index)
            for index, label in enumerate(labels)
            for point in range(self.POINTS)
        )
        self._hashes = [point for point, _ in points]
        self._owners = [owner for _, owner in points]
        self._cache: dict[str, int] = {}

    def owner(self, name: str) -> int:
        """The index (in ``labels``) of the shard that holds ``name``."""
        owner = self._cache.get(name)
        if owner is None:
            at = bisect.bisect(self._hashes, _hash(name)) % len(self._hashes)
            owner = self._owners[at]
            if len(self._cache) < 10_000:
                self._cache[name] = owner
        return owner
