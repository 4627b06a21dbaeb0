--[[
usage_increment.lua: count messages of one kind in one conversation, if the
quota allows.

KEYS[1]  the conversation: a hash of message kind -> count, expiring one
         period after its first counted message.
KEYS[2]  the user's index: a sorted set of character id -> the time (ms,
         Redis's clock) the conversation's counters expire. ListUsage reads
         it instead of scanning the keyspace.
         Both keys share the user's hash tag, so the script runs on one
         Cluster slot.

ARGV[1]  kind          the message kind (a hash field)
ARGV[2]  amount        messages to count (>= 1)
ARGV[3]  limit         the quota for the kind, or -1 for unlimited
ARGV[4]  period_ms     how long counters live after the first message (>= 1)
ARGV[5]  character_id  the index member (raw; only the keys are encoded)

Returns {allowed, used, resets_after_ms}: allowed is 0 or 1, used is the
kind's count after this call, resets_after_ms the conversation's PTTL (0 if
it has no counters).

Semantics (the memory store implements the same; keep them in step):
- used = HGET kind, or 0.
- limit >= 0 and used + amount > limit: denied; nothing is written.
- Otherwise HINCRBY kind amount. A conversation without a TTL is new: it
  expires in period_ms, and the index gains (character_id, now_ms +
  period_ms) and is kept alive at least period_ms (it must outlive its
  newest conversation; PEXPIRE only ever extends it, should the period be
  shortened by a config change). Whenever the index gains an entry, entries
  already expired leave it, which keeps it bounded by the user's live
  conversations.

Worked example: limit 3, period 1 day, empty conversation. amount 2:
{1, 2, 86400000}; amount 1 a second later: {1, 3, 86399000}; amount 1 again:
{0, 3, 86399000}. With limit -1 every call is counted.
]]

assert(#KEYS == 2, 'usage_increment.lua: expected 2 KEYS (conversation, index), got ' .. #KEYS)
assert(#ARGV == 5, 'usage_increment.lua: expected 5 ARGV (kind, amount, limit, period_ms, character_id), got ' .. #ARGV)

local conversation_key, index_key = KEYS[1], KEYS[2]
local kind = ARGV[1]
local amount = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local period = tonumber(ARGV[4])
local character_id = ARGV[5]
assert(amount and amount >= 1 and amount == math.floor(amount), 'usage_increment.lua: amount must be a positive integer')
assert(limit and limit >= -1 and limit == math.floor(limit), 'usage_increment.lua: limit must be an integer >= -1')
assert(period and period >= 1 and period == math.floor(period), 'usage_increment.lua: period_ms must be a positive integer')

-- Lua numbers are doubles and print as 1.7e+12 past 14 digits; every number
-- sent to Redis goes through int() so it is an exact integer string.
local function int(x)
  return string.format('%d', x)
end

local used = tonumber(redis.call('HGET', conversation_key, kind)) or 0
if limit >= 0 and used + amount > limit then
  return {0, used, math.max(redis.call('PTTL', conversation_key), 0)}
end

used = redis.call('HINCRBY', conversation_key, kind, int(amount))
local resets_after = redis.call('PTTL', conversation_key)
if resets_after < 0 then
  local time = redis.call('TIME')
  local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  redis.call('PEXPIRE', conversation_key, int(period))
  redis.call('ZREMRANGEBYSCORE', index_key, '-inf', int(now_ms))
  redis.call('ZADD', index_key, int(now_ms + period), character_id)
  if redis.call('PTTL', index_key) < period then
    redis.call('PEXPIRE', index_key, int(period))
  end
  resets_after = period
end
return {1, used, resets_after}
