"""``scripts/broker.sh KIND``: each kind prints a URL a layer works on, and stops on a signal.

Every kind in ``tests/support/brokers.py`` ``KINDS`` runs here, so a kind added there is
tested without a line more. The command's brokers are its own, on free loopback ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from multilayer import ChannelLayer, LayerURL
from tests.support.brokers import KINDS, listening, require
from tests.support.serve import MISSING

COMMAND = Path(__file__).resolve().parent.parent / "scripts" / "broker.sh"
#: seconds a broker may take to answer (a RabbitMQ node boots an Erlang VM)
READY = 150.0
#: seconds the command may take to stop its broker after a signal
STOP = 40.0
#: seconds one layer round trip may take on a broker that just started
ROUND_TRIP = 30.0


class Served:
    """The command running as a subprocess, its standard output read line by line."""

    def __init__(self, kind: str, errors: Path) -> None:
        self.errors = errors
        with open(errors, "wb") as stderr:
            self.process = subprocess.Popen(
                [str(COMMAND), kind],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env={**os.environ, "PYTHON": sys.executable},
            )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def url(self) -> str:
        """The last line printed once the broker answers; skips (fails in CI) when the
        command reports a missing tool."""
        try:
            line = self.lines.get(timeout=READY)
        except queue.Empty:
            pytest.fail(f"no URL within {READY}s; stderr:\n{self.errors.read_text()}")
        if line is None:
            code = self.process.wait(STOP)
            require(code != MISSING, self.errors.read_text().strip())
            pytest.fail(f"exited with {code} before printing a URL:\n{self.errors.read_text()}")
        return line

    def stop(self, number: int) -> int:
        """Send signal ``number``; the exit status, within :data:`STOP` seconds."""
        self.process.send_signal(number)
        try:
            return self.process.wait(STOP)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {STOP}s after signal {number}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP)
        if self.process.stdout is not None:
            self.process.stdout.close()


@contextlib.contextmanager
def served(kind: str, tmp: Path) -> Iterator[Served]:
    command = Served(kind, tmp / "stderr.log")
    try:
        yield command
    finally:
        command.close()


async def round_trip(url: str) -> None:
    layer = ChannelLayer(url)
    try:
        channel = await layer.new_channel()
        await layer.send(channel, {"type": "hello"})
        assert await layer.receive(channel) == {"type": "hello"}
    finally:
        await layer.close()


def assert_closed(url: str) -> None:
    for host, port in LayerURL.parse(url).hosts:
        assert port is not None and not listening(port, host or "127.0.0.1"), (
            f"{host}:{port} still accepts connections"
        )


@pytest.mark.timeout(READY + ROUND_TRIP + 2 * STOP)
@pytest.mark.parametrize("kind", list(KINDS))
def test_serves_a_layer_and_stops_on_sigterm(kind: str, tmp_path: Path) -> None:
    with served(kind, tmp_path) as command:
        url = command.url()
        asyncio.run(asyncio.wait_for(round_trip(url), ROUND_TRIP))
        assert command.stop(signal.SIGTERM) == 0
    assert_closed(url)


def test_ctrl_c_stops_it_too(tmp_path: Path) -> None:
    with served("zmq", tmp_path) as command:
        url = command.url()
        assert command.stop(signal.SIGINT) == 0
    assert_closed(url)
