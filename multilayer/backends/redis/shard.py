"""The connections to one Redis server (a shard): how commands reach it and come back.

:class:`Shard` makes connections (through Sentinel for ``redis+sentinel://``) and notices
when a server answers again after a lost connection, or when Sentinel names a new master.
:class:`Link` carries every send and group operation of one backend instance to that
server on one connection, in pipelined batches; :class:`Watched` is what it shares with
the receivers (:mod:`.receiver`): replies are bounded by a watchdog, not by a timer per
command. :func:`make_shards` turns a URL and its options into shards, and is the one place
the shared TLS options become redis-py's ``ssl_*`` arguments.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from redis.asyncio.connection import AbstractConnection, ConnectionPool, SSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ...exceptions import BrokerError
from ...toolkit import within
from ...url import LayerURL
from .scripts import SCRIPTS
from .wire import Wire, discard, pack

__all__ = [
    "TRANSIENT",
    "Link",
    "Place",
    "Shard",
    "Watched",
    "connection_options",
    "make_shards",
]

#: Errors after which a connection is dropped and made again; anything else is a bug or
#: a misconfigured server and surfaces as BrokerError.
TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)
#: Most commands one pipelined batch carries; bounds the memory of one write.
_MAX_BATCH = 512
#: Why commands written behind a cancelled one fail: their replies are never read.
_CUT = RedisConnectionError("connection closed: a command ahead of it was cancelled")


class Place(Protocol):
    """Where a queue's keys live: a whole server (:class:`Shard`), or one hash slot of a
    Redis Cluster (:class:`.cluster.Bucket`), whose server may change under it.

    ``tag`` goes into every key name of the place (``""`` for a server, a ``{hash tag}``
    on a cluster), so that one script only ever touches keys of one slot.
    """

    tag: str

    async def call(self, *command: Any) -> Any:
        """Run ``command`` where the place lives now; BrokerError if Redis failed."""

    def shard(self) -> Shard:
        """The server that holds the place now (for a receiver's own connection)."""

    async def follow(self, error: BaseException) -> bool:
        """Whether ``error`` (a receiver's) only says the place moved: it is then
        followed, and the receive is tried again."""

    def relocated(self) -> bool:
        """Whether the place's server changed since last asked: a promoted replica may
        have missed writes (read by the membership check)."""


class Shard:
    """One Redis server (or Sentinel-managed master) and this instance's connections to it.

    A shard is also a :class:`Place`: everything it holds lives on it.
    """

    tag = ""

    def __init__(
        self,
        label: str,
        pool: ConnectionPool,
        sentinel: Sentinel | None,
        timeout: float,
        connect_timeout: float,
        on_change: Callable[[Shard], None],
    ) -> None:
        self.label = label
        # Used only as a factory of configured connections (and, for Sentinel, of master
        # discovery): every connection here has one owner, so none is pooled.
        self.pool = pool
        self.sentinel = sentinel
        #: Seconds a reply may take before the connection counts as lost. Enforced here
        #: rather than by redis-py, whose per-write timeout costs a task per command.
        self.timeout = timeout
        # redis-py bounds the TCP (and TLS) connect, but reads the handshake that follows
        # (HELLO, AUTH, SELECT) with socket_timeout=None: a server that accepts and never
        # answers would hang the caller. So a whole connect gets both bounds.
        self._connect_within = connect_timeout + timeout
        #: Told when a connection to this server is lost, and when one is made again
        #: after a loss or to a new master (the server may have lost state meanwhile).
        self._on_change = on_change
        #: Set by :meth:`lose`; cleared by the next connect.
        self.lost = False
        #: The address of the server the last connection reached (Sentinel: the master).
        self.address: tuple[str, int] | None = None
        #: Set when the master address changed: a promoted replica may have missed writes.
        self.moved = False
        self.link = Link(self)

    def error(self, doing: str, error: BaseException) -> BrokerError:
        """A BrokerError naming this shard (never its credentials), caused by ``error``."""
        broker_error = BrokerError(f"Redis {self.label}: {doing} failed: {error}")
        broker_error.__cause__ = error
        return broker_error

    async def connect(self) -> Wire:
        """A new connection, ready for our commands; the caller owns it and must discard it."""
        connection: AbstractConnection = self.pool.make_connection()  # type: ignore[no-untyped-call]
        try:
            await within(connection.connect(), self._connect_within)  # type: ignore[no-untyped-call]
        except BaseException:
            await connection.disconnect(nowait=True)
            raise
        address = (str(getattr(connection, "host", "")), int(getattr(connection, "port", 0)))
        if self.address is not None and address != self.address:
            self.moved = True
        self.address = address
        if self.lost or self.moved:
            self.lost = False
            self._on_change(self)
        return Wire(connection)

    def lose(self) -> None:
        """A connection to this server was lost: the backend is told now, and again when
        a connection is made."""
        if not self.lost:
            self.lost = True
            self._on_change(self)

    async def call(self, *command: Any) -> Any:
        """Run ``command`` on this server (see :meth:`Link.call`)."""
        return await self.link.call(*command)

    def shard(self) -> Shard:
        """This shard: a server never moves."""
        return self

    async def follow(self, error: BaseException) -> bool:
        """Never: only a cluster's slots move (see :class:`Place`)."""
        return False

    def relocated(self) -> bool:
        """Whether Sentinel named a new master since last asked."""
        moved, self.moved = self.moved, False
        return moved


class Watched:
    """Something that waits for Redis replies under the backend's watchdog.

    A timer per command would cost more than the command itself (``asyncio.timeout``
    takes several microseconds), so a command only records by when it must be answered
    and the backend's guard task closes the connection of whatever is overdue; the
    waiting read then fails like any lost connection.
    """

    def __init__(self, shard: Shard) -> None:
        self._shard = shard
        self._connection: Wire | None = None
        #: Loop time by which the command in flight must be answered; None when idle.
        self._deadline: float | None = None
        self._overdue = False
        #: Connections closed without waiting, which may still be closing.
        self._closing: list[Wire] = []

    def _expect_reply(self, within: float) -> None:
        self._deadline = asyncio.get_running_loop().time() + within
        self._overdue = False

    def overdue(self, current: float) -> Wire | None:
        """The connection to close if its reply is late (guard task only)."""
        if self._deadline is not None and current > self._deadline:
            self._deadline = None
            self._overdue = True
            return self._connection
        return None

    async def _let_go(self, *, wait: bool) -> None:
        """Close the connection, if any; the next command makes a new one. ``wait``: the
        backend is being released, and the event loop may end next, so this waits until
        the connection and every one closed before without waiting are closed (see
        :meth:`.Wire.close`)."""
        connection, self._connection = self._connection, None
        if wait:
            closing, self._closing = self._closing, []
            await asyncio.gather(*(discard(wire, wait=True) for wire in (*closing, connection)))
            return
        if connection is not None:
            self._closing = [wire for wire in self._closing if not wire.released()]
            self._closing.append(connection)
        await discard(connection)

    def _explain(self, error: BaseException) -> BaseException:
        if self._overdue:
            return RedisTimeoutError(f"no reply within {self._shard.timeout:g}s")
        return error


class Link(Watched):
    """One connection carrying the commands of every concurrent caller, in pipelined batches.

    A caller finding the connection idle sends its command itself. Commands issued while
    a batch is on the wire are queued, and a writer task sends everything queued in one
    write and reads the replies in order, so concurrent sends cost one round trip per
    batch. A command whose caller was cancelled before it was written is not sent at all.
    A caller that needs no reply before it goes on writes with :meth:`write_now`, at once,
    behind the command or batch whose replies are being read; should the connection be
    lost or closed before its reply is read, its future fails (it may have run).
    A command starting with ``ASKING`` (a cluster's redirect during a slot migration) is
    sent right behind its own ``ASKING``, as the server requires.
    """

    def __init__(self, shard: Shard) -> None:
        super().__init__(shard)
        self._pending: deque[tuple[tuple[Any, ...], asyncio.Future[Any]]] = deque()
        self._busy = False
        self._writer: asyncio.Task[None] | None = None
        self._idle: asyncio.Future[None] | None = None
        #: The batch written whose replies are being read (for a lone caller of
        #: :meth:`call`, the commands behind its own); commands written behind join it.
        self._reading: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] | None = None
        #: The task reading the replies to a command :meth:`write_now` wrote on an idle link.
        self._reader: asyncio.Task[None] | None = None
        #: The scripts the server of this connection ran (it has them loaded).
        self._loaded: set[str] = set()

    def write_now(self, command: tuple[Any, ...]) -> asyncio.Future[Any] | None:
        """Write ``command`` at once, in this link's order, and return the future of its
        reply; None (nothing written) when it cannot be written before the caller goes
        on: no connection is up, or queued commands must go first.

        Once :meth:`sent_all` says so, the server gets the command even if the event loop
        ends next (``async_to_sync`` ends its loop once its call returns).
        """
        wire = self._connection
        if wire is None or self._pending:
            return None
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        batch = self._reading
        try:
            if batch is not None and not wire.closed():
                wire.send(self._pack(command))
                batch.append((command, future))
            elif not self._busy and not wire.unfit():
                wire.send(self._pack(command))
                self._busy = True
                self._reading = batch = [(command, future)]
                self._reader = asyncio.ensure_future(self._read_written(wire, batch))
            else:
                return None
        except TRANSIENT:
            return None
        return future

    def sent_all(self) -> bool:
        """Whether every byte written on this link has left this host."""
        return self._connection is not None and self._connection.all_sent()

    async def _read_written(
        self, wire: Wire, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]
    ) -> None:
        try:
            await self._send(batch, wire)
        finally:
            self._busy = False
            self._reader = None
            if self._pending:
                self._wake()

    async def call(self, *command: Any) -> Any:
        """Send ``command`` and return its reply; BrokerError if Redis failed."""
        wire = self._connection
        if self._busy or self._pending or wire is None or command[0] == "ASKING" or wire.unfit():
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            await self._submit([(command, future)])
            return await future
        # One caller on an idle, live connection, the common case: it reads its own
        # reply, with no future and no batch, which saves a tenth of a send's CPU.
        # Commands write_now writes behind it meanwhile join it: their replies follow.
        self._busy = True
        self._expect_reply(self._shard.timeout)
        joined: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._reading = joined
        refused: RedisError | None = None
        try:
            try:
                wire.send(self._pack(command))
                reply = await wire.read()
                self._ran(command)
            except NoScriptError as error:
                # Not run: the server forgot the script (SCRIPT FLUSH). The writer task
                # sends it again with its source, below.
                self._loaded.discard(command[1])
                refused = error
            except TRANSIENT as error:
                # The command may have run: not retried, as in _send.
                cause = self._explain(error)
                await self._lose(joined, cause, lost=True)
                raise self._shard.error(_describe(command), cause) from cause
            except RedisError as error:
                refused = error
            except BaseException:
                # Cancelled mid-command: its reply would be read as the next one's.
                await self._lose(joined, _CUT, lost=False)
                raise
            if joined:
                await self._send(joined, wire)
        finally:
            self._reading = None
            self._busy = False
            self._deadline = None
            if self._pending:
                self._wake()
        if isinstance(refused, NoScriptError):
            # Ahead of the commands written behind it: _send queued them again, since the
            # server forgot their scripts too.
            future = asyncio.get_running_loop().create_future()
            self._pending.appendleft((command, future))
            self._wake()
            return await future
        if refused is not None:
            raise self._shard.error(_describe(command), refused) from refused
        return reply

    def _pack(self, command: tuple[Any, ...]) -> bytes:
        """``command`` in the Redis protocol, behind its ``ASKING`` if it has one. A script
        not run on this connection yet goes with its source (``EVAL``): the server then
        cannot answer NOSCRIPT, which would have the script sent again after the
        commands written behind it, which ran."""
        if command[0] == "ASKING":
            return pack(("ASKING",)) + self._pack(command[1:])
        if command[0] == "EVALSHA" and command[1] not in self._loaded:
            return pack(("EVAL", SCRIPTS[command[1]].source, *command[2:]))
        return pack(command)

    def _ran(self, command: tuple[Any, ...]) -> None:
        """``command`` was answered: the server has its script, if it runs one."""
        command = _unasked(command)
        if command[0] == "EVALSHA":
            self._loaded.add(command[1])

    def enqueue(self, commands: list[tuple[Any, ...]]) -> list[asyncio.Future[Any]]:
        """Queue ``commands`` for the writer task, which sends them in one write: the
        future of each reply (BrokerError if Redis failed). For a caller with commands
        for several servers, which awaits them all without a task per server."""
        loop = asyncio.get_running_loop()
        entries = [(command, loop.create_future()) for command in commands]
        self._pending.extend(entries)
        self._wake()
        return [future for _, future in entries]

    async def _submit(self, entries: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        if self._busy or self._pending:
            self._pending.extend(entries)
            self._wake()
            return
        # The common case of one caller at a time: no hop through the writer task.
        self._busy = True
        try:
            await self._send(entries)
        finally:
            self._busy = False
            if self._pending:
                self._wake()

    def _wake(self) -> None:
        if self._writer is None:
            self._writer = asyncio.create_task(self._write(), name="multilayer redis writer")
        elif not self._busy and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    async def _write(self) -> None:
        # Parked rather than ended when idle: waking a task is cheaper than making one.
        batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        try:
            while True:
                if self._busy or not self._pending:
                    self._idle = asyncio.get_running_loop().create_future()
                    await self._idle
                    continue
                batch = []
                while self._pending and len(batch) < _MAX_BATCH:
                    entry = self._pending.popleft()
                    if not entry[1].done():
                        batch.append(entry)
                self._busy = True
                try:
                    await self._send(batch)
                finally:
                    self._busy = False
        finally:
            for _, future in batch:
                future.cancel()
            self._writer = None
            # Also reached when the event loop ends without close(): leave no socket open.
            await self._let_go(wait=True)

    async def _send(
        self,
        batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]],
        written: Wire | None = None,
    ) -> None:
        """Write ``batch`` (unless it was ``written`` on that connection already) and read
        its replies, and those of the commands :meth:`write_now` adds to it meanwhile.

        Cancelled, it cancels the commands of callers awaiting their replies (the batch
        it was given, unless ``written``); those whose callers went on are failed.
        """
        awaited = 0 if written is not None else len(batch)
        self._expect_reply(self._shard.timeout)
        try:
            wire = written
            if wire is None:
                if self._connection is not None and self._connection.unfit():
                    # Closed by the server while idle (a restart, a timeout, CLIENT KILL):
                    # nothing was sent on it, so reconnecting is safe.
                    self._shard.lose()
                    await self._let_go(wait=False)
                if self._connection is None:
                    self._connection = await self._shard.connect()
                    self._loaded.clear()
                wire = self._connection
                await wire.write(b"".join(self._pack(command) for command, _ in batch))
            self._reading = batch
            forgotten: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
            # The batch grows while its replies are read (write_now); nothing is awaited
            # between its last reply and the end of the loop, so none is left unread.
            for command, future in batch:
                try:
                    if command[0] == "ASKING":
                        await wire.read()
                    reply = await wire.read()
                    # Each reply shows the server alive: the next one gets a full timeout.
                    self._expect_reply(self._shard.timeout)
                    self._ran(command)
                except NoScriptError:
                    # Not run: the server forgot its scripts (SCRIPT FLUSH). Safe to resend.
                    forgotten.append((command, future))
                    continue
                except RedisError as error:
                    if isinstance(error, TRANSIENT):
                        raise
                    _settle(future, error=self._shard.error(_describe(command), error))
                    continue
                _settle(future, reply)
            self._reading = None
            # Sent again first, with their scripts' source.
            for command, _ in forgotten:
                self._loaded.discard(_script_of(command))
            self._pending.extendleft(reversed(forgotten))
        except TRANSIENT as error:
            # Replies not read are unknown: the commands may have run, so they are not
            # retried (a push retried could be delivered twice). The next call reconnects.
            await self._lose(batch, self._explain(error), lost=True)
        except RedisError as error:
            # The server refused the new connection (a database it does not have, ...):
            # every command waiting fails.
            for command, future in batch:
                _settle(future, error=self._shard.error(_describe(command), error))
        except BaseException:
            # Cancelled mid-command: the replies still due would be read as later ones'.
            for _, future in batch[:awaited]:
                future.cancel()
            await self._lose(batch[awaited:], _CUT, lost=False)
            raise
        finally:
            self._reading = None
            self._deadline = None

    async def _lose(
        self,
        batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]],
        cause: BaseException,
        *,
        lost: bool,
    ) -> None:
        """Close the connection, whose replies due can no longer be matched to their
        commands, and fail ``batch``'s with ``cause``: they may have run. The next
        command connects again. ``lost``: the server is told lost."""
        self._reading = None
        if lost:
            self._shard.lose()
        for command, future in batch:
            _settle(future, error=self._shard.error(_describe(command), cause))
        await self._let_go(wait=False)

    async def close(self) -> None:
        """Stop the writer task; commands it had not sent are cancelled."""
        for task in (self._writer, self._reader):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self._let_go(wait=True)


def _unasked(command: tuple[Any, ...]) -> tuple[Any, ...]:
    """``command`` without the ``ASKING`` it is sent behind, if any."""
    return command[1:] if command[0] == "ASKING" else command


def _script_of(command: tuple[Any, ...]) -> str:
    """The SHA1 of an EVALSHA command, behind its ASKING if any."""
    return str(_unasked(command)[1])


def _describe(command: tuple[Any, ...]) -> str:
    command = _unasked(command)
    if command[0] == "EVALSHA":
        return f"{SCRIPTS[command[1]].name} script"
    return str(command[0])


def _settle(
    future: asyncio.Future[Any], result: Any = None, *, error: BaseException | None = None
) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def make_shards(
    url: LayerURL,
    config: Mapping[str, Any],
    labels: list[str],
    on_change: Callable[[Shard], None],
) -> list[Shard]:
    """One shard per label: a Sentinel service name, or ``host:port`` from the URL."""
    timeout, connect_timeout = config["socket_timeout"], config["connect_timeout"]
    common = connection_options(url, config)
    if url.scheme != "redis+sentinel":
        shards = []
        for label in labels:
            host, _, port = label.rpartition(":")
            pool = ConnectionPool(host=host, port=int(port), **common)
            shards.append(Shard(label, pool, None, timeout, connect_timeout, on_change))
        return shards
    # Typed from redis-py 8.2 on; untyped in the older releases pyproject admits.
    sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
        [(host, port or 26379) for host, port in url.hosts],
        sentinel_kwargs={
            "password": config["sentinel_password"],
            "socket_timeout": timeout,
            "socket_connect_timeout": connect_timeout,
        },
    )
    return [
        Shard(
            f"sentinel service {service!r}",
            SentinelConnectionPool(service, sentinel, **common),  # type: ignore[no-untyped-call]
            sentinel,
            timeout,
            connect_timeout,
            on_change,
        )
        for service in labels
    ]


def connection_options(url: LayerURL, config: Mapping[str, Any]) -> dict[str, Any]:
    """redis-py's connection arguments for ``url``: credentials, database, timeouts, no
    retries, and TLS for the ``rediss`` schemes."""
    options: dict[str, Any] = {
        "db": int(url.path or 0),
        "username": url.username,
        "password": url.password,
        "socket_timeout": None,
        "socket_connect_timeout": config["connect_timeout"],
        # Never retry behind our back: a push retried after a lost reply could be
        # delivered twice. Receivers reconnect themselves.
        "retry": Retry(NoBackoff(), 0),
    }
    if url.scheme.startswith("rediss"):
        options.update(_redis_py_tls(config))
    return options


def _redis_py_tls(config: Mapping[str, Any]) -> dict[str, Any]:
    """The shared TLS options (:func:`multilayer.toolkit.tls_options`) as redis-py spells
    them. A client treats CERT_OPTIONAL as CERT_REQUIRED, so the old
    ``ssl_cert_reqs=optional``, now ``ssl_verify=true``, verifies as it always did."""
    verify = bool(config["ssl_verify"])
    return {
        "connection_class": SSLConnection,
        "ssl_ca_certs": config["ssl_cafile"],
        "ssl_certfile": config["ssl_certfile"],
        "ssl_keyfile": config["ssl_keyfile"],
        "ssl_cert_reqs": "required" if verify else "none",
        "ssl_check_hostname": verify and config["ssl_check_hostname"],
    }
