"""One fault harness for every networked backend.

Each backend supplies a :class:`Controller` around a broker process it starts itself on a
free loopback port (never the machine's shared Redis or RabbitMQ), which can kill and
restart that broker, drop this test's connections from the server side, and count what the
broker holds for a prefix. ``tests/test_faults.py`` runs the same scenarios over all of them.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from .brokers import (
    BrokerProcess,
    RabbitNode,
    free_port,
    rabbitmq_node,
    redis_sentinel_process,
    redis_server,
    require_binary,
    require_module,
    tansu_broker,
    zmq_hub,
)


class Controller:
    """A test-owned broker for one backend, and the faults it can inject."""

    #: the backend's URL scheme, used as the test id
    scheme: ClassVar[str]
    #: layer options that make faults show quickly (heartbeats, short timeouts)
    options: ClassVar[dict[str, Any]] = {}
    #: options that make a dead process's inbox go away soon (queue lifetimes)
    short_lived: ClassVar[dict[str, Any]] = {}
    #: whether messages queued before a restart are delivered after it
    restart_keeps_messages: ClassVar[bool] = False
    #: whether group memberships made before a restart still hold after it
    restart_keeps_groups: ClassVar[bool] = False
    #: whether dropping connections is a restart (the broker cannot drop them alone)
    drop_is_restart: ClassVar[bool] = False
    #: seconds after a restart during which accepted sends may still be lost
    settle: ClassVar[float] = 0.0

    def __init__(self, process: BrokerProcess) -> None:
        self.process = process

    @property
    def url(self) -> str:
        return self.process.url

    def restart(self) -> None:
        """SIGKILL the broker and start it again on the same port."""
        self.process.restart(kill=True, down_for=0.5)

    def drop_connections(self) -> None:
        """Close every client connection from the server side; the broker keeps running."""
        self.restart()

    def objects(self, prefix: str) -> int | None:
        """Keys or queues the broker holds for ``prefix``; None where it cannot be counted."""
        return None

    def queued(self, prefix: str) -> int | None:
        """Messages the broker holds for ``prefix``; None where it cannot be counted."""
        return None

    def ledger(self, prefix: str) -> int:
        """Bookkeeping records that outlive a dead process until ``flush()``."""
        return 0

    def clients(self) -> int | None:
        """Client connections the broker has open; None where it cannot be counted."""
        return None

    def close(self) -> None:
        self.process.stop(kill=True)


class RedisController(Controller):
    scheme = "redis"
    options = {"socket_timeout": 2.0, "connect_timeout": 1.0}

    def __init__(self, tmp: Path) -> None:
        self.redis = require_module("redis")
        super().__init__(redis_server(tmp))

    @contextlib.contextmanager
    def _admin(self) -> Iterator[Any]:
        client = self.redis.Redis(host="127.0.0.1", port=self.process.port, decode_responses=True)
        try:
            yield client
        finally:
            client.close()

    def drop_connections(self) -> None:
        with self._admin() as admin:
            admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")

    def objects(self, prefix: str) -> int:
        with self._admin() as admin:
            return len(admin.keys(f"{prefix}:*"))

    def clients(self) -> int:
        with self._admin() as admin:
            return len(admin.client_list()) - 1  # not this one

    def queued(self, prefix: str) -> int:
        with self._admin() as admin:
            # The queues' lists, not the places reserved in them.
            queues = admin.scan_iter(match=f"{prefix}:q:*", _type="list")
            return sum(admin.llen(key) for key in queues)


class Relay:
    """A TCP relay on a free loopback port to ``127.0.0.1:target``, whose traffic towards
    the connecting side can be held: what the target sends from then on never arrives,
    nor does the end of its stream.

    With ``pace``, the target reads slowly: what the connecting side sends is passed on in
    pieces of at most 32 KiB, each ``pace`` seconds after the last, through a receive
    buffer that small, so the rest waits unsent in the connecting side's kernel.
    """

    #: The receive buffer towards the connecting side, and the most one read takes, when paced.
    PIECE = 32 * 1024

    def __init__(self, target: int, *, pace: float = 0.0) -> None:
        self.port, self.target, self.pace = free_port(), target, pace
        self.flowing = threading.Event()
        self.flowing.set()
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as create_server
        if pace:
            # Inherited by accepted sockets; it must be set before listen() to bound the window.
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.PIECE)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self.listener.accept()
                far = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                if self.listener.fileno() < 0:
                    return
                continue
            far.settimeout(None)
            self.sockets += [near, far]
            threading.Thread(
                target=self._pump, args=(near, far, None, self.pace), daemon=True
            ).start()
            threading.Thread(target=self._pump, args=(far, near, self.flowing), daemon=True).start()

    @classmethod
    def _pump(
        cls,
        source: socket.socket,
        sink: socket.socket,
        gate: threading.Event | None,
        pace: float = 0.0,
    ) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(cls.PIECE if pace else 65536):
                if pace:
                    time.sleep(pace)
                # Checked after the read: bytes read while held are never passed on.
                if not cls._open(gate, source):
                    return
                sink.sendall(data)
            # Nor is the end of the stream: a held target never closes its side either.
            if cls._open(gate, source):
                sink.shutdown(socket.SHUT_WR)

    @staticmethod
    def _open(gate: threading.Event | None, source: socket.socket) -> bool:
        """Wait while ``gate`` holds the traffic: True once it flows, False once the
        relay is closed."""
        while gate is not None and not gate.wait(0.5):
            if source.fileno() < 0:
                return False
        return True

    def hold(self) -> None:
        """From now on, nothing the target sends reaches the connected side."""
        self.flowing.clear()

    def close(self) -> None:
        self.listener.close()
        for each in self.sockets:
            each.close()


class SentinelFailover:
    """A master, a replica replicating through a :class:`Relay`, and one Sentinel (quorum
    1), each a process of this test on free loopback ports.

    :meth:`starve` holds the replication stream, so the replica misses every write made
    afterwards; :meth:`fail_over` SIGKILLs the master and returns once Sentinel names the
    replica as master and the replica says it is one.
    """

    def __init__(self, tmp: Path) -> None:
        self.redis = require_module("redis")
        for name in ("master", "replica"):
            (tmp / name).mkdir(exist_ok=True)
        self.master = redis_server(tmp / "master")
        self.relay = Relay(self.master.port)
        self.replica = redis_server(
            tmp / "replica", "--replicaof", "127.0.0.1", str(self.relay.port)
        )
        # A long failover-timeout also keeps Sentinel from "fixing" the replica to follow
        # the master directly, around the relay, while the test runs.
        self.sentinel = redis_sentinel_process(
            tmp,
            self.master.port,
            # Not less: on the shared test machine a promoted replica may take 0.5 s to
            # answer Sentinel's first ping, which then calls it down and clients find no
            # master.
            "sentinel down-after-milliseconds mymaster 1500",
            "sentinel failover-timeout mymaster 120000",
        )

    @property
    def url(self) -> str:
        return self.sentinel.url

    def _client(self, port: int) -> Any:
        return self.redis.Redis(host="127.0.0.1", port=port, decode_responses=True)

    def _until(self, what: str, check: Any, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise TimeoutError(f"not within {timeout:g}s: {what}")
            time.sleep(0.05)

    def start(self) -> None:
        """Start all three; return once the replica is in sync and Sentinel knows it."""
        self.master.start()
        self.replica.start()
        with self._client(self.replica.port) as replica:
            self._until(
                "the replica is in sync",
                lambda: replica.info("replication").get("master_link_status") == "up",
            )
        self.sentinel.start()
        with self._client(self.sentinel.port) as sentinel:
            self._until(
                "Sentinel knows the replica",
                lambda: any(
                    int(known["port"]) == self.replica.port and "s_down" not in known["flags"]
                    for known in sentinel.sentinel_slaves("mymaster")
                ),
            )

    def starve(self) -> None:
        """The replica misses every write the master takes from now on."""
        self.relay.hold()

    def replica_has(self, key: str) -> bool:
        with self._client(self.replica.port) as replica:
            return bool(replica.exists(key))

    def fail_over(self) -> None:
        """SIGKILL the master; return once Sentinel names the replica as master to clients
        (as redis-py asks: ``SENTINEL MASTERS``, a master not down) and the replica says it
        is one."""
        self.master.stop(kill=True)
        with (
            self._client(self.sentinel.port) as sentinel,
            self._client(self.replica.port) as replica,
        ):

            def promoted() -> bool:
                state = sentinel.sentinel_masters()["mymaster"]
                return (
                    int(state["port"]) == self.replica.port
                    and state["is_master"]
                    and not (state["is_sdown"] or state["is_odown"])
                    and replica.info("replication")["role"] == "master"
                )

            self._until("Sentinel promotes the replica", promoted)

    def close(self) -> None:
        for process in (self.sentinel, self.replica, self.master):
            process.stop()
        self.relay.close()


class RabbitController(Controller):
    scheme = "amqp"
    # answer_timeout above RabbitMQ's 15 s channel_operation_timeout, under RECOVERY.
    options = {"heartbeat": 2, "connect_timeout": 5.0, "answer_timeout": 20.0}
    short_lived = {"queue_expiry": 2.0}
    # Queues are not durable, but each layer re-binds the memberships it made.
    restart_keeps_groups = True

    def __init__(self, tmp: Path) -> None:
        require_module("pika")
        self.rabbitmqctl = require_binary("rabbitmqctl")
        self.node: RabbitNode = rabbitmq_node(tmp)
        super().__init__(self.node)

    def restart(self) -> None:
        self.node.restart(kill=True)

    def drop_connections(self) -> None:
        for pid in self.node.ctl("list_connections", "pid").split():
            # A connection may already be gone; the others must still be closed.
            with contextlib.suppress(subprocess.CalledProcessError):
                self.node.ctl("close_connection", pid, "fault test")

    def _queues(self, prefix: str) -> list[tuple[str, int]]:
        rows = [
            line.split("\t")
            for line in self.node.ctl("list_queues", "name", "messages").splitlines()
        ]
        return [(name, int(count)) for name, count in rows if name.startswith(prefix + ":")]

    def objects(self, prefix: str) -> int:
        return len(self._queues(prefix))

    def clients(self) -> int:
        return len(self.node.ctl("list_connections", "pid").split())

    def queued(self, prefix: str) -> int:
        catalog = f"{prefix}::catalog"
        return sum(count for name, count in self._queues(prefix) if name != catalog)

    def ledger(self, prefix: str) -> int:
        # flush() finds the queues of a prefix in this queue, one record per queue a
        # backend instance created; a dead process's record stays until flush().
        catalog = f"{prefix}::catalog"
        return sum(count for name, count in self._queues(prefix) if name == catalog)


class KafkaController(Controller):
    scheme = "kafka"
    drop_is_restart = True
    # Each process checks every ~log_check (1 s) that the log is still the one it read,
    # and starts over once a restarted in-memory Tansu holds a new one: sends made before
    # that may be lost.
    settle = 2.0

    def __init__(self, tmp: Path) -> None:
        require_module("kafka")
        super().__init__(tansu_broker(tmp))


class ZmqController(Controller):
    scheme = "zmq"
    options = {"heartbeat": 0.2, "timeout": 5.0, "peer_timeout": 0.5}
    drop_is_restart = True

    def __init__(self, tmp: Path) -> None:
        require_module("zmq")
        super().__init__(zmq_hub(tmp, "--peer-timeout", "0.5"))


CONTROLLERS: dict[str, type[Controller]] = {
    controller.scheme: controller
    for controller in (RedisController, RabbitController, KafkaController, ZmqController)
}


@contextlib.contextmanager
def controlled(scheme: str, tmp: Path) -> Iterator[Controller]:
    """A running broker for ``scheme`` under a :class:`Controller`, stopped afterwards."""
    controller = CONTROLLERS[scheme](tmp)
    controller.process.start()
    try:
        yield controller
    finally:
        controller.close()
