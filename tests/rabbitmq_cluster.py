"""A private 3-node RabbitMQ cluster on free loopback ports, for tests and by hand.

Each node is a :class:`brokers.RabbitNode` (its own name, data directory and ports); the
nodes share one Erlang cookie of their own, written into each node's private HOME before
it boots, and nodes 2 and 3 join node 1. Nothing touches the machine's shared node.

``python tests/rabbitmq_cluster.py [DIR]`` starts one, prints a layer URL listing the
three nodes as the last line of stdout once the cluster answers, and stops it on SIGTERM
or SIGINT.
"""

from __future__ import annotations

import secrets
import signal
import sys
import tempfile
import threading
from pathlib import Path

from brokers import RabbitNode, certificates


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

    def stop(self) -> None:
        """Kill every node."""
        for node in self.nodes:
            node.stop(kill=True)


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="rmqc-"))
    cluster = RabbitCluster(root)
    stopping = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: stopping.set())
    cluster.start()
    try:
        print(cluster.url, flush=True)
        stopping.wait()
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
