"""kafka-python's client settings from a layer URL and its options (SASL, TLS), and the
diagnosis of a TLS handshake kafka-python only logs.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Mapping
from typing import Any

from ...toolkit import tls_context
from ...url import LayerURL

__all__ = ["client_config", "tls_problem"]


class _MaskSecrets(logging.Filter):
    """Masks known passwords in a library's log records (kafka-python's admin client logs
    its whole configuration, SASL password included, at DEBUG).
    """

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = message
        for secret in self.secrets:
            masked = masked.replace(secret, "***")
        if masked != message:
            record.msg, record.args = masked, ()
        return True


_MASK = _MaskSecrets()
logging.getLogger("kafka.admin.client").addFilter(_MASK)


def client_config(url: LayerURL, options: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments every kafka-python client of this layer takes."""
    config: dict[str, Any] = {
        "bootstrap_servers": [f"{host}:{port or 9092}" for host, port in url.hosts],
        "client_id": "multilayer",
    }
    tls = url.scheme == "kafka+ssl"
    if url.username is not None:
        config["security_protocol"] = "SASL_SSL" if tls else "SASL_PLAINTEXT"
        config["sasl_mechanism"] = options["sasl_mechanism"]
        config["sasl_plain_username"] = url.username
        config["sasl_plain_password"] = url.password or ""
        if url.password:
            _MASK.secrets.add(url.password)
    elif tls:
        config["security_protocol"] = "SSL"
    if tls:
        # Our own context, always: the one kafka-python builds itself uses
        # ssl.PROTOCOL_TLS, deprecated (a DeprecationWarning on every connection).
        context = tls_context(options)
        config["ssl_context"] = context
        config["ssl_check_hostname"] = context.check_hostname
    return config


def tls_problem(url: LayerURL, context: ssl.SSLContext) -> str | None:
    """Why a TLS handshake with the first broker fails, if it does: kafka-python only
    logs it and then reports the broker as unreachable (blocking)."""
    host, port = url.hosts[0]
    try:
        with (
            socket.create_connection((host, port or 9092), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            # With TLS 1.3 a server checks the client's certificate after the client
            # has finished its handshake, and answers a missing or untrusted one with
            # an alert or by hanging up. A Kafka broker otherwise sends nothing before
            # a request.
            tls.settimeout(0.5)
            if tls.recv(1) == b"":
                return (
                    f"{host}:{port or 9092} closed the connection right after the TLS "
                    "handshake, as a broker requiring a client certificate does when it "
                    "gets none or one it does not trust (ssl_certfile, ssl_keyfile)"
                )
    except ssl.SSLError as error:
        return f"TLS handshake with {host}:{port or 9092} failed: {error}"
    except OSError:
        return None
    return None
