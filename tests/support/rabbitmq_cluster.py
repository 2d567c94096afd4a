"""A private 3-node RabbitMQ cluster on free loopback ports, for tests and by hand.

Each node is a :class:`~tests.support.brokers.RabbitNode` (its own name, data directory
and ports); the nodes share one Erlang cookie of their own, written into each node's
private HOME before it boots, and nodes 2 and 3 join node 1. Nothing touches the
machine's shared node.

``scripts/broker.sh rabbitmq-cluster`` runs one in the foreground and prints a layer URL
listing the three nodes.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from .brokers import RabbitNode, certificates


class RabbitCluster:
    """``size`` private RabbitMQ nodes clustered together (see the module docstring)."""

    def __init__(self, root: Path, size: int = 3) -> None:
        cookie = secrets.token_hex(16)
        root.mkdir(parents=True, exist_ok=True)
        certs = certificates(root)
        self.nodes: list[RabbitNode] = []
        for index in range(size):
            home = root / f"node{index + 1}"
            home.mkdir(parents=True, exist_ok=True)
            node = RabbitNode(home, certs)
            # Erlang reads the cookie from $HOME; the same one lets the nodes (and our
            # rabbitmqctl) talk to each other, and to nothing else on the machine.
            cookie_file = home / "home" / ".erlang.cookie"
            cookie_file.write_text(cookie)
            cookie_file.chmod(0o400)
            self.nodes.append(node)

    @property
    def url(self) -> str:
        """A layer URL listing every node, the first node first."""
        hosts = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)
        return f"amqp://{hosts}/"

    def start(self) -> None:
        """Start every node, then join the others to the first one."""
        try:
            for node in self.nodes:
                node.start()
            first = self.nodes[0]
            for node in self.nodes[1:]:
                node.ctl("stop_app")
                node.ctl("join_cluster", first.name)
                node.ctl("start_app")
            running = first.ctl("eval", "length(rabbit_nodes:all_running()).").strip()
            if running != str(len(self.nodes)):
                raise RuntimeError(f"{running} of {len(self.nodes)} nodes run in the cluster")
        except BaseException:
            self.stop()
            raise

    def stop(self, *, kill: bool = True) -> None:
        """Kill every node (a cluster being thrown away need not leave it politely)."""
        for node in self.nodes:
            node.stop(kill=kill)

    def running(self) -> bool:
        """Whether every node is alive."""
        return all(node.running() for node in self.nodes)
