"""Django integration: a system check of every multilayer entry in ``CHANNEL_LAYERS``.

Enable it by adding the app config to ``INSTALLED_APPS``::

    INSTALLED_APPS = [..., "channels", "multilayer.django.MultilayerConfig"]

Django then reports, when the project starts (``runserver``, ``migrate``, ``check``, ...)
rather than at the first message:

* ``multilayer.E001`` (Error): the layer cannot be built: unknown URL scheme, a scheme
  whose client library is missing, an unknown option or a bad option value;
* ``multilayer.W001`` (Warning): the broker did not answer a connect probe bounded by
  :data:`PROBE_TIMEOUT` seconds. It is a warning because brokers may start after the web
  processes; the layer reconnects on its own.

The probe opens the backend exactly as the layer's first message would (so a RabbitMQ
layer declares its prefix's exchange, a Kafka layer its topic), asks for the broker's
version and closes; a ``memory://`` layer is not probed.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from django.apps import AppConfig, apps  # type: ignore[import-untyped]
from django.conf import settings  # type: ignore[import-untyped]
from django.core import checks  # type: ignore[import-untyped]
from django.utils.module_loading import import_string  # type: ignore[import-untyped]

from .exceptions import MultilayerError
from .layer import ChannelLayer

__all__ = ["PROBE_TIMEOUT", "MultilayerConfig", "check_channel_layers"]

#: Seconds the broker gets to accept a connection and answer one request during checks.
PROBE_TIMEOUT = 3.0


class MultilayerConfig(AppConfig):  # type: ignore[misc]
    """The ``multilayer`` Django app: registers :func:`check_channel_layers`."""

    name = "multilayer"
    label = "multilayer"
    verbose_name = "multilayer channel layer"

    def ready(self) -> None:
        checks.register(check_channel_layers)


def check_channel_layers(
    app_configs: Iterable[AppConfig] | None = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    """Build every multilayer layer of ``settings.CHANNEL_LAYERS`` and probe its broker."""
    if app_configs is not None and apps.get_app_config("multilayer") not in app_configs:
        return []
    messages: list[checks.CheckMessage] = []
    layers: Mapping[str, Any] = getattr(settings, "CHANNEL_LAYERS", None) or {}
    for alias, entry in layers.items():
        where = f"CHANNEL_LAYERS[{alias!r}]"
        try:
            backend = import_string(entry["BACKEND"])
        except (ImportError, KeyError, TypeError):
            continue  # Not ours to judge: Channels reports its own configuration errors.
        if not (isinstance(backend, type) and issubclass(backend, ChannelLayer)):
            continue
        config = entry.get("CONFIG") or {}
        try:
            layer = backend(**config)
        except Exception as error:  # whatever stops the layer from being built is an error
            text = str(error) if isinstance(error, MultilayerError) else repr(error)
            messages.append(
                checks.Error(
                    text,
                    hint="See the multilayer README for URL schemes and options.",
                    obj=where,
                    id="multilayer.E001",
                )
            )
            continue
        if not layer.backend_class.capabilities.multiprocess:
            continue  # An in-process layer has no broker to reach.
        problem = _probe(layer, PROBE_TIMEOUT)
        if problem is not None:
            messages.append(
                checks.Warning(
                    f"the broker at {layer.url.sanitized()} is unreachable: {problem}",
                    hint="Start the broker or fix the URL; the layer will keep reconnecting.",
                    obj=where,
                    id="multilayer.W001",
                )
            )
    return messages


def _probe(layer: ChannelLayer, timeout: float) -> str | None:
    """Connect a fresh backend of ``layer`` and ask the broker's version; None if it worked.

    The probe runs in its own thread and event loop so that it works under a running
    loop too; the caller waits at most ``2 * timeout + 1`` seconds (open and request,
    then close) even when a client library blocks.
    """
    outcome: list[str | None] = []

    async def connect() -> None:
        backend = layer.backend_class(layer.url, layer.settings, layer.backend_options)
        # A backend cleans up after its own failed open(); close() follows a good one only.
        await asyncio.wait_for(backend.open(), timeout)
        try:
            await asyncio.wait_for(backend.broker_version(), timeout)
        finally:
            # The verdict is made; a failing close must not turn it into "unreachable".
            with contextlib.suppress(Exception):
                await asyncio.wait_for(backend.close(), timeout)

    def run() -> None:
        try:
            asyncio.run(connect())
        except asyncio.TimeoutError:
            outcome.append(f"no answer within {timeout:g}s")
        except Exception as error:
            outcome.append(f"{type(error).__name__}: {error}")
        else:
            outcome.append(None)

    thread = threading.Thread(target=run, name="multilayer check probe", daemon=True)
    thread.start()
    thread.join(timeout * 2 + 1)
    return outcome[0] if outcome else f"no answer within {timeout:g}s"
