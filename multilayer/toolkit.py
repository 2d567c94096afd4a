"""What two or more backends need, written once: a toolkit for backend authors.

* :func:`wake` and :class:`Waiters`: waking a receive that waits in one event loop from
  another loop's thread or from a client library's own thread.
* :class:`ProcessWide`: state shared by every backend instance of one OS process (one
  per event loop), locked and kept while some open backend uses it.
* :func:`tls_options`, :func:`tls_context`, :func:`check_tls`: one TLS option vocabulary
  (``ssl_cafile``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_verify``,
  ``ssl_check_hostname``) and one way to turn it into an :class:`ssl.SSLContext`.
* :func:`jitter`: a random wait, from a generator of the library's own.
* :func:`within`: :func:`asyncio.wait_for` without its lost cancellations.
* Options valid only under some URL schemes are declared, not checked by hand: set
  :attr:`multilayer.options.Option.schemes`, and the core refuses them elsewhere.

docs/writing-a-backend.md shows them in use. Nothing here knows a broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import threading
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Any, Generic, TypeVar

from .exceptions import ConfigurationError
from .options import Option

__all__ = [
    "ProcessWide",
    "Waiters",
    "check_tls",
    "jitter",
    "tls_context",
    "tls_options",
    "wake",
    "within",
]

_T = TypeVar("_T")

#: ``here`` when the caller has not looked up its running loop.
_UNKNOWN: Any = object()


def wake(future: asyncio.Future[None], here: asyncio.AbstractEventLoop | None = _UNKNOWN) -> None:
    """Resolve ``future`` from any thread, unless it is already done.

    ``here`` is the event loop running in the calling thread (None for a thread without
    one), for callers that wake many futures and look it up once. In the future's own
    loop the result is set at once, without a self-pipe write; from elsewhere it is
    scheduled in that loop. A loop that has closed, even between the check and the call,
    has nobody waiting: the wake-up is dropped, and what it announced stays for the next
    receive.
    """
    if here is _UNKNOWN:
        here = asyncio._get_running_loop()
    loop = future.get_loop()
    if loop is here:
        _set_if_pending(future)
        return
    if loop.is_closed():
        return
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(_set_if_pending, future)


#: Never the ``random`` module's global generator: an application seeding it would make
#: every process jitter alike, and drawing from it in a background thread disturbs
#: anything that relies on its sequence (Hypothesis checks that strategies leave it alone).
_RANDOM = random.Random()


def jitter(low: float, high: float) -> float:
    """A uniformly random number of seconds in [low, high], to spread retries and checks
    that many processes would otherwise make at the same moment."""
    return _RANDOM.uniform(low, high)


async def within(awaitable: Awaitable[_T], seconds: float | None) -> _T:
    """``await awaitable``; after ``seconds`` (None: never) it is cancelled and
    :class:`asyncio.TimeoutError` raised.

    Unlike :func:`asyncio.wait_for` before Python 3.12, a cancellation that arrives as
    ``awaitable`` completes is never lost: it cancels the caller, the result is dropped.
    (A lost one let a receive's fetch task wait on after ``close()`` cancelled it, and
    ``close()`` wait for it for ever.)
    """
    task = asyncio.ensure_future(awaitable)
    try:
        await asyncio.wait((task,), timeout=seconds)
    except asyncio.CancelledError:
        await _stop(task)
        raise
    if not task.done():
        await _stop(task)
        raise asyncio.TimeoutError
    return task.result()


async def _stop(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and wait until it ended, its outcome retrieved (never logged)."""
    task.cancel()
    await asyncio.wait((task,))
    if not task.cancelled():
        task.exception()


def _set_if_pending(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Waiters:
    """Futures waiting for a key (a queue name), created in any loop, woken from any thread.

    The caller serializes access (a backend's own lock, or one thread).
    """

    def __init__(self) -> None:
        self._futures: dict[str, list[asyncio.Future[None]]] = {}

    def add(self, key: str) -> asyncio.Future[None]:
        """A future of the running loop, resolved by the next :meth:`wake` of ``key``."""
        future = asyncio.get_running_loop().create_future()
        self._futures.setdefault(key, []).append(future)
        return future

    def discard(self, key: str, future: asyncio.Future[None]) -> None:
        """Stop waiting (a receive that ended another way)."""
        futures = self._futures.get(key)
        if futures and future in futures:
            futures.remove(future)
            if not futures:
                del self._futures[key]

    def wake(self, key: str, here: asyncio.AbstractEventLoop | None = _UNKNOWN) -> None:
        """Wake every future waiting for ``key``."""
        if here is _UNKNOWN:
            here = asyncio._get_running_loop()
        for future in self._futures.pop(key, ()):
            wake(future, here)

    def wake_one(self, key: str, here: asyncio.AbstractEventLoop | None = _UNKNOWN) -> bool:
        """Wake the oldest future still pending for ``key``; False when none waits."""
        futures = self._futures.get(key)
        while futures:
            future = futures.pop(0)
            if not futures:
                del self._futures[key]
            if not future.done():
                wake(future, here)
                return True
        return False

    def __contains__(self, key: str) -> bool:
        return key in self._futures


class ProcessWide(Generic[_T]):
    """State shared by the backends of one OS process, keyed (by broker, prefix, queue...).

    The core makes one backend instance per event loop, so what they must share (a
    connection to a log, a node socket, what is known of a queue) lives here. An entry is
    made by the first :meth:`use` and, unless ``keep`` is set, dropped when the last
    backend that used it calls :meth:`release` (or, with :meth:`use_while`, once its last
    owner is garbage collected), so a long-running process does not keep state for every
    key it ever touched. With ``keep``, users are not counted: nothing is ever dropped.
    All methods are thread-safe.
    """

    def __init__(self, *, keep: bool = False) -> None:
        self._entries: dict[Hashable, tuple[_T, set[int]]] = {}
        self._lock = threading.Lock()
        self._keep = keep
        #: The owners of :meth:`use_while`, by id, with what tells when they are collected.
        self._owners: dict[int, weakref.finalize[..., Any]] = {}
        #: Owners collected since the last call: their finalizers only append here, since
        #: a collection may run while this thread holds the lock; the next call releases
        #: them, before any object that took over an id can use it.
        self._collected: deque[int] = deque()

    def use(self, key: Hashable, user: object, make: Callable[[], _T]) -> _T:
        """The state under ``key`` (``make()`` if none), kept until ``user`` releases it."""
        with self._lock:
            self._drop_collected()
            return self._use(key, user, make)

    def _use(self, key: Hashable, user: object, make: Callable[[], _T]) -> _T:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = (make(), set())
        if not self._keep:
            entry[1].add(id(user))
        return entry[0]

    def use_while(self, key: Hashable, owner: object, make: Callable[[], _T]) -> _T:
        """The state under ``key`` (``make()`` if none), kept while ``owner`` lives: for
        state that belongs to something outliving the backends (a layer, which makes one
        per event loop) and that needs no stopping when it is dropped."""
        with self._lock:
            # First, so that an id that a collected owner left is not taken for its own.
            self._drop_collected()
            if not self._keep and id(owner) not in self._owners:
                self._owners[id(owner)] = weakref.finalize(owner, self._collected.append, id(owner))
            return self._use(key, owner, make)

    def _drop_collected(self) -> None:
        while self._collected:
            owner = self._collected.popleft()
            del self._owners[owner]
            self._drop(owner)

    def get(self, key: Hashable) -> _T | None:
        """The state under ``key``, if any; does not mark a use."""
        with self._lock:
            self._drop_collected()
            entry = self._entries.get(key)
            return None if entry is None else entry[0]

    def users(self, key: Hashable) -> int:
        """How many open backends use the state under ``key``."""
        with self._lock:
            self._drop_collected()
            entry = self._entries.get(key)
            return 0 if entry is None else len(entry[1])

    def under(self, prefix: tuple[Any, ...]) -> list[_T]:
        """The state of every tuple key that starts with ``prefix``."""
        with self._lock:
            self._drop_collected()
            n = len(prefix)
            return [
                state
                for key, (state, _users) in self._entries.items()
                if isinstance(key, tuple) and key[:n] == prefix
            ]

    def release(self, user: object) -> list[_T]:
        """``user`` is done: drop, and return, the states no other open backend uses.

        The caller stops what the returned states hold (threads, sockets), outside the
        lock and outside any other backend's way.
        """
        with self._lock:
            self._drop_collected()
            return self._drop(id(user))

    def _drop(self, user: int) -> list[_T]:
        dropped: list[_T] = []
        for key, (state, users) in list(self._entries.items()):
            users.discard(user)
            if not users and not self._keep:
                del self._entries[key]
                dropped.append(state)
        return dropped

    def __len__(self) -> int:
        with self._lock:
            self._drop_collected()
            return len(self._entries)


_CERT_REQS = {"required": True, "optional": True, "none": False}


def tls_options(*schemes: str, aliases: Mapping[str, str] = {}) -> dict[str, Option]:
    """The TLS options, valid only under ``schemes``, in the shared vocabulary.

    ``aliases`` maps an older name a backend documented to the option it now spells
    (one of the five below, or ``ssl_cert_reqs``, whose ``none``/``optional``/``required``
    map to ``ssl_verify``), so that existing URLs keep working.
    """
    where = " or ".join(f"{scheme}://" for scheme in schemes)
    options = {
        "ssl_cafile": Option(
            str,
            None,
            f"{where}: CA bundle (PEM) that signed the server certificate",
            schemes=schemes,
        ),
        "ssl_certfile": Option(
            str, None, f"{where}: client certificate (PEM), for mutual TLS", schemes=schemes
        ),
        "ssl_keyfile": Option(
            str, None, f"{where}: client private key (PEM), for mutual TLS", schemes=schemes
        ),
        "ssl_verify": Option(
            bool,
            True,
            f"{where}: verify the server certificate (false: tests only)",
            schemes=schemes,
        ),
        "ssl_check_hostname": Option(
            bool,
            True,
            f"{where}: match the server certificate against the host name",
            schemes=schemes,
        ),
    }
    for alias, target in aliases.items():
        if alias == "ssl_cert_reqs":
            options[alias] = Option(
                str,
                "required",
                "alias of ssl_verify (none: false)",
                choices=tuple(_CERT_REQS),
                schemes=schemes,
                alias_of="ssl_verify",
                convert=_CERT_REQS.__getitem__,
            )
        else:
            spec = options[target]
            options[alias] = Option(
                spec.kind, spec.default, f"alias of {target}", schemes=schemes, alias_of=target
            )
    return options


def check_tls(where: str, config: Mapping[str, Any]) -> None:
    """Refuse TLS options that cannot work together (ConfigurationError)."""
    if config.get("ssl_keyfile") and not config.get("ssl_certfile"):
        raise ConfigurationError(f"{where}: ssl_keyfile needs ssl_certfile too")


def tls_context(config: Mapping[str, Any]) -> ssl.SSLContext:
    """A client context from the shared TLS options (see :func:`tls_options`)."""
    context = ssl.create_default_context(cafile=config.get("ssl_cafile"))
    verify = config.get("ssl_verify", True)
    context.check_hostname = bool(verify and config.get("ssl_check_hostname", True))
    if not verify:
        context.verify_mode = ssl.CERT_NONE
    if config.get("ssl_certfile"):
        context.load_cert_chain(config["ssl_certfile"], config.get("ssl_keyfile"))
    return context
