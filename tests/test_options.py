"""Options from URL queries and keyword arguments: typed, validated, never silently ignored."""

from __future__ import annotations

import re

import pytest

from multilayer import ChannelLayer, ConfigurationError, MessageTooLarge


def test_query_options_are_typed() -> None:
    layer = ChannelLayer("memory://?prefix=chat&capacity=500&expiry=30&group_expiry=7.5")
    assert (layer.prefix, layer.capacity, layer.expiry, layer.group_expiry) == (
        "chat",
        500,
        30.0,
        7.5,
    )


def test_keyword_arguments_override_the_url() -> None:
    layer = ChannelLayer("memory://?capacity=500&prefix=chat", capacity=7)
    assert (layer.capacity, layer.prefix) == (7, "chat")


def test_defaults() -> None:
    layer = ChannelLayer("memory://")
    assert (layer.prefix, layer.expiry, layer.group_expiry, layer.capacity) == (
        "asgi",
        60,
        86400,
        100,
    )
    assert layer.channel_capacity == {}


def test_unknown_option_names_the_valid_ones() -> None:
    with pytest.raises(
        ConfigurationError, match=r"unknown option 'capacty'.*valid options:.*capacity"
    ):
        ChannelLayer("memory://?capacty=5")
    with pytest.raises(ConfigurationError, match="unknown option 'hosts'"):
        ChannelLayer("memory://", hosts=["h"])


@pytest.mark.parametrize(
    ("url", "kwargs", "message"),
    [
        ("memory://?capacity=many", {}, "'capacity' must be an integer, not 'many'"),
        ("memory://?capacity=0", {}, "'capacity' must be >= 1"),
        ("memory://?expiry=-1", {}, "'expiry' must be >= 0.001"),
        ("memory://", {"capacity": "5"}, "'capacity' must be an integer, not '5'"),
        ("memory://", {"capacity": True}, "'capacity' must be an integer"),
        ("memory://", {"expiry": "soon"}, "'expiry' must be a number"),
        ("memory://?prefix=bad!prefix", {}, "'prefix': must be made of ASCII"),
        ("memory://?channel_capacity=5", {}, "cannot be set in the URL"),
        ("memory://", {"channel_capacity": {"a*": 0}}, "must be a positive integer"),
        ("memory://", {"channel_capacity": {3: 5}}, "glob strings or compiled regexes"),
        ("memory://?expiry=nan", {}, "'expiry' must be a finite number, not nan"),
        ("memory://?group_expiry=inf", {}, "'group_expiry' must be a finite number, not inf"),
        ("memory://", {"expiry": float("-inf")}, "'expiry' must be a finite number"),
        ("memory://?max_message_size=63", {}, "'max_message_size' must be >= 64"),
        ("memory://?max_message_size=1MB", {}, "'max_message_size' must be an integer"),
        ("memory://", {"max_message_size": 1.5}, "'max_message_size' must be an integer"),
        ("memory://", {"capacity": None, "prefix": 5}, "'prefix' must be a string, not 5"),
        ("memory://?prefix=", {}, "'prefix': must be made of ASCII"),
        ("memory://?prefix=" + "p" * 100, {}, "'prefix': must be made of ASCII"),
        ("memory://?capacity=1&expiry", {}, "'expiry' must be a number, not ''"),
        ("memory://?symmetric_encryption_keys=", {}, "non-empty list of Fernet keys"),
    ],
)
def test_bad_values_are_named(url: str, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        ChannelLayer(url, **kwargs)  # type: ignore[arg-type]


def test_configuration_errors_are_value_errors() -> None:
    with pytest.raises(ValueError):
        ChannelLayer("memory://?capacity=x")


def test_max_message_size_defaults_to_two_and_a_half_mebibytes_of_msgpack() -> None:
    layer = ChannelLayer("memory://")
    limit = 5 * 512 * 1024
    assert layer.settings.max_message_size == limit
    assert ChannelLayer("memory://?max_message_size=2048").settings.max_message_size == 2048
    # 8 bytes of msgpack framing around the bytes; the 8-byte deadline is not counted.
    assert len(layer._codec.encode({"b": b"x" * (limit - 8)}, 0.0)) == limit + 8
    with pytest.raises(MessageTooLarge, match=f"message of {limit + 1} bytes \\(msgpack\\)"):
        layer._codec.encode({"b": b"x" * (limit - 7)}, 0.0)


def test_unknown_schemes_and_options_name_themselves() -> None:
    with pytest.raises(ConfigurationError, match="no multilayer backend for URL scheme 'nats'"):
        ChannelLayer("nats://h:4222")
    with pytest.raises(ConfigurationError, match=r"unknown option 'heartbeat' for memory://"):
        ChannelLayer("memory://?heartbeat=5")
    with pytest.raises(ConfigurationError, match="unknown option 'Prefix'"):
        ChannelLayer("memory://", Prefix="x")


def test_capacity_rules_apply_to_the_process_queue_and_remember_queues_not_channels() -> None:
    from multilayer.capacity import CapacityPolicy

    policy = CapacityPolicy(100, {"specific.*": 7, "http.*": 3})
    assert policy.for_channel("http.request") == 3
    assert policy.for_channel("other") == 100
    for n in range(1000):  # a server's channels coming and going
        assert policy.for_channel(f"specific.abc!client{n}") == 7
    assert len(policy._cache) == 3
