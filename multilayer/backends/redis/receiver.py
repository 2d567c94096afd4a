"""The receiving side of one queue: messages taken so that none is lost or doubled.

:class:`Receiver` owns one connection per queue it receives from (a process inbox, or a
normal channel), blocks on it with BLMOVE for one waiting receive or takes a batch with
the take script (:mod:`.scripts`) for several, and reconnects on its own after a lost
connection, collecting first what the server took for it before the loss. Its commands
are sent when receives start waiting (:meth:`Receiver.arm`), not by the task that reads
the replies.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from ...backend import Backend, now
from ...serialization import log_malformed
from ...toolkit import within
from .scripts import RECOVER, TAKE, ttl_ms
from .shard import TRANSIENT, Place, Watched
from .wire import Wire, discard, pack

__all__ = ["Receiver"]

logger = logging.getLogger(__name__)

#: Most messages one receive takes; Lua's ``unpack`` has a bounded stack.
_MAX_TAKE = 256
#: The commands a receiver may have in flight.
_WAIT, _TAKE = 1, 2


class Receiver(Watched):
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

    The command is sent by :meth:`arm`, from the step of the receive that starts waiting,
    without awaiting; the core's one pending :meth:`pop` per queue reads its replies. So
    nothing is in flight while nobody waits: the queue's messages stay in Redis, where
    its capacity counts them.
    """

    def __init__(self, owner: Backend, consumer: str, place: Place, queue: str) -> None:
        super().__init__(place.shard())
        #: The backend instance, whose ``reconnects`` count this receiver's outages.
        self._owner = owner
        #: Where the queue lives; on a cluster, its server is looked up at each connect.
        self._place = place
        prefix, tag = owner.settings.prefix, place.tag
        self._queue = queue
        self._keys = (
            f"{prefix}:q:{tag}{queue}",
            f"{prefix}:f:{tag}{consumer}:{queue}",
            f"{prefix}:l1:{tag}{consumer}:{queue}",
            f"{prefix}:l2:{tag}{consumer}:{queue}",
        )
        self._ttl = ttl_ms(owner.settings.expiry, 0.0)
        self._block = self._shard.timeout / 2
        # What a blocking wait writes never changes: packed once, per landing list. The
        # server runs a client's commands in order, so the PEXPIRE follows the moment a
        # message lands: a process that dies then leaves nothing behind for good.
        queue, _, *landings = self._keys
        # For several waiting receives, an LLEN behind them says whether more wait: if
        # not, the next pop blocks at once rather than first running a take that would
        # find the queue empty.
        self._empty = [b""] + [pack(("DEL", landing)) for landing in landings]
        self._block_into = [b""] + [
            pack(("BLMOVE", queue, landing, "LEFT", "RIGHT", self._block))
            + pack(("PEXPIRE", landing, self._ttl))
            for landing in landings
        ]
        self._count = pack(("LLEN", queue))
        self._client_id: int | None = None
        self._sequence = 0
        self._confirmed = "0"
        #: The landing list (1 or 2) whose message was handed out; 0 when none.
        self._delivered = 0
        #: Whether the server may hold messages taken for us whose reply was lost.
        self._holding = False
        #: Whether messages may wait in the queue, as last seen: a take found more than
        #: one, or a blocking wait saw more behind the one it landed. If not, the next
        #: pop blocks at once rather than first running a take that would most likely
        #: find one message or none.
        self._backlog = True
        #: The command in flight (``_WAIT``, ``_TAKE``; 0: none), and the most messages it
        #: takes.
        self._armed = 0
        self._armed_limit = 0
        #: How many messages receives asked for while no command could be sent.
        self._wanted = 0
        #: Set by :meth:`arm` for a pop waiting without a connection.
        self._kick: asyncio.Future[None] | None = None
        #: Seconds before the next reconnect after a lost connection.
        self._delay = 0.05
        #: The take in flight, as sent (sent again if the server forgot the script).
        self._take_sent = b""

    async def _connect(self) -> Wire:
        if self._connection is None:
            self._shard = self._place.shard()
            self._connection = wire = await self._shard.connect()
            self._expect_reply(self._shard.timeout)
            try:
                await wire.write(pack(("CLIENT", "ID")))
                self._client_id = int(await wire.read())
            except BaseException:
                await self.drop()
                raise
            finally:
                self._deadline = None
        return self._connection

    def arm(self, limit: int) -> None:
        """Receives wait: send the command that takes up to ``limit`` messages now, from
        the caller's step, unless one is in flight; :meth:`pop` reads what it took. Without
        a usable connection, :meth:`pop` is asked to make one and send it."""
        if self._armed:
            return
        self._wanted = limit
        wire = self._connection
        # A connection still being made (its CLIENT ID unanswered) is pop's to use.
        if wire is not None and self._client_id is not None:
            try:
                self._send(wire)
                return
            except TRANSIENT:
                pass  # pop's pending read fails too, and makes a new connection
        kick = self._kick
        if kick is not None and not kick.done():
            kick.set_result(None)

    def _send(self, wire: Wire) -> None:
        """Send the command for what is wanted: for one waiting receive BLMOVE alone (one
        round trip per message, without a script, returning at once while the queue is
        not empty); for several, a take, unless the last one found one message or none
        (then BLMOVE waits for the next message in the same round trip); a take first
        after a lost connection, to collect what the server holds."""
        limit = min(self._wanted, _MAX_TAKE)
        if (limit > 1 and self._backlog) or self._holding:
            command = self._take_command(limit, collect=False)
            self._armed = _TAKE
            self._expect_reply(self._shard.timeout)
        else:
            # The landing list handed out (if any) is emptied before the BLMOVE, so that
            # it has run before any message lands.
            command = self._empty[self._delivered] + self._block_into[self._landing()]
            if limit > 1:
                command += self._count
            self._armed = _WAIT
            self._expect_reply(self._shard.timeout + self._block)
        wire.send(command)
        self._armed_limit = limit
        self._wanted = 0

    async def pop(self, limit: int) -> list[tuple[str, bytes]]:
        """Up to ``limit`` messages, waiting for the first as long as it takes; with
        ``limit`` 0, what the command :meth:`arm` sent took (none if a blocking wait
        timed out, or a take found the queue empty), waiting for :meth:`arm` meanwhile.
        A lost connection is made again (BrokerError only for a server's refusal)."""
        while True:
            if limit and not self._armed:
                self._wanted = limit
            taken = await self._pop_armed()
            if taken or not limit:
                return taken

    async def _pop_armed(self) -> list[tuple[str, bytes]]:
        asked = bool(self._armed or self._wanted)
        try:
            if not self._armed:
                if self._wanted:
                    self._send(await self._connect())
                elif self._connection is None:
                    self._kick = asyncio.get_running_loop().create_future()
                    try:
                        await self._kick
                    finally:
                        self._kick = None
                    return []
            wire = self._connection
            assert wire is not None
            taken = await self._finish(wire)
            self._delay = 0.05
            return taken
        except asyncio.CancelledError:
            await self._put_back()
            raise
        except TRANSIENT as error:
            # Nothing was asked of a connection that failed while it waited for arm().
            idle = not (asked or self._armed)
            reason = self._explain(error)
            await self.drop()
            self._holding = True
            self._shard.lose()
            # On a cluster the slot may have a new master by now: have it looked up.
            await self._place.follow(error)
            if idle:
                # Closed while nothing was asked (a server's idle timeout, a restart):
                # the next receive connects again, and collects what the server holds.
                logger.debug("Redis %s: idle receiver of %r closed: %s",
                             self._shard.label, self._queue, reason)  # fmt: skip
                return []
            # One warning per outage; the retries that follow are debug noise.
            if self._delay == 0.05:
                self._owner.reconnects += 1
            logger.log(
                logging.WARNING if self._delay == 0.05 else logging.DEBUG,
                "Redis %s: receiving from %r: %s; reconnecting in %.2fs",
                self._shard.label,
                self._queue,
                reason,
                self._delay,
            )
            await asyncio.sleep(self._delay)
            self._delay = min(self._delay * 2, 2.0)
            return []
        except RedisError as error:
            # Refused (or redirected: a cluster slot moved, or is moving): nothing was
            # taken, but the landing list handed out may not have been emptied yet,
            # and replies to the commands behind the refused one are still due: a
            # new connection reads none of them as its own.
            await self.drop()
            self._holding = True
            if not await self._place.follow(error):
                raise self._shard.error(f"receive from {self._queue!r}", error) from error
            return []

    async def _finish(self, wire: Wire) -> list[tuple[str, bytes]]:
        """Read the replies to the command in flight (the first one waits until
        :meth:`arm` sends a command, if none is in flight yet)."""
        first = await self._first_reply(wire)
        if self._armed == _TAKE:
            return self._taken(first)
        if self._armed != _WAIT:
            raise RedisConnectionError("Protocol error: a reply to no command")
        # What the wait was sent with: _delivered changes only below.
        target = self._landing()
        if self._delivered:
            self._delivered = 0
            first = await wire.read()
        element = first
        await wire.read()
        count = self._armed_limit > 1
        if count:
            self._backlog = bool(await wire.read())
        self._deadline = None
        self._armed = 0
        if element is None:
            return []
        if count and self._backlog:
            # More wait behind it: a take collects the landed message from its landing
            # list (so it is not handed out yet), with the others.
            self._expect_reply(self._shard.timeout)
            self._armed = _TAKE
            await wire.write(self._take_command(self._armed_limit, collect=True))
            return self._taken(await self._first_reply(wire))
        self._delivered = target
        landed = self._decode(element)
        return [] if landed is None else [landed]

    async def _first_reply(self, wire: Wire) -> Any:
        """The first reply to the command in flight; a take the server forgot (a restart
        flushed its scripts) is loaded and sent again: it did not run."""
        try:
            return await wire.read()
        except NoScriptError:
            if self._armed != _TAKE:
                raise
            await wire.write(pack(("SCRIPT", "LOAD", TAKE.source)) + self._take_sent)
            await wire.read()
            return await wire.read()

    def _landing(self) -> int:
        """The landing list (1 or 2) a wait lands in: not the one handed out."""
        return 2 if self._delivered == 1 else 1

    def _take_command(self, limit: int, *, collect: bool) -> bytes:
        """The take of up to ``limit`` messages; ``collect``: also what the landing lists
        hold (which the script looks for anyway while the server may hold a lost
        reply's)."""
        self._sequence += 1
        self._take_sent = pack(
            ("EVALSHA", TAKE.sha, 4, *self._keys, now(), limit, self._confirmed,
             str(self._sequence), self._delivered, self._ttl, int(collect or self._holding))
        )  # fmt: skip
        return self._take_sent

    def _taken(self, framed: bytes) -> list[tuple[str, bytes]]:
        """The messages of a take's reply, which is one string of (4-byte length,
        element) pairs."""
        self._deadline = None
        self._armed = 0
        # The batch just read is the one the take in flight marked.
        self._confirmed = str(self._sequence)
        self._delivered = 0
        self._holding = False
        taken = []
        count = 0
        at, end = 0, len(framed)
        while at < end:
            size = int.from_bytes(framed[at : at + 4], "big")
            item = self._decode(framed[at + 4 : at + 4 + size])
            if item is not None:
                taken.append(item)
            at += 4 + size
            count += 1
        # A batch: more may be coming, take again. One message or none: this receiver
        # keeps up with its queue, which the take left empty, so the next wait blocks in
        # BLMOVE, which costs the server no script and returns at once if one came; the
        # LLEN behind it says when a backlog builds up again.
        self._backlog = count > 1
        return taken

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
        """After a cancelled pop: return what this consumer holds to its queue.

        The blocked BLMOVE is unblocked first on the server, so that no message can land
        after the recovery ran; the cancelled connection is closed first, but the server
        may not have noticed yet. A pop cancelled with no command in flight holds nothing
        that was not handed out: its connection is only closed.
        """
        client_id = self._client_id
        idle = not self._armed and not self._holding
        await self.drop()
        if idle:
            return
        # Until the recovery ran, the lists may hold messages: the next take looks.
        self._holding = True
        if client_id is None:
            return
        wire: Wire | None = None

        async def recover() -> None:
            nonlocal wire
            wire = await self._shard.connect()
            await wire.write(
                pack(("CLIENT", "UNBLOCK", client_id))
                + pack(("EVAL", RECOVER.source, 4, *self._keys, self._confirmed,
                         self._delivered, self._ttl)),
            )  # fmt: skip
            await wire.read()
            await wire.read()

        try:
            await within(recover(), self._shard.timeout)
            self._delivered = 0
            self._confirmed = "0"
            self._holding = False
        except (RedisError, *TRANSIENT) as error:
            logger.warning(
                "Redis %s: could not put back messages held for %r: %s",
                self._shard.label,
                self._queue,
                error,
            )
        finally:
            await discard(wire, wait=True)

    async def drop(self, *, wait: bool = False) -> None:
        """Close the connection; the next receive makes a new one. ``wait``: the backend
        is released (see :meth:`.Watched._let_go`)."""
        self._client_id = None
        self._armed = 0
        self._deadline = None
        await self._let_go(wait=wait)
