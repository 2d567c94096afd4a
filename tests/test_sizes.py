"""What ``max_message_size`` counts, and why its default admits 1 MiB of JSON.

The Channels spec asks every layer to carry messages of up to 1 MB as JSON. The limit
counts msgpack bytes, so the default must cover the worst msgpack/JSON ratio: a float,
9 bytes in msgpack against 4 for ``0.0,`` in JSON, makes it 2.25. The property test checks
the bound on arbitrary JSON-able values; the worst cases are then checked at full size,
and :func:`largest_payload` against real Fernet tokens, since every backend sizes its
broker limits with it.
"""

from __future__ import annotations

import json
import math
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multilayer.conformance._util import message_of
from multilayer.serialization import DEFAULT_MAX_MESSAGE_SIZE, Codec, largest_payload
from tests.support.brokers import require_module

fernet = require_module("cryptography.fernet")

MIB = 1024 * 1024
KEY = fernet.Fernet.generate_key().decode()


def _json_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":")).encode())


def _msgpack_size(value: Any) -> int:
    return len(msgpack.packb(value, use_bin_type=True))


# Every JSON type; integers within msgpack's range (larger ones are a TypeError on send).
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=60,
)


@settings(max_examples=500, deadline=None)
@given(JSON_VALUES)
def test_msgpack_is_at_most_two_and_a_quarter_times_json(value: Any) -> None:
    # The +1 is the separator every value but the last of a container has in JSON (a lone
    # "0.0" is 3 bytes against 9). Containers of 65,536 entries or more take half a byte
    # more each, which stays far below the default's slack.
    assert _msgpack_size(value) <= 2.25 * (_json_size(value) + 1)


def _filled(make: Any, unit_json: int) -> dict[str, Any]:
    """A message {"type", "v": [make(), ...]} whose compact JSON is just under 1 MiB."""
    overhead = _json_size({"type": "t", "v": []})
    return {"type": "t", "v": [make() for _ in range((MIB - overhead + 1) // unit_json)]}


@pytest.mark.parametrize(
    ("make", "unit_json"),
    [
        (lambda: 0.0, 4),  # the worst: 9 bytes of msgpack for "0.0,"
        (lambda: math.nan, 4),
        (lambda: -(2**63), 21),
        (lambda: None, 5),
        (lambda: {}, 3),
        (lambda: "", 3),
        (lambda: [0.0], 6),
    ],
    ids=["float", "nan", "int64", "null", "map", "str", "nested"],
)
def test_one_mebibyte_of_json_fits_the_default(make: Any, unit_json: int) -> None:
    message = _filled(make, unit_json)
    assert _json_size(message) <= MIB
    assert _msgpack_size(message) <= DEFAULT_MAX_MESSAGE_SIZE
    encrypted = Codec(max_size=DEFAULT_MAX_MESSAGE_SIZE, keys=[KEY])
    assert len(encrypted.encode(message, 0.0)) <= largest_payload(
        DEFAULT_MAX_MESSAGE_SIZE, encrypted=True
    )


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=64, max_value=70_000))
def test_largest_payload_is_the_exact_fernet_size(limit: int) -> None:
    message = message_of(limit)
    assert _msgpack_size(message) == limit
    for keys, encrypted in (([KEY], True), ([], False)):
        payload = Codec(max_size=limit, keys=keys).encode(message, 0.0)
        assert len(payload) == largest_payload(limit, encrypted=encrypted)


def test_the_default_and_what_brokers_must_admit() -> None:
    assert DEFAULT_MAX_MESSAGE_SIZE == 2_621_440
    # The figures docs/backends/*.md quote.
    assert largest_payload(DEFAULT_MAX_MESSAGE_SIZE, encrypted=False) == 2_621_448
    assert largest_payload(DEFAULT_MAX_MESSAGE_SIZE, encrypted=True) == 3_495_360
