"""A layer in a separate OS process, driven by the multiprocess conformance tests.

``python -m multilayer.conformance.worker ROLE URL PREFIX OPTIONS_JSON [ARG]`` prints one
JSON line per event on standard output:

* ``drain CHANNEL``: receive from CHANNEL until a ``{"stop": true}`` message; print
  ``{"ready": true}`` first and ``{"got": [...]}`` at the end.
* ``inbox GROUP``: make a process-specific channel, add it to GROUP, print
  ``{"channel": NAME}``, then receive until a stop message and print ``{"got": [...]}``.
* ``hold``: make a process-specific channel, print ``{"channel": NAME}``, then never
  receive (a process whose consumer is stuck, until it is killed).
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from ..layer import ChannelLayer


def _say(**event: Any) -> None:
    print(json.dumps(event), flush=True)


async def _collect(layer: ChannelLayer, channel: str) -> list[int]:
    got: list[int] = []
    while True:
        message = await layer.receive(channel)
        if message.get("stop"):
            return got
        got.append(message["i"])


async def _main(role: str, url: str, prefix: str, options: dict[str, Any], arg: str) -> None:
    layer = ChannelLayer(url, prefix=prefix, **options)
    try:
        if role == "drain":
            _say(ready=True)
            _say(got=await _collect(layer, arg))
        elif role == "inbox":
            channel = await layer.new_channel()
            await layer.group_add(arg, channel)
            _say(channel=channel)
            _say(got=await _collect(layer, channel))
        elif role == "hold":
            _say(channel=await layer.new_channel())
            await asyncio.Event().wait()
        else:
            raise SystemExit(f"unknown role {role!r}")
    finally:
        await layer.close()


def main(argv: list[str] | None = None) -> None:
    """Entry point: see the module docstring."""
    role, url, prefix, options, arg = argv or sys.argv[1:]
    asyncio.run(asyncio.wait_for(_main(role, url, prefix, json.loads(options), arg), 120))


if __name__ == "__main__":
    main()
