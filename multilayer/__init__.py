"""multilayer: one Django Channels layer for Redis, RabbitMQ, Kafka, ZeroMQ and memory.

Pick the broker with a URL::

    CHANNEL_LAYERS = {
        "default": {"BACKEND": "multilayer.ChannelLayer", "CONFIG": {"url": "redis://localhost:6379/0"}}
    }
"""

from .backend import Backend, BrokerStats, Capabilities, LayerSettings
from .capacity import CapacityPolicy
from .exceptions import (
    BackendNotFound,
    BrokerError,
    ChannelFull,
    ConfigurationError,
    ForeignChannel,
    LayerClosed,
    MessageTooLarge,
    MultilayerError,
)
from .layer import ChannelLayer, LayerStats, from_url
from .options import Option
from .url import LayerURL

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendNotFound",
    "BrokerError",
    "BrokerStats",
    "Capabilities",
    "CapacityPolicy",
    "ChannelFull",
    "ChannelLayer",
    "ConfigurationError",
    "ForeignChannel",
    "LayerClosed",
    "LayerSettings",
    "LayerStats",
    "LayerURL",
    "MessageTooLarge",
    "MultilayerError",
    "Option",
    "__version__",
    "from_url",
]
