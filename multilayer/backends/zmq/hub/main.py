"""``multilayer hub``: the command line of the hub."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Iterable
from types import FrameType

import zmq

from ..protocol import DEFAULT_MAX_MESSAGE
from ..security import check_key, is_loopback
from .server import Hub

__all__ = ["main"]

logger = logging.getLogger(__name__.rpartition(".")[0])


def _split(values: Iterable[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multilayer hub",
        description="Run the hub of the zmq:// channel layer backend.",
    )
    parser.add_argument(
        "--bind",
        action="append",
        required=True,
        metavar="ENDPOINT",
        help="ZeroMQ endpoint to listen on, e.g. tcp://127.0.0.1:5599 or ipc:///run/ml.sock "
        "(repeatable, or a comma list)",
    )
    parser.add_argument(
        "--curve-secret-key",
        metavar="Z85",
        help="hub CURVE secret key (40 Z85 characters); default $MULTILAYER_HUB_SECRET_KEY; "
        "turns on encryption",
    )
    parser.add_argument("--curve-secret-key-file", metavar="PATH", help="read the key from PATH")
    parser.add_argument(
        "--curve-allow",
        action="append",
        default=[],
        metavar="Z85",
        help="client public key allowed to connect (repeatable, or a comma list); "
        "default: any client that knows the hub's public key",
    )
    parser.add_argument(
        "--curve-allow-file",
        metavar="PATH",
        help="client public keys allowed to connect, one a line ('# ' begins a comment), "
        "added to --curve-allow; read again on SIGHUP",
    )
    parser.add_argument(
        "--next-bind",
        action="append",
        default=[],
        metavar="ENDPOINT",
        help="endpoint for a second CURVE key while the hub's key rolls (repeatable)",
    )
    parser.add_argument(
        "--next-curve-secret-key-file",
        metavar="PATH",
        help="the second key, served on --next-bind when PATH holds one; SIGHUP reads it, "
        "and --curve-secret-key-file, again (an empty file closes its endpoints)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="listen on a non-loopback TCP address without CURVE: anyone who reaches the "
        "port reads and sends every message",
    )
    parser.add_argument(
        "--peer-timeout",
        type=float,
        default=2.0,
        help="seconds to wait for a process node before parking its messages (default 2)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=100_000,
        help="hard cap on the messages of one queue, whatever capacity clients ask (100000)",
    )
    parser.add_argument(
        "--max-message-size",
        type=int,
        default=DEFAULT_MAX_MESSAGE,
        help=f"largest frame accepted, in bytes (default {DEFAULT_MAX_MESSAGE})",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    return parser


def _secret_key(options: argparse.Namespace) -> bytes | None:
    if options.curve_secret_key_file:
        return _key_file(options.curve_secret_key_file)
    text: str | None = options.curve_secret_key or os.environ.get("MULTILAYER_HUB_SECRET_KEY")
    return _key(text or "")


def _key_file(path: str) -> bytes | None:
    """The secret key in the file at ``path``; None when it is empty."""
    with open(path, encoding="ascii") as file:
        return _key(file.read().strip())


def _key(text: str) -> bytes | None:
    if not text:
        return None
    if check_key(text):
        raise ValueError("a CURVE secret key is 40 Z85 characters")
    return text.encode("ascii")


def _allowed(options: argparse.Namespace) -> list[bytes] | None:
    """The client keys of --curve-allow and --curve-allow-file; None when neither is given."""
    if not options.curve_allow and not options.curve_allow_file:
        return None
    keys = _split(options.curve_allow)
    if options.curve_allow_file:
        with open(options.curve_allow_file, encoding="ascii") as file:
            lines = [line.strip() for line in file]
        # Z85 has "#" but no space: "# " begins a comment, never a key.
        keys += [line for line in lines if line and line != "#" and not line.startswith("# ")]
    wrong = sum(1 for key in keys if check_key(key))
    if wrong:
        raise ValueError(f"{wrong} allowed key(s) are not 40 Z85 characters")
    return [key.encode("ascii") for key in keys]


def _exposed(binds: list[str], secret: bytes | None, insecure: bool) -> str | None:
    """Why the hub must not start: a non-loopback TCP bind without CURVE; None if none."""
    exposed = [bind for bind in binds if not is_loopback(bind)]
    if not exposed or secret is not None:
        return None
    if insecure:
        logger.warning(
            "--insecure: listening on %s without CURVE; anyone who reaches it can read and "
            "send every message of every layer",
            ", ".join(exposed),
        )
        return None
    return (
        f"multilayer hub: refusing to listen on {', '.join(exposed)} without CURVE: anyone "
        "who reaches it could read and send every message. Turn CURVE on with "
        "--curve-secret-key=KEY (and --curve-allow=CLIENT_KEY; see docs/backends/zmq.md), "
        "bind a loopback address or ipc://, or pass --insecure to accept the risk."
    )


def main(argv: list[str] | None = None) -> int:
    """Run a hub until SIGTERM or SIGINT (SIGHUP reads the allow list and key files
    again); the exit status: 2 for a configuration it refuses."""
    options = _parser().parse_args(argv)
    logging.basicConfig(
        level=options.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        secret = _secret_key(options)
        following = options.next_curve_secret_key_file
        next_secret = _key_file(following) if following else None
        allowed = _allowed(options)
    except (OSError, ValueError) as error:
        print(f"multilayer hub: {error}", file=sys.stderr)
        return 2
    if allowed is not None and secret is None:
        raise SystemExit("multilayer hub: --curve-allow needs --curve-secret-key")
    if (options.next_bind or next_secret) and secret is None:
        raise SystemExit("multilayer hub: a key roll (--next-bind) needs CURVE on")
    binds = _split(options.bind)
    refusal = _exposed(binds, secret, options.insecure)
    if refusal is not None:
        print(refusal, file=sys.stderr)
        return 2
    hub = Hub(
        binds,
        secret_key=secret,
        next_binds=_split(options.next_bind),
        next_secret_key=next_secret,
        allowed_keys=allowed,
        peer_timeout=options.peer_timeout,
        max_queue=options.max_queue,
        max_message_size=options.max_message_size,
    )

    def on_signal(number: int, _frame: FrameType | None) -> None:
        logger.info("received %s, stopping", signal.Signals(number).name)
        hub.stop()

    def on_hangup(_number: int, _frame: FrameType | None) -> None:
        try:
            keys = _allowed(options)
            files = (options.curve_secret_key_file, options.next_curve_secret_key_file)
            secrets = {slot: _key_file(path) for slot, path in enumerate(files) if path}
        except (OSError, ValueError) as error:
            logger.error("SIGHUP: keys not read, the old ones stay: %s", error)
            return
        if keys is not None:
            hub.allow(keys)
        for slot, key in secrets.items():
            hub.rekey(slot, key)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hangup)
    try:
        hub.run()
    except zmq.ZMQError as error:
        logger.error("hub failed: %s", error)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
