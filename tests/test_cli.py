"""The ``multilayer`` command."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from multilayer import ChannelLayer
from multilayer.cli import main
from multilayer.conformance import suite_test_names


def test_backends_lists_every_scheme(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    for scheme in ("memory", "redis", "rediss", "redis+sentinel", "amqp", "amqps"):
        assert f"\n{scheme} " in out
    for scheme in ("kafka", "kafka+ssl", "zmq", "zmq+ipc"):
        assert f"\n{scheme} " in out


def test_check_records_a_passing_run(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "multilayer",
            "check",
            "memory://",
            "--record",
            "--record-dir",
            str(tmp_path),
            "--json",
            str(tmp_path / "run.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed, 0 failed" in result.stdout
    record = json.loads((tmp_path / "memory.json").read_text())
    assert [test["name"] for test in record["tests"]] == suite_test_names()
    assert record["url"] == "memory://" and record["capabilities"]["multiprocess"] is False
    assert (
        "| `test_channels.py::test_fifo_thousand_messages` | pass |"
        in (tmp_path / "README.md").read_text()
    )


def test_check_fails_when_a_test_fails(tmp_path: Path) -> None:
    # max_message_size=64 makes the round trip of every msgpack type (and others) fail: the
    # exit code says so.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "multilayer",
            "check",
            "memory://?max_message_size=64",
            "-k",
            "every_msgpack_type",
            "--record",
            "--record-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "1 failed" in result.stdout
    assert not (tmp_path / "memory.json").exists()


def test_bad_url_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "nosuch://host"]) == 2
    assert "no multilayer backend for URL scheme 'nosuch'" in capsys.readouterr().err


def test_bench_prints_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "memory://", "--vs", "inmemory", "-n", "200", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "multilayer/inmemory" in out
    assert "(d) group of 100: group_send/s" in out
    assert "-  " not in out.split("\n", 3)[3].split("(a)")[1].split("\n")[0]


def test_hub_subcommand_runs_the_zeromq_hub() -> None:
    from tests.support.brokers import free_port, wait_port

    port = free_port()
    hub = subprocess.Popen(
        [sys.executable, "-m", "multilayer", "hub", "--bind", f"tcp://127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_port(port, 20)
    finally:
        hub.terminate()
        output, _ = hub.communicate(timeout=20)
    assert hub.returncode == 0, output
    assert f"hub listening on tcp://127.0.0.1:{port}" in output


def test_a_plugin_command_without_its_library_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from importlib.metadata import EntryPoint

    import multilayer.plugins

    # As the hub's entry point loads without pyzmq: its module fails to import.
    missing = EntryPoint("hub", "no_such_client_library:main [zmq]", multilayer.plugins.COMMANDS)
    monkeypatch.setattr(multilayer.plugins, "entry_points", lambda group: [missing])
    assert main(["hub", "--bind", "tcp://127.0.0.1:1"]) == 2
    error = capsys.readouterr().err
    assert "'hub' command needs a library that is not installed" in error
    assert "pip install 'multilayer[zmq]'" in error


# -- stats and ping ------------------------------------------------------------------

SHARED_AMQP = "amqp://guest:guest@127.0.0.1:5672/%2F"


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "multilayer", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[int]:
    """A password-protected Redis of this test, on a free port."""
    from tests.support.brokers import broker, free_port, require_binary

    port = free_port()
    argv = [
        require_binary("redis-server"),
        "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--requirepass", "s3cret-pw",
    ]  # fmt: skip
    with broker(argv, port, tmp_path):
        yield port


def test_ping_prints_connect_and_round_trip_times(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ping", "memory://cli-ping", "-n", "5"]) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first.startswith("multilayer ping memory://cli-ping: connected in ")
    assert second.startswith("5 round trips (send + receive on ping.")
    low, median, high = (
        float(second.split(f"{name} ")[1].split(" ms")[0]) for name in ("min", "median", "max")
    )
    assert 0 < low <= median <= high


def test_stats_prints_depths_and_groups(own_redis: int, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"redis://:s3cret-pw@127.0.0.1:{own_redis}/0"

    async def fill() -> str:
        layer = ChannelLayer(url, prefix="clistats")
        for number in range(3):
            await layer.send("chat.worker", {"n": number})
        inbox = await layer.new_channel()
        await layer.group_add("room-1", inbox)
        await layer.group_add("room-1", "chat.worker")
        await layer.close()
        return inbox.partition("!")[0] + "!"

    inbox = asyncio.run(asyncio.wait_for(fill(), 30))
    assert main(["stats", url, "--prefix", "clistats"]) == 0
    out = capsys.readouterr().out
    assert "s3cret-pw" not in out
    assert f"multilayer stats redis://:***@127.0.0.1:{own_redis}/0  prefix=clistats" in out
    rows = {tuple(line.split()) for line in out.splitlines()}
    assert {("chat.worker", "3"), ("room-1", "2")} <= rows
    assert (inbox, "1") not in rows  # nothing was sent to the inbox


def test_stats_says_what_a_broker_cannot_tell(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.support.brokers import require

    require(_listening(5672), "RabbitMQ is not running on 127.0.0.1:5672")
    assert main(["stats", SHARED_AMQP, "--prefix", "clistats"]) == 0
    out = capsys.readouterr().out
    assert "amqp:// cannot report queue depths or group sizes" in out


@pytest.mark.parametrize("scheme", ["redis", "amqp", "kafka", "zmq"])
def test_ping_and_stats_on_every_networked_broker(
    scheme: str, own_redis: int, tmp_path: Path
) -> None:
    from tests.support.brokers import broker, free_port, hub_argv, require

    with contextlib.ExitStack() as stack:
        if scheme == "redis":
            url = f"redis://:s3cret-pw@127.0.0.1:{own_redis}/0"
        elif scheme == "amqp":
            require(_listening(5672), "RabbitMQ is not running on 127.0.0.1:5672")
            url = SHARED_AMQP
        elif scheme == "kafka":
            from tests.support.kafka_broker import tansu

            url = f"kafka://127.0.0.1:{stack.enter_context(tansu(tmp_path)).port}"
        else:
            port = free_port()
            stack.enter_context(broker(hub_argv(port), port, tmp_path))
            url = f"zmq://127.0.0.1:{port}"
        ping = _cli("ping", url, "-n", "3", "--prefix", "cliping")
        assert ping.returncode == 0, ping.stdout + ping.stderr
        assert "3 round trips" in ping.stdout and "median" in ping.stdout
        stats = _cli("stats", url, "--prefix", "cliping")
        assert stats.returncode == 0, stats.stdout + stats.stderr
        assert "prefix=cliping" in stats.stdout
        assert "password" not in stats.stdout + ping.stdout and "s3cret" not in ping.stdout


def _assert_one_line_error(result: subprocess.CompletedProcess[str], *, secret: str = "") -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("multilayer: "), result.stderr
    if secret:
        assert secret not in result.stdout + result.stderr
    return lines[0]


@pytest.mark.parametrize("command", ["ping", "stats"])
@pytest.mark.parametrize("scheme", ["redis", "amqp", "kafka", "zmq"])
def test_an_unreachable_broker_is_one_line_and_exit_1(command: str, scheme: str) -> None:
    from tests.support.brokers import free_port

    url = f"{scheme}://127.0.0.1:{free_port()}"  # nothing listens there
    line = _assert_one_line_error(_cli(command, url, "--timeout", "3"))
    assert url in line


@pytest.mark.parametrize("command", ["ping", "stats"])
def test_bad_rabbitmq_credentials_are_one_line_and_exit_1(command: str) -> None:
    from tests.support.brokers import require

    require(_listening(5672), "RabbitMQ is not running on 127.0.0.1:5672")
    url = "amqp://guest:wrong-pw-123@127.0.0.1:5672/%2F"
    line = _assert_one_line_error(_cli(command, url, "--timeout", "10"), secret="wrong-pw-123")
    assert "ACCESS_REFUSED" in line and "guest:***@" in line


@pytest.mark.parametrize("command", ["ping", "stats"])
def test_bad_redis_password_is_one_line_and_exit_1(command: str, own_redis: int) -> None:
    url = f"redis://:wrong-pw-456@127.0.0.1:{own_redis}/0"
    line = _assert_one_line_error(_cli(command, url, "--timeout", "5"), secret="wrong-pw-456")
    assert "invalid" in line.lower() or "WRONGPASS" in line


def test_stats_watch_refreshes_until_ctrl_c() -> None:
    watch = subprocess.Popen(
        [sys.executable, "-m", "multilayer", "stats", "memory://", "--watch", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell may start background jobs with SIGINT ignored; Ctrl-C must reach this one.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert watch.stdout is not None
        headers = 0
        deadline = time.monotonic() + 30
        while headers < 3 and time.monotonic() < deadline:
            headers += watch.stdout.readline().startswith("multilayer stats memory://")
        assert headers == 3
        watch.send_signal(signal.SIGINT)
        _, errors = watch.communicate(timeout=20)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait(10)
    assert watch.returncode == 0 and "Traceback" not in errors, errors
