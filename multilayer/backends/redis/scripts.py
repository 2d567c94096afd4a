"""The Lua scripts that make each Redis operation one atomic round trip.

Every queue element is ``suffix \\n payload``: the channel-name suffix after ``!`` (empty
for a normal channel and for a group envelope) and the payload, which starts with its
8-byte big-endian deadline, so a script can drop expired messages without decoding them.
Scripts are sent by SHA1. A send or group operation sends its script's source instead
(``EVAL``) until its connection ran it, and again after the server forgot it (NOSCRIPT);
a receiver's take is loaded again (``SCRIPT LOAD``) when the server answers NOSCRIPT.

Key layout (``P`` is the layer prefix; docs/backends/redis.md gives memory costs):
``P:q:QUEUE`` list of messages of a normal channel or process inbox (a group envelope,
see :mod:`multilayer.fanout`, has an empty suffix); ``P:g:GROUP`` sorted set of member
channels scored by membership deadline, kept on the shard of each member;
``P:f:CONSUMER:QUEUE`` and ``P:l1:``/``P:l2:CONSUMER:QUEUE`` the in-flight and landing
lists of one receiving backend instance; ``P:m:TOKEN`` a layer's membership marker;
``P:q:QUEUE#r`` hash of the places senders reserved in the queue (see ``PUSH``).
"""

from __future__ import annotations

import hashlib

__all__ = [
    "CHECK_MARK",
    "GROUP_ADD",
    "GROUP_SEND",
    "GROUP_SEND_NODE",
    "PUSH",
    "RECOVER",
    "RESTORE",
    "SCRIPTS",
    "TAKE",
    "Script",
    "ttl_ms",
]

#: Extra lifetime of keys beyond the deadline of what they hold, for clock skew.
_GRACE_MS = 1000


class Script:
    """A Lua script, sent by SHA1 once the server has it (see the module's docstring)."""

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


# Elements are ``suffix \n payload``; payloads start with the 8-byte big-endian deadline.
# Every ``redis.call`` costs a script a microsecond or more: the common paths make few.
_LUA_HELPERS = """
-- A malformed element (another client's write) counts as live: Python logs and drops it.
local function expired(element, now)
  local at = string.find(element, '\\n', 1, true)
  if not at or #element < at + 8 then return false end
  return struct.unpack('>d', element, at + 1) <= now
end
local function keep_alive(key, ttl)
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end
-- Drops the expired messages at the head of a queue (deadlines grow along a queue, so
-- that is where they are) and returns its new length.
local function trim_expired(key, now)
  while true do
    local head = redis.call('LINDEX', key, 0)
    if not head or not expired(head, now) then break end
    redis.call('LPOP', key)
  end
  return redis.call('LLEN', key)
end
-- The server's clock in milliseconds: what the ends of reserved places are counted in.
local function server_ms()
  local time = redis.call('TIME')
  return time[1] * 1000 + math.floor(time[2] / 1000)
end
-- The places senders reserved in the queue at ``key`` and have not used (see PUSH): a
-- hash next to it, ``units end_ms`` per sender. Those past their end (the server's
-- clock) are dropped, and so are ``holder``'s: its push is not on a place, so it asks
-- for new ones or gives them up. A cluster's keys (hash-tagged) have none, and are not
-- asked: a key that a migrating slot no longer holds would fail the script halfway.
local function reserved(key, holder)
  if string.find(key, '{', 1, true) then return 0 end
  local places = key .. '#r'
  if redis.call('EXISTS', places) == 0 then return 0 end
  local now_ms = server_ms()
  local entries = redis.call('HGETALL', places)
  local total = 0
  for i = 1, #entries, 2 do
    local units, ends = string.match(entries[i + 1], '^(%d+) (%d+)$')
    if not units or tonumber(ends) <= now_ms or entries[i] == holder then
      redis.call('HDEL', places, entries[i])
    else
      total = total + tonumber(units)
    end
  end
  return total
end
-- Appended first and taken back if the queue is over capacity (places reserved count as
-- taken) once its expired head is dropped (the new element, at the tail, is live): two
-- calls when there is room and no reservation, and nothing else runs meanwhile, so
-- nobody sees the queue over capacity. A new list (one element) has no lifetime yet: it
-- gets this one without asking. Returns 0 when full, else 1 + the places left free;
-- then the places others reserved.
local function push(key, element, capacity, now, ttl, holder)
  local length = redis.call('RPUSH', key, element)
  local others = reserved(key, holder)
  local taken = length + others
  if taken > capacity then
    taken = trim_expired(key, now) + others
    if taken > capacity then
      redis.call('RPOP', key)
      return 0
    end
  end
  if length == 1 then redis.call('PEXPIRE', key, ttl) else keep_alive(key, ttl) end
  return 1 + capacity - taken, others
end
"""

# For the scripts that take from a queue.
_LUA_HELD = """
local function requeue(key, elements, ttl)
  if #elements == 0 then return end
  for i = #elements, 1, -1 do redis.call('LPUSH', key, elements[i]) end
  keep_alive(key, ttl)
end
-- What a consumer holds but has not handed out: an in-flight batch whose reply was lost
-- (its marker is not the last confirmed one) and messages in its landing lists, except
-- in the one (numbered ``delivered``, 0 for none) whose message was handed out. With
-- ``quick`` the consumer read every reply and was handed out every landed message: it
-- holds nothing, and the lists are only deleted.
local function held(inflight, confirmed, landings, delivered, quick)
  local found = {}
  if not quick then
    local flight = redis.call('LRANGE', inflight, 0, -1)
    if #flight > 0 and flight[1] ~= confirmed then
      for i = 2, #flight do found[#found + 1] = flight[i] end
    end
    for index, landing in ipairs(landings) do
      if index ~= delivered then
        for _, element in ipairs(redis.call('LRANGE', landing, 0, -1)) do
          found[#found + 1] = element
        end
      end
    end
  end
  redis.call('DEL', inflight, unpack(landings))
  return found
end
"""

# KEYS: queue. ARGV: element, capacity, now, ttl_ms, sender (a backend instance's
# token), places (how many to reserve; -1: this push uses one reserved before), lease_ms.
# Returns 0 when full, else 1 + the places reserved for the sender, for lease_ms: none
# on its first ask within lease_ms (a sender that pushes once, as a backend per event
# loop does, sets nothing aside), and never so many that all senders' places exceed
# half the room free of stored messages. Until used or past their end, reserved places
# count as taken for everyone else, so the sender's next pushes, which use them, cannot
# be refused, and it may go on before they are answered; another sender is refused
# only once at least half the queue holds messages. A push whose places are gone
# (flushed, or dropped after their end) is checked like any other.
PUSH = Script(
    "push",
    _LUA_HELPERS
    + """
local key, element, capacity = KEYS[1], ARGV[1], tonumber(ARGV[2])
local now, ttl, sender, wanted = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local places = key .. '#r'
local entry = redis.call('HGET', places, sender)
local units, ends = string.match(entry or '', '^(%d+) (%d+)$')
if wanted < 0 then
  if units and units ~= '0' then
    -- Counted as taken by everyone since it was reserved, even past its end: it is
    -- used, not checked.
    if units == '1' then
      redis.call('HDEL', places, sender)
    else
      redis.call('HSET', places, sender, (tonumber(units) - 1) .. ' ' .. ends)
    end
    if redis.call('RPUSH', key, element) == 1 then
      redis.call('PEXPIRE', key, ttl)
    else
      keep_alive(key, ttl)
    end
    return 1
  end
  wanted = 0
end
-- A push not on a place replaces the sender's places (with none unless it asks): it
-- asks once it used them, and a push that does not ask gives them up. An entry of 0
-- places says that the sender asked within lease_ms.
local room, others = push(key, element, capacity, now, ttl, sender)
if room == 0 or wanted < 1 then return room > 0 and 1 or 0 end
local lease = tonumber(ARGV[7])
local now_ms = server_ms()
local granted = 0
if ends and tonumber(ends) > now_ms then
  granted = math.max(0, math.min(wanted, math.floor((room - 1 + others) / 2) - others))
end
redis.call('HSET', places, sender, granted .. ' ' .. string.format('%d', now_ms + lease))
keep_alive(places, lease)
return 1 + granted
""",
)

# KEYS: queue, inflight, landing 1, landing 2. ARGV: now, limit, confirmed marker, new
# marker, delivered landing (0, 1 or 2), ttl_ms, collect (1: look for what is held; 0:
# the consumer knows it holds nothing). Takes up to ``limit`` live messages, oldest
# first, records them as the new in-flight batch and returns them as one string of
# (4-byte length, element) pairs: far cheaper to parse than a RESP array.
TAKE = Script(
    "take",
    _LUA_HELPERS
    + _LUA_HELD
    + """
local now, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
local found = held(KEYS[2], ARGV[3], {KEYS[3], KEYS[4]}, tonumber(ARGV[5]), ARGV[7] == '0')
for _, element in ipairs(found) do
  if not expired(element, now) then out[#out + 1] = element end
end
if #out > limit then
  local extra = {}
  for i = limit + 1, #out do extra[#extra + 1] = out[i]; out[i] = nil end
  requeue(KEYS[1], extra, tonumber(ARGV[6]))
end
while #out < limit do
  local want = limit - #out
  local batch = redis.call('LPOP', KEYS[1], want)
  if not batch then break end
  for _, element in ipairs(batch) do
    if not expired(element, now) then out[#out + 1] = element end
  end
  if #batch < want then break end
end
if #out == 0 then return '' end
redis.call('RPUSH', KEYS[2], ARGV[4], unpack(out))
redis.call('PEXPIRE', KEYS[2], ARGV[6])
local framed = {}
for _, element in ipairs(out) do
  framed[#framed + 1] = struct.pack('>I4', #element)
  framed[#framed + 1] = element
end
return table.concat(framed)
""",
)

# KEYS: queue, inflight, landing 1, landing 2. ARGV: confirmed marker, delivered landing,
# ttl_ms. Puts what the consumer held back at the head of the queue; returns how many.
RECOVER = Script(
    "recover",
    _LUA_HELPERS
    + _LUA_HELD
    + """
local found = held(KEYS[2], ARGV[1], {KEYS[3], KEYS[4]}, tonumber(ARGV[2]), false)
requeue(KEYS[1], found, tonumber(ARGV[3]))
return #found
""",
)

# KEYS: group. ARGV: channel, deadline, ttl_ms, now. Also drops expired memberships, so
# that a group added to but never sent to stays small.
GROUP_ADD = Script(
    "group_add",
    _LUA_HELPERS
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[4])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
keep_alive(KEYS[1], tonumber(ARGV[3]))
return 1
""",
)

_LUA_GROUP = """
-- msgpack heads: the type byte (and length) in front of an array or a string.
local function array_head(n)
  if n < 16 then return string.char(0x90 + n) end
  if n < 65536 then return struct.pack('>BI2', 0xdc, n) end
  return struct.pack('>BI4', 0xdd, n)
end
local function str_head(n)
  if n < 32 then return string.char(0xa0 + n) end
  if n < 256 then return string.char(0xd9, n) end
  if n < 65536 then return struct.pack('>BI2', 0xda, n) end
  return struct.pack('>BI4', 0xdb, n)
end

-- The live members of the group kept at ``key``, read without writing anything: nil and
-- the error if the key is not on this node (a cluster's slot moving). A membership that
-- outlives the message is sent as lasting forever (msgpack inf): the copy expires first,
-- so the receiver's check cannot tell the difference, and reading, formatting and
-- packing a score per member was most of this script's time. Only the memberships ending sooner
-- carry their deadline. The expired ones are read with those, and noted (``stale``) for
-- ``deliver`` to drop; the caller has dropped them first when the message itself is
-- past its deadline (then they would be read with the others).
local function read_members(key, now, expires)
  local soon = redis.pcall('ZRANGEBYSCORE', key, '-inf', '(' .. expires, 'WITHSCORES')
  if soon.err then return nil, soon.err end
  local later = redis.pcall('ZRANGEBYSCORE', key, expires, '+inf')
  if later.err then return nil, later.err end
  local live = {}
  for i = 1, #soon, 2 do
    if tonumber(soon[i + 1]) > now then
      live[#live + 1] = soon[i]
      live[#live + 1] = soon[i + 1]
    end
  end
  return {key = key, soon = live, later = later, stale = #live < #soon}
end

-- On a cluster, while a slot migrates, a member queue may already be on the other
-- node, and touching it fails the script where it stands: every queue is touched
-- before anything is written, so a send is whole or not at all (and then tried again).
-- False if a queue of ``members`` is not on this node.
local function local_queues(members, prefix, probed)
  local function here(member)
    local bang = string.find(member, '!', 1, true)
    local key = prefix .. (bang and string.sub(member, 1, bang) or member)
    if not probed[key] then
      probed[key] = true
      if type(redis.pcall('EXISTS', key)) == 'table' then return false end
    end
    return true
  end
  for i = 1, #members.soon, 2 do
    if not here(members.soon[i]) then return false end
  end
  for _, member in ipairs(members.later) do
    if not here(member) then return false end
  end
  return true
end

-- Delivers ``payload`` to ``members`` (read by read_members), whose queues are named
-- ``prefix .. queue``: one envelope per inbox, a copy per normal channel. Appends the
-- members skipped because they were full to ``full``.
local function deliver(members, prefix, payload, group, now, ttl, uniform, capacities, full)
  if members.stale then redis.call('ZREMRANGEBYSCORE', members.key, '-inf', now) end
  local inboxes, order = {}, {}
  -- Files a member under its inbox, with its packed deadline; a normal member gets its
  -- copy.
  local function add(member, deadline)
    local bang = string.find(member, '!', 1, true)
    local queue = bang and string.sub(member, 1, bang) or member
    local capacity = uniform or capacities[queue]
    if capacity and not bang then
      if push(prefix .. queue, '\\n' .. payload, capacity, now, ttl) == 0 then
        full[#full + 1] = member
      end
    elseif capacity then
      local inbox = inboxes[queue]
      if not inbox then
        inbox = {capacity = capacity, names = {}, deadlines = {}}
        inboxes[queue] = inbox
        order[#order + 1] = queue
      end
      local suffix, names = string.sub(member, bang + 1), inbox.names
      names[#names + 1] = str_head(#suffix)
      names[#names + 1] = suffix
      inbox.deadlines[#inbox.deadlines + 1] = deadline
    end
  end
  local soon = members.soon
  for i = 1, #soon, 2 do add(soon[i], struct.pack('>Bd', 0xcb, soon[i + 1])) end
  local forever = struct.pack('>Bd', 0xcb, math.huge)
  for _, member in ipairs(members.later) do add(member, forever) end
  local body = string.sub(payload, 9)
  local head = array_head(4) .. str_head(#group) .. group .. struct.pack('>Bd', 0xcb, now)
  for _, queue in ipairs(order) do
    local inbox = inboxes[queue]
    local count = #inbox.deadlines
    local header = table.concat({head, array_head(count), table.concat(inbox.names),
      array_head(count), table.concat(inbox.deadlines)})
    local element = table.concat({'\\n', string.sub(payload, 1, 8), string.char(0xc1),
      struct.pack('>I4', #header), header, body})
    if push(prefix .. queue, element, inbox.capacity, now, ttl) == 0 then
      for i = 2, #inbox.names, 2 do full[#full + 1] = queue .. inbox.names[i] end
    end
  end
end
"""

# KEYS: group. ARGV: now, payload, ttl_ms, queue key prefix, group name, the payload's
# deadline, capacity, then (with capacity '') queue/capacity pairs for a non-uniform
# capacity policy; a member whose queue is not among them joined after they were
# computed, and is left out as if it had joined after this send. Returns the members
# skipped because they were full; TRYAGAIN, having sent nothing, when a member queue is
# on another node mid-migration (a cluster).
#
# The process-specific members of one inbox get one envelope between them (the format of
# multilayer.fanout), counted once against the inbox's capacity; a normal member gets its
# own copy. The header is packed here as msgpack-python packs it, so that an envelope is
# byte for byte what fanout.seal makes: cmsgpack would pack a whole-number deadline as an
# integer and a float that fits as float32, which decode alike but are not the same bytes.
GROUP_SEND = Script(
    "group_send",
    # Most buckets of a cluster hold no member of a given group: they answer before the
    # helpers are even defined.
    "if redis.call('EXISTS', KEYS[1]) == 0 then return {} end\n"
    + _LUA_HELPERS
    + _LUA_GROUP
    + """
local now, payload, ttl = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local prefix, group, expires, uniform = ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7])
local capacities = {}
for i = 8, #ARGV, 2 do capacities[ARGV[i]] = tonumber(ARGV[i + 1]) end
if tonumber(expires) <= now then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now) end
local members, err = read_members(KEYS[1], now, expires)
if not members then return redis.error_reply(err) end
-- On a cluster its keys carry a hash tag.
if string.find(prefix, '{', 1, true) and not local_queues(members, prefix, {}) then
  return redis.error_reply('TRYAGAIN queue migrating')
end
local full = {}
deliver(members, prefix, payload, group, now, ttl, uniform, capacities, full)
return full
""",
)

# A cluster's group_send to every bucket one master holds, in one script: no KEYS. ARGV:
# now, payload, ttl_ms, group name, the payload's deadline (later than now), capacity
# (uniform), then a group key and queue key prefix per bucket. The keys of several slots
# are reached as the flag allows, and only those of this node: every group key and member
# queue is read before anything is written, and if one is elsewhere (a stale topology, a
# slot migrating) the script answers TRYAGAIN having written nothing, and the sender runs
# GROUP_SEND per bucket instead, which follows redirects. Returns the members skipped
# because they were full. Needs Redis 7.0 (script flags).
GROUP_SEND_NODE = Script(
    "group_send (one node)",
    "#!lua flags=allow-cross-slot-keys\n"
    + _LUA_HELPERS
    + _LUA_GROUP
    + """
local now, payload, ttl = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local group, expires, uniform = ARGV[4], ARGV[5], tonumber(ARGV[6])
local found, probed = {}, {}
for i = 7, #ARGV, 2 do
  local exists = redis.pcall('EXISTS', ARGV[i])
  if type(exists) == 'table' then return redis.error_reply('TRYAGAIN bucket elsewhere') end
  if exists == 1 then
    local members = read_members(ARGV[i], now, expires)
    if not members or not local_queues(members, ARGV[i + 1], probed) then
      return redis.error_reply('TRYAGAIN bucket elsewhere')
    end
    found[#found + 1] = {members, ARGV[i + 1]}
  end
end
local full = {}
for _, bucket in ipairs(found) do
  deliver(bucket[1], bucket[2], payload, group, now, ttl, uniform, {}, full)
end
return full
""",
)

# KEYS: group. ARGV: now, then channel, deadline, ttl_ms for each membership to restore.
# ZADD GT: a deadline another process renewed meanwhile is never shortened, and the key's
# lifetime only grows, as in group_add.
RESTORE = Script(
    "restore",
    _LUA_HELPERS
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local longest = 1
for i = 2, #ARGV, 3 do
  redis.call('ZADD', KEYS[1], 'GT', ARGV[i + 1], ARGV[i])
  longest = math.max(longest, tonumber(ARGV[i + 2]))
end
keep_alive(KEYS[1], longest)
return 1
""",
)

# KEYS: a layer's membership marker. ARGV: ttl_ms. 0 when the marker is missing (the
# server lost what the layer wrote, or it was never written); else 1, and the marker
# lives at least ttl_ms more.
CHECK_MARK = Script(
    "check memberships",
    _LUA_HELPERS
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
keep_alive(KEYS[1], tonumber(ARGV[1]))
return 1
""",
)

SCRIPTS = {
    script.sha: script
    for script in (PUSH, TAKE, RECOVER, GROUP_ADD, GROUP_SEND, GROUP_SEND_NODE, RESTORE, CHECK_MARK)
}


def ttl_ms(deadline: float, current: float) -> int:
    """The lifetime (ms) of a key holding something until ``deadline``, seen at ``current``;
    a second longer, for clock skew between processes."""
    return max(1, int((deadline - current) * 1000)) + _GRACE_MS
