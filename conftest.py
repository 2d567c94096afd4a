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

import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.brokers import IN_CI, KINDS, Broker, BrokerProcess, tansu_broker, zmq_hub

_STARTED: list[Broker] = []
#: placeholders for the ``host:port`` of a broker rather than its whole URL
_ADDRESSES: dict[str, Callable[[Path], BrokerProcess]] = {"tansu": tansu_broker, "hub": zmq_hub}


def _placeholders(url: str) -> set[str]:
    return {
        name for name in re.findall(r"\{([a-z-]+)\}", url) if name in _ADDRESSES or name in KINDS
    }


def _serve(name: str, logs: Path) -> str | None:
    """Start the broker ``{name}`` stands for; what replaces the placeholder, or None
    when it cannot run here."""
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
    return replacement


def pytest_configure(config: pytest.Config) -> None:
    urls: list[str] = config.getoption("--multilayer-url", default=None) or []
    names = set().union(*map(_placeholders, urls))
    if not names:
        return
    logs = Path(tempfile.mkdtemp(prefix="multilayer-brokers-"))
    replacements = {name: _serve(name, logs) for name in sorted(names)}
    config.option.multilayer_url = [
        url.format(**replacements)
        for url in urls
        if all(replacements[name] is not None for name in _placeholders(url))
    ]


def pytest_unconfigure(config: pytest.Config) -> None:
    while _STARTED:
        _STARTED.pop().stop()
