"""The chat example's consumers: a room over WebSocket, and the worker behind ``announce``.

Nothing here names a broker: the layer is configuration. Every event a client gets
carries the id of the process that produced it (the sender's server, or the worker), so
that a client can see that messages crossed processes; the tests check exactly that.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import parse_qs

from channels.consumer import AsyncConsumer
from channels.generic.websocket import AsyncJsonWebsocketConsumer


def room_group(room: str) -> str:
    """The layer group of a chat room."""
    return "chat-" + room


class ChatConsumer(AsyncJsonWebsocketConsumer):  # type: ignore[misc]
    """One WebSocket in a room (``/ws/chat/ROOM/?user=NAME``): the room is a group.

    Clients send ``{"text": ...}``; every member of the room, in any server process,
    receives ``{"kind": "message", "user", "text", "process"}``. Leaving the room tells
    the others with ``{"kind": "left", "user", "process"}``.
    """

    async def connect(self) -> None:
        query = parse_qs(self.scope["query_string"].decode())
        self.user = query.get("user", ["anonymous"])[0][:40]
        self.group = room_group(self.scope["url_route"]["kwargs"]["room"])
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        await self.channel_layer.group_discard(self.group, self.channel_name)
        # Sent after the discard completed, so a client seeing it knows the group is left.
        await self.channel_layer.group_send(
            self.group,
            {"type": "chat.event", "kind": "left", "user": self.user, "process": os.getpid()},
        )

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        text = content.get("text") if isinstance(content, dict) else None
        if not isinstance(text, str) or not text.strip():
            await self.send_json({"kind": "error", "error": 'send {"text": "..."}'})
            return
        await self.channel_layer.group_send(
            self.group,
            {
                "type": "chat.event",
                "kind": "message",
                "user": self.user,
                "text": text,
                "process": os.getpid(),
            },
        )

    async def chat_event(self, event: dict[str, Any]) -> None:
        await self.send_json({key: value for key, value in event.items() if key != "type"})


class AnnounceConsumer(AsyncConsumer):  # type: ignore[misc]
    """The worker of the ``chat-announce`` normal channel: posts announcements to rooms."""

    async def chat_announce(self, message: dict[str, Any]) -> None:
        await self.channel_layer.group_send(
            room_group(message["room"]),
            {
                "type": "chat.event",
                "kind": "announcement",
                "user": "announcer",
                "text": message["text"],
                "process": os.getpid(),
            },
        )
