"""A link: one DEALER socket in one event loop, to a hub or to another process's node.

It matches replies to requests by id, batches the requests and the leased sends of one
event-loop step into one ZeroMQ message each, and hands a hub's ``ginval`` to the
backend's group copies.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import zmq
import zmq.asyncio

from ...exceptions import BrokerError
from .protocol import DEFAULT_MAX_MESSAGE, WANT, decode, encode
from .security import Curve

__all__ = ["Link", "Restarted", "log_send_failure"]

logger = logging.getLogger(__name__.rpartition(".")[0])

#: Bytes of payloads one batch of leased sends holds before it is written: a batch is one
#: frame, and every frame must stay within the sockets' DEFAULT_MAX_MESSAGE (a frame of
#: one payload alone may be larger, up to largest_payload(max_message_size)).
_BATCH_BYTES = 1024 * 1024
#: A leased send this long after the previous write goes out at once, unbatched.
_SPARSE = 0.001
#: How long a closed socket still tries to write what was written to it (ms). Zero would
#: drop a send or group_send that had returned but not yet left the process when its
#: layer closed or its event loop ended; closing never waits for it.
LINGER_MS = 10_000


class Restarted(Exception):
    """The hub restarted: a pop parked at the old hub will never be answered."""


class Link:
    """A DEALER socket in one event loop, matching replies to requests by id."""

    def __init__(
        self,
        owned: list[zmq.Socket[bytes]],
        endpoint: str,
        curve: Curve | None,
        server_key: bytes | None,
        orphan: Any,
        invalidate: Callable[[str | None], None] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._invalidate = invalidate
        raw: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        # The backend owns the raw socket and closes it even if its event loop just ends
        # (async_to_sync); the asyncio view is a shadow that never warns on collection.
        owned.append(raw)
        raw.setsockopt(zmq.LINGER, LINGER_MS)
        raw.setsockopt(zmq.MAXMSGSIZE, DEFAULT_MAX_MESSAGE)
        raw.setsockopt(zmq.SNDHWM, 100_000)
        raw.setsockopt(zmq.RCVHWM, 100_000)
        if curve is not None and server_key is not None:
            curve.client(raw, server_key)
        raw.connect(endpoint)
        self.raw = raw
        self.sock = zmq.asyncio.Socket.from_socket(raw)
        self.pending: dict[int, asyncio.Future[tuple[list[Any], list[bytes]]]] = {}
        self.pops: dict[int, str] = {}
        #: Messages were sent on a lease since the node last answered.
        self.unsettled = False
        #: Messages sent on leases, not yet written: ([key, channel, size], payload) pairs.
        self._leased: list[tuple[list[Any], bytes]] = []
        self._leased_bytes = 0
        #: Requests batched by start_batched, not yet written.
        self._requests: list[tuple[str, int, list[Any], list[bytes]]] = []
        self._last_write = 0.0
        self._orphan = orphan
        self._ids = itertools.count(1)
        self._reader = asyncio.ensure_future(self._read())

    def start(
        self,
        command: str,
        args: Sequence[Any],
        payloads: Sequence[bytes] = (),
        *,
        ahead: bool = False,
    ) -> tuple[int, asyncio.Future[tuple[list[Any], list[bytes]]]]:
        """Send a request now; its id and the future of its reply. ``ahead``: before the
        messages and requests batched in this loop step (for a request whose order does
        not matter), which then still go out together at the end of the step.
        """
        if not ahead:
            self.write_leased()
            self.write_requests()
        request_id = next(self._ids)
        future: asyncio.Future[tuple[list[Any], list[bytes]]] = (
            asyncio.get_running_loop().create_future()
        )
        try:
            self._write([encode(command, request_id, *args), *payloads])
        except zmq.ZMQError as error:
            raise BrokerError(f"cannot send to {self.endpoint}: {error}") from error
        self.pending[request_id] = future
        return request_id, future

    async def call(
        self, command: str, args: Sequence[Any], payloads: Sequence[bytes], timeout: float
    ) -> list[Any]:
        """Send a request and wait up to ``timeout`` seconds for its reply arguments."""
        request_id, future = self.start(command, args, payloads)
        try:
            # Not wait_for: on Python 3.11 it can swallow a cancellation that arrives as the
            # reply fails, and a heartbeat loop would then outlive its event loop.
            done, _ = await asyncio.wait({future}, timeout=timeout)
        finally:
            self.pending.pop(request_id, None)
        if not done:
            future.cancel()
            raise BrokerError(f"no answer from {self.endpoint} to {command!r} within {timeout:g}s")
        reply, _ = future.result()
        return reply

    def start_batched(
        self, command: str, args: Sequence[Any], payloads: Sequence[bytes]
    ) -> tuple[int, asyncio.Future[tuple[list[Any], list[bytes]]]]:
        """Like :meth:`start`, but written with the other requests of this loop step as
        one ZeroMQ message (at the end of the step, or before anything else on the link).
        """
        self.write_leased()
        request_id = next(self._ids)
        future: asyncio.Future[tuple[list[Any], list[bytes]]] = (
            asyncio.get_running_loop().create_future()
        )
        self.pending[request_id] = future
        self._requests.append((command, request_id, list(args), list(payloads)))
        if len(self._requests) >= WANT:
            self.write_requests()
        elif len(self._requests) == 1:
            asyncio.get_running_loop().call_soon(self.write_requests)
        return request_id, future

    def _write(self, frames: list[bytes]) -> None:
        """Write ``frames`` now or raise zmq.ZMQError, as a plain socket would.

        The asyncio socket reports a send that would block (no hub connected, or its
        queue full) through the future it returns, not by raising: that future is
        settled here, so no failure goes unseen.
        """
        sent: Any = self.sock.send_multipart(frames, zmq.NOBLOCK)
        if sent.done():
            error = sent.exception()
            if error is not None:
                raise error
        else:  # not expected with NOBLOCK; still, never leave an error unretrieved
            sent.add_done_callback(log_send_failure)

    def write_requests(self) -> None:
        """Write the batched requests now."""
        if not self._requests:
            return
        batch, self._requests = self._requests, []
        header = encode("batch", 0, [[c, rid, args, len(p)] for c, rid, args, p in batch])
        try:
            self._write([header, *(frame for *_, payloads in batch for frame in payloads)])
        except zmq.ZMQError as error:
            failed = BrokerError(f"cannot send to {self.endpoint}: {error}")
            for _command, request_id, _args, _payloads in batch:
                future = self.pending.pop(request_id, None)
                if future is not None and not future.done():
                    future.set_exception(failed)

    def send_leased(self, key: str, channel: str, payload: bytes) -> None:
        """Send a message on a lease (no reply), batched with the others of this loop step.

        Batching is what makes leased sends cheap: one ZeroMQ message, not one per send.
        Any request on this link writes the batch first, so order is kept.
        """
        self.write_requests()
        if self._leased and self._leased_bytes + len(payload) > _BATCH_BYTES:
            self.write_leased()
        self._leased.append(([key, channel, len(payload)], payload))
        self._leased_bytes += len(payload)
        self.unsettled = True
        if len(self._leased) >= WANT or (
            len(self._leased) == 1 and time.monotonic() - self._last_write > _SPARSE
        ):
            # Sparse traffic (ping-pong) has no batch to wait for: write at once.
            self.write_leased()
        elif len(self._leased) == 1:
            asyncio.get_running_loop().call_soon(self.write_leased)

    def write_leased(self) -> None:
        """Write the batch of leased messages now."""
        if not self._leased:
            return
        batch, self._leased = self._leased, []
        self._leased_bytes = 0
        self._last_write = time.monotonic()
        header = encode("send", 0, [item for item, _ in batch])
        try:
            self._write([header, b"".join(payload for _, payload in batch)])
        except zmq.ZMQError as error:
            # The senders were told "sent"; like a node that dies after taking them.
            logger.error("lost %d message(s) sent to %s: %s", len(batch), self.endpoint, error)

    def fail_pops(self) -> None:
        for request_id in self.pops:
            future = self.pending.get(request_id)
            if future is not None and not future.done():
                future.set_exception(Restarted())

    async def _read(self) -> None:
        while True:
            self._handle(await self.sock.recv_multipart())

    def take_answers(self) -> None:
        """Handle the messages already arrived now, without waiting for the reader's turn."""
        while True:
            try:
                # Non-blocking, as pyzmq's asyncio socket itself reads when it can.
                if not int(self.raw.get(zmq.EVENTS)) & zmq.POLLIN:
                    return
                frames = self.raw.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:
                return
            self._handle(frames)

    def _handle(self, frames: list[bytes]) -> None:
        try:
            command, request_id, args = decode(frames[0])
        except ValueError:
            logger.warning("ignored a malformed answer from %s", self.endpoint)
            return
        if command == "ginval":
            # The hub is changing a group we hold the members of: drop them, then say so
            # (the change is answered once we have).
            if self._invalidate is not None and args and isinstance(args[0], str):
                self._invalidate(args[0])
            with contextlib.suppress(zmq.ZMQError):
                self._write([encode("gack", request_id)])
            return
        future = self.pending.pop(request_id, None)
        key = self.pops.pop(request_id, None)
        if command == "error":
            error = BrokerError(f"{self.endpoint} refused the request: {args[0]}")
            if future is not None and not future.done():
                future.set_exception(error)
            return
        if future is not None and not future.done():
            future.set_result((args, frames[1:]))
        elif key is not None and args and args[0]:
            # A pop answered after its caller gave up: put the messages back.
            self._orphan(self, key, args[0], frames[1:])

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):  # no running loop: nothing can be written
            self.write_leased()
            self.write_requests()
        self._reader.cancel()
        # Closing the asyncio view first unregisters its file descriptor from the loop:
        # a stale registration would steal the wake-ups of a later socket reusing the fd.
        self.sock.close()
        self.raw.close()
        closed = BrokerError(f"the connection to {self.endpoint} was closed")
        for future in self.pending.values():
            if not future.done():
                # An error, not a cancellation: a send sharing this link must not look
                # cancelled to its caller; it falls back to the hub instead.
                future.set_exception(closed)
                future.exception()  # marks it retrieved when nobody awaits it any more
        self.pending.clear()


def log_send_failure(sent: asyncio.Future[Any]) -> None:
    if not sent.cancelled() and sent.exception() is not None:
        logger.error("a write to the hub or a node failed: %s", sent.exception())
