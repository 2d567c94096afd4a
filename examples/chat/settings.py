"""Django settings of the chat example: the one line that picks the broker is the URL."""

import os
from pathlib import Path

SECRET_KEY = "example-only"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]
INSTALLED_APPS = [
    "channels",
    # Reports a bad MULTILAYER_URL, or an unreachable broker, when the project starts.
    "multilayer.django.MultilayerConfig",
]
ROOT_URLCONF = "examples.chat.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [Path(__file__).parent / "templates"],
    }
]
ASGI_APPLICATION = "examples.chat.asgi.application"
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "multilayer.ChannelLayer",
        "CONFIG": {"url": os.environ.get("MULTILAYER_URL", "memory://")},
    }
}
USE_TZ = True
TIME_ZONE = "UTC"
