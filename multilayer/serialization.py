"""How messages travel: an 8-byte expiry deadline followed by the msgpack body.

``max_message_size`` counts the msgpack bytes of a message, what the application sent,
never the deadline header nor the encryption overhead: those are the layer's business,
and a limit that moved with them would refuse a message with encryption on that it
carries with encryption off. Brokers must then admit more than ``max_message_size``;
:func:`largest_payload` says how much, and every backend sizes its broker and client
limits from it, in one place.

The deadline (seconds since the epoch, as a big-endian double) stays readable without
decoding the body, so brokers' scripts and the core can drop expired messages cheaply.
With ``symmetric_encryption_keys`` the body is a Fernet token of the deadline and the
msgpack bytes: the broker sees only the deadline, and a changed deadline fails
authentication like a changed body.

Whatever arrives from a broker is untrusted: :meth:`Codec.decode` turns anything that is
not a payload this layer could have made into a logged warning and ``None``, never an
exception, so a receive loop carries on with the next message.
"""

from __future__ import annotations

import logging
import math
import struct
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import msgpack

from .exceptions import ConfigurationError, MessageTooLarge

if TYPE_CHECKING:
    from cryptography.fernet import MultiFernet

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "Codec",
    "MsgpackSerializer",
    "Serializer",
    "check_encryption_keys",
    "deadline_of",
    "largest_payload",
    "pack",
    "unpack",
    "unpack_message",
]

logger = logging.getLogger("multilayer")

_DEADLINE = struct.Struct("!d")
HEADER_SIZE = _DEADLINE.size

#: The default ``max_message_size``: 2.5 MiB of msgpack. The Channels spec asks every layer
#: to carry messages of up to 1 MB as JSON, and msgpack takes at most 2.25 times a value's
#: compact JSON size (a float is 9 bytes against 4 for ``0.0,`` in JSON; the table in
#: README's Options has the other types), so this admits every such message.
DEFAULT_MAX_MESSAGE_SIZE = 5 * 512 * 1024

#: Fernet's fixed overhead before base64: version (1), timestamp (8), IV (16), HMAC (32).
_FERNET_FIXED = 1 + 8 + 16 + 32
_AES_BLOCK = 16


def largest_payload(max_message_size: int, *, encrypted: bool) -> int:
    """The largest payload a layer with ``max_message_size`` hands to its broker.

    That is the deadline header plus the msgpack body, or with encryption the header
    plus the Fernet token of header and body (PKCS7-padded to whole AES blocks, then
    URL-safe base64 with padding): about 4/3 of the body plus 110 bytes. Backends size
    their broker's and client's limits with this, so that every message the size check
    admits also gets through the broker.
    """
    if not encrypted:
        return HEADER_SIZE + max_message_size
    padded = ((HEADER_SIZE + max_message_size) // _AES_BLOCK + 1) * _AES_BLOCK
    token = (_FERNET_FIXED + padded + 2) // 3 * 4
    return HEADER_SIZE + token


class Serializer(Protocol):
    """Turns a message dict into bytes and back."""

    def dumps(self, message: dict[str, Any]) -> bytes: ...

    def loads(self, data: bytes) -> dict[str, Any]: ...


class MsgpackSerializer:
    """msgpack with bin/str kept apart, so bytes and str survive the round trip."""

    def __init__(self) -> None:
        # A Packer is reused (it is twice as fast as packb) but is not thread-safe.
        self._local = threading.local()

    def dumps(self, message: dict[str, Any]) -> bytes:
        try:
            packer = self._local.packer
        except AttributeError:
            packer = self._local.packer = msgpack.Packer(use_bin_type=True)
        try:
            data: bytes = packer.pack(message)
        except (TypeError, ValueError, OverflowError) as error:
            packer.reset()
            where = _unpackable(message, "message")
            raise TypeError(f"message is not msgpack-serializable: {where or error}") from None
        return data

    def loads(self, data: bytes) -> dict[str, Any]:
        message: dict[str, Any] = msgpack.unpackb(data, raw=False, strict_map_key=False)
        return message


DEFAULT_SERIALIZER = MsgpackSerializer()

_SCALARS = (type(None), bool, float, str, bytes, bytearray)


def _unpackable(value: Any, path: str) -> str | None:
    """Where in ``value`` msgpack fails, such as "message['a'][1] is of type set", or None.

    Only called after a failure: msgpack's own messages differ between releases and do
    not always name the type.
    """
    if isinstance(value, _SCALARS):
        return None
    if isinstance(value, int):
        return None if -(2**63) <= value < 2**64 else f"{path} is an int outside 64 bits"
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (*_SCALARS, int)):
                return f"{path} has a key of type {type(key).__name__}"
            found = _unpackable(item, f"{path}[{key!r}]")
            if found:
                return found
        return None
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = _unpackable(item, f"{path}[{index}]")
            if found:
                return found
        return None
    return f"{path} is of type {type(value).__name__}"


def check_encryption_keys(keys: Any) -> tuple[str, ...]:
    """``keys`` as a tuple of Fernet keys; ConfigurationError naming the bad one by position.

    Accepts a list or tuple of keys, or one string of comma-separated keys (the URL form).
    Never shows a key: a wrong one may be a real key with a typo.
    """
    if isinstance(keys, str):
        keys = [key for key in keys.split(",") if key.strip()]
    if not isinstance(keys, (list, tuple)) or not keys:
        raise ConfigurationError(
            "option 'symmetric_encryption_keys' must be a non-empty list of Fernet keys "
            f"(or a comma-separated string of them), not a {type(keys).__name__}"
        )
    fernet = _fernet_module()
    checked = []
    for index, key in enumerate(keys):
        if not isinstance(key, (str, bytes)):
            raise ConfigurationError(
                f"option 'symmetric_encryption_keys': key #{index} must be a string, "
                f"not {type(key).__name__}"
            )
        text = key.decode("ascii", "replace") if isinstance(key, bytes) else key
        try:
            fernet.Fernet(text.strip())
        except (ValueError, TypeError):
            raise ConfigurationError(
                f"option 'symmetric_encryption_keys': key #{index} is not a Fernet key "
                "(32 random bytes in URL-safe base64, 44 characters; make one with "
                "cryptography.fernet.Fernet.generate_key())"
            ) from None
        checked.append(text.strip())
    return tuple(checked)


def _fernet_module() -> Any:
    try:
        from cryptography import fernet
    except ImportError:
        raise ConfigurationError(
            "option 'symmetric_encryption_keys' needs the cryptography package: "
            "pip install 'multilayer[crypto]'"
        ) from None
    return fernet


class Codec:
    """Payloads of one layer: size limit, optional encryption, defensive decoding.

    ``keys`` are Fernet keys: messages are encrypted with the first and decrypted with
    any of them, so a new key is rolled out by putting it first while the old one still
    decrypts what is in flight.
    """

    def __init__(
        self,
        *,
        max_size: int,
        keys: Sequence[str] = (),
        serializer: Serializer = DEFAULT_SERIALIZER,
    ) -> None:
        self.max_size = max_size
        self.serializer = serializer
        self._cipher: MultiFernet | None = None
        self._invalid_token: type[Exception] = Exception
        if keys:
            fernet = _fernet_module()
            self._cipher = fernet.MultiFernet([fernet.Fernet(key) for key in keys])
            self._invalid_token = fernet.InvalidToken

    @property
    def encrypted(self) -> bool:
        """Whether message bodies are encrypted."""
        return self._cipher is not None

    def encode(self, message: dict[str, Any], deadline: float) -> bytes:
        """The payload of ``message``.

        MessageTooLarge when its msgpack form exceeds ``max_size`` bytes, checked before
        encryption: the limit is on what the application sent (see the module docstring).
        """
        body = self.serializer.dumps(message)
        if len(body) > self.max_size:
            raise MessageTooLarge(
                f"message of {len(body)} bytes (msgpack) exceeds max_message_size={self.max_size}"
            )
        header = _DEADLINE.pack(deadline)
        if self._cipher is not None:
            body = self._cipher.encrypt(header + body)
        return header + body

    def decode(self, payload: bytes, channel: str) -> dict[str, Any] | None:
        """The message of ``payload``, or None (logged) when it is not one of ours."""
        try:
            body = payload[HEADER_SIZE:]
            if len(payload) < HEADER_SIZE:
                raise ValueError("shorter than the deadline header")
            if self._cipher is not None:
                try:
                    plain = self._cipher.decrypt(body)
                except self._invalid_token:
                    raise ValueError(
                        "failed authentication (tampered, or encrypted with an unknown key)"
                    ) from None
                if plain[:HEADER_SIZE] != payload[:HEADER_SIZE]:
                    raise ValueError("failed authentication (the deadline was changed)")
                body = plain[HEADER_SIZE:]
            message = self.serializer.loads(body)
            if type(message) is not dict:
                raise ValueError(f"body is a {type(message).__name__}, not a map")
            for key in message:
                if type(key) is not str:
                    raise ValueError("body has keys that are not strings")
        except Exception as error:  # msgpack and cryptography raise many types for garbage
            log_malformed(channel, len(payload), error)
            return None
        return message


def log_malformed(where: str, size: int, error: BaseException | str) -> None:
    """Warn that a malformed message or frame was dropped (one wording, never its bytes)."""
    reason = error if isinstance(error, str) else _describe(error)
    logger.warning("dropped a malformed message on %r (%d bytes): %s", where, size, reason)


def _describe(error: BaseException) -> str:
    # Errors of our own checks say what was wrong; a library's may quote the bytes.
    if type(error) is ValueError:
        return str(error)
    return f"undecodable ({type(error).__name__})"


def pack(
    message: dict[str, Any],
    deadline: float,
    *,
    max_size: int,
    serializer: Serializer = DEFAULT_SERIALIZER,
) -> bytes:
    """The unencrypted payload of ``message``; MessageTooLarge when its msgpack form
    exceeds ``max_size`` bytes."""
    return Codec(max_size=max_size, serializer=serializer).encode(message, deadline)


def unpack(
    payload: bytes, serializer: Serializer = DEFAULT_SERIALIZER
) -> tuple[float, dict[str, Any]]:
    """The deadline and message of an unencrypted payload made by :func:`pack`."""
    return _DEADLINE.unpack_from(payload)[0], serializer.loads(payload[HEADER_SIZE:])


def unpack_message(payload: bytes, serializer: Serializer = DEFAULT_SERIALIZER) -> dict[str, Any]:
    """The message of an unencrypted payload made by :func:`pack`."""
    return serializer.loads(payload[HEADER_SIZE:])


def deadline_of(payload: bytes) -> float:
    """The expiry deadline of a payload, without decoding its body.

    A payload too short to hold one never expires here: it travels on to
    :meth:`Codec.decode`, which logs and drops it, rather than vanishing unseen.
    """
    try:
        deadline: float = _DEADLINE.unpack_from(payload)[0]
    except struct.error:
        return math.inf
    return deadline
