"""Apache Kafka in KRaft mode, run from its Maven jars on free loopback ports.

Maven resolves ``org.apache.kafka:kafka_2.13`` and a Log4j 2 binding (``kafka/pom.xml``
beside this file) into the local Maven repository once; the classpath it prints is cached
under ``~/.cache/multilayer/apache-kafka/``, keyed by the pom's hash, so later runs start
Java straight away and download nothing.

Every node is a combined broker and controller with its own ports and data directory.
One node, or a cluster of several (a controller quorum of all of them, replication factor
the node count, ``min.insync.replicas=2``). Logs stay in each node's directory.

``scripts/broker.sh kafka`` (one node) and ``scripts/broker.sh kafka-cluster`` (three)
run one in the foreground, as every other kind of test broker.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import weakref
from pathlib import Path

from .brokers import free_ports, listening, require

POM = Path(__file__).with_name("kafka") / "pom.xml"
CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "multilayer" / "apache-kafka"
)

# Kafka's own start script's settings, with a heap small enough for three nodes on a
# shared two-core machine.
JVM_OPTIONS = (
    "-Xms128m",
    "-Xmx512m",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-Djava.awt.headless=true",
)
# The storage tool runs for a second: the quick compiler alone starts it sooner.
TOOL_OPTIONS = ("-Xmx256m", "-XX:TieredStopAtLevel=1")

LOG4J2 = """\
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = {directory}/server.log
appender.file.filePattern = {directory}/server.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 10MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 2
rootLogger.level = info
rootLogger.appenderRef.file.ref = file
"""


def kafka_version() -> str:
    """The Apache Kafka version the pom names: the one every test broker runs."""
    match = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", POM.read_text())
    assert match is not None, f"{POM} names no kafka.version"
    return match.group(1)


def _cached_classpath() -> Path:
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()[:16]
    return CACHE / f"classpath-{digest}.txt"


def _usable(cached: Path) -> str | None:
    """The classpath in ``cached`` if every jar it names is still there."""
    if not cached.exists():
        return None
    jars = cached.read_text().strip()
    return jars if jars and all(Path(jar).exists() for jar in jars.split(os.pathsep)) else None


def require_tools() -> None:
    """Skip (fail under CI) when no Apache Kafka can start here."""
    reason = missing_tools()
    require(reason is None, reason or "")


def missing_tools() -> str | None:
    """Why no Apache Kafka can start here, or None when one can."""
    if shutil.which("java") is None:
        return "java is not installed (Apache Kafka runs from its jars)"
    if shutil.which("mvn") is None and _usable(_cached_classpath()) is None:
        return "mvn is not installed (it resolves the Apache Kafka jars)"
    return None


def classpath(timeout: float = 900.0) -> str:
    """The broker's Java classpath, resolved by Maven on the first call for this pom."""
    cached = _cached_classpath()
    jars = _usable(cached)
    if jars is not None:
        return jars
    CACHE.mkdir(parents=True, exist_ok=True)
    # Concurrent first runs each write a file of their own; whichever rename lands last
    # leaves the same classpath.
    partial = cached.with_suffix(f".{os.getpid()}.tmp")
    argv = ["mvn", "-q", "-B", "-f", str(POM), "dependency:build-classpath"]
    result = subprocess.run(
        [*argv, f"-Dmdep.outputFile={partial}"], capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    os.replace(partial, cached)
    return cached.read_text().strip()


def registered_brokers(port: int) -> int | None:
    """How many live brokers the broker on ``port`` knows, or None if it does not answer.

    A Metadata v4 request for no topics, written by hand so that readiness needs no Kafka
    client; v4 is the oldest version Kafka 4 still serves."""
    request = struct.pack(">hhihib", 3, 4, 1, -1, 0, 0)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2.0) as sock:
            sock.sendall(struct.pack(">i", len(request)) + request)
            head = b""
            while len(head) < 16:
                chunk = sock.recv(16 - len(head))
                if not chunk:
                    return None
                head += chunk
    except OSError:
        return None
    brokers: int = struct.unpack(">iiii", head)[3]
    return brokers


def _cluster_id() -> str:
    while True:
        # The storage tool's argument parser would read a leading "-" as an option (Kafka's
        # own random ids avoid one for the same reason).
        candidate = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()
        if not candidate.startswith("-"):
            return candidate


def _kill_all(processes: list[subprocess.Popen[bytes] | None]) -> None:
    """Let no JVM outlive the interpreter that forgot to stop it."""
    for process in processes:
        if process is not None and process.poll() is None:
            process.kill()


class ApacheKafka:
    """A KRaft Apache Kafka of ``nodes`` combined broker-controllers under ``workdir``
    (a temporary directory, removed on ``stop()``, when none is given).

    Ports are chosen at construction, so ``bootstrap`` and ``url`` are known before
    ``start()``; ``restart(i)`` brings node ``i`` back on the same ports and data."""

    def __init__(
        self, nodes: int = 1, workdir: Path | None = None, *, ready_timeout: float = 120.0
    ) -> None:
        if nodes < 1:
            raise ValueError(f"nodes must be at least 1, not {nodes}")
        self._owned = workdir is None
        self.workdir = (
            Path(tempfile.mkdtemp(prefix="apache-kafka-")) if workdir is None else workdir
        )
        self.ready_timeout = ready_timeout
        ports = free_ports(2 * nodes)
        self.ports, self.controller_ports = ports[:nodes], ports[nodes:]
        self._processes: list[subprocess.Popen[bytes] | None] = [None] * nodes
        weakref.finalize(self, _kill_all, self._processes)

    @property
    def bootstrap(self) -> str:
        """``127.0.0.1:p1,127.0.0.1:p2,...``: every broker's client listener."""
        return ",".join(f"127.0.0.1:{port}" for port in self.ports)

    @property
    def url(self) -> str:
        """A layer URL naming every broker."""
        return f"kafka://{self.bootstrap}"

    @property
    def pids(self) -> list[int]:
        """Process ids of the nodes started and not yet killed or stopped."""
        return [process.pid for process in self._processes if process is not None]

    def directory(self, index: int) -> Path:
        """Node ``index``'s directory: its configuration, ``data/`` and ``server.log``."""
        return self.workdir / f"node-{index + 1}"

    def _properties(self, index: int) -> str:
        nodes = len(self.ports)
        insync = min(2, nodes)
        voters = ",".join(
            f"{i + 1}@127.0.0.1:{port}" for i, port in enumerate(self.controller_ports)
        )
        settings: dict[str, object] = {
            "process.roles": "broker,controller",
            "node.id": index + 1,
            "listeners": f"PLAINTEXT://127.0.0.1:{self.ports[index]},"
            f"CONTROLLER://127.0.0.1:{self.controller_ports[index]}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.ports[index]}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.quorum.voters": voters,
            "log.dirs": self.directory(index) / "data",
            "default.replication.factor": nodes,
            "min.insync.replicas": insync,
            "offsets.topic.replication.factor": nodes,
            "transaction.state.log.replication.factor": nodes,
            "transaction.state.log.min.isr": insync,
            "share.coordinator.state.topic.replication.factor": nodes,
            "share.coordinator.state.topic.min.isr": insync,
            # The default 50 partitions per internal topic take seconds to create here.
            "offsets.topic.num.partitions": 4,
            "transaction.state.log.num.partitions": 4,
            "share.coordinator.state.topic.num.partitions": 4,
            "group.initial.rebalance.delay.ms": 0,
            "log.segment.bytes": 16 * 1024 * 1024,
            "log.index.size.max.bytes": 1024 * 1024,
            "log.cleaner.threads": 1,
            "log.cleaner.dedupe.buffer.size": 8 * 1024 * 1024,
            "num.network.threads": 2,
            "num.io.threads": 2,
            "num.replica.fetchers": 1,
            "num.recovery.threads.per.data.dir": 1,
            "background.threads": 2,
            # A killed node is fenced, and so leaves every ISR, after 6 s rather than 9 s.
            "broker.heartbeat.interval.ms": 1000,
            "broker.session.timeout.ms": 6000,
        }
        return "".join(f"{key}={value}\n" for key, value in settings.items())

    def start(self) -> None:
        """Format every node's storage (once), start them all, and wait until each broker
        answers with every broker registered; on any failure nothing is left running."""
        try:
            jars = classpath()
            cluster_id = _cluster_id()
            formats = []
            for index in range(len(self.ports)):
                directory = self.directory(index)
                (directory / "data").mkdir(parents=True, exist_ok=True)
                (directory / "server.properties").write_text(self._properties(index))
                (directory / "log4j2.properties").write_text(LOG4J2.format(directory=directory))
                if not (directory / "data" / "meta.properties").exists():
                    formats.append(self._format(index, jars, cluster_id))
            for index, process in formats:
                if process.wait(timeout=120) != 0:
                    raise RuntimeError(f"formatting node {index} failed:\n{self._log_tail(index)}")
            for index in range(len(self.ports)):
                self._spawn(index, jars)
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _format(
        self, index: int, jars: str, cluster_id: str
    ) -> tuple[int, subprocess.Popen[bytes]]:
        directory = self.directory(index)
        with open(directory / "console.log", "ab") as console:
            process = subprocess.Popen(
                ["java", *TOOL_OPTIONS, "kafka.tools.StorageTool", "format", "--cluster-id",
                 cluster_id, "--config", str(directory / "server.properties")],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                env={**os.environ, "CLASSPATH": jars},
            )  # fmt: skip
        return index, process

    def _spawn(self, index: int, jars: str) -> None:
        directory = self.directory(index)
        with open(directory / "console.log", "ab") as console:
            # A session of its own: a Ctrl-C in the terminal reaches only the Python parent,
            # which then stops the nodes in order.
            self._processes[index] = subprocess.Popen(
                [
                    "java",
                    *JVM_OPTIONS,
                    f"-Dlog4j2.configurationFile={directory / 'log4j2.properties'}",
                    f"-Dkafka.logs.dir={directory}",
                    "kafka.Kafka",
                    str(directory / "server.properties"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                env={**os.environ, "CLASSPATH": jars},
                start_new_session=True,
            )

    def _log_tail(self, index: int) -> str:
        directory = self.directory(index)
        parts = [
            f"--- {path.name}:\n{path.read_text(errors='replace')[-2000:]}"
            for path in (directory / "console.log", directory / "server.log")
            if path.exists()
        ]
        return "\n".join(parts)

    def _wait_ready(self) -> None:
        running = [i for i, process in enumerate(self._processes) if process is not None]
        deadline = time.monotonic() + self.ready_timeout
        while True:
            for index in running:
                process = self._processes[index]
                assert process is not None
                if process.poll() is not None:
                    raise RuntimeError(
                        f"Apache Kafka node {index} exited with {process.returncode}:\n"
                        f"{self._log_tail(index)}"
                    )
            if all(registered_brokers(self.ports[i]) == len(running) for i in running):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Apache Kafka ({self.bootstrap}) not ready after {self.ready_timeout:g} s:\n"
                    f"{self._log_tail(running[0])}"
                )
            time.sleep(0.2)

    def kill(self, index: int) -> None:
        """SIGKILL node ``index`` (broker and controller at once) and reap it."""
        process, self._processes[index] = self._processes[index], None
        if process is not None:
            process.kill()
            process.wait(30)

    def restart(self, index: int) -> None:
        """Start node ``index`` again on its ports and data (killing it first if it runs),
        and wait until every running broker knows every running broker."""
        self.kill(index)
        self._spawn(index, classpath())
        self._wait_ready()

    def running(self) -> bool:
        """Whether every node is alive."""
        return all(process is not None and process.poll() is None for process in self._processes)

    def stop(self, *, kill: bool = False, grace: float = 20.0) -> None:
        """Stop every node (SIGTERM, then SIGKILL after ``grace`` seconds; SIGKILL at once
        with ``kill``), wait until its ports are closed, and remove the working directory
        if this object made it."""
        live = [process for process in self._processes if process is not None]
        self._processes[:] = [None] * len(self._processes)
        # All at once: a node stopping alone waits on a quorum the others already left.
        for process in live:
            if kill:
                process.kill()
            else:
                process.terminate()
        deadline = time.monotonic() + grace
        for process in live:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(30)
        ports = [*self.ports, *self.controller_ports]
        deadline = time.monotonic() + 10
        while any(listening(port) for port in ports) and time.monotonic() < deadline:
            time.sleep(0.1)
        if self._owned:
            shutil.rmtree(self.workdir, ignore_errors=True)
