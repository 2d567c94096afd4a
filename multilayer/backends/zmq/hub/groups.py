"""The hub's commands on groups, and the leases of group copies it hands out."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from ....fanout import seal, split
from ....names import non_local_name
from ..protocol import DEFAULT_MAX_MESSAGE, GROUP_LEASE, BadRequest, count, encode, number, text
from .state import HubState, Job, payload_frame

__all__ = ["GroupCommands"]


class GroupCommands(HubState):
    """The commands on groups: gadd, gdiscard, gmembers, gsend, gwatch, gack, and flush."""

    def _group_add(self, client: bytes, rid: int, args: list[Any], frames: list[bytes]) -> None:
        group, channel, until = text(args[0]), text(args[1]), number(args[2])
        self.groups.setdefault(group, {})[channel] = until
        self._changed([group], Job(client, rid, "ok"))

    def _group_discard(self, client: bytes, rid: int, args: list[Any], frames: list[bytes]) -> None:
        group, channel = text(args[0]), text(args[1])
        members = self.groups.get(group)
        if members is not None:
            members.pop(channel, None)
            if not members:
                del self.groups[group]
        self._changed([group], Job(client, rid, "ok"))

    def _group_watch(self, client: bytes, rid: int, args: list[Any], frames: list[bytes]) -> None:
        # The members of a group living in at most ``most`` queues (normal channels and
        # process inboxes: one send each) and numbering at most ``most_members``, with
        # their expiry times, and a lease: until it ends, or the client acknowledges an
        # invalidation, no change to the group is answered (see _changed), so the client
        # may fan out on its own.
        group, most, most_members = text(args[0]), count(args[1]), count(args[2])
        members = self.groups.get(group, {})
        current = time.time()
        live = [(channel, until) for channel, until in members.items() if until > current]
        if len(live) > most_members or len({non_local_name(c) for c, _ in live}) > most:
            self._reply(client, encode("ok", rid, None, 0))
            return
        self.watchers.setdefault(group, {})[client] = time.monotonic() + GROUP_LEASE
        self._reply(client, encode("ok", rid, live, GROUP_LEASE))

    def _group_ack(self, client: bytes, rid: int, args: list[Any], frames: list[bytes]) -> None:
        # A client dropped its copy of a group (``rid`` is the invalidation's id); no reply.
        entry = self._acks.get(rid)
        if entry is not None and entry[0] == client:
            del self._acks[rid]
            self._release(entry[1])

    def _changed(self, groups: Iterable[str], job: Job) -> None:
        """Answer ``job`` once every client holding a copy of ``groups`` has dropped it."""
        current = time.monotonic()
        for group in groups:
            for client, until in self.watchers.pop(group, {}).items():
                if until <= current:
                    continue
                invalidation = self._new_id()
                # Unreachable (gone) client: it cannot fan out any more either.
                if self._reply(client, encode("ginval", invalidation, group)):
                    job.waiting += 1
                    self._acks[invalidation] = (client, job, until)
        if not job.waiting:
            self._finish(job)

    def _release(self, job: Job) -> None:
        job.waiting -= 1
        if not job.waiting:
            self._finish(job)

    def _lapse_acks(self, current: float) -> None:
        """Stop waiting for clients whose lease has ended: they no longer use their copy."""
        for invalidation in [i for i, (_, _, until) in self._acks.items() if until <= current]:
            self._release(self._acks.pop(invalidation)[1])

    def _group_members(self, client: bytes, rid: int, args: list[Any], frames: list[bytes]) -> None:
        self._reply(client, encode("ok", rid, self._members(text(args[0]), time.time())))

    def _group_send(self, client: bytes, rid: int, args: list[Any], frames: list[bytes]) -> None:
        # Capacity overrides are keyed by queue: a normal member, or a process inbox.
        group, prefix, default = text(args[0]), text(args[1]), count(args[2])
        overrides = args[3] or {}
        if not isinstance(overrides, dict):
            raise BadRequest("capacity overrides must be a map")
        payload = payload_frame(frames, 1)
        job = Job(client, rid, "gsend")
        current = time.time()
        # Envelopes carry the time the caller sent (nodes older than that field: now), so a
        # member its layer discarded after group_send returned gets none of this message.
        sent_at = number(args[4]) if len(args) > 4 else current
        members = self.groups.get(group, {})
        inboxes, normal = split(
            (channel, until) for channel, until in members.items() if until > current
        )
        job.live = len(normal) + sum(len(local) for local in inboxes.values())
        for member, _until in normal:
            capacity = overrides.get(member, default)
            if not self._enqueue(f"{prefix}:{member}", member, payload, capacity):
                job.full.append(member)
        # One envelope per process inbox, whatever its number of members: the inbox's
        # capacity counts it once, and the owner's layer hands it to each member.
        name = group[len(prefix) + 1 :]
        for inbox, local in inboxes.items():
            key = f"{prefix}:{inbox}"
            capacity = overrides.get(inbox, default)
            data = seal(payload, name, sent_at, inbox, local)
            if len(data) <= DEFAULT_MAX_MESSAGE:
                channels = [inbox]
                job.named[inbox] = [member for member, _until in local]
            else:
                # Naming this many members beside a payload this large makes a frame no
                # node takes: each member gets its own copy, counted each, as before.
                channels = [member for member, _until in local]
                data = payload
            owner = self.directory.get(key)
            if owner is not None:
                self._forward(job, owner, [(key, channel, capacity) for channel in channels], data)
                continue
            for channel in channels:
                if not self._enqueue(key, channel, data, capacity):
                    job.full.append(channel)
        if not job.waiting:
            self._finish(job)

    def _flush(self, client: bytes, rid: int, args: list[Any], frames: list[bytes]) -> None:
        start = text(args[0]) + ":"
        for key in [k for k in self.queues if k.startswith(start)]:
            del self.queues[key]
        for key in [k for k in self.groups if k.startswith(start)]:
            del self.groups[key]
        job = Job(client, rid, "flush")
        owners = {o.endpoint: o for k, o in self.directory.items() if k.startswith(start)}
        for owner in owners.values():
            forward_id = self._new_id()
            frames = [encode("flush", forward_id, start)]
            self._send_owner(job, owner, forward_id, frames, [], b"", time.time())
        self._changed([g for g in self.watchers if g.startswith(start)], job)
