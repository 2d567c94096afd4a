"""The backend's shared core: options, the hub links, the node, and hub restarts."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import secrets
import socket
import weakref
from collections.abc import Mapping
from typing import Any, ClassVar

import zmq

from ...backend import Backend, Capabilities, LayerSettings
from ...exceptions import BrokerError, ConfigurationError
from ...options import Option
from ...serialization import largest_payload
from ...toolkit import jitter, within
from ...url import LayerURL
from .link import Link
from .node import Node, NodeConfig, start_node
from .protocol import DEFAULT_MAX_MESSAGE, shard
from .security import Curve, check_key, is_loopback, process_keys

__all__ = ["ZmqCore"]

logger = logging.getLogger(__name__.rpartition(".")[0])


class ZmqCore(Backend):
    """Configuration, links to the hubs, the node, and watching the hubs: what the send,
    receive and group paths of :class:`~.backend.ZmqBackend` share.
    """

    capabilities: ClassVar[Capabilities] = Capabilities(
        multiprocess=True,
        native_expiry=True,
        native_fanout=True,
        restartable=False,
        restores_memberships=True,
        queue_depth=True,
        group_sizes=True,
    )
    extra: ClassVar[str | None] = "zmq"
    options: ClassVar[Mapping[str, Option]] = {
        "timeout": Option(float, 10.0, "seconds to wait for a hub's answer", minimum=0.01),
        "peer_timeout": Option(
            float, 2.0, "seconds to wait for another process before using the hub", minimum=0.01
        ),
        "heartbeat": Option(
            float, 1.0, "seconds between hub pings and inbox re-registrations", minimum=0.05
        ),
        "advertise": Option(
            str, "", "address other processes reach this process's node at", schemes=("zmq",)
        ),
        "insecure": Option(
            bool,
            False,
            "let this process's node listen on a non-loopback address without CURVE",
            schemes=("zmq",),
        ),
        "curve_serverkey": Option(str, "", "the hub's CURVE public key (Z85)", check=check_key),
        "curve_secretkey": Option(
            str, "", "this process's CURVE secret key (Z85)", secret=True, check=check_key
        ),
    }

    @classmethod
    def check_url(cls, url: LayerURL, options: Mapping[str, Any]) -> None:
        if url.scheme == "zmq+ipc":
            if url.hosts or not url.path:
                raise ConfigurationError(
                    f"{url.sanitized()}: write a ZeroMQ IPC hub as zmq+ipc:///path/to/hub.sock"
                )
        elif not url.hosts or any(port is None for _, port in url.hosts):
            raise ConfigurationError(
                f"{url.sanitized()}: write ZeroMQ hubs as zmq://HOST:PORT[,HOST:PORT...]"
            )
        if options.get("curve_secretkey") and not options.get("curve_serverkey"):
            raise ConfigurationError(
                f"{url.sanitized()}: curve_secretkey needs curve_serverkey (the hub's public key)"
            )
        if url.scheme == "zmq" and not options.get("curve_serverkey"):
            cls._check_exposure(url, options)

    @classmethod
    def _check_exposure(cls, url: LayerURL, options: Mapping[str, Any]) -> None:
        """Refuse a node listening beyond loopback without CURVE, unless ``insecure``."""
        # The node binds to ``advertise``, else to the address that routes to the first
        # hub: a loopback one only for a hub on loopback.
        host = options.get("advertise") or url.hosts[0][0]
        if is_loopback(f"tcp://[{host}]:0"):
            return
        if options.get("insecure"):
            logger.warning(
                "%s: insecure=true: this process's node listens on a non-loopback address "
                "without CURVE; anyone who reaches it can send to this process's channels",
                url.sanitized(),
            )
            return
        raise ConfigurationError(
            f"{url.sanitized()}: this process's node would listen on a non-loopback address "
            f"(the one that routes to {host}) without CURVE, so anyone who reaches it could "
            "send to this process's channels; turn CURVE on with curve_serverkey (and "
            "curve_secretkey; see docs/backends/zmq.md), or accept the risk with insecure=true"
        )

    @classmethod
    def versions(cls) -> dict[str, str]:
        return {"pyzmq": zmq.__version__, "libzmq": zmq.zmq_version()}

    def __init__(self, url: LayerURL, settings: LayerSettings, options: Mapping[str, Any]):
        super().__init__(url, settings, options)
        largest = largest_payload(settings.max_message_size, encrypted=True)
        if largest > DEFAULT_MAX_MESSAGE:
            # Nodes and hubs refuse frames beyond this (a hub's --max-message-size may be
            # larger, but nodes would still drop such messages from other processes).
            raise ConfigurationError(
                f"{url.sanitized()}: max_message_size={settings.max_message_size} makes "
                f"payloads of up to {largest} bytes encrypted, more than the "
                f"{DEFAULT_MAX_MESSAGE} bytes ZeroMQ nodes and hubs accept in one frame"
            )
        if url.scheme == "zmq+ipc":
            self._hubs: tuple[str, ...] = (f"ipc:///{url.path.lstrip('/')}",)
            self._hub_names: tuple[str, ...] = self._hubs
        else:
            self._hubs = tuple(
                f"tcp://{f'[{host}]' if ':' in host else host}:{port}" for host, port in url.hosts
            )
            self._hub_names = tuple(f"{host}:{port}" for host, port in url.hosts)
        self._prefix = settings.prefix + ":"
        self._timeout: float = self.config["timeout"]
        self._peer_timeout: float = self.config["peer_timeout"]
        self._heartbeat: float = self.config["heartbeat"]
        self._curve = self._curve_keys()
        self._links: list[Link] = []
        self._peers: dict[str, Link] = {}
        #: Inbox key -> [places leased to us, monotonic time to stop using them].
        self._credits: dict[str, list[Any]] = {}
        #: Queue or inbox key -> set once the push asking for a lease there is answered.
        self._asking_lease: dict[str, asyncio.Future[None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        #: Group sends the hub has not answered yet (it answers once members have them): a
        #: direct send to a node, and close(), wait for them.
        self._group_sends: set[asyncio.Future[Any]] = set()
        self._node: Node | None = None
        self._owned: list[zmq.Socket[bytes]] = []
        weakref.finalize(self, _close_all, self._owned)

    def _curve_keys(self) -> Curve | None:
        server = self.config["curve_serverkey"]
        if not server:
            return None
        secret = self.config["curve_secretkey"]
        if secret:
            public = zmq.curve_public(secret.encode())
            return Curve(server.encode(), public, secret.encode())
        public, generated = process_keys()
        return Curve(server.encode(), public, generated)

    def _node_bind(self) -> str:
        if self.url.scheme == "zmq+ipc":
            return f"{self._hubs[0]}.{os.getpid()}.{secrets.token_hex(4)}"
        host = self.config["advertise"] or _route_to(self.url.hosts[0][0], self.url.hosts[0][1])
        return f"tcp://{host}:*"

    async def open(self) -> None:
        self._node = start_node(
            NodeConfig(self._hubs, self._hub_names, "", self._heartbeat, self._curve),
            self._node_bind,
            self,
        )
        server = self._curve.server_key if self._curve else None
        self._links = [
            Link(self._owned, endpoint, self._curve, server, self._orphan, self._invalidate)
            for endpoint in self._hubs
        ]
        self._tasks = [asyncio.ensure_future(self._watch(link)) for link in self._links]

    async def close(self) -> None:
        if self._group_sends:
            await asyncio.wait(set(self._group_sends), timeout=self._timeout)
        if self._node is not None:
            self._node.release(asyncio.get_running_loop())
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        links = (*self._links, *self._peers.values())
        for link in links:
            link.close()
        # Their readers were cancelled: let them end inside close(), not after it.
        await asyncio.gather(*(link._reader for link in links), return_exceptions=True)
        self._links, self._peers, self._tasks = [], {}, []
        _close_all(self._owned)

    def abandon(self) -> None:
        # Its loop ended without close(): nothing reads these sockets any more. Closed now
        # rather than when a garbage collection finds this backend, or a process that
        # calls async_to_sync per request holds a hub connection per call until then.
        _close_all(self._owned)

    async def broker_version(self) -> str:
        reply = await self._links[0].call("ping", (), (), self._timeout)
        return f"multilayer hub {reply[1]}"

    def _link(self, name: str) -> Link:
        return self._links[shard(name, self._hub_names)]

    async def _watch(self, link: Link) -> None:
        """Ping the hub; when it comes back as a new process, re-issue parked pops."""
        epoch = None
        lost = False
        # Memberships this layer made that the restarted hub holds no more; kept until
        # re-asserted, so that a hub lost again meanwhile is retried on the next ping.
        restore = False
        while True:
            # Requests up to this id were written before the ping that may find a new hub.
            issued = max(link.pending, default=0)
            try:
                reply = await link.call("ping", (), (), self._heartbeat * 3)
            except BrokerError:
                lost = True
                await asyncio.sleep(self._heartbeat)
                continue
            restarted = epoch is not None and reply[0] != epoch
            if restarted:
                logger.warning("hub %s restarted; its queues and groups are gone", link.endpoint)
                link.fail_pops()
                self._give_up_group_sends(link, issued)
                self._invalidate(None)
                restore = True
            if lost or restarted:
                self.reconnects += 1
                lost = False
            epoch = reply[0]
            if restore:
                restore = not await self._reassert_on(link)
            await asyncio.sleep(self._heartbeat)

    def _give_up_group_sends(self, link: Link, issued: int) -> None:
        """Stop waiting for answers to group sends written before the hub restarted.

        The old hub died with them or the new one took them; either way waiting the whole
        ``timeout`` held up direct sends ordered after them, and ``close()``.
        """
        gone = BrokerError(f"hub {link.endpoint} restarted before answering")
        for request_id, future in list(link.pending.items()):
            if request_id <= issued and future in self._group_sends and not future.done():
                future.set_exception(gone)

    async def _reassert_on(self, link: Link) -> bool:
        """Re-add the memberships of the groups ``link``'s hub holds; False if it failed."""
        # Every process notices a restarted hub within one heartbeat: spread their
        # re-assertions over that heartbeat rather than sending them all at once.
        await asyncio.sleep(jitter(0.0, min(self._heartbeat, 0.5)))
        try:
            await self.reassert_memberships(lambda group, _channel: self._link(group) is link)
        except BrokerError as error:
            logger.warning("hub %s: re-asserting memberships failed: %s", link.endpoint, error)
            return False
        return True

    # -- inboxes -----------------------------------------------------------------------

    async def declare_inbox(self, inbox: str) -> None:
        assert self._node is not None
        future = self._node.register(self._prefix + inbox)
        try:
            await within(asyncio.wrap_future(future), self._timeout)
        except asyncio.TimeoutError:
            raise BrokerError(
                f"hub {self.url.sanitized()} did not register inbox {inbox!r} "
                f"within {self._timeout:g}s"
            ) from None

    def _orphan(self, link: Link, key: str, channels: list[str], frames: list[bytes]) -> None:
        try:
            link.start("requeue", (key, channels), frames)
        except BrokerError as error:
            logger.error("lost %d message(s) of %s: %s", len(channels), key, error)

    def _invalidate(self, group: str | None) -> None:
        """The hub changes ``group`` (a key, with the prefix), or restarted (None): drop any
        copy of its members this backend fans out from (see :mod:`.groups`)."""


def _close_all(sockets: list[zmq.Socket[bytes]]) -> None:
    for sock in sockets:
        sock.close()  # lingering (link.LINGER_MS): what was written still goes out
    sockets.clear()


def _route_to(host: str, port: int | None) -> str:
    """The local address this host uses to reach ``host``: where peers can reach us too."""
    try:
        if ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:
        if host == "localhost":
            return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, port or 9))
            address: str = probe.getsockname()[0]
            return address
    except OSError:
        return "127.0.0.1"
