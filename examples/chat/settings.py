"""Django settings of the chat example: the one line that picks the broker is the URL."""

import os

SECRET_KEY = "example-only"
INSTALLED_APPS = ["channels"]
ASGI_APPLICATION = "examples.chat.asgi.application"
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "multilayer.ChannelLayer",
        "CONFIG": {"url": os.environ.get("MULTILAYER_URL", "memory://")},
    }
}
