"""Backend discovery by URL scheme through stevedore entry points."""

from __future__ import annotations

import json
import subprocess
import sys
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


#: The client library each extra installs: what a venv without that extra lacks.
CLIENT_OF_EXTRA = {"redis": "redis", "rabbitmq": "pika", "kafka": "kafka", "zmq": "zmq"}

# Run in a fresh interpreter, where nothing has imported the client or a backend yet:
# ``None`` in sys.modules makes every import of the client fail as if it were missing.
_WITHOUT_CLIENT = """
import contextlib, io, json, sys
sys.modules[sys.argv[1]] = None
from multilayer.cli import main
from multilayer.exceptions import BackendNotFound
from multilayer.plugins import load_backend
problems = {}
for scheme in sys.argv[2:]:
    try:
        load_backend(scheme)
    except BackendNotFound as error:
        problems[scheme] = str(error)
table = io.StringIO()
with contextlib.redirect_stdout(table):
    main(["backends"])
print(json.dumps({"problems": problems, "table": table.getvalue()}))
"""


def _schemes_by_extra() -> dict[str, list[str]]:
    schemes: dict[str, list[str]] = {}
    for scheme, entry_point in plugins._entry_points().items():
        if entry_point.module.startswith("multilayer.") and entry_point.extras:
            schemes.setdefault(entry_point.extras[0], []).append(scheme)
    return schemes


def test_every_built_in_extra_names_its_client_library() -> None:
    assert sorted(_schemes_by_extra()) == sorted(CLIENT_OF_EXTRA)


@pytest.mark.parametrize("extra", sorted(CLIENT_OF_EXTRA))
def test_a_missing_client_library_names_the_extra_for_every_scheme(extra: str) -> None:
    """Each scheme of the extra fails to load with the pip command, whether its backend
    imports the client at the top or would only import it later, and ``multilayer
    backends`` reports it unavailable with the same command."""
    schemes = _schemes_by_extra()[extra]
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_CLIENT, CLIENT_OF_EXTRA[extra], *schemes],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    report = json.loads(done.stdout)
    install = f"pip install 'multilayer[{extra}]'"
    assert sorted(report["problems"]) == sorted(schemes)
    for scheme, problem in report["problems"].items():
        assert f"URL scheme {scheme!r} needs a client library that is not installed" in problem
        assert problem.endswith(install)
    rows = {line.split()[0]: line for line in report["table"].splitlines()[1:]}
    for scheme in schemes:
        assert "unavailable:" in rows[scheme] and rows[scheme].endswith(install), rows[scheme]
    assert rows["memory"].split()[-1] == "ok"


def test_a_non_backend_entry_point_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    class WrongManager:
        driver = dict

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

    monkeypatch.setattr(plugins, "DriverManager", WrongManager)
    with pytest.raises(BackendNotFound, match="is not a multilayer Backend"):
        plugins.load_backend("memory")
