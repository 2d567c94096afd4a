"""Who may talk to a hub or a node: CURVE keys, the allow list, and loopback-only defaults.

* :func:`is_loopback`: whether an endpoint is reachable from this host only; the hub and
  layers refuse to listen anywhere else without CURVE unless told ``insecure``.
* :class:`Gate`: CURVE clients authenticated by ZAP (pyzmq's thread authenticator)
  against an allow list that may change while the socket serves (``None``: any CURVE
  client). A plaintext peer fails the CURVE handshake in libzmq itself; either way no
  frame of a refused peer reaches the application, and :class:`RefusalLog` writes one
  rate-limited line per refused peer, naming its address, never its key.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.auth.thread
import zmq.utils.monitor
import zmq.utils.z85

__all__ = ["Curve", "Gate", "RefusalLog", "check_key", "is_loopback", "process_keys"]

logger = logging.getLogger(__name__.rpartition(".")[0])

#: pyzmq's authenticator logs client keys at debug level: its log goes nowhere.
_SILENT = logging.Logger("multilayer zap")
_SILENT.addHandler(logging.NullHandler())
_SILENT.propagate = False


def check_key(value: str) -> str | None:
    """None if ``value`` is empty or a Z85 CURVE key, else what is wrong (an Option check)."""
    if not value:
        return None
    try:
        valid = len(value) == 40 and len(zmq.utils.z85.decode(value)) == 32
    except (ValueError, KeyError, UnicodeEncodeError):
        valid = False
    # Z85 uses '&', '+', '#', '%', '?' and '/': in a URL they must be percent-encoded.
    return None if valid else "a CURVE key is 40 Z85 characters (percent-encode it in a URL)"


@dataclass(frozen=True)
class Curve:
    """CURVE keys of this process: the hub's public key and our own key pair."""

    server_key: bytes
    public_key: bytes
    secret_key: bytes

    def client(self, sock: zmq.Socket[Any], server_key: bytes) -> None:
        """Make ``sock`` a CURVE client of the server whose public key is ``server_key``."""
        sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public_key)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret_key)


_keys_lock = threading.Lock()
_keys: list[tuple[bytes, bytes]] = []


def process_keys() -> tuple[bytes, bytes]:
    """A CURVE key pair made once per process, when the URL names none."""
    with _keys_lock:
        if not _keys:
            _keys.append(zmq.curve_keypair())
        return _keys[0]


def _is_key(value: Any) -> bool:
    return isinstance(value, str) and bool(value) and check_key(value) is None


def is_loopback(endpoint: str) -> bool:
    """True when ``endpoint`` (a ZeroMQ bind address) is reachable from this host only:
    ``ipc://``, ``inproc://``, or TCP on 127.0.0.0/8, ::1 or ``localhost``. A host name,
    an interface name or a wildcard counts as exposed."""
    transport, _, rest = endpoint.partition("://")
    if transport in ("ipc", "inproc"):
        return True
    host = rest.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RefusalLog:
    """One WARNING per refused peer address, at most ``burst`` lines a ``window`` (s).

    A peer refused again within the window is not logged again; lines held back by the
    burst limit are counted in the next line written, so a scanner cannot flood the log.
    """

    def __init__(self, logger: logging.Logger, window: float = 60.0, burst: int = 10) -> None:
        self._logger = logger
        self._window = window
        self._burst = burst
        self._seen: dict[str, float] = {}
        self._written: list[float] = []
        self._held = 0
        self._lock = threading.Lock()

    def refused(self, address: str, why: str) -> None:
        """Note that the peer at ``address`` was refused because ``why``."""
        current = time.monotonic()
        with self._lock:
            since = current - self._window
            if len(self._seen) > 10_000:
                self._seen = {a: t for a, t in self._seen.items() if t > since}
            if self._seen.get(address, since) > since:
                return
            self._seen[address] = current
            self._written = [t for t in self._written if t > since]
            if len(self._written) >= self._burst:
                self._held += 1
                return
            self._written.append(current)
            held, self._held = self._held, 0
        more = f" ({held} more refused peers not logged)" if held else ""
        self._logger.warning("refused %s: %s%s", address, why, more)


class _Authenticator(zmq.auth.thread.ThreadAuthenticator):
    """pyzmq's thread authenticator, telling the gate the address of the peer it checks."""

    def __init__(self, context: zmq.Context[Any], gate: Gate) -> None:
        super().__init__(context, log=_SILENT)
        self._gate = gate

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        # A ZAP request is [version, id, domain, address, identity, mechanism, ...].
        self._gate.address = msg[3].decode(errors="replace") if len(msg) > 3 else "?"
        await super().handle_zap_message(msg)


class Gate:
    """CURVE clients of the sockets of ``context``, checked against a changing allow list.

    ``allowed``: Z85 public keys, or None for any CURVE client. Refused peers are logged
    through ``log``. :meth:`watch` adds a server socket's failed handshakes (a plaintext
    peer, a wrong server key) to that log.
    """

    def __init__(
        self,
        context: zmq.Context[Any],
        allowed: Iterable[bytes] | None,
        log: RefusalLog,
        *,
        always: Iterable[bytes] = (),
    ) -> None:
        self._allowed = None if allowed is None else frozenset(allowed)
        #: Keys allowed whatever the list says (a node's hub, before it sent the list).
        self._always = frozenset(always)
        #: The lists :meth:`allow_from` was given, by source.
        self._sources: dict[int, frozenset[bytes] | None] = {}
        self._log = log
        #: The address of the peer being checked (set and read in the ZAP thread).
        self.address = "?"
        self._auth = _Authenticator(context, self)
        self._auth.start()
        self._auth.configure_curve_callback(domain="*", credentials_provider=self)
        self._monitors: list[zmq.Socket[Any]] = []

    @property
    def allowed(self) -> frozenset[bytes] | None:
        """The Z85 public keys allowed now; None: any CURVE client."""
        return self._allowed

    def allow(self, keys: Iterable[bytes] | None) -> None:
        """Replace the allow list; connections made from now on are checked against it."""
        self._allowed = None if keys is None else frozenset(keys)

    def allow_from(self, source: int, keys: Any) -> None:
        """Take the list hub ``source`` sent (Z85 texts, or None: any client); the gate
        allows what any of its sources allows. A list that is not one is ignored."""
        if keys is not None and not (
            isinstance(keys, list)
            and all(isinstance(key, str) and not check_key(key) for key in keys)
        ):
            logging.getLogger(__name__.rpartition(".")[0]).warning(
                "ignored a malformed allow list from a hub"
            )
            return
        self._sources[source] = None if keys is None else frozenset(k.encode() for k in keys)
        lists = list(self._sources.values())
        merged = frozenset[bytes]().union(*(keys for keys in lists if keys is not None))
        self.allow(None if None in lists else merged)

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP's question for a CURVE client (``key`` in Z85): may it connect?"""
        allowed = self._allowed
        if allowed is None or key in allowed or key in self._always:
            return True
        self._log.refused(self.address, "its CURVE key is not on the allow list")
        return False

    def watch(self, sock: zmq.Socket[Any]) -> zmq.Socket[Any]:
        """A monitor of ``sock``'s failed handshakes; poll it and call :meth:`read`."""
        monitor = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        )
        self._monitors.append(monitor)
        return monitor

    def unwatch(self, monitor: zmq.Socket[Any]) -> None:
        """Close a monitor :meth:`watch` made (its socket is closing)."""
        if monitor in self._monitors:
            self._monitors.remove(monitor)
            monitor.close(0)

    def watches(self, sock: zmq.Socket[Any]) -> bool:
        """True if ``sock`` is one of the monitors :meth:`watch` made."""
        return sock in self._monitors

    def read(self, monitor: zmq.Socket[Any]) -> None:
        """Log the failed handshakes waiting on ``monitor`` (ZeroMQ does not say the peer's
        address there: the line names the endpoint it tried)."""
        while monitor.poll(0):
            event = zmq.utils.monitor.recv_monitor_message(monitor)
            endpoint = event["endpoint"].decode(errors="replace")
            self._log.refused(
                f"a peer of {endpoint}", "its handshake failed (no CURVE, or a wrong server key)"
            )

    def stop(self) -> None:
        """Stop the ZAP thread and the monitors (before the context ends)."""
        for monitor in self._monitors:
            monitor.close(0)
        self._monitors.clear()
        self._auth.stop()
