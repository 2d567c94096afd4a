"""Backend discovery: one stevedore entry point per URL scheme in ``multilayer.backends``.

A backend may also bring ``multilayer`` subcommands (the ZeroMQ hub does): one entry
point per command name in ``multilayer.commands``, naming a ``main(argv) -> int``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any, NoReturn

from stevedore import DriverManager

from .backend import Backend
from .exceptions import BackendNotFound

__all__ = [
    "COMMANDS",
    "NAMESPACE",
    "BackendInfo",
    "command_names",
    "installed_backends",
    "load_backend",
    "load_command",
]

NAMESPACE = "multilayer.backends"
COMMANDS = "multilayer.commands"


@dataclass(frozen=True)
class BackendInfo:
    """One registered scheme, as ``multilayer backends`` shows it."""

    scheme: str
    target: str
    extra: str | None
    problem: str | None

    @property
    def available(self) -> bool:
        """True when the backend and its client library import."""
        return self.problem is None


def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=NAMESPACE)}


def _install_hint(ep: EntryPoint) -> str:
    extras = ep.extras
    return f"pip install 'multilayer[{extras[0]}]'" if extras else "reinstall its package"


def load_backend(scheme: str) -> type[Backend]:
    """The backend class registered for ``scheme``; BackendNotFound naming the fix if none."""
    registered = _entry_points()

    def missing(names: Any) -> NoReturn:
        close = difflib.get_close_matches(scheme, list(registered), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise BackendNotFound(
            f"no multilayer backend for URL scheme {scheme!r}{hint} "
            f"Installed schemes: {', '.join(sorted(registered)) or 'none'}"
        )

    def failed(_manager: Any, ep: EntryPoint, error: BaseException) -> NoReturn:
        if isinstance(error, ImportError) and not (error.name or "").startswith("multilayer."):
            raise BackendNotFound(
                f"URL scheme {scheme!r} needs a client library that is not installed "
                f"({error}); {_install_hint(ep)}"
            ) from error
        raise BackendNotFound(
            f"backend for URL scheme {scheme!r} failed to load: {error}"
        ) from error

    if scheme not in registered:
        missing([scheme])
    manager: DriverManager[Any] = DriverManager(
        NAMESPACE,
        scheme,
        invoke_on_load=False,
        on_load_failure_callback=failed,
        on_missing_entrypoints_callback=missing,
    )
    backend = manager.driver
    if not (isinstance(backend, type) and issubclass(backend, Backend)):
        raise BackendNotFound(
            f"entry point {scheme!r} in {NAMESPACE} is not a multilayer Backend: {backend!r}"
        )
    return backend


def installed_backends() -> list[BackendInfo]:
    """Every registered scheme, and whether it loads."""
    result = []
    for scheme, ep in sorted(_entry_points().items()):
        problem = None
        try:
            load_backend(scheme)
        except BackendNotFound as error:
            problem = str(error)
        result.append(
            BackendInfo(scheme, ep.value.split()[0], next(iter(ep.extras), None), problem)
        )
    return result


def command_names() -> list[str]:
    """The ``multilayer`` subcommands plugins register."""
    return sorted({ep.name for ep in entry_points(group=COMMANDS)})


def load_command(name: str) -> Callable[[list[str]], int]:
    """The ``main`` of subcommand ``name``; BackendNotFound naming the extra if it lacks one."""
    found = [ep for ep in entry_points(group=COMMANDS) if ep.name == name]
    if not found:
        raise BackendNotFound(f"no multilayer command {name!r}")
    try:
        command: Callable[[list[str]], int] = found[0].load()
    except ImportError as error:
        if (error.name or "").startswith("multilayer."):
            raise
        raise BackendNotFound(
            f"the {name!r} command needs a library that is not installed ({error}); "
            f"{_install_hint(found[0])}"
        ) from error
    return command
