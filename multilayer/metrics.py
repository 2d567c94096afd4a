"""Prometheus metrics of every channel layer in this process (``multilayer[prometheus]``).

Importing this module registers one collector with prometheus_client's default registry
and starts timing sends; whatever already serves that registry (``start_http_server``,
``make_wsgi_app``, django-prometheus's ``/metrics``) then reports, for each layer scheme
and prefix (never a URL, which may hold credentials):

* counters, as :class:`~multilayer.LayerStats` keeps them: ``multilayer_messages_sent_total``,
  ``multilayer_group_sends_total``, ``multilayer_messages_received_total``,
  ``multilayer_messages_expired_total``, ``multilayer_messages_dropped_full_total``,
  ``multilayer_reconnects_total``;
* the gauge ``multilayer_messages_buffered``: fetched by this process, not handed out yet;
* the histogram ``multilayer_send_duration_seconds``: ``send()`` until the broker took it.

A scrape reads counters in memory: it never waits for an event loop nor asks a broker.
Queue depths and group sizes are the broker's to tell, so they are opt-in:
:func:`watch_broker` asks it every so often in a thread of its own, and scrapes report
the last answer (``multilayer_queue_messages``, ``multilayer_group_members``).
:func:`broker_text` renders one answer in the text format, for ``multilayer stats
--prometheus``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .counters import SEND_BUCKETS, process_counters, timing
from .layer import ChannelLayer, LayerStats

__all__ = ["BrokerWatch", "LayerCollector", "broker_text", "watch_broker"]

logger = logging.getLogger(__name__)

LABELS = ["scheme", "prefix"]

# (metric name without _total, Counters field, help)
_COUNTERS = (
    ("multilayer_messages_sent", "sent", "Messages accepted by send()."),
    ("multilayer_group_sends", "group_sent", "Calls of group_send()."),
    ("multilayer_messages_received", "received", "Messages returned by receive()."),
    (
        "multilayer_messages_expired",
        "expired",
        "Messages a receive in this process dropped because their expiry had passed.",
    ),
    (
        "multilayer_messages_dropped_full",
        "dropped_full",
        "Sends refused with ChannelFull, and group copies refused for a full member.",
    ),
    ("multilayer_reconnects", "reconnects", "Broker connections lost and made again."),
)


def _broker_families(
    views: list[tuple[str, str, LayerStats, float]],
) -> Iterator[Metric]:
    """Queue depths and group sizes of ``(scheme, prefix, stats, when)`` answers."""
    queues = GaugeMetricFamily(
        "multilayer_queue_messages",
        "Messages waiting in a queue of the prefix, as the broker last said.",
        labels=[*LABELS, "queue"],
    )
    groups = GaugeMetricFamily(
        "multilayer_group_members",
        "Live members of a group of the prefix, as the broker last said.",
        labels=[*LABELS, "group"],
    )
    updated = GaugeMetricFamily(
        "multilayer_broker_stats_timestamp_seconds",
        "When the broker last answered for the prefix (Unix time).",
        labels=LABELS,
    )
    for scheme, prefix, stats, when in views:
        for queue, waiting in (stats.queues or {}).items():
            queues.add_metric([scheme, prefix, queue], waiting)
        for group, members in (stats.groups or {}).items():
            groups.add_metric([scheme, prefix, group], members)
        updated.add_metric([scheme, prefix], when)
    yield from (queues, groups, updated)


class LayerCollector(Collector):
    """Reports every layer of the process, and the broker answers of :func:`watch_broker`.

    Registered with the default registry on import; register it in another
    :class:`~prometheus_client.CollectorRegistry` to serve it from there.
    """

    def collect(self) -> Iterator[Metric]:
        sums = process_counters()
        for name, field, text in _COUNTERS:
            family = CounterMetricFamily(name, text, labels=LABELS)
            for labels, (counters, _buffered) in sums.items():
                family.add_metric(list(labels), getattr(counters, field))
            yield family
        buffered = GaugeMetricFamily(
            "multilayer_messages_buffered",
            "Messages this process fetched from the broker and did not hand out yet.",
            labels=LABELS,
        )
        durations = HistogramMetricFamily(
            "multilayer_send_duration_seconds",
            "Seconds from send() until the broker accepted the message.",
            labels=LABELS,
        )
        bounds = [*(str(bound) for bound in SEND_BUCKETS), "+Inf"]
        for labels, (counters, waiting) in sums.items():
            buffered.add_metric(list(labels), waiting)
            cumulative, running = [], 0
            for bound, count in zip(bounds, counters.send_buckets, strict=True):
                running += count
                cumulative.append((bound, running))
            durations.add_metric(list(labels), cumulative, counters.send_seconds)
        yield buffered
        yield durations
        with _watches_lock:
            views = [watch.last for watch in _watches if watch.last is not None]
        if views:
            yield from _broker_families(views)


class BrokerWatch:
    """Asks the broker for a prefix's queue depths and group sizes every ``every`` seconds.

    It runs its own layer in a daemon thread with its own event loop, so the
    application's loops and the scrapes never wait for the broker. ``last`` holds the
    latest answer; a failed request is logged and the previous answer kept.
    """

    def __init__(self, layer: ChannelLayer, every: float, timeout: float) -> None:
        self.layer, self.every, self.timeout = layer, every, timeout
        self.last: tuple[str, str, LayerStats, float] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"multilayer broker watch {layer.prefix}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        asyncio.run(self._poll())

    async def _poll(self) -> None:
        layer = self.layer
        try:
            while not self._stop.is_set():
                try:
                    stats = await asyncio.wait_for(layer.stats(), self.timeout)
                except Exception as error:  # the broker's trouble is logged, not raised here
                    logger.warning(
                        "broker stats of %s failed: %s",
                        layer.url.sanitized(),
                        str(error) or type(error).__name__,
                    )
                else:
                    self.last = (layer.url.scheme, layer.prefix, stats, time.time())
                # A blocking wait in this thread's own loop: nothing else runs here.
                await asyncio.to_thread(self._stop.wait, self.every)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(layer.close(), self.timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop asking, close the watch's connections, and stop reporting its answer."""
        self._stop.set()
        self._thread.join(timeout)
        with _watches_lock:
            if self in _watches:
                _watches.remove(self)


_watches: list[BrokerWatch] = []
_watches_lock = threading.Lock()


def watch_broker(
    url: str | None = None, *, every: float = 60.0, timeout: float = 10.0, **options: Any
) -> BrokerWatch:
    """Report the broker's queue depths and group sizes under a prefix, refreshed every
    ``every`` seconds (each request bounded by ``timeout``).

    ``url`` and ``options`` (``prefix=...``, TLS options, ...) are those of the layer to
    watch, as :class:`~multilayer.ChannelLayer` takes them. Every process that runs it
    asks the broker, so run it in one of them. ``stop()`` the watch to end it.
    """
    watch = BrokerWatch(ChannelLayer(url, **options), every, timeout)
    with _watches_lock:
        _watches.append(watch)
    return watch


class _Once(Collector):
    def __init__(self, view: tuple[str, str, LayerStats, float]) -> None:
        self.view = view

    def collect(self) -> Iterator[Metric]:
        yield from _broker_families([self.view])


def broker_text(scheme: str, stats: LayerStats) -> str:
    """``stats``' queue depths and group sizes in Prometheus' text exposition format;
    what the broker cannot tell is said in a comment."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Once((scheme, stats.prefix, stats, time.time())))
    note = f"# {stats.unknown}\n" if stats.unknown else ""
    return note + generate_latest(registry).decode()


REGISTRY.register(LayerCollector())
timing.on = True
