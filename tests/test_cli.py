"""The ``multilayer`` command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    from brokers import free_port, wait_port

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
