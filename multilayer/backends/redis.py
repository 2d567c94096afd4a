"""Redis backend: ``redis://``, ``rediss://`` (TLS) and ``redis+sentinel://``.

Features: queues are Redis lists, so a message waits for its receiver until it expires and
each message reaches exactly one receiver, whichever process it is in. Every operation is
one round trip: a Lua script for sends (capacity check, append and key TTL in one atomic
step) and group fan-out (one call per server whatever the member count). Concurrent
operations of an event loop share one connection per server and are sent as pipelined
batches. A receive takes messages through per-consumer in-flight and landing lists, so a
receive cancelled while its reply is on the wire loses nothing: the messages go back to
the head of their queue when the layer closes. Each process has one inbox list for all its
process-specific channels, and one blocking connection per queue it receives from.
Channels and groups are spread over several Redis servers by consistent hashing of the
part of a channel name up to ``!``, so a process-specific channel is always sent to and
received from the same server. Receivers ride out a Redis restart or a Sentinel failover
and resume. Needs Redis (or a compatible server) 6.2 or newer.

A ``group_send`` puts one envelope (:mod:`multilayer.fanout`) into each process inbox with
members, naming them, sealed by the group script on the inbox's shard and counted once
against the inbox's capacity; the receiving process hands it to each member. A member
that is a normal channel gets its own copy.

URL format::

    redis://[[user]:password@]host[:port][,host[:port]...][/db][?option=value...]
    rediss://[[user]:password@]host[:port][,host[:port]...][/db][?ssl_ca_certs=...]
    redis+sentinel://[[user]:password@]sentinel[:port][,sentinel[:port]...][/db][?service=NAME]

``redis://`` and ``rediss://`` default to ``localhost:6379``; several hosts are several
shards (not replicas), and every process must list the same hosts, spelt the same way.
``redis+sentinel://`` lists the Sentinel processes (port 26379 by default); ``service``
names the monitored master, or several masters separated by commas, one shard each. The
URL's credentials and ``/db`` apply to the Redis servers, not to the Sentinels.

Options (besides the core ones):

``socket_timeout`` (5.0, redis-py's default)
    seconds to wait for a reply before a connection counts as lost; an idle receive
    re-blocks every half of it, so it waits forever without an error.
``connect_timeout`` (5.0)
    seconds to wait for a TCP (and TLS) connection.
``service`` (``mymaster``), ``sentinel_password``
    ``redis+sentinel://`` only: the master name(s), and the Sentinels' own password.
``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs`` (``required``),
``ssl_check_hostname`` (true)
    ``rediss://`` only: CA bundle, client certificate and key (mutual TLS), whether to
    verify the server certificate, and whether to check its host name (never checked
    when ``ssl_cert_reqs=none``).

Key layout (``P`` is the layer prefix; ``docs/backends/redis.md`` gives memory costs):
``P:q:QUEUE`` list of messages of a normal channel or process inbox, each stored as the
channel-name suffix after ``!``, a newline and the payload (a group envelope, see
:mod:`multilayer.fanout`, has an empty suffix); ``P:g:GROUP`` sorted set of member
channels scored by membership deadline, kept on the shard of each member;
``P:f:CONSUMER:QUEUE`` and ``P:l1:``/``P:l2:CONSUMER:QUEUE`` the in-flight and landing
lists of one receiving backend instance.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import logging
import random
import secrets
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import redis
from redis.asyncio.connection import AbstractConnection, ConnectionPool, SSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..backend import Backend, BrokerStats, Capabilities, LayerSettings, now
from ..capacity import CapacityPolicy
from ..exceptions import BrokerError, ChannelFull, ConfigurationError
from ..memberships import Membership
from ..names import non_local_name
from ..options import Option
from ..serialization import log_malformed
from ..url import LayerURL

__all__ = ["RedisBackend"]

logger = logging.getLogger(__name__)

#: Errors after which a connection is dropped and made again; anything else is a bug or
#: a misconfigured server and surfaces as BrokerError.
_TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)
#: Most commands one pipelined batch carries; bounds the memory of one write.
_MAX_BATCH = 512
#: Most messages one receive takes; Lua's ``unpack`` has a bounded stack.
_MAX_TAKE = 256
#: Extra lifetime of keys beyond the deadline of what they hold, for clock skew.
_GRACE_MS = 1000


class _Script:
    """A Lua script sent by SHA1, loaded again when the server answers NOSCRIPT."""

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


# Elements are ``suffix \n payload``; payloads start with the 8-byte big-endian deadline.
_LUA_HELPERS = """
-- A malformed element (another client's write) counts as live: Python logs and drops it.
local function expired(element, now)
  local at = string.find(element, '\\n', 1, true)
  if not at or #element < at + 8 then return false end
  return struct.unpack('>d', element, at + 1) <= now
end
local function keep_alive(key, ttl)
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end
-- Drops the expired messages at the head of a queue (deadlines grow along a queue, so
-- that is where they are) and returns its new length.
local function trim_expired(key, now)
  while true do
    local head = redis.call('LINDEX', key, 0)
    if not head or not expired(head, now) then break end
    redis.call('LPOP', key)
  end
  return redis.call('LLEN', key)
end
local function push(key, element, capacity, now, ttl)
  if redis.call('LLEN', key) >= capacity and trim_expired(key, now) >= capacity then
    return 0
  end
  redis.call('RPUSH', key, element)
  keep_alive(key, ttl)
  return 1
end
local function requeue(key, elements, ttl)
  if #elements == 0 then return end
  for i = #elements, 1, -1 do redis.call('LPUSH', key, elements[i]) end
  keep_alive(key, ttl)
end
-- What a consumer holds but has not handed out: an in-flight batch whose reply was lost
-- (its marker is not the last confirmed one) and messages in its landing lists, except
-- in the one (numbered ``delivered``, 0 for none) whose message was handed out.
local function held(inflight, confirmed, landings, delivered)
  local found = {}
  local flight = redis.call('LRANGE', inflight, 0, -1)
  if #flight > 0 and flight[1] ~= confirmed then
    for i = 2, #flight do found[#found + 1] = flight[i] end
  end
  for index, landing in ipairs(landings) do
    if index ~= delivered then
      for _, element in ipairs(redis.call('LRANGE', landing, 0, -1)) do
        found[#found + 1] = element
      end
    end
  end
  redis.call('DEL', inflight, unpack(landings))
  return found
end
"""

# KEYS: queue. ARGV: element, capacity, now, ttl_ms. Returns 1, or 0 when full.
_PUSH = _Script(
    "push",
    _LUA_HELPERS
    + "return push(KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]))",
)

# KEYS: queue, inflight, landing 1, landing 2. ARGV: now, limit, confirmed marker, new
# marker, delivered landing (0, 1 or 2), ttl_ms. Takes up to ``limit`` live messages,
# oldest first, records them as the new in-flight batch and returns them as one string
# of (4-byte length, element) pairs: far cheaper to parse than a RESP array.
_TAKE = _Script(
    "take",
    _LUA_HELPERS
    + """
local now, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
local found = held(KEYS[2], ARGV[3], {KEYS[3], KEYS[4]}, tonumber(ARGV[5]))
for _, element in ipairs(found) do
  if not expired(element, now) then out[#out + 1] = element end
end
if #out > limit then
  local extra = {}
  for i = limit + 1, #out do extra[#extra + 1] = out[i]; out[i] = nil end
  requeue(KEYS[1], extra, tonumber(ARGV[6]))
end
while #out < limit do
  local want = limit - #out
  local batch = redis.call('LPOP', KEYS[1], want)
  if not batch then break end
  for _, element in ipairs(batch) do
    if not expired(element, now) then out[#out + 1] = element end
  end
  if #batch < want then break end
end
if #out == 0 then return '' end
redis.call('RPUSH', KEYS[2], ARGV[4], unpack(out))
redis.call('PEXPIRE', KEYS[2], ARGV[6])
local framed = {}
for _, element in ipairs(out) do
  framed[#framed + 1] = struct.pack('>I4', #element)
  framed[#framed + 1] = element
end
return table.concat(framed)
""",
)

# KEYS: queue, inflight, landing 1, landing 2. ARGV: confirmed marker, delivered landing,
# ttl_ms. Puts what the consumer held back at the head of the queue; returns how many.
_RECOVER = _Script(
    "recover",
    _LUA_HELPERS
    + """
local found = held(KEYS[2], ARGV[1], {KEYS[3], KEYS[4]}, tonumber(ARGV[2]))
requeue(KEYS[1], found, tonumber(ARGV[3]))
return #found
""",
)

# KEYS: group. ARGV: channel, deadline, ttl_ms, now. Also drops expired memberships, so
# that a group added to but never sent to stays small.
_GROUP_ADD = _Script(
    "group_add",
    _LUA_HELPERS
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[4])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
keep_alive(KEYS[1], tonumber(ARGV[3]))
return 1
""",
)

# KEYS: group. ARGV: now, payload, ttl_ms, queue key prefix, group name, the payload's
# deadline, capacity, then (with capacity '') queue/capacity pairs for a non-uniform
# capacity policy; a member whose queue is not among them joined after they were
# computed, and is left out as if it had joined after this send. Returns the members
# skipped because they were full.
#
# The process-specific members of one inbox get one envelope between them (the format of
# multilayer.fanout), counted once against the inbox's capacity; a normal member gets its
# own copy. The header is packed here as msgpack-python packs it, so that an envelope is
# byte for byte what fanout.seal makes: cmsgpack would pack a whole-number deadline as an
# integer and a float that fits as float32, which decode alike but are not the same bytes.
_GROUP_SEND = _Script(
    "group_send",
    _LUA_HELPERS
    + """
-- msgpack heads: the type byte (and length) in front of an array or a string.
local function array_head(n)
  if n < 16 then return string.char(0x90 + n) end
  if n < 65536 then return struct.pack('>BI2', 0xdc, n) end
  return struct.pack('>BI4', 0xdd, n)
end
local FIXSTR = {}
for n = 0, 31 do FIXSTR[n] = string.char(0xa0 + n) end
local function str_head(n)
  if n < 32 then return FIXSTR[n] end
  if n < 256 then return string.char(0xd9, n) end
  if n < 65536 then return struct.pack('>BI2', 0xda, n) end
  return struct.pack('>BI4', 0xdb, n)
end

local now, payload, ttl = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local prefix, group, expires, uniform = ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7])
local capacities = {}
for i = 8, #ARGV, 2 do capacities[ARGV[i]] = tonumber(ARGV[i + 1]) end
local full, inboxes, order = {}, {}, {}
-- Files a member under its inbox, with its packed deadline; a normal member gets its copy.
local function add(member, deadline)
  local bang = string.find(member, '!', 1, true)
  local queue = bang and string.sub(member, 1, bang) or member
  local capacity = uniform or capacities[queue]
  if capacity and not bang then
    if push(prefix .. queue, '\\n' .. payload, capacity, now, ttl) == 0 then
      full[#full + 1] = member
    end
  elseif capacity then
    local inbox = inboxes[queue]
    if not inbox then
      inbox = {capacity = capacity, names = {}, deadlines = {}}
      inboxes[queue] = inbox
      order[#order + 1] = queue
    end
    local suffix, names = string.sub(member, bang + 1), inbox.names
    names[#names + 1] = str_head(#suffix)
    names[#names + 1] = suffix
    inbox.deadlines[#inbox.deadlines + 1] = deadline
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
-- A membership that outlives the message is sent as lasting forever (msgpack inf): the
-- copy expires first, so the receiver's check cannot tell the difference, and reading,
-- formatting and packing a score per member was most of this script's time. Only the
-- memberships ending sooner carry their deadline (struct.pack converts the score).
local soon = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. expires, 'WITHSCORES')
for i = 1, #soon, 2 do add(soon[i], struct.pack('>Bd', 0xcb, soon[i + 1])) end
local forever = struct.pack('>Bd', 0xcb, math.huge)
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], expires, '+inf')) do
  add(member, forever)
end
local body = string.sub(payload, 9)
local head = array_head(4) .. str_head(#group) .. group .. struct.pack('>Bd', 0xcb, now)
for _, queue in ipairs(order) do
  local inbox = inboxes[queue]
  local count = #inbox.deadlines
  local header = table.concat({head, array_head(count), table.concat(inbox.names),
    array_head(count), table.concat(inbox.deadlines)})
  local element = table.concat({'\\n', string.sub(payload, 1, 8), string.char(0xc1),
    struct.pack('>I4', #header), header, body})
  if push(prefix .. queue, element, inbox.capacity, now, ttl) == 0 then
    for i = 2, #inbox.names, 2 do full[#full + 1] = queue .. inbox.names[i] end
  end
end
return full
""",
)

# KEYS: group. ARGV: now, then channel, deadline, ttl_ms for each membership to restore.
# ZADD GT: a deadline another process renewed meanwhile is never shortened, and the key's
# lifetime only grows, as in group_add.
_RESTORE = _Script(
    "restore",
    _LUA_HELPERS
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local longest = 1
for i = 2, #ARGV, 3 do
  redis.call('ZADD', KEYS[1], 'GT', ARGV[i + 1], ARGV[i])
  longest = math.max(longest, tonumber(ARGV[i + 2]))
end
keep_alive(KEYS[1], longest)
return 1
""",
)

# KEYS: a layer's membership marker. ARGV: ttl_ms. 0 when the marker is missing (the
# server lost what the layer wrote, or it was never written); else 1, and the marker
# lives at least ttl_ms more.
_CHECK_MARK = _Script(
    "check memberships",
    _LUA_HELPERS
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
keep_alive(KEYS[1], tonumber(ARGV[1]))
return 1
""",
)

_SCRIPTS = {
    script.sha: script
    for script in (_PUSH, _TAKE, _RECOVER, _GROUP_ADD, _GROUP_SEND, _RESTORE, _CHECK_MARK)
}


def _pack(command: Sequence[Any]) -> bytes:
    """``command`` in the Redis protocol; leaner than redis-py's general packer."""
    parts = [b"*%d\r\n" % len(command)]
    for argument in command:
        if type(argument) is not bytes:
            argument = (repr(argument) if type(argument) is float else str(argument)).encode()
        parts.append(b"$%d\r\n%b\r\n" % (len(argument), argument))
    return b"".join(parts)


def _ttl_ms(deadline: float, current: float) -> int:
    return max(1, int((deadline - current) * 1000)) + _GRACE_MS


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class _Ring:
    """Consistent hashing of names onto shards: adding a shard moves about 1/n of them."""

    POINTS = 160

    def __init__(self, labels: Sequence[str]) -> None:
        points = sorted(
            (_hash(f"{label}#{point}"), index)
            for index, label in enumerate(labels)
            for point in range(self.POINTS)
        )
        self._hashes = [point for point, _ in points]
        self._owners = [owner for _, owner in points]
        self._cache: dict[str, int] = {}

    def owner(self, name: str) -> int:
        """The index of the shard that holds ``name``."""
        owner = self._cache.get(name)
        if owner is None:
            at = bisect.bisect(self._hashes, _hash(name)) % len(self._hashes)
            owner = self._owners[at]
            if len(self._cache) < 10_000:
                self._cache[name] = owner
        return owner


async def _closed_while_idle(connection: AbstractConnection) -> bool:
    """Whether an idle connection is unfit for a new command: closed, reset or holding a
    stray reply. Nothing has been written on it yet, so the caller may reconnect and send.
    """
    # redis-py 8 renamed can_read_destructive() (5.x to 7.x) back to can_read().
    check = getattr(connection, "can_read", None) or connection.can_read_destructive
    try:
        return bool(await check())
    except (RedisError, OSError):
        # redis-py 5.x to 7.x answer True for the server's EOF; 8.x raises ConnectionError
        # for it (and for a reset), and every version raises when the parser is already
        # gone. Letting that escape would fail the command as if its reply had been lost.
        return True


async def _discard(connection: AbstractConnection | None) -> None:
    if connection is not None:
        await connection.disconnect(nowait=True)


async def _evalsha(connection: AbstractConnection, script: _Script, *args: Any) -> Any:
    """Run ``script`` on ``connection``, loading it first if the server forgot it."""
    command = ("EVALSHA", script.sha, *args)
    try:
        await connection.send_packed_command(_pack(command), check_health=False)
        return await connection.read_response()
    except NoScriptError:
        await connection.send_packed_command(
            _pack(("SCRIPT", "LOAD", script.source)) + _pack(command), check_health=False
        )
        await connection.read_response()
        return await connection.read_response()


class _Shard:
    """One Redis server (or Sentinel-managed master) and this instance's connections to it."""

    def __init__(
        self,
        label: str,
        pool: ConnectionPool,
        sentinel: Sentinel | None,
        timeout: float,
        connect_timeout: float,
        on_back: Callable[[_Shard], None],
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
        self._on_back = on_back
        #: Set by whoever loses a connection to this server; the next connect made
        #: after it tells the backend the server is back (it may have lost its state).
        self.lost = False
        #: The address of the server the last connection reached (Sentinel: the master).
        self.address: tuple[str, int] | None = None
        #: Set when the master address changed: a promoted replica may have missed writes.
        self.moved = False
        self.link = _Link(self)

    def error(self, doing: str, error: BaseException) -> BrokerError:
        """A BrokerError naming this shard (never its credentials), caused by ``error``."""
        broker_error = BrokerError(f"Redis {self.label}: {doing} failed: {error}")
        broker_error.__cause__ = error
        return broker_error

    async def connect(self) -> AbstractConnection:
        """A new, connected connection; the caller owns it and must discard it."""
        connection: AbstractConnection = self.pool.make_connection()  # type: ignore[no-untyped-call]
        try:
            await asyncio.wait_for(connection.connect(), self._connect_within)  # type: ignore[no-untyped-call]
        except BaseException:
            await connection.disconnect(nowait=True)
            raise
        address = (str(getattr(connection, "host", "")), int(getattr(connection, "port", 0)))
        if self.address is not None and address != self.address:
            self.moved = True
        self.address = address
        if self.lost or self.moved:
            self.lost = False
            self._on_back(self)
        return connection


class _Watched:
    """Something that waits for Redis replies under the backend's watchdog.

    A timer per command would cost more than the command itself (``asyncio.timeout``
    takes several microseconds), so a command only records by when it must be answered
    and the backend's guard task closes the connection of whatever is overdue; the
    waiting read then fails like any lost connection.
    """

    def __init__(self, shard: _Shard) -> None:
        self._shard = shard
        self._connection: AbstractConnection | None = None
        #: Loop time by which the command in flight must be answered; None when idle.
        self._deadline: float | None = None
        self._overdue = False

    def _expect_reply(self, within: float) -> None:
        self._deadline = asyncio.get_running_loop().time() + within
        self._overdue = False

    def overdue(self, current: float) -> AbstractConnection | None:
        """The connection to close if its reply is late (guard task only)."""
        if self._deadline is not None and current > self._deadline:
            self._deadline = None
            self._overdue = True
            return self._connection
        return None

    def _explain(self, error: BaseException) -> BaseException:
        if self._overdue:
            return RedisTimeoutError(f"no reply within {self._shard.timeout:g}s")
        return error


class _Link(_Watched):
    """One connection carrying the commands of every concurrent caller, in pipelined batches.

    A caller finding the connection idle sends its command itself. Commands issued while
    a batch is on the wire are queued, and a writer task sends everything queued in one
    write and reads the replies in order, so concurrent sends cost one round trip per
    batch. A command whose caller was cancelled before it was written is not sent at all.
    """

    def __init__(self, shard: _Shard) -> None:
        super().__init__(shard)
        self._pending: deque[tuple[tuple[Any, ...], asyncio.Future[Any]]] = deque()
        self._busy = False
        self._writer: asyncio.Task[None] | None = None
        self._idle: asyncio.Future[None] | None = None

    async def call(self, *command: Any) -> Any:
        """Send ``command`` and return its reply; BrokerError if Redis failed."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self._busy or self._pending:
            self._pending.append((command, future))
            self._wake()
            return await future
        # The common case of one caller at a time: no hop through the writer task.
        self._busy = True
        try:
            await self._send([(command, future)])
        finally:
            self._busy = False
            if self._pending:
                self._wake()
        return await future

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
            connection, self._connection = self._connection, None
            await _discard(connection)

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        self._expect_reply(self._shard.timeout)
        try:
            if self._connection is not None and await _closed_while_idle(self._connection):
                # Closed by the server while idle (a restart, a timeout, CLIENT KILL):
                # nothing was sent on it, so reconnecting is safe.
                stale, self._connection = self._connection, None
                self._shard.lost = True
                await _discard(stale)
            if self._connection is None:
                self._connection = await self._shard.connect()
            connection = self._connection
            await connection.send_packed_command(
                b"".join(_pack(command) for command, _ in batch), check_health=False
            )
            forgotten: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
            for command, future in batch:
                try:
                    reply = await connection.read_response()
                except NoScriptError:
                    # Not run: the server restarted and forgot its scripts. Safe to resend.
                    forgotten.append((command, future))
                    continue
                except RedisError as error:
                    if isinstance(error, _TRANSIENT):
                        raise
                    _settle(future, error=self._shard.error(_describe(command), error))
                    continue
                _settle(future, reply)
            for sha in {command[1] for command, _ in forgotten}:
                await connection.send_packed_command(
                    _pack(("SCRIPT", "LOAD", _SCRIPTS[sha].source)), check_health=False
                )
                await connection.read_response()
            self._pending.extendleft(reversed(forgotten))
        except _TRANSIENT as error:
            # Replies not read are unknown: the commands may have run, so they are not
            # retried (a push retried could be delivered twice). The next call reconnects.
            lost, self._connection = self._connection, None
            self._shard.lost = True
            await _discard(lost)
            cause = self._explain(error)
            for command, future in batch:
                _settle(future, error=self._shard.error(_describe(command), cause))
        except RedisError as error:
            # A script the server refuses to load: every command still waiting fails.
            for command, future in batch:
                _settle(future, error=self._shard.error(_describe(command), error))
        except BaseException:
            # Cancelled mid-command: redis-py has closed the connection under us.
            lost, self._connection = self._connection, None
            await _discard(lost)
            raise
        finally:
            self._deadline = None

    async def close(self) -> None:
        writer = self._writer
        if writer is not None:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
        connection, self._connection = self._connection, None
        await _discard(connection)


def _describe(command: tuple[Any, ...]) -> str:
    if command[0] == "EVALSHA":
        return f"{_SCRIPTS[command[1]].name} script"
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


class _Receiver(_Watched):
    """The receiving side of one queue in one backend instance.

    It owns one connection and never lets a message exist only in a reply on the wire.
    For several waiting receives, the take script moves up to ``limit`` messages into
    this consumer's in-flight list, marked with a sequence number, and returns them; the
    next take deletes that batch, which was handed out when its reply arrived. For one
    waiting receive, or an empty queue, BLMOVE lands one message in one of two landing
    lists and returns it; the landing list used before is emptied in the same write, so
    that the server always tells which one holds a message already handed out. A reply
    lost to a dropped connection is thus still on the server, and the next take returns
    it; a reply lost to cancellation is put back at the head of the queue.
    """

    def __init__(self, backend: RedisBackend, shard: _Shard, queue: str) -> None:
        super().__init__(shard)
        self._backend = backend
        prefix = backend.settings.prefix
        self._queue = queue
        self._keys = (
            f"{prefix}:q:{queue}",
            f"{prefix}:f:{backend.consumer}:{queue}",
            f"{prefix}:l1:{backend.consumer}:{queue}",
            f"{prefix}:l2:{backend.consumer}:{queue}",
        )
        self._ttl = _ttl_ms(backend.settings.expiry, 0.0)
        self._block = shard.timeout / 2
        # What a blocking wait writes never changes: packed once, per landing list. The
        # server runs a client's commands in order, so the PEXPIRE follows the moment a
        # message lands: a process that dies then leaves nothing behind for good.
        queue, _, *landings = self._keys
        self._empty = [b""] + [_pack(("DEL", landing)) for landing in landings]
        self._block_into = [b""] + [
            _pack(("BLMOVE", queue, landing, "LEFT", "RIGHT", self._block))
            + _pack(("PEXPIRE", landing, self._ttl))
            for landing in landings
        ]
        self._client_id: int | None = None
        self._sequence = 0
        self._confirmed = "0"
        #: The landing list (1 or 2) whose message was handed out; 0 when none.
        self._delivered = 0
        #: Whether the server may hold messages taken for us whose reply was lost.
        self._holding = False

    async def _connect(self) -> AbstractConnection:
        if self._connection is None:
            self._connection = connection = await self._shard.connect()
            self._expect_reply(self._shard.timeout)
            try:
                await connection.send_packed_command(_pack(("CLIENT", "ID")), check_health=False)
                self._client_id = int(await connection.read_response())
            except BaseException:
                await self.drop()
                raise
            finally:
                self._deadline = None
        return self._connection

    async def pop(self, limit: int) -> list[tuple[str, bytes]]:
        delay = 0.05
        while True:
            try:
                # For one waiting receiver BLMOVE alone does: one round trip per message,
                # without a script, and it returns at once while the queue is not empty.
                # After a lost connection, a take first collects what the server holds.
                if limit > 1 or self._holding:
                    taken = await self._take(await self._connect(), min(limit, _MAX_TAKE))
                    if taken:
                        return taken
                landed = await self._wait(await self._connect())
                if landed is not None:
                    return [landed]
                delay = 0.05
            except asyncio.CancelledError:
                await self._put_back()
                raise
            except _TRANSIENT as error:
                reason = self._explain(error)
                await self.drop()
                self._holding = True
                self._shard.lost = True
                # One warning per outage; the retries that follow are debug noise.
                if delay == 0.05:
                    self._backend.reconnects += 1
                logger.log(
                    logging.WARNING if delay == 0.05 else logging.DEBUG,
                    "Redis %s: receiving from %r: %s; reconnecting in %.2fs",
                    self._shard.label,
                    self._queue,
                    reason,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            except RedisError as error:
                raise self._shard.error(f"receive from {self._queue!r}", error) from error

    async def _take(self, connection: AbstractConnection, limit: int) -> list[tuple[str, bytes]]:
        self._sequence += 1
        marker = str(self._sequence)
        self._expect_reply(self._shard.timeout)
        try:
            framed: bytes = await _evalsha(
                connection, _TAKE, 4, *self._keys, now(), limit, self._confirmed, marker,
                self._delivered, self._ttl,
            )  # fmt: skip
        finally:
            self._deadline = None
        self._confirmed = marker
        self._delivered = 0
        self._holding = False
        taken = []
        at, end = 0, len(framed)
        while at < end:
            size = int.from_bytes(framed[at : at + 4], "big")
            item = self._decode(framed[at + 4 : at + 4 + size])
            if item is not None:
                taken.append(item)
            at += 4 + size
        return taken

    async def _wait(self, connection: AbstractConnection) -> tuple[str, bytes] | None:
        target = 2 if self._delivered == 1 else 1
        command = self._empty[self._delivered] + self._block_into[target]
        self._expect_reply(self._shard.timeout + self._block)
        try:
            await connection.send_packed_command(command, check_health=False)
            if self._delivered:
                await connection.read_response()
                self._delivered = 0
            element = await connection.read_response()
            await connection.read_response()
        finally:
            self._deadline = None
        if element is None:
            return None
        self._delivered = target
        return self._decode(element)

    def _decode(self, element: bytes) -> tuple[str, bytes] | None:
        cut = element.find(b"\n")
        try:
            suffix = element[:cut].decode() if cut >= 0 else None
        except UnicodeDecodeError:
            suffix = None
        if suffix is None or (suffix and not self._queue.endswith("!")):
            log_malformed(self._queue, len(element), "bad channel-name suffix")
            return None
        return self._queue + suffix, element[cut + 1 :]

    async def _put_back(self) -> None:
        """After a cancelled receive: return what this consumer holds to its queue.

        The blocked BLMOVE is unblocked first on the server, so that no message can land
        after the recovery ran; a cancelled connection is closed by redis-py, but the
        server may not have noticed yet.
        """
        client_id = self._client_id
        await self.drop()
        if client_id is None:
            return
        connection: AbstractConnection | None = None

        async def recover() -> None:
            nonlocal connection
            connection = await self._shard.connect()
            await connection.send_packed_command(
                _pack(("CLIENT", "UNBLOCK", client_id))
                + _pack(("EVAL", _RECOVER.source, 4, *self._keys, self._confirmed,
                         self._delivered, self._ttl)),
            )  # fmt: skip
            await connection.read_response()
            await connection.read_response()

        try:
            await asyncio.wait_for(recover(), self._shard.timeout)
            self._delivered = 0
            self._confirmed = "0"
        except (RedisError, *_TRANSIENT) as error:
            logger.warning(
                "Redis %s: could not put back messages held for %r: %s",
                self._shard.label,
                self._queue,
                error,
            )
        finally:
            await _discard(connection)

    async def drop(self) -> None:
        """Close the connection; the next receive makes a new one."""
        connection, self._connection = self._connection, None
        self._client_id = None
        await _discard(connection)


class RedisBackend(Backend):
    """Channels as Redis lists, groups as sorted sets, sharded over one or more servers."""

    capabilities: ClassVar[Capabilities] = Capabilities(
        multiprocess=True,
        native_expiry=True,
        native_fanout=True,
        restartable=False,
        restores_memberships=True,
        queue_depth=True,
        group_sizes=True,
    )
    extra: ClassVar[str | None] = "redis"
    options: ClassVar[Mapping[str, Option]] = {
        "socket_timeout": Option(
            float,
            5.0,
            "seconds to wait for a Redis reply; idle receives re-block every half of it",
            minimum=0.2,
        ),
        "connect_timeout": Option(float, 5.0, "seconds to wait for a connection", minimum=0.1),
        "membership_check": Option(
            float,
            10.0,
            "seconds (jittered by +-50%) between checks that Redis still holds this layer's "
            "group memberships",
            minimum=0.5,
        ),
        "service": Option(
            str, "mymaster", "redis+sentinel: master name(s), comma-separated, one shard each"
        ),
        "sentinel_password": Option(
            str, None, "redis+sentinel: password of the Sentinels themselves", secret=True
        ),
        "ssl_ca_certs": Option(str, None, "rediss: CA bundle that signed the server certificate"),
        "ssl_certfile": Option(str, None, "rediss: client certificate file, for mutual TLS"),
        "ssl_keyfile": Option(str, None, "rediss: client private key file, for mutual TLS"),
        "ssl_cert_reqs": Option(
            str,
            "required",
            "rediss: verification of the server certificate",
            choices=("required", "optional", "none"),
        ),
        "ssl_check_hostname": Option(
            bool, True, "rediss: match the server certificate against the host name"
        ),
    }

    _SENTINEL_ONLY = ("service", "sentinel_password")
    _TLS_ONLY = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")

    @classmethod
    def check_url(cls, url: LayerURL, options: Mapping[str, Any]) -> None:
        where = url.without_query().sanitized()
        if url.path and not url.path.isdigit():
            raise ConfigurationError(
                f"{where}: the path must be a database number like /0, not {url.path!r}"
            )
        if len(set(url.hosts)) != len(url.hosts):
            raise ConfigurationError(f"{where}: a host appears twice in the host list")
        defaults = {name: cls.options[name].default for name in options}
        if url.scheme != "redis+sentinel":
            cls._refuse(url, options, defaults, cls._SENTINEL_ONLY, "redis+sentinel://")
        else:
            if not url.hosts:
                raise ConfigurationError(f"{where}: list the Sentinels, as host:port[,host:port]")
            services = options.get("service", "mymaster").split(",")
            if not all(service.strip() for service in services):
                raise ConfigurationError(f"{where}: option 'service' has an empty master name")
            if len(set(services)) != len(services):
                raise ConfigurationError(f"{where}: option 'service' names a master twice")
        if url.scheme != "rediss":
            cls._refuse(url, options, defaults, (*cls._TLS_ONLY, "ssl_check_hostname"), "rediss://")

    @staticmethod
    def _refuse(
        url: LayerURL,
        options: Mapping[str, Any],
        defaults: Mapping[str, Any],
        names: Sequence[str],
        scheme: str,
    ) -> None:
        for name in names:
            if name in options and options[name] != defaults[name]:
                where = url.without_query().sanitized()
                raise ConfigurationError(f"{where}: option {name!r} applies only to {scheme} URLs")

    @classmethod
    def versions(cls) -> dict[str, str]:
        return {"redis-py": redis.__version__}

    def __init__(self, url: LayerURL, settings: LayerSettings, options: Mapping[str, Any]) -> None:
        super().__init__(url, settings, options)
        #: Names this instance's landing and in-flight lists; unique per instance.
        self.consumer = secrets.token_hex(8)
        self._shards: list[_Shard] = []
        # Shards are named by the URL, never by a resolved address, so that every
        # process given the same URL hashes every name to the same shard.
        if url.scheme == "redis+sentinel":
            self._names = [name.strip() for name in self.config["service"].split(",")]
        else:
            hosts = [(host, port or 6379) for host, port in url.hosts] or [("localhost", 6379)]
            self._names = [f"{host}:{port}" for host, port in hosts]
        self._ring = _Ring(self._names)
        self._receivers: dict[str, _Receiver] = {}
        self._guard: asyncio.Task[None] | None = None
        self._sentry: asyncio.Task[None] | None = None
        self._recheck: asyncio.Event | None = None
        self._queue_prefix = f"{settings.prefix}:q:"
        self._group_prefix = f"{settings.prefix}:g:"

    async def open(self) -> None:
        config = self.config
        url = self.url
        timeout = config["socket_timeout"]
        common: dict[str, Any] = {
            "db": int(url.path or 0),
            "username": url.username,
            "password": url.password,
            "socket_timeout": None,
            "socket_connect_timeout": config["connect_timeout"],
            # Never retry behind our back: a push retried after a lost reply could be
            # delivered twice. Receivers reconnect themselves.
            "retry": Retry(NoBackoff(), 0),
        }
        if url.scheme == "redis+sentinel":
            # Typed from redis-py 8.2 on; untyped in the older releases pyproject admits.
            sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
                [(host, port or 26379) for host, port in url.hosts],
                sentinel_kwargs={
                    "password": config["sentinel_password"],
                    "socket_timeout": config["socket_timeout"],
                    "socket_connect_timeout": config["connect_timeout"],
                },
            )
            for service in self._names:
                pool: ConnectionPool = SentinelConnectionPool(  # type: ignore[no-untyped-call]
                    service, sentinel, **common
                )
                self._shards.append(
                    _Shard(
                        f"sentinel service {service!r}",
                        pool,
                        sentinel,
                        timeout,
                        config["connect_timeout"],
                        self._broker_back,
                    )
                )
        else:
            if url.scheme == "rediss":
                common.update(
                    connection_class=SSLConnection,
                    ssl_ca_certs=config["ssl_ca_certs"],
                    ssl_certfile=config["ssl_certfile"],
                    ssl_keyfile=config["ssl_keyfile"],
                    ssl_cert_reqs=config["ssl_cert_reqs"],
                    ssl_check_hostname=config["ssl_check_hostname"]
                    and config["ssl_cert_reqs"] != "none",
                )
            for name in self._names:
                host, _, port = name.rpartition(":")
                pool = ConnectionPool(host=host, port=int(port), **common)
                self._shards.append(
                    _Shard(name, pool, None, timeout, config["connect_timeout"], self._broker_back)
                )
        self._recheck = asyncio.Event()
        self._guard = asyncio.create_task(self._guard_loop(), name="multilayer redis guard")
        self._sentry = asyncio.create_task(
            self._sentry_loop(), name="multilayer redis membership check"
        )

    async def _guard_loop(self) -> None:
        """Close the connections of overdue replies until close(), then release them all.

        asyncio.run() cancels every pending task before it closes its loop, so the
        release also runs when the loop ends without close(): no socket is left open.
        """
        loop = asyncio.get_running_loop()
        period = min(1.0, self.config["socket_timeout"] / 4)
        try:
            while True:
                await asyncio.sleep(period)
                current = loop.time()
                watched: list[_Watched] = [shard.link for shard in self._shards]
                for late in (*watched, *self._receivers.values()):
                    connection = late.overdue(current)
                    if connection is not None:
                        await _discard(connection)
        finally:
            for receiver in self._receivers.values():
                await receiver.drop()
            sentinels = {}
            for shard in self._shards:
                await shard.link.close()
                if shard.sentinel is not None:
                    sentinels[id(shard.sentinel)] = shard.sentinel
            for sentinel in sentinels.values():
                for client in sentinel.sentinels:
                    await client.aclose()

    async def close(self) -> None:
        # The sentry first: it sends through the links the guard releases.
        for task in (self._sentry, self._guard):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    # -- memberships a restart lost ----------------------------------------------------

    def _broker_back(self, _shard: _Shard) -> None:
        """A server answered again after a lost connection: check its memberships soon."""
        if self._recheck is not None:
            self._recheck.set()

    async def _sentry_loop(self) -> None:
        """Check every ``membership_check`` seconds, and soon after any reconnect, that
        each server still holds this layer's memberships; re-assert them where it lost them.

        Waits are jittered so that processes started, or reconnected, together do not
        check in step; a check that failed (the server is still away) is tried again
        within a second.
        """
        assert self._recheck is not None
        interval = self.config["membership_check"]
        wait = interval
        while True:
            try:
                await asyncio.wait_for(self._recheck.wait(), wait * random.uniform(0.5, 1.5))
                # Every process that lost its connection reconnects at about the same
                # moment: spread their checks over half a second.
                await asyncio.sleep(random.uniform(0.0, min(0.5, interval / 2)))
            except asyncio.TimeoutError:
                pass
            self._recheck.clear()
            try:
                await self._check_memberships()
                wait = interval
            except BrokerError as error:
                logger.debug("membership check deferred: %s", error)
                wait = min(interval, 1.0)
            except Exception:
                # A bug here must not end the checks for good, nor go unseen.
                logger.exception("membership check failed")
                wait = interval

    async def _check_memberships(self) -> None:
        """One round trip per server when nothing was lost (a marker key per layer, which
        lives as long as the layer's latest membership); else re-assert, then re-mark."""
        latest = self.membership_ledger.latest()
        if latest is None:
            return
        marker = f"{self.settings.prefix}:m:{self.membership_ledger.token}"
        ttl = _ttl_ms(latest, now())

        async def check(shard: _Shard) -> None:
            moved, shard.moved = shard.moved, False
            if not moved and await shard.link.call("EVALSHA", _CHECK_MARK.sha, 1, marker, ttl):
                return
            try:
                await self.reassert_memberships(
                    lambda _group, channel: self._shard(non_local_name(channel)) is shard
                )
                await shard.link.call("SET", marker, 1, "PX", ttl)
            except BaseException:
                shard.moved = shard.moved or moved
                raise

        await asyncio.gather(*(check(shard) for shard in self._shards))

    async def restore_memberships(self, entries: list[Membership]) -> None:
        """One script per group and server, run concurrently (pipelined on each link)."""
        by_key: dict[tuple[int, str], list[Any]] = {}
        current = now()
        for group, channel, deadline in entries:
            shard = self._shards.index(self._shard(non_local_name(channel)))
            by_key.setdefault((shard, group), []).extend(
                (channel, deadline, _ttl_ms(deadline, current))
            )
        await asyncio.gather(
            *(
                self._shards[shard].link.call(
                    "EVALSHA", _RESTORE.sha, 1, self._group_prefix + group, current, *arguments
                )
                for (shard, group), arguments in by_key.items()
            )
        )

    async def broker_version(self) -> str | None:
        info: bytes = await self._shards[0].link.call("INFO", "server")
        for line in info.decode().splitlines():
            if line.startswith("redis_version:"):
                return line.partition(":")[2]
        return None

    def _shard(self, name: str) -> _Shard:
        if len(self._shards) == 1:
            return self._shards[0]
        return self._shards[self._ring.owner(name)]

    def _receiver(self, queue: str) -> _Receiver:
        receiver = self._receivers.get(queue)
        if receiver is None:
            receiver = self._receivers[queue] = _Receiver(self, self._shard(queue), queue)
        return receiver

    async def declare_inbox(self, inbox: str) -> None:
        """Check that the inbox's shard answers: a Redis list needs no declaration, since
        a message sent to a missing list creates it and waits there."""
        await self._shard(inbox).link.call("PING")

    async def push(self, channel: str, payload: bytes, *, deadline: float, capacity: int) -> None:
        queue = non_local_name(channel)
        current = now()
        accepted = await self._shard(queue).link.call(
            "EVALSHA",
            _PUSH.sha,
            1,
            self._queue_prefix + queue,
            channel[len(queue) :].encode() + b"\n" + payload,
            capacity,
            current,
            _ttl_ms(deadline, current),
        )
        if not accepted:
            raise ChannelFull(f"channel {channel!r} is full ({capacity} messages waiting)")

    async def pop(self, queue: str, limit: int) -> list[tuple[str, bytes]]:
        return await self._receiver(queue).pop(limit)

    async def group_add(self, group: str, channel: str, *, deadline: float) -> None:
        current = now()
        await self._shard(non_local_name(channel)).link.call(
            "EVALSHA",
            _GROUP_ADD.sha,
            1,
            self._group_prefix + group,
            channel,
            deadline,
            _ttl_ms(deadline, current),
            current,
        )

    async def group_discard(self, group: str, channel: str) -> None:
        await self._shard(non_local_name(channel)).link.call(
            "ZREM", self._group_prefix + group, channel
        )

    async def group_send(
        self, group: str, payload: bytes, *, deadline: float, capacity: CapacityPolicy
    ) -> None:
        """One script per shard, run concurrently: each delivers to the members it holds.

        A membership lives on its member's shard, so each script finds there the inboxes
        of its process-specific members and seals one envelope per inbox in place.
        """
        key = self._group_prefix + group
        current = now()
        ttl = _ttl_ms(deadline, current)

        async def fan_out(shard: _Shard) -> list[bytes]:
            if capacity.uniform:
                targets: list[Any] = [capacity.default]
            else:
                members = await shard.link.call("ZRANGEBYSCORE", key, f"({current!r}", "+inf")
                if not members:
                    return []
                targets = [""]
                for queue in dict.fromkeys(non_local_name(member.decode()) for member in members):
                    targets += [queue, capacity.for_channel(queue)]
            full: list[bytes] = await shard.link.call(
                "EVALSHA", _GROUP_SEND.sha, 1, key, current, payload, ttl,
                self._queue_prefix, group, deadline, *targets,
            )  # fmt: skip
            return full

        if len(self._shards) == 1:
            results = [await fan_out(self._shards[0])]
        else:
            results = await asyncio.gather(*(fan_out(shard) for shard in self._shards))
        # The script returns the full members only: how many it reached stays on Redis.
        self.skip_full_members(group, sum(len(full) for full in results))

    async def broker_stats(self) -> BrokerStats:
        """LLEN of every queue and ZCOUNT of live members of every group, on every shard.

        A queue's length may include expired messages its next receive will drop.
        """
        queues: dict[str, int] = {}
        groups: dict[str, int] = {}
        current = now()
        for shard in self._shards:
            for prefix, table in ((self._queue_prefix, queues), (self._group_prefix, groups)):
                cursor = b"0"
                while True:
                    cursor, keys = await shard.link.call(
                        "SCAN", cursor, "MATCH", prefix + "*", "COUNT", 1000
                    )
                    if keys:
                        counts = await asyncio.gather(
                            *(
                                shard.link.call("LLEN", key)
                                if table is queues
                                else shard.link.call("ZCOUNT", key, f"({current!r}", "+inf")
                                for key in keys
                            )
                        )
                        for key, count in zip(keys, counts, strict=True):
                            name = key.decode()[len(prefix) :]
                            table[name] = table.get(name, 0) + int(count)
                    if cursor == b"0":
                        break
        return BrokerStats(
            queues={name: count for name, count in queues.items() if count},
            groups={name: count for name, count in groups.items() if count},
        )

    async def flush(self) -> None:
        """Delete every key under this prefix on every shard (SCAN, then UNLINK a page)."""
        pattern = f"{self.settings.prefix}:*"
        for shard in self._shards:
            cursor = b"0"
            while True:
                cursor, keys = await shard.link.call(
                    "SCAN", cursor, "MATCH", pattern, "COUNT", 1000
                )
                if keys:
                    await shard.link.call("UNLINK", *keys)
                if cursor == b"0":
                    break
