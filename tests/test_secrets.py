"""Credentials never appear in reprs, errors, logs (at DEBUG, every library's) or
conformance records.

A known password goes into URLs and secret options; everything the layer shows is then
searched for it. A Redis server started here requires the password, so one layer
really authenticates with it (and ``multilayer check`` records a run against it); the
shared RabbitMQ refuses it, and dead ports make connections fail.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest

from multilayer import ChannelLayer, MultilayerError
from tests.support.brokers import broker, free_port, require, require_binary, require_module

PASSWORD = "S3cr3t-Pw"
#: Also what would show if the password were percent-encoded or half-masked.
FORBIDDEN = (PASSWORD, "S3cr3t", "cr3t-Pw", "S3cr3t%2DPw")


def assert_clean(*texts: str) -> None:
    for text in texts:
        for secret in FORBIDDEN:
            assert secret not in text, f"{secret!r} leaked in: {text[:300]!r}"


def _error_text(error: BaseException) -> str:
    """The error as a user sees it: str, repr and the whole traceback with its causes."""
    return "\n".join([str(error), repr(error), *traceback.format_exception(error)])


def _dead_port() -> int:
    return free_port()  # nothing listens there right now


def url_forms(port: int) -> list[str]:
    return [
        f"redis://:{PASSWORD}@127.0.0.1:{port}/0",
        f"redis://user:{PASSWORD}@127.0.0.1:{port},127.0.0.1:{port + 1}/3",
        f"rediss://user:{PASSWORD}@127.0.0.1:{port}/0?ssl_cert_reqs=none",
        f"redis+sentinel://:{PASSWORD}@127.0.0.1:{port}/0?service=m&sentinel_password={PASSWORD}",
        f"amqp://guest:{PASSWORD}@127.0.0.1:{port}/%2F?connect_timeout=1",
        f"amqps://guest:{PASSWORD}@127.0.0.1:{port}/vhost?verify=false",
        f"kafka+ssl://user:{PASSWORD}@127.0.0.1:{port}",
    ]


def test_reprs_and_configuration_errors_hide_the_password() -> None:
    for url in url_forms(_dead_port()):
        layer = ChannelLayer(url)
        assert_clean(
            repr(layer),
            str(layer),
            repr(layer.url),
            str(layer.url),
            layer.url.sanitized(),
            repr(layer.settings),
            repr(layer.url.without_query()),
        )
        assert layer.url.render().count(PASSWORD) >= 1  # what the client library gets
        separator = "&" if "?" in url else "?"
        for bad_url, options in [
            (url + separator + "no_such_option=1", {}),
            (url + separator + "capacity=lots", {}),
            (url, {"capacity": "x"}),
            (url, {"expiry": float("nan")}),
            (url.replace("127.0.0.1", "bad host"), {}),
            (url.replace(f":{PASSWORD}@", f":{PASSWORD}/x@"), {}),
            (url.replace(f":{PASSWORD}@", f":{PASSWORD}?x@"), {}),
            (url.replace(f":{PASSWORD}@", f":{PASSWORD}#x@"), {}),
            (url.replace("127.0.0.1:", "127.0.0.1:99999", 1), {}),
            (url + separator + "prefix=a&prefix=b", {}),
            (url.replace("://", ":/", 1), {}),
        ]:
            with pytest.raises(MultilayerError) as caught:
                ChannelLayer(bad_url, **options)
            assert_clean(_error_text(caught.value))


def test_secret_options_are_never_echoed() -> None:
    with pytest.raises(MultilayerError) as caught:
        ChannelLayer(f"zmq://127.0.0.1:1?curve_serverkey={PASSWORD}&curve_secretkey={PASSWORD}")
    assert_clean(_error_text(caught.value))
    with pytest.raises(MultilayerError) as caught:
        ChannelLayer("memory://", symmetric_encryption_keys=[PASSWORD])
    assert_clean(_error_text(caught.value))
    layer = ChannelLayer(f"redis+sentinel://s:26379/0?sentinel_password={PASSWORD}")
    assert_clean(repr(layer), str(layer.url))


async def _fail(layer: ChannelLayer) -> str:
    """Make ``layer`` talk to its broker, which refuses; the error as text."""
    try:
        await asyncio.wait_for(layer.send("secret.q", {"n": 1}), 8)
        await asyncio.wait_for(layer.receive("secret.q"), 8)
    except (MultilayerError, asyncio.TimeoutError, OSError) as error:
        return _error_text(error)
    finally:
        await asyncio.wait_for(layer.close(), 10)
    raise AssertionError(f"{layer!r} reached a broker it should not have")


@pytest.mark.parametrize("scheme", ["redis", "amqp", "kafka"])
def test_failed_connections_hide_the_password_in_errors_and_debug_logs(
    scheme: str, caplog: pytest.LogCaptureFixture
) -> None:
    require_module({"redis": "redis", "amqp": "pika", "kafka": "kafka"}[scheme])
    port = _dead_port()
    url = {
        "redis": f"redis://:{PASSWORD}@127.0.0.1:{port}/0?connect_timeout=1",
        "amqp": f"amqp://guest:{PASSWORD}@127.0.0.1:{port}/%2F?connect_timeout=1",
        "kafka": f"kafka://user:{PASSWORD}@127.0.0.1:{port}",
    }[scheme]
    caplog.set_level(logging.DEBUG)
    try:
        layer = ChannelLayer(url)
    except MultilayerError as error:  # a scheme that refuses credentials says so, cleanly
        assert_clean(_error_text(error))
        return
    text = asyncio.run(_fail(layer))
    assert_clean(text, caplog.text, repr(layer))


def test_wrong_password_on_the_shared_rabbitmq(caplog: pytest.LogCaptureFixture) -> None:
    require_module("pika")
    import socket

    with socket.socket() as sock:
        sock.settimeout(1)
        require(sock.connect_ex(("127.0.0.1", 5672)) == 0, "no RabbitMQ on 127.0.0.1:5672")
    caplog.set_level(logging.DEBUG)
    layer = ChannelLayer(f"amqp://guest:{PASSWORD}@127.0.0.1:5672/%2F?connect_timeout=2")
    text = asyncio.run(_fail(layer))
    assert "ACCESS_REFUSED" in text or "auth" in text.lower(), text[-500:]
    assert_clean(text, caplog.text)


@pytest.fixture
def redis_with_password(tmp_path: Path) -> Iterator[str]:
    require_module("redis")
    port = free_port()
    argv = [require_binary("redis-server"), "--port", str(port), "--bind", "127.0.0.1"]
    argv += ["--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
    argv += ["--requirepass", PASSWORD]
    with broker(argv, port, tmp_path):
        yield f"redis://:{PASSWORD}@127.0.0.1:{port}/0"


def test_real_authentication_and_debug_logs(
    redis_with_password: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    async def body() -> None:
        layer = ChannelLayer(redis_with_password, prefix="secret")
        try:
            inbox = await layer.new_channel()
            await layer.send(inbox, {"n": 1})
            assert await asyncio.wait_for(layer.receive(inbox), 10) == {"n": 1}
            await layer.flush()
        finally:
            await layer.close()
        wrong = ChannelLayer(redis_with_password.replace(PASSWORD, "nope"), prefix="secret")
        assert_clean(await _fail(wrong))

    asyncio.run(asyncio.wait_for(body(), 60))
    assert caplog.records, "nothing was logged: the DEBUG capture is not working"
    assert_clean(caplog.text)


def test_conformance_records_and_output_hide_the_password(
    redis_with_password: str, tmp_path: Path
) -> None:
    for url, passes in [
        (redis_with_password, True),
        (redis_with_password.replace(f":{PASSWORD}@", ":wrong-pass@"), False),
    ]:
        record = tmp_path / "record.json"
        result = subprocess.run(
            [sys.executable, "-m", "multilayer", "check", url, "-k", "msgpack", "--json", record],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert (result.returncode == 0) is passes, result.stdout[-2000:] + result.stderr[-2000:]
        assert_clean(result.stdout, result.stderr)
        if record.exists():
            text = record.read_text()
            assert_clean(text)
            assert json.loads(text)["url"].startswith("redis://127.0.0.1:")
            record.unlink()
        else:
            assert not passes
