"""CURVE keys: checking them, this process's key pair, and setting up client sockets."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.utils.z85

__all__ = ["Curve", "check_key", "process_keys"]


def check_key(value: str) -> str | None:
    if not value:
        return None
    try:
        valid = len(value) == 40 and len(zmq.utils.z85.decode(value)) == 32
    except (ValueError, KeyError, UnicodeEncodeError):
        valid = False
    # Z85 uses '&', '+', '#', '%', '?' and '/': in a URL they must be percent-encoded.
    return None if valid else "a CURVE key is 40 Z85 characters (percent-encode it in a URL)"


@dataclass(frozen=True)
class Curve:
    """CURVE keys of this process: the hub's public key and our own key pair."""

    server_key: bytes
    public_key: bytes
    secret_key: bytes

    def client(self, sock: zmq.Socket[Any], server_key: bytes) -> None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public_key)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret_key)


_keys_lock = threading.Lock()
_keys: list[tuple[bytes, bytes]] = []


def process_keys() -> tuple[bytes, bytes]:
    """A CURVE key pair made once per process, when the URL names none."""
    with _keys_lock:
        if not _keys:
            _keys.append(zmq.curve_keypair())
        return _keys[0]
