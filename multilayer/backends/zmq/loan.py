"""Lending a thread's ZeroMQ socket to the event loop that waits on it, and taking it back.

A node's thread serves its ROUTER socket so that inboxes outlive any one event loop. While
an event loop waits on an inbox, the thread lends it the socket: the loop reads it like
any asyncio socket and a message for a receive in that loop wakes it directly, without a
hop through the thread. The thread takes the socket back when the loop gives it back, or
stops running, or is blocked. ZeroMQ sockets may move between threads behind a lock;
only the current owner touches the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

__all__ = ["OWNER_CHECK", "SocketLoan"]

#: How often the thread checks that the event loop it lent its socket still runs (s),
#: and how long that loop may go without running a callback before the thread takes the
#: socket back (the loop is blocked).
OWNER_CHECK = 0.05
_OWNER_STALL = 0.5


class SocketLoan:
    """Who serves ``sock``: the thread that polls it, or an event loop it lent it to.

    ``serve(loop)`` reads what waits on the socket (called in the lending loop, under
    :attr:`lock`); ``wake()`` interrupts the thread's poll so that it hands over soon.
    """

    def __init__(
        self,
        sock: zmq.Socket[Any],
        serve: Callable[[asyncio.AbstractEventLoop], None],
        wake: Callable[[], None],
    ) -> None:
        self._sock = sock
        self._serve = serve
        self._wake = wake
        self._fd = int(sock.get(zmq.FD))
        #: The event loop serving the socket (None: the thread), guarded by ``lock``; only
        #: the thread hands it to a loop, between two of its polls.
        self.owner: asyncio.AbstractEventLoop | None = None
        self.lock = threading.Lock()
        #: A loop that asked to serve the socket.
        self._adopter: asyncio.AbstractEventLoop | None = None
        #: The thread polls the socket (it is lent to no loop).
        self.polled = False
        #: When the lending loop last ran a callback the thread sent it, and when it sent one.
        self._seen = self._asked = 0.0

    def ask(self, loop: asyncio.AbstractEventLoop) -> None:
        """Ask for the socket to be served by ``loop`` (running in the calling thread)."""
        if self.owner is not None or self._adopter is loop:
            return
        self._adopter = loop
        with contextlib.suppress(OSError):
            self._wake()

    def give_back(self, loop: asyncio.AbstractEventLoop) -> None:
        """Give the socket back to the thread if ``loop`` (the caller's) serves it."""
        with self.lock:
            if self._adopter is loop:
                self._adopter = None
            if self.owner is not loop:
                return
            self.owner = None
            loop.remove_reader(self._fd)
        with contextlib.suppress(OSError):
            self._wake()

    def end(self) -> None:
        """The thread is ending: a loop still holding the socket leaves it alone now."""
        with self.lock:
            self.owner = None

    def hand_over(self, poller: zmq.Poller) -> None:
        """Between the thread's polls: lend the socket to a loop, or take it back."""
        current = time.monotonic()
        with self.lock:
            owner = self.owner
            if owner is not None and (
                owner.is_closed() or not owner.is_running() or current - self._seen > _OWNER_STALL
            ):
                # Its loop ended without closing the backend (async_to_sync does that), or
                # is blocked: the other loops of the process must not wait for it.
                self.owner = owner = None
            adopter, self._adopter = self._adopter, None
            if owner is None and adopter is not None and adopter.is_running():
                try:
                    adopter.call_soon_threadsafe(self._start, adopter)
                except RuntimeError:
                    pass  # closed in the meantime
                else:
                    self.owner = owner = adopter
                    self._seen = self._asked = current
        if owner is not None and current - self._asked >= OWNER_CHECK:
            self._asked = current
            with contextlib.suppress(RuntimeError):
                owner.call_soon_threadsafe(self._ran)
        if owner is None and not self.polled:
            poller.register(self._sock, zmq.POLLIN)
        elif owner is not None and self.polled:
            poller.unregister(self._sock)
        self.polled = owner is None

    def _ran(self) -> None:
        self._seen = time.monotonic()

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        with self.lock:
            if self.owner is not loop:
                return
            loop.add_reader(self._fd, self._on_readable, loop)
        self._on_readable(loop)

    def _on_readable(self, loop: asyncio.AbstractEventLoop) -> None:
        with self.lock:
            if self.owner is not loop:
                loop.remove_reader(self._fd)  # the thread took the socket back
                return
            self._serve(loop)
            # The descriptor signals changes only: look again while messages are left.
            if int(self._sock.get(zmq.EVENTS)) & zmq.POLLIN:
                loop.call_soon(self._on_readable, loop)
