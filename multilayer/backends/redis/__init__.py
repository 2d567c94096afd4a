"""Redis backend: ``redis://``, ``rediss://`` (TLS), ``redis+sentinel://`` and Redis
Cluster (``redis+cluster://``, ``rediss+cluster://``).

Queues are Redis lists: a message waits for its receiver until it expires, and reaches
exactly one receiver in whichever process. Groups are sorted sets of member channels
scored by membership deadline. Every operation is one round trip: a Lua script checks
capacity, appends and renews the key TTL in one atomic step. Needs Redis 6.2 or newer.
docs/backends/redis.md has the URL forms, the options, the key layout and the figures.

Where things live:

* :mod:`.backend`: :class:`RedisBackend`, its options and URL checks; ``push`` (sends),
  ``group_add``/``group_discard``, ``group_send`` (one script per shard, run
  concurrently), ``broker_stats``, ``flush``; the guard task that closes connections
  whose reply is overdue.
* :mod:`.scripts`: the Lua scripts (push, take, recover, group add, group send, restore,
  membership marker). ``group_send`` seals one envelope (:mod:`multilayer.fanout`) per
  process inbox in Lua, counted once against its capacity.
* :mod:`.wire`: the Redis protocol on our own connections: commands packed, replies
  parsed straight from the stream (redis-py only makes the connections), error replies
  raised as redis-py's exceptions.
* :mod:`.shard`: :class:`~.shard.Shard`, one server (or Sentinel-managed master) and the
  making of connections, Sentinel discovery and the TLS options; :class:`~.shard.Link`,
  the one connection per server that carries every send of an event loop in pipelined
  batches. A connection that died while idle is replaced before a command is written;
  a command whose reply was lost is never retried (it may have run).
* :mod:`.receiver`: :class:`~.receiver.Receiver`, receives (``pop``): one blocking
  connection per queue, BLMOVE into landing lists or the take script into an in-flight
  list, so a reply lost to a dropped connection or a cancelled receive loses and doubles
  nothing. Receivers reconnect on their own, so they ride out restarts and failovers.
* :mod:`.ring`: sharding. Several ``redis://`` hosts, or several Sentinel services, are
  shards; a channel goes to the shard its name up to ``!`` hashes to, so a process's
  inbox and its memberships meet on one server.
* :mod:`.cluster`: Redis Cluster. Keys carry a hash tag naming one of a few fixed slots
  (buckets), so each script touches one slot; :class:`~.cluster.Cluster` learns the
  topology through redis-py's ``RedisCluster``, keeps one shard per master, and follows
  MOVED, ASK and TRYAGAIN; a ``group_send`` is one script per bucket, one write per master.
  Shards and buckets are both :class:`~.shard.Place`: where a queue's keys live.
* :mod:`.sentry`: the membership check. After a lost connection (every second or so
  until the server answers), a reconnect, a master change, and every ``membership_check``
  seconds, each layer checks its marker key on each server (each bucket on a cluster) and
  re-asserts the memberships a server lost, with their original deadlines.
"""

from .backend import RedisBackend

__all__ = ["RedisBackend"]
