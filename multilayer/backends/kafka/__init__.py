"""Kafka backend: channels as a replicated state machine over one partitioned Kafka topic
per prefix.

Each layer prefix owns one topic, the *operation log* ``multilayer.<prefix>``, of
``partitions`` partitions (8 by default). Every send, receive claim, group change and
flush is an operation in it. **Partition 0 is control** (group changes, inbox
assignments, near-capacity reports, verdicts, flush markers), which every process
replays; a **normal channel** lives in partition ``1 + crc32(name) % (partitions - 1)``;
each process's **inbox** gets the least-loaded partition, decided where its assignment
record lands in control. A process replays control plus the partitions it uses (lazily,
from that partition's snapshot), through the same deterministic state machine, so the
order within a partition decides capacity, which receiver gets a message and flush: no
consumer groups, no rebalances. Records of an inbox carry its name as Kafka key, and a
process skips other processes' inbox records without decoding them. A topic made with
one partition (older layers) keeps everything in partition 0. One process shares one
connection per log among all its event loops (kafka-python is threaded).

Where things live:

* :mod:`.backend`: :class:`KafkaBackend`, the contract's entry points. **Sends**
  (``push``) to a queue this process replays go out without a round trip while it sees
  room, else wait for the log's verdict; to another process's inbox, without a round trip
  unless its owner reported it near capacity, else as a *checked* send its owner answers
  (``_push_elsewhere``); **receives** take straight from this process's replayed inbox
  (``_pop_inbox``) or file a *claim* for a normal channel (``_pop_shared``), renewed
  every ``claim_lease``/3 (the *lease*) while the receive waits; **groups** are
  ``group_add``/``group_discard`` records in control, and ``group_send`` fences the
  control replay, then writes one envelope per member inbox (:mod:`multilayer.fanout`)
  and one checked send per normal member, in their partitions.
* :mod:`.log`: the operations (codes, shapes, decoding) and :class:`~.log.Machine`, the
  state every process computes alike (queues, claims, groups, capacity).
* :mod:`.view`: this process's :class:`~.view.View` of that state, with who waits for
  what, messages its claims hold (prefetch), and sends not replayed yet.
* :mod:`.replay`: the thread reading the partitions this process uses into the view,
  each from its newest snapshot, skipping other processes' inbox records by key.
  **Reconnects** are kafka-python's own; a log that came back empty (an in-memory
  broker restarted, a topic made again) is noticed there by a periodic check of its
  first record, the state starts over from the new log, and the hub has each layer
  re-assert its memberships.
* :mod:`.snapshot`: snapshots of each partition's state in the same partition of the
  compacted topic ``multilayer-state.<prefix>``, which a process starts a partition from
  instead of its start, and when a process writes one.
* :mod:`.writer`: the thread packing operations into Kafka records for the producer, one
  record per partition and key.
* :mod:`.hub`: one process's :class:`~.hub.Hub` per log (view, writer, replay, and the
  control fence of group sends), shared through :class:`multilayer.toolkit.ProcessWide`.
* :mod:`.client`: kafka-python settings from the URL (SASL, TLS).

docs/backends/kafka.md explains the design, its costs and how it behaves on restarts.
"""

from .backend import KafkaBackend

__all__ = ["KafkaBackend"]
