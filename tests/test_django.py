"""Django Channels uses the layer through CHANNEL_LAYERS alone: the chat example in one process.

This is the ``memory://`` form of tests/test_django_processes.py: the same consumers,
view and worker, driven by ``channels.testing`` in this process.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.support.brokers import require_module

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.chat.settings")


@pytest.fixture(scope="module")
def application() -> Any:
    import django

    django.setup()
    from examples.chat.asgi import application

    return application


def run(body: Callable[[], Awaitable[None]]) -> None:
    """Run ``body()`` bounded, then empty and close the memory layer for the next test."""
    from channels.layers import channel_layers

    async def bounded() -> None:
        try:
            await asyncio.wait_for(body(), 30)
        finally:
            await channel_layers["default"].flush()
            await channel_layers["default"].close()

    asyncio.run(bounded())


async def http(application: Any, method: str, path: str, form: bytes = b"") -> dict[str, Any]:
    """One HTTP request through the ASGI app, awaited until the app has finished."""
    from channels.testing import HttpCommunicator

    headers = [(b"content-type", b"application/x-www-form-urlencoded")] if form else []
    request = HttpCommunicator(application, method, path, body=form, headers=headers)
    response: dict[str, Any] = await request.get_response(timeout=10)
    # Django closes the request body file only after the response; let it get there.
    await request.wait(timeout=10)
    return response


def test_channel_layers_setting_builds_our_layer(application: Any) -> None:
    from channels.layers import get_channel_layer

    import multilayer

    layer = get_channel_layer()
    assert isinstance(layer, multilayer.ChannelLayer)
    assert layer.url.scheme == "memory"


def test_chat_room_between_two_websockets(application: Any) -> None:
    from channels.testing import WebsocketCommunicator

    async def body() -> None:
        alice = WebsocketCommunicator(application, "/ws/chat/lobby/?user=alice")
        bob = WebsocketCommunicator(application, "/ws/chat/lobby/?user=bob")
        assert (await alice.connect())[0] and (await bob.connect())[0]
        await alice.send_json_to({"text": "hello bob"})
        expected = {"kind": "message", "user": "alice", "text": "hello bob", "process": os.getpid()}
        assert await bob.receive_json_from(timeout=5) == expected
        assert await alice.receive_json_from(timeout=5) == expected
        await bob.disconnect()
        assert await alice.receive_json_from(timeout=5) == {
            "kind": "left",
            "user": "bob",
            "process": os.getpid(),
        }
        await alice.send_json_to({"text": "still there?"})
        assert (await alice.receive_json_from(timeout=5))["text"] == "still there?"
        await alice.send_json_to({"no": "text"})
        assert (await alice.receive_json_from(timeout=5))["kind"] == "error"
        await alice.disconnect()

    run(body)


def test_announce_view_reaches_the_room_through_the_worker(application: Any) -> None:
    from channels.layers import get_channel_layer
    from channels.testing import WebsocketCommunicator
    from channels.worker import Worker

    from examples.chat.views import ANNOUNCE_CHANNEL

    async def body() -> None:
        worker = Worker(application, [ANNOUNCE_CHANNEL], get_channel_layer())
        serving = asyncio.ensure_future(worker.handle())
        alice = WebsocketCommunicator(application, "/ws/chat/news/?user=alice")
        assert (await alice.connect())[0]
        try:
            response = await http(application, "POST", "/rooms/news/announce", b"text=tea+is+ready")
            assert response["status"] == 202, response
            event = await alice.receive_json_from(timeout=5)
            assert event == {
                "kind": "announcement",
                "user": "announcer",
                "text": "tea is ready",
                "process": os.getpid(),
            }
            response = await http(application, "POST", "/rooms/news/announce")
            assert response["status"] == 400 and b"'text'" in response["body"], response
            assert await alice.receive_nothing(timeout=0.2)
        finally:
            await alice.disconnect()
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)

    run(body)


def test_chat_page_renders_the_room(application: Any) -> None:
    async def body() -> None:
        response = await http(application, "GET", "/rooms/lobby/")
        assert response["status"] == 200
        script = b'<script id="room-name" type="application/json">"lobby"</script>'
        assert script in response["body"]

    run(body)


def test_metrics_endpoint_counts_the_chat(application: Any) -> None:
    from channels.testing import WebsocketCommunicator

    require_module("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    async def scrape() -> dict[str, float]:
        response = await http(application, "GET", "/metrics")
        assert response["status"] == 200, response
        return {
            sample.name: sample.value
            for family in text_string_to_metric_families(response["body"].decode())
            for sample in family.samples
            if sample.labels.get("scheme") == "memory" and sample.labels.get("prefix") == "asgi"
        }

    async def body() -> None:
        before = await scrape()
        alice = WebsocketCommunicator(application, "/ws/chat/metrics/?user=alice")
        assert (await alice.connect())[0]
        for text in ("one", "two"):
            await alice.send_json_to({"text": text})
            assert (await alice.receive_json_from(timeout=5))["text"] == text
        await alice.disconnect()
        after = await scrape()
        assert (
            after["multilayer_group_sends_total"] - before.get("multilayer_group_sends_total", 0)
            == 3
        )
        assert after["multilayer_messages_received_total"] > before.get(
            "multilayer_messages_received_total", 0
        )

    run(body)
