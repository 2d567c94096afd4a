"""The Django system check of multilayer.django: bad CHANNEL_LAYERS are reported at startup."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.brokers import free_port, require_module

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.chat.settings")


@pytest.fixture(scope="module", autouse=True)
def django_ready() -> None:
    import django

    django.setup()


@pytest.fixture
def fast_probe(monkeypatch: pytest.MonkeyPatch) -> float:
    """A short probe timeout, so that the unreachable cases stay quick."""
    import multilayer.django

    monkeypatch.setattr(multilayer.django, "PROBE_TIMEOUT", 1.0)
    return 1.0


def layers(config: dict[str, Any], backend: str = "multilayer.ChannelLayer") -> Any:
    """A context in which ``CHANNEL_LAYERS`` holds one layer, ``default``."""
    from django.test.utils import override_settings

    return override_settings(CHANNEL_LAYERS={"default": {"BACKEND": backend, "CONFIG": config}})


def messages(config: dict[str, Any], backend: str = "multilayer.ChannelLayer") -> list[Any]:
    """What Django's check framework reports about ``config``, multilayer's messages only."""
    from django.core.checks import run_checks

    with layers(config, backend):
        return [m for m in run_checks() if m.id.startswith("multilayer.")]


def test_the_app_registers_the_check() -> None:
    from django.core.checks import registry

    from multilayer.django import check_channel_layers

    assert check_channel_layers in registry.registry.get_checks()


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"url": "nosuch://localhost"}, "'nosuch'"),
        ({"url": "memory://?bogus=1"}, "'bogus'"),
        ({"url": "memory://", "capcity": 10}, "'capcity'"),
        ({"url": "memory://?capacity=0"}, "capacity"),
        ({"url": "redis://127.0.0.1:6379/0?expiry=soon"}, "expiry"),
        ({"url": "redis://127.0.0.1:port/0"}, "bad port"),
        ({"url": 6379}, "must be a string"),
    ],
    ids=[
        "unknown-scheme",
        "unknown-url-option",
        "unknown-config-key",
        "bad-value",
        "bad-type",
        "bad-port",
        "not-a-url",
    ],
)
def test_bad_url_or_config_is_an_error(config: dict[str, Any], named: str) -> None:
    from django.core.checks import ERROR

    started = time.monotonic()
    (message,) = messages(config)
    assert (message.id, message.level, message.obj) == (
        "multilayer.E001",
        ERROR,
        "CHANNEL_LAYERS['default']",
    )
    assert named in message.msg
    assert time.monotonic() - started < 1.0, "a configuration error needs no connection"


def test_check_command_fails_at_startup_on_an_error() -> None:
    from django.core.management import call_command
    from django.core.management.base import SystemCheckError

    with layers({"url": "nosuch://localhost"}), pytest.raises(SystemCheckError, match="nosuch"):
        call_command("check")


@pytest.mark.parametrize(
    ("scheme", "module"),
    [("redis", "redis"), ("amqp", "pika"), ("kafka", "kafka"), ("zmq", "zmq")],
)
def test_unreachable_broker_is_a_warning(scheme: str, module: str, fast_probe: float) -> None:
    from django.core.checks import WARNING

    require_module(module)
    port = free_port()  # nothing listens there
    started = time.monotonic()
    (message,) = messages({"url": f"{scheme}://127.0.0.1:{port}"})
    elapsed = time.monotonic() - started
    assert (message.id, message.level) == ("multilayer.W001", WARNING)
    assert f"127.0.0.1:{port}" in message.msg and "unreachable" in message.msg
    assert elapsed < fast_probe * 2 + 2, f"the probe took {elapsed:.1f}s"


def test_credentials_never_appear_in_a_warning(fast_probe: float) -> None:
    require_module("redis")
    (message,) = messages({"url": f"redis://:s3cret@127.0.0.1:{free_port()}/0"})
    assert "s3cret" not in message.msg


def test_a_reachable_broker_passes(layer_url: str) -> None:
    from multilayer import ChannelLayer

    prefix = "check" + secrets.token_hex(4)
    assert messages({"url": layer_url, "prefix": prefix}) == []

    async def flush() -> None:  # what the probe's open() declared, e.g. RabbitMQ's exchange
        layer = ChannelLayer(layer_url, prefix=prefix)
        try:
            await asyncio.wait_for(layer.flush(), 20)
        finally:
            await asyncio.wait_for(layer.close(), 10)

    asyncio.run(flush())


def test_other_layer_backends_are_left_to_channels() -> None:
    assert messages({}, backend="channels.layers.InMemoryChannelLayer") == []


@pytest.mark.parametrize("command", [["check"], ["runworker", "chat-announce"]])
def test_manage_commands_refuse_to_start_on_a_bad_url(command: list[str]) -> None:
    root = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "MULTILAYER_URL": "nosuch://localhost",
        "DJANGO_SETTINGS_MODULE": "examples.chat.settings",
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-m", "django", *command],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "multilayer.E001" in done.stderr and "'nosuch'" in done.stderr, done.stderr
