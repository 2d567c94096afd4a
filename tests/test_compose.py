"""docker-compose.yml, checked without Docker: the compose-spec schema, then references.

No Docker engine runs in CI, so nothing here starts a container: check-jsonschema validates
the file against the compose-spec JSON schema it ships, and the tests below check what a
schema cannot (service references, healthchecks, the build context, the test entry point).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.brokers import require

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
BROKERS = {"redis": "redis", "rabbitmq": "rabbitmq", "kafka": "kafka", "zmq": "zmq-hub"}


def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    checker = shutil.which("check-jsonschema") or str(
        Path(sys.executable).with_name("check-jsonschema")
    )
    require(
        Path(checker).exists(), "check-jsonschema is not installed (pip install multilayer[test])"
    )
    return subprocess.run(
        [checker, "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _services() -> dict[str, dict[str, Any]]:
    document = yaml.safe_load(COMPOSE.read_text())
    services: dict[str, dict[str, Any]] = document["services"]
    return services


def _depends_on(service: dict[str, Any]) -> dict[str, Any]:
    depends = service.get("depends_on", {})
    return {name: {} for name in depends} if isinstance(depends, list) else dict(depends)


def test_compose_file_matches_the_compose_spec_schema() -> None:
    result = _validate(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_rejects_a_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("services:\n  redis:\n    image: redis:7\n    healthcheck: every 2s\n")
    result = _validate(broken)
    assert result.returncode != 0 and "healthcheck" in result.stdout + result.stderr


def test_every_dependency_exists_and_waits_for_health() -> None:
    services = _services()
    for name, service in services.items():
        for target, condition in _depends_on(service).items():
            assert target in services, f"{name} depends on unknown service {target!r}"
            assert condition.get("condition") == "service_healthy", f"{name} -> {target}"
            assert "healthcheck" in services[target], f"{target} has no healthcheck"


def test_every_broker_has_a_healthcheck() -> None:
    services = _services()
    brokers = [name for name in services if not name.startswith("test-")]
    assert {"redis", "redis-sentinel-1", "redis-sentinel-2", "rabbitmq", "kafka", "zmq-hub"} <= set(
        brokers
    )
    for name in brokers:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def test_sentinels_monitor_the_redis_service() -> None:
    services = _services()
    for name in ("redis-sentinel-1", "redis-sentinel-2"):
        command = " ".join(services[name]["command"])
        assert "sentinel monitor mymaster redis 6379" in command and "--sentinel" in command
        assert "redis" in _depends_on(services[name])


@pytest.mark.parametrize("broker", sorted(BROKERS))
def test_a_test_service_per_broker_runs_the_shared_entry_point(broker: str) -> None:
    services = _services()
    service = services.get(f"test-{broker}")
    assert service is not None, f"docker compose run --rm test-{broker} would find nothing"
    assert BROKERS[broker] in _depends_on(service)
    command = " ".join(service["command"])
    assert "scripts/test.sh" in command
    assert "multilayer/conformance" in command and "tests/test_django" in command
    backends = service["environment"]["BACKENDS"].split()
    script = (ROOT / "scripts" / "test.sh").read_text()
    known = re.search(r"unknown backend .*\(([a-z ]+)\)", script)
    assert known is not None
    assert set(backends) <= set(known.group(1).split())
    for variable, url in service["environment"].items():
        if variable.endswith("_URL"):
            # The brokers as other containers reach them, never the host's loopback.
            assert "127.0.0.1" not in url and "localhost" not in url, f"{variable}={url}"
            assert f"${{{variable}:-" in script, f"scripts/test.sh ignores {variable}"


def test_built_services_have_their_dockerfile_and_stage() -> None:
    services = _services()
    built = {name: service["build"] for name, service in services.items() if "build" in service}
    assert "zmq-hub" in built
    for name, build in built.items():
        context = ROOT / build.get("context", ".")
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"{name}: no {dockerfile}"
        target = build.get("target")
        if target is not None:
            stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", dockerfile.read_text(), re.M | re.I)
            assert target in stages, f"{name}: {dockerfile} has no stage {target!r}"
    hub_stage = (ROOT / "Dockerfile").read_text().split("AS test")[0]
    assert "'.[zmq]'" in hub_stage and '"multilayer", "hub"' in hub_stage


def test_the_entry_point_runs_only_the_selected_backends() -> None:
    environment = {**os.environ, "BACKENDS": "memory", "MULTILAYER_SKIP_INSTALL": "1"}
    script = str(ROOT / "scripts" / "test.sh")
    result = subprocess.run(
        [
            script,
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "multilayer/conformance/test_stats.py",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    collected = [line for line in result.stdout.splitlines() if "::" in line]
    assert collected and all(line.endswith("[memory]") for line in collected), result.stdout
    unknown = subprocess.run(
        [script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**environment, "BACKENDS": "nope"},
    )
    assert unknown.returncode == 2 and "unknown backend 'nope'" in unknown.stderr
