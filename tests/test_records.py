"""The committed conformance records match the suite and hold no failure."""

from __future__ import annotations

from pathlib import Path

import pytest

from multilayer.conformance import suite_test_names
from multilayer.conformance.records import load_records, write_matrix

RUNS = Path(__file__).parent.parent / "conformance_runs"
EXPECTED_SCHEMES = {"memory", "redis", "amqp", "kafka", "zmq"}


def test_every_builtin_backend_has_a_record() -> None:
    assert {record["scheme"] for record in load_records(RUNS)} >= EXPECTED_SCHEMES


@pytest.mark.parametrize("record", load_records(RUNS), ids=lambda r: str(r["scheme"]))
def test_record_lists_the_current_suite_and_passes(record: dict[str, object]) -> None:
    tests = record["tests"]
    assert isinstance(tests, list)
    assert [test["name"] for test in tests] == suite_test_names(), (
        f"regenerate: multilayer check {record['url']} --record"
    )
    failed = [test["name"] for test in tests if test["outcome"] not in ("passed", "skipped")]
    assert not failed
    for test in tests:
        if test["outcome"] == "skipped":
            assert "capabilities." in test["reason"], "a skip must name the capability"


def test_matrix_is_up_to_date(tmp_path: Path) -> None:
    for path in RUNS.glob("*.json"):
        (tmp_path / path.name).write_text(path.read_text())
    write_matrix(tmp_path)
    assert (tmp_path / "README.md").read_text() == (RUNS / "README.md").read_text()
