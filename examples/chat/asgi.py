"""ASGI entry point of the chat example (``daphne examples.chat.asgi:application``).

The ``channel`` protocol is what ``runworker chat-announce`` serves.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.chat.settings")
django_application = get_asgi_application()

from channels.routing import ChannelNameRouter, ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path  # noqa: E402

from .consumers import AnnounceConsumer, ChatConsumer  # noqa: E402
from .views import ANNOUNCE_CHANNEL  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_application,
        "websocket": URLRouter([path("ws/chat/<slug:room>/", ChatConsumer.as_asgi())]),
        "channel": ChannelNameRouter({ANNOUNCE_CHANNEL: AnnounceConsumer.as_asgi()}),
    }
)
