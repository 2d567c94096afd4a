"""The receiving side of one queue: messages taken so that none is lost or doubled.

:class:`Receiver` owns one connection per queue it receives from (a process inbox, or a
normal channel), blocks on it with BLMOVE for one waiting receive or takes a batch with
the take script (:mod:`.scripts`) for several, and reconnects on its own after a lost
connection, collecting first what the server took for it before the loss.
"""

from __future__ import annotations

import asyncio
import logging

from redis.exceptions import RedisError

from ...backend import Backend, now
from ...serialization import log_malformed
from .scripts import RECOVER, TAKE, evalsha, ttl_ms
from .shard import TRANSIENT, Place, Watched
from .wire import Wire, discard, pack

__all__ = ["Receiver"]

logger = logging.getLogger(__name__)

#: Most messages one receive takes; Lua's ``unpack`` has a bounded stack.
_MAX_TAKE = 256


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
        #: Whether messages may wait in the queue, as last seen: a take found some, or a
        #: blocking wait saw more behind the one it landed. If not, the next pop blocks
        #: at once rather than first running a take that would most likely find none.
        self._backlog = True

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

    async def pop(self, limit: int) -> list[tuple[str, bytes]]:
        """Up to ``limit`` messages of the queue, waiting for the first as long as it
        takes; a lost connection is made again (BrokerError only for a server's refusal)."""
        # The receives this queue's last pop woke run first: a reply one of them sends
        # then leaves before this pop's command, not behind it, and more messages may
        # arrive for the batch. Not for a single receive (a normal channel's): it has no
        # batch to grow, and the extra turn of the loop costs it a system call.
        if limit > 1:
            await asyncio.sleep(0)
        delay = 0.05
        while True:
            try:
                # For one waiting receiver BLMOVE alone does: one round trip per message,
                # without a script, and it returns at once while the queue is not empty.
                # For several, a take, unless the queue was just seen empty: then BLMOVE
                # waits for the next message in the same round trip. After a lost
                # connection, a take first collects what the server holds.
                if (limit > 1 and self._backlog) or self._holding:
                    taken = await self._take(await self._connect(), min(limit, _MAX_TAKE))
                    if taken:
                        return taken
                landed = await self._wait(await self._connect(), count=limit > 1)
                if landed is not None and limit > 1 and self._backlog:
                    # More wait behind it: a take collects the landed message from its
                    # landing list (so it is not handed out yet), with the others.
                    self._delivered = 0
                    taken = await self._take(
                        await self._connect(), min(limit, _MAX_TAKE), collect=True
                    )
                    if taken:
                        return taken
                elif landed is not None:
                    return [landed]
                delay = 0.05
            except asyncio.CancelledError:
                await self._put_back()
                raise
            except TRANSIENT as error:
                reason = self._explain(error)
                await self.drop()
                self._holding = True
                self._shard.lose()
                # On a cluster the slot may have a new master by now: have it looked up.
                await self._place.follow(error)
                # One warning per outage; the retries that follow are debug noise.
                if delay == 0.05:
                    self._owner.reconnects += 1
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
                # Refused (or redirected: a cluster slot moved, or is moving): nothing was
                # taken, but the landing list handed out may not have been emptied yet,
                # and replies to the commands behind the refused one are still due: a
                # new connection reads none of them as its own.
                await self.drop()
                self._holding = True
                if not await self._place.follow(error):
                    raise self._shard.error(f"receive from {self._queue!r}", error) from error

    async def _take(
        self, wire: Wire, limit: int, *, collect: bool = False
    ) -> list[tuple[str, bytes]]:
        """Up to ``limit`` messages; ``collect``: also what the landing lists hold
        (which the script looks for anyway while the server may hold a lost reply's)."""
        self._sequence += 1
        marker = str(self._sequence)
        self._expect_reply(self._shard.timeout)
        try:
            framed: bytes = await evalsha(
                wire, TAKE, 4, *self._keys, now(), limit, self._confirmed, marker,
                self._delivered, self._ttl, int(collect or self._holding),
            )  # fmt: skip
        finally:
            self._deadline = None
        self._confirmed = marker
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
        # Messages keep coming (or more wait): take again. None: the pop blocks next.
        self._backlog = count > 0
        return taken

    async def _wait(self, wire: Wire, *, count: bool) -> tuple[str, bytes] | None:
        target = 2 if self._delivered == 1 else 1
        command = self._empty[self._delivered] + self._block_into[target]
        if count:
            command += self._count
        self._expect_reply(self._shard.timeout + self._block)
        try:
            await wire.write(command)
            if self._delivered:
                await wire.read()
                self._delivered = 0
            element = await wire.read()
            await wire.read()
            if count:
                self._backlog = bool(await wire.read())
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
        after the recovery ran; the cancelled connection is closed first, but the server
        may not have noticed yet.
        """
        client_id = self._client_id
        # Until the recovery ran, the lists may hold messages: the next take looks.
        self._holding = True
        await self.drop()
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
            await asyncio.wait_for(recover(), self._shard.timeout)
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
        """Close the connection; the next receive makes a new one. ``wait``: until it is
        closed (see :func:`.shard.discard`), when the backend is released."""
        connection, self._connection = self._connection, None
        self._client_id = None
        await discard(connection, wait=wait)
