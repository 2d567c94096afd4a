"""pytest plugin of the conformance suite: the ``--multilayer-url`` option and fixtures."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shlex
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from ..backend import Capabilities
from ..layer import ENV_URL, ChannelLayer
from ..url import LayerURL

T = TypeVar("T")

#: Upper bound of one test's event-loop run, so that no test can hang CI.
RUN_TIMEOUT = 90.0
#: Upper bound of one run of ``--multilayer-restart-command``.
RESTART_TIMEOUT = 120.0


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("multilayer")
    group.addoption(
        "--multilayer-url",
        action="append",
        default=[],
        metavar="URL",
        help="layer URL the conformance suite runs against (repeatable; default "
        f"${ENV_URL} or memory://)",
    )
    group.addoption(
        "--multilayer-restart-command",
        default=None,
        metavar="COMMAND",
        help="shell command that kills the broker of --multilayer-url and starts it again "
        "with empty state, returning once it accepts connections; tests that need a "
        "restart skip without it",
    )


class RestartHooks:
    """The hook a test session implements to restart brokers it started itself."""

    @pytest.hookspec(firstresult=True)
    def pytest_multilayer_restarter(
        self, config: pytest.Config, url: str
    ) -> Callable[[], None] | None:
        """A blocking callable that kills the broker behind ``url`` and starts it again
        with empty state, returning once it accepts connections; None when this
        implementation does not own that broker. ``--multilayer-restart-command``, when
        given, comes first."""


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(RestartHooks)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "multiprocess: runs layers in separate OS processes")
    config.addinivalue_line("markers", "slow: waits for expiry timers")


def _urls(config: pytest.Config) -> list[str]:
    urls: list[str] = config.getoption("--multilayer-url") or []
    return urls or [os.environ.get(ENV_URL) or "memory://"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "layer_url" in metafunc.fixturenames:
        urls = _urls(metafunc.config)
        schemes = [LayerURL.parse(url).scheme for url in urls]
        ids = [
            scheme if schemes.count(scheme) == 1 else f"{scheme}{index}"
            for index, scheme in enumerate(schemes)
        ]
        metafunc.parametrize("layer_url", urls, ids=ids, scope="session")


class Harness:
    """Builds layers for one test, runs its coroutine with a bound, and cleans up.

    Every layer of one test shares a fresh random prefix, so tests never see each
    other's messages, and each is flushed and closed when the test's run ends.
    """

    def __init__(self, url: str, restart: Callable[[], None] | None = None) -> None:
        self.url = url
        self._restart = restart
        self.prefix = "conf" + secrets.token_hex(4)
        self._layers: list[ChannelLayer] = []
        probe = ChannelLayer(url, prefix=self.prefix)
        self.scheme = probe.url.scheme
        self.capabilities: Capabilities = probe.backend_class.capabilities

    def layer(self, **options: Any) -> ChannelLayer:
        """A layer on the test URL and prefix; options override the URL's."""
        options.setdefault("prefix", self.prefix)
        layer = ChannelLayer(self.url, **options)
        self._layers.append(layer)
        return layer

    def require(self, capability: str, why: str) -> None:
        """Skip, with the reason recorded, when the backend lacks ``capability``."""
        if not getattr(self.capabilities, capability):
            pytest.skip(f"{self.scheme}: capabilities.{capability} is false ({why})")

    def require_restart(self) -> None:
        """Skip, with the reason recorded, when nobody said how to restart the broker.

        The suite cannot kill a broker it did not start: whoever runs it says how, with
        ``--multilayer-restart-command``, or the test session restarts brokers it started
        itself (the ``pytest_multilayer_restarter`` hook; multilayer's own shared brokers
        are restarted by its fault tests, ``tests/test_faults.py``, on private copies).
        """
        if self._restart is None:
            pytest.skip(
                f"{self.scheme}: capabilities.restores_memberships is true, but no "
                "--multilayer-restart-command was given and the session did not start "
                "this broker (the suite cannot restart a broker it did not start)"
            )

    def restart_broker(self) -> None:
        """Restart the broker (blocking; call it through ``asyncio.to_thread``)."""
        assert self._restart is not None, "call require_restart() first"
        self._restart()

    def run(self, body: Callable[[], Awaitable[T]], timeout: float = RUN_TIMEOUT) -> T:
        """Run ``body()`` in a new event loop, bounded by ``timeout`` seconds."""

        async def bounded() -> T:
            try:
                return await asyncio.wait_for(body(), timeout)
            finally:
                await self._cleanup()

        return asyncio.run(bounded())

    async def _cleanup(self) -> None:
        layers, self._layers = self._layers, []
        for index, layer in enumerate(layers):
            if index == 0:
                # Cleanup must not hide the test's own outcome.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(layer.flush(), 10)
            await asyncio.wait_for(layer.close(), 10)


@pytest.fixture
def harness(layer_url: str, request: pytest.FixtureRequest) -> Iterator[Harness]:
    """A :class:`Harness` on the URL this test runs against."""
    command: str | None = request.config.getoption("--multilayer-restart-command")
    restart: Callable[[], None] | None
    if command:

        def restart() -> None:
            subprocess.run(shlex.split(command), check=True, timeout=RESTART_TIMEOUT)

    else:
        restart = request.config.hook.pytest_multilayer_restarter(
            config=request.config, url=layer_url
        )
    yield Harness(layer_url, restart)
