"""The public surface: exports, typing marker, error tree, layer construction."""

from __future__ import annotations

import asyncio
import inspect
import re
import subprocess
import sys
from pathlib import Path

import channels.exceptions
import pytest

import multilayer
from multilayer import ChannelLayer, from_url


def test_all_is_exactly_the_public_names() -> None:
    public = {
        name
        for name, value in vars(multilayer).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert set(multilayer.__all__) == public | {"__version__"}


def test_typed_package() -> None:
    assert (Path(multilayer.__file__).parent / "py.typed").exists()


def test_errors_are_the_channels_errors() -> None:
    assert issubclass(multilayer.ChannelFull, channels.exceptions.ChannelFull)
    assert issubclass(multilayer.MessageTooLarge, channels.exceptions.MessageTooLarge)
    for error in (multilayer.ChannelFull, multilayer.ConfigurationError, multilayer.BrokerError):
        assert issubclass(error, multilayer.MultilayerError)


def test_url_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MULTILAYER_URL", "memory://envstore?capacity=9")
    layer = ChannelLayer()
    assert (layer.url.host, layer.capacity) == ("envstore", 9)
    monkeypatch.delenv("MULTILAYER_URL")
    assert ChannelLayer().url.scheme == "memory"


def test_from_url_is_the_layer() -> None:
    layer = from_url("memory://?prefix=x", capacity=3)
    assert isinstance(layer, ChannelLayer)
    assert (layer.prefix, layer.capacity) == ("x", 3)


def test_repr_hides_the_password() -> None:
    layer = ChannelLayer("memory://user:hunter2@store")
    assert "hunter2" not in repr(layer) and "store" in repr(layer)


def test_construction_needs_no_event_loop_and_no_broker() -> None:
    layer = ChannelLayer("memory://")
    assert layer.extensions == ["groups", "flush"]
    asyncio.run(layer.close())


def test_buffered_messages_survive_a_finished_event_loop() -> None:
    layer = ChannelLayer("memory://adopt", capacity=10)

    async def fill() -> None:
        for i in range(3):
            await layer.send("adopt.me", {"i": i})
        assert await layer.receive("adopt.me") == {"i": 0}

    async def drain() -> list[int]:
        try:
            return [(await layer.receive("adopt.me"))["i"] for _ in range(2)]
        finally:
            await layer.close()

    asyncio.run(fill())
    assert asyncio.run(asyncio.wait_for(drain(), 5)) == [1, 2]


@pytest.mark.parametrize(
    ("message", "named"),
    [
        ({"set": {1, 2}}, "message['set'] is of type set"),
        ({"huge": 2**64}, "message['huge'] is an int outside 64 bits"),
        ({"deep": {"list": [1, object()]}}, "message['deep']['list'][1] is of type object"),
        ({"map": {1j: 1}}, "message['map'] has a key of type complex"),
    ],
)
def test_an_unserializable_value_is_named_by_its_place(
    message: dict[str, object], named: str
) -> None:
    # msgpack's own wording differs between the releases pyproject.toml admits.
    layer = ChannelLayer("memory://")
    with pytest.raises(TypeError, match=re.escape(named)):
        asyncio.run(layer.send("api.check", message))


def test_using_the_layer_never_imports_pytest() -> None:
    # pytest is a dependency for `multilayer check` alone; an application that sends and
    # receives, Django app and system check included, must not load it.
    code = (
        "import asyncio, sys\n"
        "import multilayer, multilayer.django, multilayer.cli\n"
        "layer = multilayer.ChannelLayer('memory://')\n"
        "async def main():\n"
        "    inbox = await layer.new_channel()\n"
        "    await layer.group_add('g', inbox)\n"
        "    await layer.group_send('g', {'type': 'x'})\n"
        "    assert await layer.receive(inbox) == {'type': 'x'}\n"
        "    await layer.close()\n"
        "asyncio.run(main())\n"
        "loaded = {name.split('.')[0] for name in sys.modules}\n"
        "print(sorted(loaded & {'pytest', '_pytest', 'pluggy'}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"
