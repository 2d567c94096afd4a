"""symmetric_encryption_keys: Fernet in the core codec, the same on every backend.

Round trips, key rotation, unknown keys and unencrypted senders run on every
``--multilayer-url`` backend; tampering and what the broker stores are checked on the raw
bytes of a Redis server this module starts.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from multilayer import ChannelLayer, ConfigurationError, MessageTooLarge
from multilayer.conformance._util import assert_nothing, recv
from multilayer.conformance.plugin import Harness
from multilayer.serialization import Codec, largest_payload
from tests.support.brokers import private_redis, require_module

fernet = require_module("cryptography.fernet")

OLD, NEW, OTHER = (fernet.Fernet.generate_key().decode() for _ in range(3))
SECRET_TEXT = "plaintext-that-must-never-reach-the-broker"


def _dropped(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if "dropped a malformed message" in record.getMessage()
    ]


# -- the codec (no broker) ----------------------------------------------------------------


def test_codec_encrypts_the_body_and_keeps_the_deadline_readable() -> None:
    codec = Codec(max_size=1 << 20, keys=[NEW])
    deadline = time.time() + 60
    payload = codec.encode({"text": SECRET_TEXT, "blob": b"\x00\x01"}, deadline)
    assert SECRET_TEXT.encode() not in payload
    assert Codec(max_size=1 << 20).decode(payload, "c") is None  # not msgpack without the key
    from multilayer.serialization import deadline_of

    assert deadline_of(payload) == deadline
    assert codec.decode(payload, "c") == {"text": SECRET_TEXT, "blob": b"\x00\x01"}


def test_codec_rotation_encrypts_with_the_first_key_and_decrypts_with_any() -> None:
    before, during, after = (
        Codec(max_size=1 << 20, keys=keys) for keys in ([OLD], [NEW, OLD], [NEW])
    )
    deadline = time.time() + 60
    old_payload = before.encode({"n": 1}, deadline)
    new_payload = during.encode({"n": 2}, deadline)
    assert during.decode(old_payload, "c") == {"n": 1}
    assert after.decode(new_payload, "c") == {"n": 2}
    assert before.decode(new_payload, "c") is None
    assert after.decode(old_payload, "c") is None


def test_codec_rejects_tampering_and_logs_without_the_bytes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    codec = Codec(max_size=1 << 20, keys=[NEW])
    payload = codec.encode({"n": 1}, time.time() + 60)
    flipped_body = payload[:40] + bytes([payload[40] ^ 1]) + payload[41:]
    later_deadline = Codec(max_size=1 << 20).encode({}, time.time() + 600)[:8] + payload[8:]
    with caplog.at_level(logging.WARNING, logger="multilayer"):
        assert codec.decode(flipped_body, "chan") is None
        assert codec.decode(later_deadline, "chan") is None
        assert codec.decode(payload[:-1], "chan") is None
        assert Codec(max_size=1 << 20, keys=[OTHER]).decode(payload, "chan") is None
    messages = _dropped(caplog)
    assert len(messages) == 4
    assert all("failed authentication" in message for message in messages)
    assert "the deadline was changed" in messages[1]
    assert all(payload[8:30].decode() not in message for message in messages)


@pytest.mark.parametrize("limit", [64, 1000, 300_000])
def test_max_message_size_counts_msgpack_before_encryption(limit: int) -> None:
    plain, encrypted = Codec(max_size=limit), Codec(max_size=limit, keys=[NEW])
    # {"b": bytes} is 4 bytes of msgpack plus the bin's length prefix (2, 3 or 5 bytes).
    prefix = 2 if limit - 6 < 256 else 3 if limit - 7 < 65536 else 5
    largest, too_large = {"b": b"x" * (limit - 3 - prefix)}, {"b": b"x" * (limit - 2 - prefix)}
    for codec in (plain, encrypted):
        payload = codec.encode(largest, 0.0)
        assert len(payload) == largest_payload(limit, encrypted=codec.encrypted)
        assert codec.decode(payload, "c") == largest
        with pytest.raises(MessageTooLarge, match=f"of {limit + 1} bytes"):
            codec.encode(too_large, 0.0)


@pytest.mark.parametrize(
    ("keys", "problem"),
    [
        ([], "must be a non-empty list of Fernet keys"),
        ("", "must be a non-empty list of Fernet keys"),
        (42, "must be a non-empty list of Fernet keys"),
        ([NEW, 42], "key #1 must be a string, not int"),
        (["not-a-key"], "key #0 is not a Fernet key"),
        ([NEW, NEW[:-2] + "=="], "key #1 is not a Fernet key"),
    ],
)
def test_bad_keys_are_named_by_position_never_shown(keys: object, problem: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(problem)) as caught:
        ChannelLayer("memory://", symmetric_encryption_keys=keys)
    assert NEW not in str(caught.value) and NEW[:-2] not in str(caught.value)
    assert "not-a-key" not in str(caught.value)


def test_keys_in_the_url_are_comma_separated_and_masked() -> None:
    layer = ChannelLayer(f"memory://?symmetric_encryption_keys={NEW},{OLD}&prefix=enc")
    assert layer._codec.encrypted
    payload = layer._codec.encode({"n": 1}, time.time() + 60)
    assert Codec(max_size=1 << 20, keys=[NEW]).decode(payload, "c") == {"n": 1}
    for text in (repr(layer), str(layer.url), layer.url.sanitized()):
        assert NEW not in text and OLD not in text
    with pytest.raises(ConfigurationError) as caught:
        ChannelLayer(f"memory://?symmetric_encryption_keys={NEW},nope")
    assert NEW not in str(caught.value) and "nope" not in str(caught.value)


# -- every backend ------------------------------------------------------------------------


def test_encrypted_round_trip_on_every_backend(harness: Harness) -> None:
    async def body() -> None:
        sender = harness.layer(symmetric_encryption_keys=[NEW])
        receiver = harness.layer(symmetric_encryption_keys=[NEW])
        inbox = await receiver.new_channel()
        await receiver.group_add("enc-group", inbox)
        message = {"text": SECRET_TEXT, "bytes": b"\xff" * 300, "n": [1, 2.5, None]}
        await sender.send("enc.chan", message)
        await sender.send(inbox, message)
        await sender.group_send("enc-group", message)
        assert await recv(receiver, "enc.chan") == message
        assert [await recv(receiver, inbox) for _ in range(2)] == [message, message]

    harness.run(body)


def test_rotation_on_every_backend(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        old_only = harness.layer(symmetric_encryption_keys=[OLD])
        rotating = harness.layer(symmetric_encryption_keys=[NEW, OLD])
        new_only = harness.layer(symmetric_encryption_keys=[NEW])
        # Before the rollout completes: old senders, rotating receivers.
        await old_only.send("enc.rot", {"from": "old"})
        assert await recv(rotating, "enc.rot") == {"from": "old"}
        # Rotating senders encrypt with the new key: the old-only layer cannot read it.
        await rotating.send("enc.rot", {"from": "rotating"})
        assert await recv(new_only, "enc.rot") == {"from": "rotating"}
        await rotating.send("enc.rot", {"from": "rotating", "n": 2})
        with caplog.at_level(logging.WARNING, logger="multilayer"):
            await assert_nothing(old_only, "enc.rot", 0.5)
        assert _dropped(caplog)

    harness.run(body)


def test_unknown_key_and_plaintext_are_dropped_and_logged_on_every_backend(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        stranger = harness.layer(symmetric_encryption_keys=[OTHER])
        plain = harness.layer()
        friend = harness.layer(symmetric_encryption_keys=[NEW])
        receiver = harness.layer(symmetric_encryption_keys=[NEW])
        inbox = await receiver.new_channel()
        with caplog.at_level(logging.WARNING, logger="multilayer"):
            for channel in ("enc.mixed", inbox):
                await stranger.send(channel, {"from": "stranger"})
                await plain.send(channel, {"from": "plain"})
                await friend.send(channel, {"from": "friend"})
                assert await recv(receiver, channel) == {"from": "friend"}
        messages = _dropped(caplog)
        assert len(messages) == 4, messages
        assert all("failed authentication" in message for message in messages)

    harness.run(body)


# -- what the broker sees ---------------------------------------------------------------


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    with private_redis(tmp_path) as url:
        yield url


def test_the_broker_never_sees_plaintext_and_tampering_is_rejected(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    import redis

    async def body() -> None:
        layer = ChannelLayer(redis_url, prefix="enc", symmetric_encryption_keys=[NEW])
        client = redis.Redis.from_url(redis_url)
        try:
            await layer.send("enc.raw", {"text": SECRET_TEXT})
            await layer.send("enc.raw", {"text": "second"})
            await layer.send("enc.raw", {"text": "third"})
            stored = client.lrange("enc:q:enc.raw", 0, -1)
            assert len(stored) == 3
            assert all(SECRET_TEXT.encode() not in element for element in stored)
            assert all(b"second" not in element and b"third" not in element for element in stored)
            # Elements are "<suffix>\n<payload>"; flip one bit of the first token's body.
            first = bytearray(stored[0])
            first[30] ^= 1
            client.lset("enc:q:enc.raw", 0, bytes(first))
            # And move the second one's deadline (outside the token) by a minute.
            second = stored[1]
            cut = second.index(b"\n") + 1
            moved = Codec(max_size=1 << 20).encode({}, time.time() + 120)[:8]
            client.lset("enc:q:enc.raw", 1, second[:cut] + moved + second[cut + 8 :])
            with caplog.at_level(logging.WARNING, logger="multilayer"):
                assert await asyncio.wait_for(layer.receive("enc.raw"), 10) == {"text": "third"}
            assert len(_dropped(caplog)) == 2
        finally:
            client.close()
            await layer.close()

    asyncio.run(asyncio.wait_for(body(), 60))
