"""Run the chat example with one command: ``python -m examples.chat [--port 8000]``.

It serves the app with daphne and runs the ``chat-announce`` worker in the same process,
which is what ``memory://`` (the default layer, one process only) needs. With a broker
(``MULTILAYER_URL=redis://...``) the same command works, and so do separate processes:
``daphne examples.chat.asgi:application`` any number of times, plus
``python -m django runworker chat-announce``.
"""

from __future__ import annotations

import argparse
import os
import threading

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.chat.settings")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.chat", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()

    import django
    from django.core.management import call_command

    django.setup()
    call_command("check")  # a bad MULTILAYER_URL stops here, before serving anything

    from channels.layers import get_channel_layer
    from channels.worker import Worker
    from daphne.cli import CommandLineInterface

    from .asgi import application
    from .views import ANNOUNCE_CHANNEL

    worker = Worker(application, [ANNOUNCE_CHANNEL], get_channel_layer())
    threading.Thread(target=worker.run, name="chat-announce worker", daemon=True).start()
    print(f"chat on http://{args.host}:{args.port}/ (layer {get_channel_layer()!r})", flush=True)
    CommandLineInterface().run(
        ["--bind", args.host, "--port", str(args.port), "examples.chat.asgi:application"]
    )


if __name__ == "__main__":
    main()
