"""Property-based tests (hypothesis): names, message round trips and undecodable payloads.

The round trips run on every ``--multilayer-url`` backend, with few examples each (real
brokers are slow): one event loop in a thread serves every example of a test, so that
each example costs a send and a receive rather than new connections.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import msgpack
import pytest
from channels.layers import BaseChannelLayer
from hypothesis import assume, given
from hypothesis import strategies as st

from multilayer import ChannelLayer, ConfigurationError, LayerURL
from multilayer.conformance.plugin import Harness
from multilayer.names import MAX_NAME_LENGTH, check_channel_name, check_group_name
from tests.support.looping import BROKER_EXAMPLES, UNHURRIED, LoopThread

NAME_CHARS = st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
GROUP_NAMES = st.text(NAME_CHARS, min_size=1, max_size=MAX_NAME_LENGTH - 1)
CHANNEL_NAMES = st.builds(
    lambda head, tail: head if tail is None else f"{head}!{tail}"[: MAX_NAME_LENGTH - 1],
    st.text(NAME_CHARS, min_size=1, max_size=60),
    st.none() | st.text(NAME_CHARS, max_size=40),
)


# -- names (no broker) -------------------------------------------------------------------


def channels_check(kind: str, name: str) -> bool:
    """Channels' own check of a ``kind`` ("channel" or "group") name; TypeError if refused.

    Channels 4.2.2 renamed ``valid_<kind>_name`` to ``require_valid_<kind>_name``; the
    rules are the same, and pyproject.toml admits releases on both sides.
    """
    layer = BaseChannelLayer()
    check = getattr(layer, f"require_valid_{kind}_name", None) or getattr(
        layer, f"valid_{kind}_name"
    )
    return bool(check(name))


@UNHURRIED
@given(GROUP_NAMES)
def test_valid_group_names_are_accepted_as_channels_accepts_them(name: str) -> None:
    assert check_group_name(name) == name
    assert check_channel_name(name) == name
    assert channels_check("group", name)


@UNHURRIED
@given(CHANNEL_NAMES)
def test_valid_channel_names_are_accepted_as_channels_accepts_them(name: str) -> None:
    assert check_channel_name(name) == name
    assert channels_check("channel", name)


@UNHURRIED
@given(st.text(max_size=120) | st.text(NAME_CHARS | st.sampled_from("! \n\t/:#é€"), max_size=110))
def test_names_channels_refuses_are_refused_with_the_name(name: str) -> None:
    # Nothing Channels itself would refuse gets through (we may refuse a little more).
    try:
        channels_check("channel", name)
        channels_accepts = True
    except TypeError:
        channels_accepts = False
    try:
        check_channel_name(name)
    except TypeError as error:
        assert repr(name)[:50] in str(error)
    else:
        assert channels_accepts, f"{name!r} accepted here but refused by channels"
    try:
        check_group_name(name)
    except TypeError as error:
        assert "invalid group name" in str(error)
    else:
        assert "!" not in name
        assert channels_check("group", name)


def test_the_cache_of_checked_names_stays_bounded_as_channels_churn() -> None:
    from multilayer import names

    for number in range(3 * names._KNOWN_LIMIT):
        assert check_channel_name(f"specific.churn!{number}") == f"specific.churn!{number}"
        assert len(names._KNOWN_CHANNELS) <= names._KNOWN_LIMIT
    # A name met again after the cache emptied is still checked, not taken on trust.
    with pytest.raises(TypeError):
        check_channel_name("specific.churn!0 ")


@UNHURRIED
@given(st.one_of(st.none(), st.integers(), st.binary(), st.lists(st.text()), st.floats()))
def test_names_that_are_not_strings_are_type_errors(name: Any) -> None:
    with pytest.raises(TypeError, match="invalid channel name"):
        check_channel_name(name)
    with pytest.raises(TypeError, match="invalid group name"):
        check_group_name(name)


@UNHURRIED
@given(GROUP_NAMES.map(lambda name: name + "x" * MAX_NAME_LENGTH))
def test_names_of_100_characters_or_more_are_refused(name: str) -> None:
    with pytest.raises(TypeError):
        check_channel_name(name)
    with pytest.raises(TypeError):
        check_group_name(name)


# -- messages on every backend -------------------------------------------------------------

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.binary(max_size=40)
)


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)


VALUES = st.recursive(SCALARS, _containers, max_leaves=20)
MESSAGES = st.dictionaries(st.text(max_size=20), VALUES, max_size=6)


@pytest.fixture
def loop_thread(harness: Harness) -> Iterator[LoopThread]:
    thread = LoopThread()
    try:
        yield thread
    finally:
        # The harness's cleanup flushes and closes its layers in the loop that used them.
        thread.run(harness._cleanup(), 30)
        thread.close()


def test_any_message_round_trips_exactly(harness: Harness, loop_thread: LoopThread) -> None:
    sender, receiver = harness.layer(), harness.layer()
    inbox = loop_thread.run(receiver.new_channel())

    @BROKER_EXAMPLES
    @given(MESSAGES, st.booleans())
    def round_trip(message: dict[str, Any], to_inbox: bool) -> None:
        channel = inbox if to_inbox else "prop.round"

        async def body() -> dict[str, Any]:
            await sender.send(channel, message)
            return await receiver.receive(channel)

        assert loop_thread.run(body()) == message

    round_trip()


def _decodes_as_message(body: bytes) -> bool:
    """Whether msgpack alone reads ``body`` as a map with string keys (a real message)."""
    try:
        value = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception:
        return False
    return isinstance(value, dict) and all(isinstance(key, str) for key in value)


def test_undecodable_payloads_are_logged_dropped_and_receiving_goes_on(
    harness: Harness, loop_thread: LoopThread, caplog: pytest.LogCaptureFixture
) -> None:
    # The backend carries the garbage like any payload (an unexpired deadline and a body
    # that is no message); the core must drop it and deliver the next good message.
    sender, receiver = harness.layer(), harness.layer()
    inbox = loop_thread.run(receiver.new_channel())
    sent = 0

    @BROKER_EXAMPLES
    @given(st.binary(max_size=200), st.booleans())
    def garbage_then_good(body: bytes, to_inbox: bool) -> None:
        nonlocal sent
        assume(not _decodes_as_message(body))
        channel = inbox if to_inbox else "prop.garbage"
        sent += 1

        async def run() -> dict[str, Any]:
            backend = await sender._backend()
            deadline = time.time() + 60
            payload = struct.pack("!d", deadline) + body
            await backend.push(channel, payload, deadline=deadline, capacity=100)
            await sender.send(channel, {"good": sent})
            return await receiver.receive(channel)

        with caplog.at_level(logging.WARNING, logger="multilayer"):
            assert loop_thread.run(run()) == {"good": sent}
        dropped = [r for r in caplog.records if "dropped a malformed message" in r.getMessage()]
        assert dropped, "the dropped payload was not logged"
        # The bytes themselves never reach a WARNING.
        if len(body) >= 12:
            assert all(repr(body[:12])[2:-1] not in r.getMessage() for r in dropped)
        caplog.clear()

    garbage_then_good()
    assert sent > 0


# -- URLs (no broker) ----------------------------------------------------------------------

SCHEMES = st.sampled_from(["redis", "rediss", "amqp", "kafka", "zmq", "memory", "nosuch"])


@UNHURRIED
@given(st.text(max_size=80) | st.builds("{}://{}".format, SCHEMES, st.text(max_size=60)))
def test_any_text_parses_or_is_a_configuration_error(text: str) -> None:
    try:
        url = LayerURL.parse(text)
    except ConfigurationError:
        return
    assert LayerURL.parse(url.render()).hosts == url.hosts


@UNHURRIED
@given(SCHEMES, st.text(max_size=20), st.text(max_size=20).map(lambda p: f"Zq9{p}Zq9"))
def test_any_password_round_trips_and_is_never_shown(scheme: str, user: str, password: str) -> None:
    url = f"{scheme}://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:1/0"
    parsed = LayerURL.parse(url)
    assert (parsed.username, parsed.password) == (user or None, password)
    assert LayerURL.parse(parsed.render()).password == password
    shown = [repr(parsed), str(parsed), parsed.sanitized()]
    try:
        shown.append(repr(ChannelLayer(url)))
    except ConfigurationError as error:  # memory:// takes no host, nosuch:// has no backend
        shown.append(str(error))
    for text in shown:
        assert "Zq9" not in text
