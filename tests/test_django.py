"""Django Channels uses the layer through CHANNEL_LAYERS alone: a chat room end to end."""

from __future__ import annotations

import asyncio
import os

import pytest

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.chat.settings")


@pytest.fixture(scope="module")
def application() -> object:
    import django

    django.setup()
    from examples.chat.asgi import application

    return application


def test_channel_layers_setting_builds_our_layer(application: object) -> None:
    from channels.layers import get_channel_layer

    import multilayer

    layer = get_channel_layer()
    assert isinstance(layer, multilayer.ChannelLayer)
    assert layer.url.scheme == "memory"


def test_chat_room_between_two_websockets(application: object) -> None:
    from channels.layers import channel_layers
    from channels.testing import WebsocketCommunicator

    async def body() -> None:
        alice = WebsocketCommunicator(application, "/ws/chat/lobby/")
        bob = WebsocketCommunicator(application, "/ws/chat/lobby/")
        assert (await alice.connect())[0] and (await bob.connect())[0]
        await alice.send_json_to({"text": "hello bob"})
        assert await bob.receive_json_from(timeout=5) == {"text": "hello bob"}
        assert await alice.receive_json_from(timeout=5) == {"text": "hello bob"}
        await bob.disconnect()
        await alice.send_json_to({"text": "still there?"})
        assert await alice.receive_json_from(timeout=5) == {"text": "still there?"}
        await alice.disconnect()
        await channel_layers["default"].flush()
        await channel_layers["default"].close()

    asyncio.run(asyncio.wait_for(body(), 30))
