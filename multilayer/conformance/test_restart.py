"""After a broker restart that lost every membership, each layer re-asserts its own.

Needs ``--multilayer-restart-command`` (see :meth:`Harness.require_restart`) and the
``restores_memberships`` capability; skipped, with the reason, otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter

from ._util import recv
from .plugin import Harness

#: Seconds a backend may take to re-assert its memberships after the broker is back. The
#: built-in backends take about one second (docs/reliability.md); this is their worst case
#: (a restart nobody noticed, found by the periodic check) with room to spare.
RESTORE_BOUND = 30.0
#: Seconds after the restart command returned from which a send must succeed.
FIRST_SEND = 1.0


def test_memberships_come_back_after_a_broker_restart(harness: Harness) -> None:
    harness.require("restores_memberships", "memberships are not re-asserted after a restart")
    harness.require_restart()

    async def body() -> None:
        member, sender = harness.layer(), harness.layer()
        channel = await member.new_channel()
        await member.group_add("conf-restart", channel)
        await sender.group_send("conf-restart", {"n": 0})
        assert await recv(member, channel) == {"n": 0}
        await asyncio.to_thread(harness.restart_broker)
        await asyncio.sleep(FIRST_SEND)
        # The first send after recovery works: idle connections that died are replaced.
        await sender.send(channel, {"direct": True})
        assert await recv(member, channel, timeout=10) == {"direct": True}
        got: list[int] = []
        number = 0
        started = time.monotonic()
        while not got:
            assert time.monotonic() - started < RESTORE_BOUND, "membership never restored"
            number += 1
            await sender.group_send("conf-restart", {"n": number})
            # Not restored yet, a group message is lost, as the contract allows.
            with contextlib.suppress(asyncio.TimeoutError):
                got.append((await asyncio.wait_for(member.receive(channel), 0.5))["n"])
        # Restored: every group message from now on arrives, once, in order.
        first_after = number + 1
        for number in range(first_after, first_after + 5):
            await sender.group_send("conf-restart", {"n": number})
        while got[-1] != first_after + 4:
            got.append((await recv(member, channel, timeout=10))["n"])
        assert [n for n in got if n >= first_after] == list(range(first_after, first_after + 5))
        assert not [n for n, count in Counter(got).items() if count > 1]

    harness.run(body)
