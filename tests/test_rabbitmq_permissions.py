"""The RabbitMQ permissions docs/backends/rabbitmq.md ("Clusters") documents are enough, on
a private node (tests/support/brokers.py ``RabbitNode``): a user holding only them runs
every kind of operation, quorum normal channels included, and one lacking write on
``amq.default`` cannot send."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator

import pytest

from multilayer import BrokerError, ChannelLayer
from tests.support.brokers import RabbitNode, require_module

require_module("pika")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    owned = RabbitNode(tmp_path_factory.mktemp("rabbitmq-permissions"))
    owned.start()
    try:
        yield owned
    finally:
        owned.stop(kill=True)


def _user(node: RabbitNode, prefix: str, write: str) -> str:
    """A new user on a new vhost with the documented configure and read permissions for
    ``prefix`` and write permission ``write``; a layer URL as that user."""
    user, password, vhost = "u" + secrets.token_hex(4), secrets.token_hex(8), prefix
    node.ctl("add_vhost", vhost)
    node.ctl("add_user", user, password)
    node.ctl("set_permissions", "-p", vhost, user, f"^{prefix}:", write, f"^{prefix}:")
    return f"amqp://{user}:{password}@127.0.0.1:{node.port}/{vhost}?queue_type=quorum"


def test_the_documented_permissions_are_enough(node: RabbitNode) -> None:
    prefix = "p" + secrets.token_hex(4)
    url = _user(node, prefix, rf"^({prefix}:|amq\.default$)")

    async def body() -> None:
        layer = ChannelLayer(url, prefix=prefix)
        other = ChannelLayer(url, prefix=prefix)
        try:
            inbox = await layer.new_channel()
            await other.group_add("room", inbox)  # a join message from another layer
            await other.group_add("room", "jobs")  # a normal channel's membership queue
            await other.send("jobs", {"n": 1})
            await other.send(inbox, {"n": 2})
            await other.group_send("room", {"n": 3})
            got = [await asyncio.wait_for(layer.receive("jobs"), 10) for _ in range(2)]
            assert got == [{"n": 1}, {"n": 3}]
            got = [await asyncio.wait_for(layer.receive(inbox), 10) for _ in range(2)]
            assert got == [{"n": 2}, {"n": 3}]
            await layer.flush()
        finally:
            await layer.close()
            await other.close()

    asyncio.run(asyncio.wait_for(body(), 60))


def test_without_write_on_the_default_exchange_sends_fail(node: RabbitNode) -> None:
    prefix = "p" + secrets.token_hex(4)
    url = _user(node, prefix, f"^{prefix}:")

    async def body() -> None:
        layer = ChannelLayer(url, prefix=prefix)
        try:
            with pytest.raises(BrokerError, match=r"ACCESS_REFUSED.*amq\.default"):
                await asyncio.wait_for(layer.send("jobs", {"n": 1}), 20)
        finally:
            await layer.close()

    asyncio.run(asyncio.wait_for(body(), 60))
