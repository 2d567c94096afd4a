"""RabbitMQ backend: ``amqp://`` and ``amqps://``, on pika's asyncio connection adapter.

``amqp://[user[:password]@]host[:port][,host...][/vhost][?option=value...]``; options,
and the long explanations, in docs/backends/rabbitmq.md.

The design in a screenful (every name below is under ``<prefix>:``):

* Normal channels are queues ``<prefix>:<channel>``; all process-specific channels of a
  process share its inbox queue ``<prefix>:<name>!``, each message carrying its full
  channel name in the AMQP ``type``. Expiry, capacity (``x-max-length`` with
  reject-publish) and idle expiry are queue arguments: no plugin, no policy.
* **Sends** (:mod:`.backend` ``push``, :mod:`.publisher`): one publish on the
  confirm-mode channel, waiting for the confirm; a negative one is ChannelFull. A send to
  a process inbox does not wait while the inbox has room this process knows is free
  (:mod:`.credit`: counted by a passive declare, exact for one sender). With
  ``queue_type=quorum`` a normal channel is a quorum queue, whose capacity a classic
  gate queue keeps exact (:mod:`.gates`).
* **Receives** (:mod:`.consumer`): a consumer per queue, running only while pops want
  messages, acknowledging what pop handed out; an inbox's in batches, redeliveries
  recognised by ``message_id``.
* **Groups** (:mod:`.groups`): bindings on the direct exchange ``<prefix>::groups``, so a
  ``group_send`` is one publish. An inbox is bound once per group and its process keeps
  the member list (changes made elsewhere arrive as control messages in the inbox); a
  normal channel joins through a membership queue dead-lettering into its queue.
* **Topology and the catalog** (:mod:`.topology`): every queue's declaration and
  arguments; the catalog queue ``<prefix>::catalog`` lists the queues (AMQP cannot), so
  ``flush()`` deletes them and only them.
* **Reconnects** (:mod:`.connection`): :class:`~.connection.Link` keeps one connection,
  made again with backoff after it drops (several hosts tried in order); the backend
  then re-declares its inboxes and re-binds its memberships.
* **Speed** (:mod:`.frames`): the frames of every message are encoded and decoded there,
  beside pika's private transport; the only module touching pika's private parts.
"""

from __future__ import annotations

from .backend import RabbitMQBackend

__all__ = ["RabbitMQBackend"]
