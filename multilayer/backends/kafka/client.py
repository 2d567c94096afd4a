"""kafka-python's client settings from a layer URL and its options (SASL, TLS), the
diagnosis of a TLS handshake kafka-python only logs, and the broker's release as its
features tell it.
"""

from __future__ import annotations

import io
import logging
import socket
import ssl
import time
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from kafka.client_async import KafkaClient
from kafka.errors import KafkaError
from kafka.protocol.api_versions import ApiVersionsRequest
from kafka.protocol.types import CompactArray, CompactString, Int16, TaggedFields

from ...toolkit import tls_context
from ...url import LayerURL

__all__ = ["broker_release", "client_config", "describe_features", "tls_problem"]


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
        # kafka-python doubles its wait between refused connections up to 30 s: a broker
        # back after 30 s down was reached 24 s later. The Java client's cap, 1 s, keeps
        # that at about a second, at one connection attempt a second during an outage.
        "reconnect_backoff_max_ms": 1000,
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


#: ``metadata.version`` feature levels and the Kafka release each came with (Kafka's
#: ``MetadataVersion``, read from the 4.4.0 jars); KRaft brokers report the levels they
#: support and the one in use in their ApiVersions answer, but never their release.
_METADATA_VERSIONS = {
    1: "3.0-IV1", 2: "3.1-IV0", 3: "3.2-IV0", 4: "3.3-IV0", 5: "3.3-IV1", 6: "3.3-IV2",
    7: "3.3-IV3", 8: "3.4-IV0", 9: "3.5-IV0", 10: "3.5-IV1", 11: "3.5-IV2",
    12: "3.6-IV0", 13: "3.6-IV1", 14: "3.6-IV2", 15: "3.7-IV0", 16: "3.7-IV1",
    17: "3.7-IV2", 18: "3.7-IV3", 19: "3.7-IV4", 20: "3.8-IV0", 21: "3.9-IV0",
    22: "4.0-IV0", 23: "4.0-IV1", 24: "4.0-IV2", 25: "4.0-IV3", 26: "4.1-IV0",
    27: "4.1-IV1", 28: "4.2-IV0", 29: "4.2-IV1", 30: "4.3-IV0", 31: "4.4-IV0",
    32: "4.4-IV1", 33: "4.4-IV2", 34: "4.5-IV0",
}  # fmt: skip

#: Tags of ApiVersions' response (v3 and later) that carry features.
_SUPPORTED, _FINALIZED = 0, 2

_SUPPORTED_FEATURES = CompactArray(
    ("name", CompactString("utf-8")),
    ("min_version", Int16),
    ("max_version", Int16),
    ("_tagged_fields", TaggedFields),
)
#: Finalized features put the highest level first.
_FINALIZED_FEATURES = CompactArray(
    ("name", CompactString("utf-8")),
    ("max_version_level", Int16),
    ("min_version_level", Int16),
    ("_tagged_fields", TaggedFields),
)


def _metadata_version(raw: bytes | None, array: CompactArray, field: int) -> int | None:
    if raw is None:
        return None
    for feature in array.decode(io.BytesIO(raw)) or ():
        if feature[0] == "metadata.version":
            return int(feature[field])
    return None


def describe_features(tagged: Mapping[int, bytes]) -> str | None:
    """What the features of an ApiVersions answer say about the broker: its release, as
    the highest ``metadata.version`` its software supports, and the level in use (lower
    until an upgraded cluster is finalized). None: the broker lists no such feature
    (ZooKeeper-era brokers and most Kafka-protocol emulators)."""
    supported = _metadata_version(tagged.get(_SUPPORTED), _SUPPORTED_FEATURES, 2)
    if supported is None:
        return None

    newest = max(_METADATA_VERSIONS)

    def name(level: int) -> str:
        if level > newest:
            return f"level {level}, newer than {_METADATA_VERSIONS[newest]}"
        return _METADATA_VERSIONS.get(level, f"level {level}")

    if supported in _METADATA_VERSIONS:
        described = "Kafka " + _METADATA_VERSIONS[supported].split("-")[0]
    else:
        described = f"Kafka newer than {_METADATA_VERSIONS[newest].split('-')[0]}"
    in_use = _metadata_version(tagged.get(_FINALIZED), _FINALIZED_FEATURES, 1)
    if in_use is not None:
        described += f", metadata.version {name(in_use)}"
    return described


def _own_version() -> str:
    """This package's version, as brokers log it for the clients they serve."""
    try:
        return version("multilayer")
    except PackageNotFoundError:
        return "unknown"


def broker_release(config: Mapping[str, Any], timeout: float = 5.0) -> str | None:
    """Ask one broker for its features (blocking: run it in a thread); see
    :func:`describe_features`. None when the broker's answer names no release."""
    try:
        client = KafkaClient(**config)
    except KafkaError:
        return None  # no broker answered: the caller says what it knows without one
    try:
        node = client.least_loaded_node()
        deadline = time.monotonic() + timeout
        while node is None or not client.ready(node):
            if time.monotonic() > deadline:
                return None
            client.poll(timeout_ms=100)
            node = node if node is not None else client.least_loaded_node()
        if client.get_api_versions().get(ApiVersionsRequest[3].API_KEY, (0, 0))[1] < 3:
            return None
        request = ApiVersionsRequest[3](
            client_software_name="multilayer",
            client_software_version=_own_version(),
            _tagged_fields={},
        )
        future = client.send(node, request)
        client.poll(future=future, timeout_ms=int(timeout * 1000))
        if not future.succeeded():
            return None
        return describe_features(future.value._tagged_fields)
    finally:
        client.close()
