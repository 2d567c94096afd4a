"""Bad input: every public method refuses it with an error naming the problem, and loses
nothing that was already queued.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import pytest
from channels.exceptions import MessageTooLarge

from ..exceptions import ForeignChannel
from ..layer import ChannelLayer
from ..serialization import DEFAULT_MAX_MESSAGE_SIZE
from ._util import assert_nothing, recv
from .plugin import Harness

BAD_CHANNELS: list[tuple[Any, str]] = [
    (None, "invalid channel name None"),
    (42, "invalid channel name 42"),
    (b"bytes.name", "invalid channel name b'bytes.name'"),
    (["a"], r"invalid channel name \['a'\]"),
    ("", "invalid channel name ''"),
    ("x" * 100, "invalid channel name 'xxxx"),
    ("has space", "invalid channel name 'has space'"),
    ("tab\there", r"invalid channel name 'tab\\there'"),
    ("ünïcode", "invalid channel name 'ünïcode'"),
    ("semi;colon", "invalid channel name 'semi;colon'"),
    ("two!bangs!", "invalid channel name 'two!bangs!'"),
    ("!leading", "invalid channel name '!leading'"),
    ("bad!suffix space", "invalid channel name 'bad!suffix space'"),
]
BAD_GROUPS: list[tuple[Any, str]] = [
    (None, "invalid group name None"),
    (7, "invalid group name 7"),
    ("", "invalid group name ''"),
    ("g" * 100, "invalid group name 'gggg"),
    ("bang!", "invalid group name 'bang!'"),
    ("sp ace", "invalid group name 'sp ace'"),
    ("ünïcode", "invalid group name 'ünïcode'"),
]


class _Opaque:
    """A value msgpack cannot encode."""


BAD_MESSAGES: list[tuple[Any, type[Exception], str]] = [
    (None, TypeError, "message must be a dict, not NoneType"),
    ("text", TypeError, "message must be a dict, not str"),
    ([("type", "x")], TypeError, "message must be a dict, not list"),
    ({1: "int key"}, TypeError, "message keys must be strings, not int: 1"),
    ({b"type": "x"}, TypeError, "message keys must be strings, not bytes"),
    ({"type": "x", None: 1}, TypeError, "message keys must be strings, not NoneType"),
    ({"obj": _Opaque()}, TypeError, "message is not msgpack-serializable"),
    ({"set": {1, 2}}, TypeError, "message is not msgpack-serializable"),
    ({"huge": 2**64}, TypeError, "message is not msgpack-serializable"),
    ({"nested": {"deep": [_Opaque()]}}, TypeError, "message is not msgpack-serializable"),
    (
        {"blob": b"x" * DEFAULT_MAX_MESSAGE_SIZE},
        MessageTooLarge,
        rf"message of \d+ bytes \(msgpack\) exceeds max_message_size={DEFAULT_MAX_MESSAGE_SIZE}",
    ),
]


async def _expect(call: Callable[[], Awaitable[Any]], error: type[Exception], pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        await call()


async def _bad_calls(layer: ChannelLayer, good_channel: str, group: str) -> int:
    """Every bad call this file knows, each checked for its error; returns how many."""
    calls: list[tuple[Callable[[], Awaitable[Any]], type[Exception], str]] = []
    for name, text in BAD_CHANNELS:
        calls += [
            (partial(layer.send, name, {"type": "x"}), TypeError, text),
            (partial(layer.receive, name), TypeError, text),
            (partial(layer.group_add, group, name), TypeError, text),
            (partial(layer.group_discard, group, name), TypeError, text),
        ]
    for name, text in BAD_GROUPS:
        calls += [
            (partial(layer.group_add, name, good_channel), TypeError, text),
            (partial(layer.group_discard, name, good_channel), TypeError, text),
            (partial(layer.group_send, name, {"type": "x"}), TypeError, text),
            (partial(layer.new_channel, name), TypeError, text),
        ]
    for message, error, text in BAD_MESSAGES:
        calls += [
            (partial(layer.send, good_channel, message), error, text),
            (partial(layer.group_send, group, message), error, text),
        ]
    for call, error, text in calls:
        await _expect(call, error, text)
    return len(calls)


def test_bad_input_raises_named_errors_and_loses_nothing(harness: Harness) -> None:
    async def body() -> None:
        sender, receiver = harness.layer(), harness.layer()
        inbox = await receiver.new_channel()
        await receiver.group_add("conf-bad", inbox)
        queued = [{"type": "queued", "n": n, "data": b"\x00\xff" * n} for n in range(3)]
        for message in queued:
            await sender.send("conf.bad", message)
            await sender.send(inbox, message)
        count = await _bad_calls(sender, "conf.bad", "conf-bad")
        assert count > 100
        # The receiving layer makes bad calls too, on the very channels it waits on.
        await _bad_calls(receiver, inbox, "conf-bad")
        assert [await recv(receiver, "conf.bad") for _ in queued] == queued
        assert [await recv(receiver, inbox) for _ in queued] == queued
        # The membership survived the bad group calls; nothing extra was delivered.
        await sender.group_send("conf-bad", {"type": "after"})
        assert await recv(receiver, inbox) == {"type": "after"}
        await assert_nothing(receiver, inbox, 0.3)
        await assert_nothing(receiver, "conf.bad", 0.3)

    harness.run(body)


def test_receive_of_another_process_channel_is_refused_without_loss(harness: Harness) -> None:
    async def body() -> None:
        owner, stranger = harness.layer(), harness.layer()
        inbox = await owner.new_channel()
        await stranger.send(inbox, {"n": 1})
        with pytest.raises(ForeignChannel, match=re.escape(f"cannot receive from {inbox!r}")):
            await stranger.receive(inbox)
        assert await recv(owner, inbox) == {"n": 1}

    harness.run(body)
