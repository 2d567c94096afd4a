"""Test-session brokers for the conformance URLs.

``--multilayer-url`` values may name brokers this session starts itself, on free loopback
ports and with the code of ``scripts/broker.sh``, and stops at the end: ``{KIND}`` (any
kind that command takes, for example ``{redis-sentinel}``) stands for the whole URL of a
broker of that kind; ``{tansu}`` (an in-memory Tansu) and ``{hub}`` (a multilayer ZeroMQ
hub) stand for an address, as in ``kafka://{tansu}`` and ``zmq://{hub}``. Without
placeholders nothing starts. A broker that cannot run here drops its URLs, or stops the
run under ``CI=true``.
"""

from __future__ import annotations

import functools
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.brokers import IN_CI, KINDS, Broker, BrokerProcess, tansu_broker, zmq_hub

_STARTED: list[Broker] = []
#: how to restart the one broker a session URL stands on, by URL
_RESTARTS: dict[str, Callable[[], None]] = {}
#: Brokers the conformance restart test may restart, by placeholder: the hub loses every
#: membership (its state lives in memory), Apache Kafka keeps its log (as in production).
#: Tansu is left out: an in-memory log that comes back empty loses the sends made before
#: the layer noticed, which the test's first send after a restart must not meet.
_RESTARTERS: dict[str, Callable[[Any], None]] = {
    "hub": lambda hub: hub.restart(kill=True),
    "kafka": lambda kafka: kafka.restart(0),
}
#: placeholders for the ``host:port`` of a broker rather than its whole URL
_ADDRESSES: dict[str, Callable[[Path], BrokerProcess]] = {"tansu": tansu_broker, "hub": zmq_hub}


def _placeholders(url: str) -> set[str]:
    return {
        name for name in re.findall(r"\{([a-z-]+)\}", url) if name in _ADDRESSES or name in KINDS
    }


def _serve(name: str, logs: Path) -> tuple[str, Broker] | None:
    """Start the broker ``{name}`` stands for; what replaces the placeholder and the
    broker, or None when it cannot run here."""
    try:
        if name in _ADDRESSES:
            process = _ADDRESSES[name](logs)
            broker: Broker = process
            replacement = f"127.0.0.1:{process.port}"
        else:
            broker = KINDS[name](logs)
            replacement = broker.url
    except (pytest.skip.Exception, pytest.fail.Exception) as missing:
        if IN_CI:
            raise pytest.UsageError(missing.msg) from None
        return None
    broker.start()
    _STARTED.append(broker)
    return replacement, broker


def pytest_configure(config: pytest.Config) -> None:
    urls: list[str] = config.getoption("--multilayer-url", default=None) or []
    names = set().union(*map(_placeholders, urls))
    if not names:
        return
    logs = Path(tempfile.mkdtemp(prefix="multilayer-brokers-"))
    served = {name: _serve(name, logs) for name in sorted(names)}
    replacements = {name: found[0] for name, found in served.items() if found is not None}
    config.option.multilayer_url = []
    for url in urls:
        used = _placeholders(url)
        if not used <= replacements.keys():
            continue
        formatted = url.format(**replacements)
        config.option.multilayer_url.append(formatted)
        if len(used) == 1 and (name := used.pop()) in _RESTARTERS:
            broker = served[name]
            assert broker is not None
            _RESTARTS[formatted] = functools.partial(_RESTARTERS[name], broker[1])


def pytest_multilayer_restarter(config: pytest.Config, url: str) -> Callable[[], None] | None:
    return _RESTARTS.get(url)


def pytest_unconfigure(config: pytest.Config) -> None:
    while _STARTED:
        _STARTED.pop().stop()
