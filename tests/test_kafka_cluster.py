"""Kafka backend behaviour that a real cluster brings out: opening while a new topic has no
leader yet. The broker is faked here (kafka-python's clients replaced), so this runs
without one; the conformance suite on the 3-node Apache Kafka covers the rest."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from multilayer.exceptions import BrokerError
from tests.support.brokers import require_module

require_module("kafka")

from kafka.errors import KafkaTimeoutError  # noqa: E402

from multilayer.backends.kafka import hub as hub_module  # noqa: E402
from multilayer.backends.kafka import replay as replay_module  # noqa: E402


class _LeaderlessFetcher:
    """Answers every ListOffsets like a partition without a leader: never."""

    def end_offsets(self, _partitions: Any, timeout_ms: int) -> dict[Any, int]:
        time.sleep(timeout_ms / 1000)
        raise KafkaTimeoutError("no leader")


class _LeaderlessConsumer:
    """A KafkaConsumer of a topic whose partition has no leader yet. Its public
    ``end_offsets`` retries forever, as kafka-python's does."""

    def __init__(self, **_config: Any) -> None:
        self._fetcher = _LeaderlessFetcher()
        self.closed = threading.Event()

    def assign(self, _partitions: Any) -> None:
        pass

    def partitions_for_topic(self, _topic: str) -> set[int]:
        return set(range(8))

    def seek_to_beginning(self, *_partitions: Any) -> None:
        pass

    def end_offsets(self, _partitions: Any) -> dict[Any, int]:
        self.closed.wait()
        raise KafkaTimeoutError("closed")

    def close(self) -> None:
        self.closed.set()


def test_stop_during_a_slow_open_ends_the_opening_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    # A close() while a layer opens stops the hub from another thread; the opening thread
    # must end too, or the event loop's executor waits for it at shutdown.
    monkeypatch.setattr(replay_module, "KafkaConsumer", _LeaderlessConsumer)
    monkeypatch.setattr(hub_module.Hub, "create_topic", lambda _self: None)
    options = {
        "idle_after": 2.0,
        "fetch_wait_ms": 5,
        "log_check": 1.0,
        "max_record": 1_000_000,
        "acks": "all",
        "linger_ms": 0,
        "snapshot_every": 100_000,
        "snapshot_interval": 60.0,
        "partitions": 8,
    }
    hub = hub_module.Hub("multilayer.leaderless", {}, options)
    monkeypatch.setattr(hub.writer, "start", lambda _config: None)
    raised: list[BaseException] = []

    def opening() -> None:
        try:
            hub.ensure_started()
        except BaseException as error:
            raised.append(error)

    thread = threading.Thread(target=opening, daemon=True)
    thread.start()
    time.sleep(0.3)
    assert thread.is_alive(), "the fake leaderless partition must keep the open waiting"
    started = time.monotonic()
    hub.stop()
    thread.join(5)
    assert not thread.is_alive(), "the opening thread still waits after stop()"
    assert time.monotonic() - started < 3
    assert len(raised) == 1 and isinstance(raised[0], BrokerError), raised
