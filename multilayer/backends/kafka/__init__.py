"""Kafka backend: channels as a replicated state machine over one Kafka topic per prefix.

Each layer prefix owns one single-partition topic, the *operation log*
``multilayer.<prefix>``. Every send, receive claim, group change and flush is an
operation in it, and every process replays the log through the same deterministic state
machine, so the log order decides capacity, which receiver gets a message of a normal
channel, group membership and flush: no consumer groups, no rebalances. One process
shares one connection per log among all its event loops (kafka-python is threaded).

Where things live:

* :mod:`.backend`: :class:`KafkaBackend`, the contract's entry points. **Sends**
  (``push``) go out without a round trip while this process sees room, else wait for the
  log's verdict; **receives** take straight from this process's replayed inbox
  (``_pop_inbox``) or file a *claim* for a normal channel (``_pop_shared``), renewed
  every ``claim_lease``/3 (the *lease*) while the receive waits; **groups** are
  ``group_add``/``group_discard`` records, and ``group_send`` is one record the replay
  fans out (:mod:`multilayer.fanout`).
* :mod:`.log`: the operations (codes, shapes, decoding) and :class:`~.log.Machine`, the
  state every process computes alike (queues, claims, groups, capacity).
* :mod:`.view`: this process's :class:`~.view.View` of that state, with who waits for
  what, messages its claims hold (prefetch), and sends not replayed yet.
* :mod:`.replay`: the thread reading the log into the view, from the newest snapshot.
  **Reconnects** are kafka-python's own; a log that came back empty (an in-memory
  broker restarted, a topic made again) is noticed there by a periodic check of its
  first record, the state starts over from the new log, and the hub has each layer
  re-assert its memberships.
* :mod:`.snapshot`: snapshots of the state in the compacted topic
  ``multilayer-state.<prefix>``, which a process joining starts from instead of the
  log's start, and when a process writes one.
* :mod:`.writer`: the thread packing operations into Kafka records for the producer.
* :mod:`.hub`: one process's :class:`~.hub.Hub` per log (view, writer, replay), shared
  through :class:`multilayer.toolkit.ProcessWide`.
* :mod:`.client`: kafka-python settings from the URL (SASL, TLS).

docs/backends/kafka.md explains the design, its costs and how it behaves on restarts.
"""

from .backend import KafkaBackend

__all__ = ["KafkaBackend"]
