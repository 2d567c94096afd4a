"""Backend discovery by URL scheme through stevedore entry points."""

from __future__ import annotations

from typing import Any

import pytest

import multilayer.plugins as plugins
from multilayer import BackendNotFound, ChannelLayer
from multilayer.backends.memory import MemoryBackend


def test_memory_is_registered() -> None:
    assert plugins.load_backend("memory") is MemoryBackend
    assert any(info.scheme == "memory" and info.available for info in plugins.installed_backends())


def test_unknown_scheme_lists_installed_ones_and_suggests() -> None:
    with pytest.raises(BackendNotFound, match=r"'memroy'; did you mean 'memory'\?.*memory"):
        ChannelLayer("memroy://")


def test_missing_client_library_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    class FailingManager:
        def __init__(self, namespace: str, name: str, **kwargs: Any) -> None:
            (entry_point,) = [ep for ep in plugins._entry_points().values() if ep.name == name]
            kwargs["on_load_failure_callback"](
                self, entry_point, ImportError("No module named 'redis'")
            )

    monkeypatch.setattr(plugins, "DriverManager", FailingManager)
    with pytest.raises(BackendNotFound, match=r"pip install 'multilayer\[redis\]'"):
        plugins.load_backend("redis")


def test_a_non_backend_entry_point_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    class WrongManager:
        driver = dict

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

    monkeypatch.setattr(plugins, "DriverManager", WrongManager)
    with pytest.raises(BackendNotFound, match="is not a multilayer Backend"):
        plugins.load_backend("memory")
