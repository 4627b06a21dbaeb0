--[[
usage_increment.lua: count messages of one kind in one conversation, if the
quota allows.

KEYS[1]  the conversation: a hash of message kind -> count, expiring one
         period after its first counted message.
KEYS[2]  the user's index: a sorted set of character id -> the time (ms,
         Redis's clock) the conversation's counters expire. ListUsage reads
         it instead of scanning the keyspace.
KEYS[3]  the same character ids, all scored 0, so that Redis keeps them in
         byte order and ListUsage reads the first ones by rank.
KEYS[4]  optional, with ARGV[6] = 1: the request's record, "<allowed>
         <used> <resets_after_ms> <amount>", expiring with the conversation
         (PX = its PTTL after this call); lua/usage_settle.lua reads it.
         All keys share the user's hash tag, so the script runs on one
         Cluster slot.

ARGV[1]  kind          the message kind (a hash field)
ARGV[2]  amount        messages to count (>= 1)
ARGV[3]  limit         the quota for the kind, or -1 for unlimited
ARGV[4]  period_ms     how long counters live after the first message (>= 1)
ARGV[5]  character_id  the index member (raw; only the keys are encoded)
ARGV[6]  record        optional; 1: KEYS[4] is the request's record

Returns {allowed, used, resets_after_ms}: allowed is 0 or 1, used is the
kind's count after this call, resets_after_ms the conversation's PTTL (0 if
it has no counters); with ARGV[6] = 1 a fourth, replayed (0 or 1).

Semantics (the memory store implements the same; keep them in step):
- With a record key: if the record exists, its answer is returned as first
  given, with replayed = 1, and nothing is written. Otherwise the answer
  below is remembered for as long as the conversation's counters live; a
  denial when the conversation has none (a quota of 0) is not remembered,
  as there is nothing for its record to live with (a retry is denied alike).
- used = HGET kind, or 0.
- limit >= 0 and used + amount > limit: denied; nothing is written.
- Otherwise HINCRBY kind amount. A conversation without a TTL is new: it
  expires in period_ms, both indexes gain character_id (the first scored
  now_ms + period_ms, the second 0) and are kept alive at least period_ms
  (they must outlive the newest conversation; PEXPIRE only ever extends
  them, should the period be shortened by a config change). Whenever they
  gain an entry, entries already expired leave both, which keeps them
  bounded by the user's live conversations.

Bounded work: a call that opens no conversation is O(1). One that opens one
is O(log n) in the user's live conversations, plus the removal of the ones
that expired since, each removed once: the conversations a caller opens
are paid for by the calls that opened them.

Worked example: limit 3, period 1 day, empty conversation. amount 2:
{1, 2, 86400000}; amount 1 a second later: {1, 3, 86399000}; amount 1 again:
{0, 3, 86399000}. With limit -1 every call is counted.
]]

local recorded = ARGV[6] == '1'
if not (#KEYS == (recorded and 4 or 3)) then error('usage_increment.lua: expected 3 KEYS (conversation, index, by id) and the record when ARGV[6] = 1, got ' .. #KEYS, 0) end
if not (#ARGV == 5 or #ARGV == 6) then error('usage_increment.lua: expected 5 or 6 ARGV (kind, amount, limit, period_ms, character_id[, record]), got ' .. #ARGV, 0) end

local conversation_key, index_key, by_id_key = KEYS[1], KEYS[2], KEYS[3]
local kind = ARGV[1]
-- Numbers by s + 0, not tonumber(), which runs strtod twice: an argument
-- that is not a number fails here, Lua's error naming its local.
local amount, limit, period = ARGV[2], ARGV[3], ARGV[4]
amount, limit, period = amount + 0, limit + 0, period + 0
local character_id = ARGV[5]
if not (amount >= 1 and amount % 1 == 0) then error('usage_increment.lua: amount must be a positive integer', 0) end
if not (limit >= -1 and limit % 1 == 0) then error('usage_increment.lua: limit must be an integer >= -1', 0) end
if not (period >= 1 and period % 1 == 0) then error('usage_increment.lua: period_ms must be a positive integer', 0) end

-- Lua numbers are doubles and print as 1.7e+12 past 14 digits; every number
-- sent to Redis goes through int() so it is an exact integer string.
local function int(x)
  return string.format('%d', x)
end

local record_key = KEYS[4]
if recorded then
  local seen = redis.call('GET', record_key)
  if seen then
    local a, u, r = string.match(seen, '^(%d+) (%d+) (%d+) ')
    if not (a) then error('usage_increment.lua: unexpected record in ' .. record_key, 0) end
    return {tonumber(a), tonumber(u), tonumber(r), 1}
  end
end

-- Returns the answer, remembering it first when the call has a record.
local function answer(allowed, used_after, resets_after)
  if not recorded then
    return {allowed, used_after, resets_after}
  end
  if resets_after > 0 then
    redis.call('SET', record_key,
      table.concat({int(allowed), int(used_after), int(resets_after), int(amount)}, ' '),
      'PX', int(resets_after))
  end
  return {allowed, used_after, resets_after, 0}
end

local stored = redis.call('HGET', conversation_key, kind)
local used = stored and stored + 0 or 0
if limit >= 0 and used + amount > limit then
  return answer(0, used, math.max(redis.call('PTTL', conversation_key), 0))
end

used = redis.call('HINCRBY', conversation_key, kind, int(amount))
local resets_after = redis.call('PTTL', conversation_key)
if resets_after < 0 then
  local time = redis.frozen_time or redis.call('TIME')
  local now_ms = time[1] * 1000 + math.floor(time[2] / 1000)
  redis.call('PEXPIRE', conversation_key, int(period))
  local expired = redis.call('ZRANGEBYSCORE', index_key, '-inf', int(now_ms))
  for i = 1, #expired, 1000 do
    redis.call('ZREM', by_id_key, unpack(expired, i, math.min(i + 999, #expired)))
  end
  redis.call('ZREMRANGEBYSCORE', index_key, '-inf', int(now_ms))
  redis.call('ZADD', index_key, int(now_ms + period), character_id)
  redis.call('ZADD', by_id_key, 0, character_id)
  for _, key in ipairs({index_key, by_id_key}) do
    if redis.call('PTTL', key) < period then
      redis.call('PEXPIRE', key, int(period))
    end
  end
  resets_after = period
end
return answer(1, used, resets_after)
