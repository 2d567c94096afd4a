"""A throwaway Redis Cluster on free loopback ports: masters with a replica each.

Every node is a ``redis-server --cluster-enabled yes`` without persistence, with its own
directory under one temporary directory; ``redis-cli --cluster create`` joins them. The
node timeout is short (2 s) so that a killed master's replica takes over within seconds.
Given a directory of TLS files (``ca.pem``, ``server.pem``/``.key``, ``client.pem``/
``.key``), every node speaks only TLS, to clients, to its replicas and on the cluster bus.

``scripts/broker.sh redis-cluster`` runs one (3 masters, a replica each) in the
foreground, as every other kind of test broker.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["RedisCluster"]

#: Milliseconds a master may be unreachable before its replica is promoted.
NODE_TIMEOUT_MS = 2000


class _NodeExited(RuntimeError):
    """A node's redis-server ended before it answered (its port or bus port was taken
    meanwhile: both are picked free, then bound later)."""


def _free_ports(count: int, taken: tuple[int, ...] = ()) -> list[int]:
    """``count`` distinct free ports, not in ``taken``, each with its cluster bus port
    (+10000) free too."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port + 10000 > 65535 or port in ports or port in taken:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


class RedisCluster:
    """``masters`` masters with ``replicas`` replicas each, started by :meth:`start`."""

    def __init__(
        self,
        masters: int = 3,
        replicas: int = 1,
        certs: Path | None = None,
        directory: Path | None = None,
    ) -> None:
        self.masters = masters
        self.replicas = replicas
        self.certs = certs
        self.ports = _free_ports(masters * (1 + replicas))
        #: Removed by stop() only when made here.
        self._owned = directory is None
        self.directory = directory or Path(tempfile.mkdtemp(prefix="multilayer-redis-cluster-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.processes: list[subprocess.Popen[bytes] | None] = [None] * len(self.ports)

    @property
    def url(self) -> str:
        """The layer URL naming every node as a seed (with TLS: the CA and the client
        certificate in its query)."""
        nodes = ",".join(f"127.0.0.1:{port}" for port in self.ports)
        if self.certs is None:
            return f"redis+cluster://{nodes}"
        return (
            f"rediss+cluster://{nodes}?ssl_cafile={self.certs / 'ca.pem'}"
            f"&ssl_certfile={self.certs / 'client.pem'}&ssl_keyfile={self.certs / 'client.key'}"
        )

    def cli(self, *args: str, port: int | None = None, timeout: float = 60.0) -> str:
        """Run ``redis-cli`` (against node ``port``, the first by default); its stdout."""
        tls = []
        if self.certs is not None:
            tls = ["--tls", "--cacert", str(self.certs / "ca.pem"),
                   "--cert", str(self.certs / "client.pem"),
                   "--key", str(self.certs / "client.key")]  # fmt: skip
        done = subprocess.run(
            ["redis-cli", *tls, "-h", "127.0.0.1", "-p", str(port or self.ports[0]), *args],
            capture_output=True,
            check=True,
            timeout=timeout,
        )
        return done.stdout.decode()

    def start(self, timeout: float = 60.0) -> None:
        """Start every node, join them, and wait until every node says the cluster is ok."""
        for index in range(len(self.ports)):
            for attempt in range(3):
                try:
                    self._spawn(index)
                    break
                except _NodeExited:
                    # Another process took a port between picking and binding (an
                    # outgoing connection's local port, in a busy test session).
                    if attempt == 2:
                        raise
                    self.ports[index] = _free_ports(1, tuple(self.ports))[0]
        addresses = [f"127.0.0.1:{port}" for port in self.ports]
        self.cli("--cluster", "create", *addresses, "--cluster-replicas", str(self.replicas),
                 "--cluster-yes", timeout=timeout)  # fmt: skip
        self.wait_ok(timeout)

    def _spawn(self, index: int) -> None:
        port = self.ports[index]
        node = self.directory / str(port)
        node.mkdir(exist_ok=True)
        listen = ["--port", str(port)]
        if self.certs is not None:
            listen = ["--port", "0", "--tls-port", str(port), "--tls-cluster", "yes",
                      "--tls-replication", "yes",
                      "--tls-cert-file", str(self.certs / "server.pem"),
                      "--tls-key-file", str(self.certs / "server.key"),
                      "--tls-ca-cert-file", str(self.certs / "ca.pem")]  # fmt: skip
        with open(node / "server.log", "ab") as log:
            self.processes[index] = subprocess.Popen(
                [
                    "redis-server", *listen, "--bind", "127.0.0.1",
                    "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                    "--save", "", "--appendonly", "no", "--dir", str(node),
                    # A replica must have synced before it can be promoted: at once.
                    "--repl-diskless-sync-delay", "0",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        process = self.processes[index]
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                if process is not None and process.poll() is not None:
                    raise _NodeExited(f"redis-server on {port} exited: see {node}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on {port} did not start") from None
                time.sleep(0.05)

    def running(self) -> bool:
        """Whether every node's process runs (the test brokers' common question)."""
        return len(self.live_ports()) == len(self.ports)

    def live_ports(self) -> list[int]:
        """The ports of the nodes whose process runs."""
        return [
            port
            for port, process in zip(self.ports, self.processes, strict=True)
            if process is not None and process.poll() is None
        ]

    def wait_ok(self, timeout: float = 60.0) -> None:
        """Wait until every running node says ``cluster_state:ok`` and every replica has
        synced with its master (only then can it be promoted); RuntimeError after
        ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                states = [self.cli("cluster", "info", port=port) for port in self.live_ports()]
                links = [self.cli("info", "replication", port=port) for port in self.live_ports()]
                if all("cluster_state:ok" in state for state in states) and all(
                    "role:master" in link or "master_link_status:up" in link for link in links
                ):
                    return
            except subprocess.SubprocessError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ok after {timeout}s; logs in {self.directory}")
            time.sleep(0.2)

    def role(self, port: int) -> str:
        """``master`` or ``slave``, as the node at ``port`` says."""
        return self.cli("role", port=port).split()[0]

    def master_ports(self) -> list[int]:
        """The running nodes that are masters now."""
        return [port for port in self.live_ports() if self.role(port) == "master"]

    def kill(self, index: int) -> None:
        """SIGKILL node ``index`` (its data is gone: no persistence)."""
        process, self.processes[index] = self.processes[index], None
        if process is not None:
            process.kill()
            process.wait(10)

    def restart(self, index: int) -> None:
        """Start node ``index`` again after :meth:`kill`; it rejoins from nodes.conf."""
        self.kill(index)
        self._spawn(index)

    def stop(self, *, kill: bool = False) -> None:
        """Stop (SIGKILL with ``kill``) every node, and remove the directory if made here."""
        for process in self.processes:
            if process is not None:
                (process.kill if kill else process.terminate)()
        for index, process in enumerate(self.processes):
            if process is not None:
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)
                self.processes[index] = None
        if self._owned:
            shutil.rmtree(self.directory, ignore_errors=True)
