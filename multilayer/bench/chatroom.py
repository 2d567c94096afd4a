"""The chat room that ``multilayer bench --scenarios r`` serves from real daphne processes.

``daphne multilayer.bench.chatroom:application``. Every WebSocket joins one room (a layer
group) on connect and leaves it on disconnect; each text frame a client sends is
``group_send`` to the room, and every member forwards it to its WebSocket unchanged. The
frame is passed through untouched so that the servers do the same work whatever the
layer, and the bench measures the layer rather than a JSON codec.

The layer is configuration, read from the environment the bench sets:
``MULTILAYER_BENCH_BACKEND`` (the Channels ``BACKEND`` dotted path) and
``MULTILAYER_BENCH_CONFIG`` (its ``CONFIG`` as JSON), so the same application runs
multilayer and its peers.
"""

from __future__ import annotations

import json
import os
from typing import Any

import django  # type: ignore[import-untyped]
from django.conf import settings  # type: ignore[import-untyped]

from .room import BACKEND_ENV, CONFIG_ENV

__all__ = ["ROOM", "RoomConsumer", "application"]

#: The one group every client joins.
ROOM = "bench-room"

if not settings.configured:
    settings.configure(
        CHANNEL_LAYERS={
            "default": {
                "BACKEND": os.environ.get(BACKEND_ENV, "multilayer.ChannelLayer"),
                "CONFIG": json.loads(os.environ.get(CONFIG_ENV, "{}")),
            }
        },
        # The consumer closes stale database connections around each event; a dummy
        # database makes that a no-op instead of an ImproperlyConfigured error.
        DATABASES={},
        USE_TZ=True,
    )
    django.setup()

# Channels' consumer modules read the settings on import, so they come after configure().
from channels.generic.websocket import AsyncWebsocketConsumer  # noqa: E402
from channels.routing import ProtocolTypeRouter  # noqa: E402


class RoomConsumer(AsyncWebsocketConsumer):  # type: ignore[misc]
    """One member of the room: joins before accepting, so a client that is connected has
    joined; relays every text frame to the room and every room event to its socket."""

    async def connect(self) -> None:
        await self.channel_layer.group_add(ROOM, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        await self.channel_layer.group_discard(ROOM, self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if text_data is not None:
            await self.channel_layer.group_send(ROOM, {"type": "room.message", "text": text_data})

    async def room_message(self, event: dict[str, Any]) -> None:
        await self.send(text_data=event["text"])


#: The ASGI application: every WebSocket path is the room; there is no HTTP.
application = ProtocolTypeRouter({"websocket": RoomConsumer.as_asgi()})
