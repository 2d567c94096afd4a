"""The connection a backend keeps to RabbitMQ: opened on the first answering host,
watched, and made again with backoff after it drops.

:class:`Link` owns the connection and its two long-lived channels (the admin channel
for declarations, the publisher for every publish); what the backend re-creates after a
reconnect is its own business, done through the hooks it gives the link.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import pika
import pika.channel
import pika.exceptions
from pika.adapters.asyncio_connection import AsyncioConnection

from ...exceptions import BrokerError
from ...toolkit import tls_context, within
from ...url import LayerURL
from .channel import Channel, fail, settle
from .frames import FastConnection
from .publisher import Publisher

__all__ = ["Disconnected", "Link"]

logger = logging.getLogger(__package__)


class Disconnected(BrokerError):
    """The connection closed under an operation that can wait for the next one."""


#: Called with a new connection before it is offered to anyone (declare the topology).
Prepare = Callable[[AsyncioConnection], Awaitable[None]]


def _close_if_open(connection: AsyncioConnection) -> None:
    """Close ``connection`` unless it is closed or closing already: pika raises then, and
    in a reconnect attempt that error would end the reconnecting for good."""
    if not (connection.is_closed or connection.is_closing):
        connection.close()


class Link:
    """One connection to RabbitMQ, kept: the first answering host of the URL, made again
    with backoff (0.1 s doubling to 2 s) whenever it drops, until :meth:`close`.

    The hooks: ``prepare(connection)`` runs on each new connection before it is offered,
    and every ``renew_every`` seconds while it lasts (keeping leases alive); ``restore()``
    runs once it is offered (re-create what the broker may have lost); ``lost()`` runs
    when it drops, ``reconnected()`` once it is made again (before ``restore()``);
    ``stopping()`` before it is closed on purpose.
    """

    def __init__(
        self,
        url: LayerURL,
        config: Mapping[str, Any],
        *,
        prepare: Prepare,
        restore: Callable[[], Awaitable[None]],
        lost: Callable[[], None],
        reconnected: Callable[[], None],
        stopping: Callable[[], None],
        renew_every: float,
    ) -> None:
        self.url = url
        self.config = config
        self.vhost = url.path or "/"
        self._prepare, self._restore, self._lost = prepare, restore, lost
        self._reconnected, self._stopping = reconnected, stopping
        self._renew_every = renew_every
        self.connection: AsyncioConnection | None = None
        self.admin: Channel | None = None
        #: None from the moment the connection is lost.
        self.publisher: Publisher | None = None
        self._ready = asyncio.Event()
        #: Event-loop time of the last reconnection, None before one.
        self._reconnected_at: float | None = None
        self._closing = False
        self._keeper: asyncio.Task[None] | None = None

    def parameters(self, host: str, port: int | None) -> pika.ConnectionParameters:
        """pika's parameters for one host of the URL."""
        url, config = self.url, self.config
        tls = url.scheme == "amqps"
        ssl_options = pika.SSLOptions(tls_context(config), server_hostname=host) if tls else None
        return pika.ConnectionParameters(
            host=host,
            port=port or (5671 if tls else 5672),
            virtual_host=self.vhost,
            credentials=pika.PlainCredentials(
                url.username if url.username is not None else "guest",
                url.password if url.password is not None else "guest",
            ),
            heartbeat=config["heartbeat"],
            client_properties={"connection_name": config["connection_name"]},
            ssl_options=ssl_options,
            connection_attempts=1,
            socket_timeout=config["connect_timeout"],
            stack_timeout=config["connect_timeout"],
        )

    async def open(self) -> None:
        """Connect (BrokerError if no host answers), then keep the connection."""
        await self._connect()
        self._keeper = asyncio.create_task(self._keep_connected(), name="multilayer amqp")

    async def close(self) -> None:
        """Stop reconnecting and close the connection."""
        self._closing = True
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
        await self._disconnect()

    async def connected(self, *, forever: bool = False) -> AsyncioConnection:
        """The connection, once usable (BrokerError after ``connect_timeout`` unless forever)."""
        if not self._ready.is_set():
            try:
                await within(
                    self._ready.wait(), None if forever else self.config["connect_timeout"]
                )
            except asyncio.TimeoutError:
                raise BrokerError(f"RabbitMQ at {self.url.sanitized()} is unreachable") from None
        if self.connection is None:
            raise Disconnected(f"lost the connection to RabbitMQ at {self.url.sanitized()}")
        return self.connection

    @property
    def closing(self) -> bool:
        """Whether this link is closing its connection for good: close(), or the end of
        its event loop (as after each ``async_to_sync`` call)."""
        return self._closing

    def reconnected_within(self, seconds: float) -> bool:
        """Whether the connection was made again in the last ``seconds``."""
        at = self._reconnected_at
        return at is not None and asyncio.get_running_loop().time() - at < seconds

    async def channel(self) -> Channel:
        """The admin channel, reopened if a refused operation closed it."""
        connection = await self.connected()
        if self.admin is None or not self.admin.usable:
            self.admin = await Channel.open(connection)
        return self.admin

    async def publishing(self) -> Publisher:
        """The publisher, reopened if its channel closed."""
        connection = await self.connected()
        if self.publisher is None or not self.publisher.usable:
            self.publisher = await Publisher.open(connection)
        return self.publisher

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        payload: bytes,
        kind: str | None,
        *,
        mandatory: bool,
        message_id: str | None = None,
    ) -> str:
        """Publish and wait for RabbitMQ's verdict: ``"ack"``, ``"nack"`` or ``"returned"``."""
        try:
            publisher = self.publisher
            if publisher is None or not publisher.usable:
                publisher = await self.publishing()
            future = publisher.publish(
                exchange, routing_key, payload, kind, mandatory=mandatory, message_id=message_id
            )
            assert future is not None
            return await future
        except pika.exceptions.AMQPError as error:
            raise self.error(f"publishing to {routing_key!r}", error) from error

    def drop_publisher(self) -> None:
        """Close the publisher (its unconfirmed publishes fail); the next publish opens
        a new one."""
        publisher, self.publisher = self.publisher, None
        if publisher is not None:
            publisher.channel.close()

    def error(self, what: str, error: BaseException) -> BrokerError:
        """A BrokerError saying what failed where, caused by ``error``."""
        broker_error = BrokerError(f"RabbitMQ at {self.url.sanitized()}: {what}: {error!r}")
        broker_error.__cause__ = error
        return broker_error

    async def _disconnect(self) -> None:
        self._closing = True
        self._stopping()
        connection, self.connection = self.connection, None
        self._ready.clear()
        if connection is not None and not (connection.is_closed or connection.is_closing):
            closed = asyncio.get_running_loop().create_future()
            connection.add_on_close_callback(lambda _c, _r: settle(closed, None))
            connection.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await within(closed, self.config["connect_timeout"])

    async def _connect(self, *, again: bool = False) -> None:
        errors: list[BaseException] = []
        for host, port in self.url.hosts or (("localhost", None),):
            try:
                connection = await self._open_connection(self.parameters(host, port))
            except Exception as error:  # pika's connection workflow raises its own types
                errors.append(error)
                continue
            try:
                await self._setup(connection, again=again)
            except (pika.exceptions.AMQPError, BrokerError) as error:
                self._closed(connection, error)
                _close_if_open(connection)
                errors.append(error)
                continue
            return
        raise BrokerError(
            f"cannot connect to RabbitMQ at {self.url.sanitized()}: {errors[-1]!r}"
        ) from errors[-1]

    async def _open_connection(self, parameters: pika.ConnectionParameters) -> AsyncioConnection:
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[AsyncioConnection] = loop.create_future()
        connection = FastConnection(
            parameters,
            on_open_callback=lambda c: settle(opened, c),
            on_open_error_callback=lambda _c, error: fail(
                opened, error if isinstance(error, BaseException) else OSError(str(error))
            ),
            on_close_callback=self._closed,
            custom_ioloop=loop,
            answer_timeout=self.config["answer_timeout"],
        )
        try:
            return await within(opened, self.config["connect_timeout"])
        except BaseException:
            _close_if_open(connection)
            raise

    async def _setup(self, connection: AsyncioConnection, *, again: bool) -> None:
        admin = await Channel.open(connection)
        publisher = await Publisher.open(connection)
        await self._prepare(connection)
        self.connection, self.admin, self.publisher = connection, admin, publisher
        self._ready.set()
        if again:
            # Counted once the connection serves, not after restore(), which may pause
            # (spreading re-declarations): a receive resumed is a reconnection counted.
            self._reconnected_at = asyncio.get_running_loop().time()
            self._reconnected()
        await self._restore()

    def _closed(self, connection: AsyncioConnection, reason: BaseException) -> None:
        if connection is not self.connection:
            return
        self._ready.clear()
        self.connection = self.admin = self.publisher = None
        self._lost()
        if not self._closing:
            logger.warning("lost RabbitMQ connection to %s: %r", self.url.sanitized(), reason)

    async def _keep_connected(self) -> None:
        try:
            await self._reconnect_forever()
        except asyncio.CancelledError:
            if not self._closing:
                # The event loop is ending without close() (asyncio.run() returning,
                # async_to_sync): close the connection now, or the messages prefetched
                # here would stay unacknowledged, out of every other consumer's reach,
                # until the socket is garbage-collected.
                await self._disconnect()
            raise

    async def _reconnect_forever(self) -> None:
        delay = 0.1
        while True:
            connection = self.connection
            if connection is not None and not connection.is_closed:
                lost = asyncio.get_running_loop().create_future()
                connection.add_on_close_callback(lambda _c, _r, done=lost: settle(done, None))
                while not lost.done():
                    await asyncio.wait([lost], timeout=self._renew_every)
                    if not lost.done():
                        await self._renew(connection)
                delay = 0.1
                continue
            try:
                await self._connect(again=True)
                logger.info("reconnected to RabbitMQ at %s", self.url.sanitized())
                continue
            except BrokerError as error:
                logger.debug("%s", error)
            except Exception:
                # A bug, but nothing else would ever reconnect this layer: log it, try again.
                logger.exception("reconnecting to RabbitMQ at %s failed", self.url.sanitized())
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _renew(self, connection: AsyncioConnection) -> None:
        try:
            await self._prepare(connection)
        except pika.exceptions.AMQPError as error:
            # A lost connection is handled by the caller's loop; the next renewal retries.
            logger.debug("renewing the topology on %s: %r", self.url.sanitized(), error)
