"""The exceptions multilayer raises.

Every error of this package derives from :class:`MultilayerError`::

    MultilayerError
     ├── ConfigurationError (also ValueError)   bad URL, option or value
     │    └── BackendNotFound                    no plugin for a URL scheme, or its extra missing
     ├── ChannelFull (also channels.exceptions.ChannelFull)
     ├── MessageTooLarge (also channels.exceptions.MessageTooLarge)
     ├── ForeignChannel (also ValueError)       receive() on another process's channel
     ├── LayerClosed                            the layer was used after close() in a loop
     └── BrokerError                            the broker failed; the client error is __cause__

Invalid channel names, group names and messages raise :class:`TypeError`, as the Channels
layer specification requires; the offending value is part of the message.
"""

from __future__ import annotations

from channels import exceptions as _channels_exceptions

__all__ = [
    "BackendNotFound",
    "BrokerError",
    "ChannelFull",
    "ConfigurationError",
    "ForeignChannel",
    "LayerClosed",
    "MessageTooLarge",
    "MultilayerError",
]


class MultilayerError(Exception):
    """Base class of every error raised by multilayer."""


class ConfigurationError(MultilayerError, ValueError):
    """A layer URL, option or option value is invalid."""


class BackendNotFound(ConfigurationError):
    """No backend is installed for a URL scheme."""


class ChannelFull(MultilayerError, _channels_exceptions.ChannelFull):  # type: ignore[misc]
    """The channel holds ``capacity`` messages already; the message was not sent."""


class MessageTooLarge(MultilayerError, _channels_exceptions.MessageTooLarge):  # type: ignore[misc]
    """The serialized message is larger than the layer's ``max_message_size``."""


class ForeignChannel(MultilayerError, ValueError):
    """A process-specific channel was received from by a layer that did not create it."""


class LayerClosed(MultilayerError):
    """A waiting ``receive()`` was ended because the layer was closed."""


class BrokerError(MultilayerError):
    """The broker or its client library failed; the original error is ``__cause__``."""
