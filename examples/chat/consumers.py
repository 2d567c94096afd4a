"""A chat room consumer, unchanged from any Channels tutorial: the layer is configuration."""

from __future__ import annotations

from typing import Any

from channels.generic.websocket import AsyncJsonWebsocketConsumer


class ChatConsumer(AsyncJsonWebsocketConsumer):  # type: ignore[misc]
    """Joins the room named in the URL route and relays every message to the room."""

    async def connect(self) -> None:
        self.room = "chat-" + self.scope["url_route"]["kwargs"]["room"]
        await self.channel_layer.group_add(self.room, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        await self.channel_layer.group_discard(self.room, self.channel_name)

    async def receive_json(self, content: dict[str, Any], **kwargs: Any) -> None:
        await self.channel_layer.group_send(
            self.room, {"type": "chat.message", "text": content["text"]}
        )

    async def chat_message(self, event: dict[str, Any]) -> None:
        await self.send_json({"text": event["text"]})
