"""``--vs multilayer_metrics``: our layer with Prometheus metrics on, to price them.

Interleaved in one run with the plain ``multilayer`` column, it times every send (what
importing :mod:`multilayer.metrics` turns on) and scrapes the default registry every
second from another thread, 15 times as often as Prometheus does by default. A scrape
holds the GIL for a few milliseconds (mostly prometheus_client writing the text), so a
scenario run shorter than a second sees none: scraping at the start of each would put
one scrape into a few milliseconds of traffic, which no deployment does. Sends are timed
only while this contender runs, so the ``multilayer`` column stays metrics-off and the
ratio column is the cost.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from prometheus_client import generate_latest

from .. import metrics  # noqa: F401 (the collector the scrapes read)
from ..counters import timing
from ..layer import ChannelLayer
from . import LayerContender

__all__ = ["multilayer_metrics"]

#: Seconds between two scrapes while the contender runs.
SCRAPE_EVERY = 1.0


@contextlib.contextmanager
def _metrics_on() -> Iterator[None]:
    stop = threading.Event()

    def scrape() -> None:
        while not stop.wait(SCRAPE_EVERY):
            generate_latest()

    scraper = threading.Thread(target=scrape, name="bench scraper", daemon=True)
    timing.on = True
    scraper.start()
    try:
        yield
    finally:
        timing.on = False
        stop.set()
        scraper.join()


class _Metered(LayerContender):
    async def throughput_normal(self, n: int) -> float:
        with _metrics_on():
            return await super().throughput_normal(n)

    async def throughput_specific(self, n: int) -> float:
        with _metrics_on():
            return await super().throughput_specific(n)

    async def pingpong(self, n: int) -> list[float]:
        with _metrics_on():
            return await super().pingpong(n)

    async def group_send(self, members: int, n: int) -> tuple[float, float]:
        with _metrics_on():
            return await super().group_send(members, n)


def multilayer_metrics(url: str, capacity: int) -> LayerContender:
    """Our layer on ``url`` with metrics on and scraped while it runs."""
    # Importing multilayer.metrics turned timing on for every layer; only this one times.
    timing.on = False
    return _Metered("multilayer_metrics", lambda: ChannelLayer(url, capacity=capacity))
